//! `GET /metrics` of `model-tracer serve` on the real model: scraped by a
//! real Prometheus server (the Debian package `prometheus`) and read back
//! through its query API, and parsed by the Prometheus Python client
//! against the families features.md documents. Each test starts its
//! server, and Prometheus, on 127.0.0.1 and kills them at the end, also
//! when it fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use model_tracer_test_support::{python_with, require, scratch_dir};

mod serve_support;

use serve_support::{prerequisites, python, tests_dir, Server};

/// SmolLM2-135M's layers.
const LAYERS: usize = 30;

/// The (layer, stage) sites a `Lightweight` tracer records per forward of
/// the reference decoder, each one series of `model_tracer_activation_rms`:
/// the six stages of every layer (`input`, `post_norm`, `post_attn`,
/// `post_ffn_norm`, `post_ffn`, `output`) and the three outside a layer
/// (`embedding`, `final_norm`, `logits`).
const RMS_SERIES: usize = 6 * LAYERS + 3;

/// The Prometheus server binary: `command -v prometheus`.
fn prometheus_bin() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("prometheus"))
        .find(|p| p.is_file())
}

/// A free port of 127.0.0.1, as the system picks it (free when this
/// returns; another process may take it before it is used).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
    listener.local_addr().expect("a bound address").port()
}

/// A running Prometheus, killed when dropped.
struct Prometheus {
    child: Child,
    url: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts `bin` scraping `target` (`host:port`) every second, its
    /// configuration, data and log under `dir`, and waits (at most 60 s)
    /// for `/-/ready`; a free port taken meanwhile by another process is
    /// tried once more with another.
    fn start(bin: &Path, dir: &Path, target: &str) -> Prometheus {
        let config = dir.join("prometheus.yml");
        let yaml = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: model-tracer\n    metrics_path: /metrics\n    \
             static_configs:\n      - targets: ['{target}']\n"
        );
        std::fs::write(&config, yaml).expect("writing prometheus.yml");
        let mut last = String::new();
        for attempt in 0..2 {
            let port = free_port();
            let log = dir.join(format!("prometheus-{attempt}.log"));
            let log_file = std::fs::File::create(&log).expect("creating the log");
            let child = Command::new(bin)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join(format!("data-{attempt}")).display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log_file)
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
            let mut p = Prometheus {
                child,
                url: format!("http://127.0.0.1:{port}"),
            };
            if p.wait_ready(Duration::from_secs(60)) {
                return p;
            }
            last = std::fs::read_to_string(&log).unwrap_or_default();
        }
        panic!("Prometheus did not become ready; its log:\n{last}");
    }

    /// Whether `/-/ready` answers 200 within `limit`; `false` at once if
    /// the process exits (its port taken, say).
    fn wait_ready(&mut self, limit: Duration) -> bool {
        use std::io::{Read, Write};
        let addr = self.url.trim_start_matches("http://").to_string();
        let start = Instant::now();
        while start.elapsed() < limit {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return false;
            }
            let answer = std::net::TcpStream::connect(&addr).and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                s.write_all(
                    b"GET /-/ready HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
                )?;
                let mut text = String::new();
                s.read_to_string(&mut text)?;
                Ok(text)
            });
            if answer.is_ok_and(|t| t.starts_with("HTTP/1.1 200")) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    }
}

#[test]
fn prometheus_scrapes_the_corrupted_requests_and_the_serving_families() {
    let Some(model) = prerequisites() else { return };
    let bin = prometheus_bin();
    if !require(
        bin.is_some(),
        "the Prometheus server `prometheus` (apt-get install prometheus)",
    ) {
        return;
    }
    let Some(bin) = bin else { return };
    let dir = scratch_dir(env!("CARGO_TARGET_TMPDIR"), "serve-prometheus");
    let mut server = Server::start(&model, &["--inject", "nan@7"]);
    let sent = dir.join("sent.json");
    let sent_arg = sent.to_string_lossy().into_owned();
    let script = tests_dir().join("serve_metrics.py");
    python(
        &script,
        &[
            "requests",
            "--url",
            &server.url,
            "--requests",
            "3",
            "--out",
            &sent_arg,
        ],
        Duration::from_secs(300),
    );
    let target = server.url.trim_start_matches("http://").to_string();
    let prometheus = Prometheus::start(&bin, &dir, &target);
    python(
        &script,
        &[
            "prometheus",
            "--prometheus",
            &prometheus.url,
            "--sent",
            &sent_arg,
            "--origin-layer",
            "7",
            "--origin-stage",
            "post_attn",
            "--rms-series",
            &RMS_SERIES.to_string(),
            "--timeout",
            "60",
        ],
        Duration::from_secs(120),
    );
    server.assert_alive();
    drop(prometheus);
}

#[test]
fn the_metrics_text_parses_into_the_documented_families() {
    let Some(model) = prerequisites() else { return };
    if !require(
        python_with("prometheus_client").is_some(),
        "the prometheus_client Python package (pip install prometheus-client)",
    ) {
        return;
    }
    let mut server = Server::start(&model, &["--inject", "nan@7", "--full-every", "2"]);
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../features.md");
    let doc = doc.to_string_lossy().into_owned();
    python(
        &tests_dir().join("serve_metrics.py"),
        &[
            "parse",
            "--url",
            &server.url,
            "--doc",
            &doc,
            "--rms-series",
            &RMS_SERIES.to_string(),
        ],
        Duration::from_secs(300),
    );
    server.assert_alive();
}
