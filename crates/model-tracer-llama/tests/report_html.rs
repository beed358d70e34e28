//! The HTML report: escaping without a browser, then real rendering in
//! headless Chromium (synthetic model always, the real model when present).
#![cfg(feature = "serde")]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use model_tracer::{write_html, Full, ReportInput};
use model_tracer_llama::model::Llama;
use model_tracer_llama::report::report_input;

/// Token strings that would be live markup if they were not escaped.
const NASTY: [&str; 5] = [
    "<script>document.body.setAttribute('data-pwned','script')</script>",
    "<img src=x onerror=\"document.body.setAttribute('data-pwned','img')\">",
    "\"&'",
    "</script><b>bold</b><!--",
    "]]> \u{2028} \\u003c",
];

fn render(input: &ReportInput<'_>) -> String {
    let mut out = Vec::new();
    write_html(&mut out, input).unwrap();
    String::from_utf8(out).unwrap()
}

/// The tiny model under `Full`, with a NaN at position 9 of layer 1, a
/// 24-position cache (it evicts), and nasty strings among its tokens.
fn tiny_report_input(
    model: &mut Llama<Full>,
    tokens: &[u32],
) -> (BTreeMap<usize, String>, BTreeMap<u32, String>) {
    model.set_fault(Some(common::nan_at(1, 9)));
    common::run_tokens(model, tokens);
    let texts = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| match i % 4 {
            0 => (i, NASTY[(i / 4) % NASTY.len()].to_string()),
            _ => (i, format!("t{t}")),
        })
        .collect();
    let vocab = (0..512u32)
        .map(|id| (id, format!("{}#{id}", NASTY[id as usize % NASTY.len()])))
        .collect();
    (texts, vocab)
}

fn count(hay: &str, needle: &str) -> usize {
    hay.to_ascii_lowercase().matches(needle).count()
}

#[test]
fn token_text_cannot_become_markup() {
    let mut model = common::tiny_model(Full, 24);
    let tokens: Vec<u32> = (0..40).map(|i| (i * 29 + 3) % 512).collect();
    let (texts, vocab) = tiny_report_input(&mut model, &tokens);
    let mut input = report_input(&model, &tokens, "tiny <b>\"&'</b>");
    input.position_text = texts;
    input.token_text = vocab;
    let html = render(&input);
    // Exactly our two script elements, opened and closed once each.
    assert_eq!(
        count(&html, "<script"),
        2,
        "a token opened a script element"
    );
    assert_eq!(
        count(&html, "</script"),
        2,
        "a token closed a script element"
    );
    for live in ["<img", "<b>", "<!--", "onerror=\"", "\u{2028}"] {
        assert!(!html.contains(live), "{live:?} is in the page unescaped");
    }
    // The strings are there, as data.
    assert!(html.contains(r#"\u003cimg src=x onerror=\"document.body"#));
    assert!(html.contains(r#"\"\u0026'"#));
    assert!(html.contains("tiny &lt;b&gt;&quot;&amp;&#39;&lt;/b&gt;"));
    // Self-contained: nothing is loaded from anywhere.
    for fetch in ["http://", "https://", "src=\"", "<link", "@import", "url("] {
        if fetch == "http://" {
            // The SVG namespace is an identifier, not a fetch.
            assert_eq!(
                html.matches("http://").count(),
                html.matches("http://www.w3.org/2000/svg").count()
            );
            continue;
        }
        assert!(!html.contains(fetch), "the page references {fetch}");
    }
}

// ---- headless Chromium ----------------------------------------------------

use model_tracer_test_support::{chromium, run_chromium};

/// Decodes an 8-bit RGB or RGBA, non-interlaced PNG into RGB pixels.
fn decode_png(bytes: &[u8]) -> (usize, usize, Vec<[u8; 3]>) {
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    let (mut w, mut h, mut channels) = (0usize, 0usize, 0usize);
    let mut idat = Vec::new();
    let mut at = 8;
    while at + 8 <= bytes.len() {
        let len = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let kind = &bytes[at + 4..at + 8];
        let data = &bytes[at + 8..at + 8 + len];
        match kind {
            b"IHDR" => {
                w = u32::from_be_bytes(data[0..4].try_into().unwrap()) as usize;
                h = u32::from_be_bytes(data[4..8].try_into().unwrap()) as usize;
                assert_eq!(data[8], 8, "bit depth");
                channels = match data[9] {
                    2 => 3,
                    6 => 4,
                    t => panic!("colour type {t}"),
                };
                assert_eq!(data[12], 0, "interlaced");
            }
            b"IDAT" => idat.extend_from_slice(data),
            b"IEND" => break,
            _ => {}
        }
        at += 12 + len;
    }
    let raw = miniz_oxide::inflate::decompress_to_vec_zlib(&idat).unwrap();
    let stride = w * channels;
    assert_eq!(raw.len(), h * (stride + 1));
    let mut prev = vec![0u8; stride];
    let mut pixels = Vec::with_capacity(w * h);
    for row in raw.chunks_exact(stride + 1) {
        let (filter, line) = (row[0], &row[1..]);
        let mut cur = vec![0u8; stride];
        for i in 0..stride {
            let a = if i >= channels {
                cur[i - channels] as i16
            } else {
                0
            };
            let b = prev[i] as i16;
            let c = if i >= channels {
                prev[i - channels] as i16
            } else {
                0
            };
            let pred = match filter {
                0 => 0,
                1 => a,
                2 => b,
                3 => (a + b) / 2,
                4 => {
                    let p = a + b - c;
                    let (pa, pb, pc) = ((p - a).abs(), (p - b).abs(), (p - c).abs());
                    if pa <= pb && pa <= pc {
                        a
                    } else if pb <= pc {
                        b
                    } else {
                        c
                    }
                }
                f => panic!("filter {f}"),
            };
            cur[i] = line[i].wrapping_add(pred as u8);
        }
        pixels.extend(cur.chunks_exact(channels).map(|p| [p[0], p[1], p[2]]));
        prev = cur;
    }
    (w, h, pixels)
}

/// Opens `page` in Chromium: checks the script rendered all five sections
/// without error and that a screenshot is not blank; returns the DOM.
fn check_in_browser(bin: &Path, dir: &Path, page: &Path) -> String {
    let dom = run_chromium(bin, dir, page, &["--dump-dom".to_string()]);
    assert!(
        dom.contains("data-status=\"ok\""),
        "the page did not render: {}",
        dom.split("id=\"status\"")
            .nth(1)
            .unwrap_or("")
            .chars()
            .take(400)
            .collect::<String>()
    );
    let rendered = dom
        .split("data-rendered=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap();
    let counts: HashMap<&str, usize> = rendered
        .split(',')
        .filter_map(|kv| kv.split_once(':'))
        .map(|(k, v)| (k, v.parse().unwrap()))
        .collect();
    for section in ["activations", "attention", "lens", "quant", "kv"] {
        assert!(
            counts.get(section).copied().unwrap_or(0) > 0,
            "{section} is empty: {rendered}"
        );
    }
    // Token strings mention `data-pwned` as text; only markup that ran
    // would set it on <body>.
    let body_tag = dom
        .split("<body")
        .nth(1)
        .and_then(|s| s.split('>').next())
        .unwrap();
    assert!(
        !body_tag.contains("data-pwned"),
        "a token string ran as markup: {body_tag}"
    );
    assert!(!dom.contains("<img"), "a token string became an element");
    let png = dir.join("report.png");
    run_chromium(
        bin,
        dir,
        page,
        &[
            format!("--screenshot={}", png.display()),
            "--window-size=1400,1700".into(),
        ],
    );
    let (w, h, pixels) = decode_png(&std::fs::read(&png).unwrap());
    assert_eq!((w, h), (1400, 1700));
    let mut freq: HashMap<[u8; 3], usize> = HashMap::new();
    for p in &pixels {
        *freq.entry(*p).or_default() += 1;
    }
    let background = freq.values().copied().max().unwrap();
    let drawn = pixels.len() - background;
    eprintln!(
        "screenshot {}: {} colours, {:.1}% of pixels off the background",
        png.display(),
        freq.len(),
        100.0 * drawn as f64 / pixels.len() as f64
    );
    assert!(freq.len() > 100, "only {} colours: blank page?", freq.len());
    assert!(drawn * 10 > pixels.len(), "mostly background: blank page?");
    dom
}

#[test]
fn a_synthetic_report_renders_in_chromium() {
    let Some(bin) = chromium() else {
        common::require(false, "chromium (apt-get install chromium)");
        return;
    };
    let dir = common::scratch_dir("report-synthetic");
    let mut model = common::tiny_model(Full, 24);
    let tokens: Vec<u32> = (0..40).map(|i| (i * 29 + 3) % 512).collect();
    let (texts, vocab) = tiny_report_input(&mut model, &tokens);
    let mut input = report_input(&model, &tokens, "synthetic tiny");
    input.position_text = texts;
    input.token_text = vocab;
    let page = dir.join("report.html");
    std::fs::write(&page, render(&input)).unwrap();
    let dom = check_in_browser(&bin, &dir, &page);
    // The token strings are on the page as text.
    assert!(dom.contains("&lt;img src=x onerror="), "token text missing");
    // The NaN is marked, and so are the decisive layers and the worst brick.
    assert!(dom.contains("class=\"anomaly\""));
    assert!(dom.contains("NaN produced here"));
    assert!(dom.contains("class=\"decisive\""));
    assert!(dom.contains("class=\"sel worst\""));
}

#[test]
fn a_real_model_report_renders_in_chromium() {
    let Some(gguf) = common::real_model() else {
        return;
    };
    let Some(bin) = chromium() else {
        common::require(false, "chromium (apt-get install chromium)");
        return;
    };
    let dir = common::scratch_dir("report-real");
    let mut model = Llama::from_gguf(&gguf, None, Full).unwrap();
    let prompt = model
        .tokenizer
        .as_ref()
        .unwrap()
        .encode("The capital of France is");
    let generation = model.generate(&prompt, 3, |_| {});
    assert_eq!(generation.tokens[0], 7042, "\" Paris\"");
    let mut tokens = prompt.clone();
    tokens.extend(&generation.tokens);
    let input = report_input(&model, &tokens, "SmolLM2-135M-Instruct Q4_1");
    assert_eq!(input.model.layers, 30);
    let page = dir.join("report.html");
    std::fs::write(&page, render(&input)).unwrap();
    let dom = check_in_browser(&bin, &dir, &page);
    assert!(dom.contains(" Paris"), "the answer is not on the page");
    assert!(
        dom.contains("worst brick: "),
        "the worst brick is not named"
    );
}
