//! `model-tracer serve --otlp-endpoint` on the real model, against a real
//! OTLP/HTTP receiver (`otlp_receiver.py`: the `opentelemetry-proto`
//! package's protobuf classes behind `http.server`), which writes every
//! log record and span it decodes as a JSON line. Each test starts its own
//! receiver and server on 127.0.0.1 with port 0 and kills them at the end,
//! also when it fails.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use model_tracer_test_support::{python_with, real_model, require, scratch_dir};

const BIN: &str = env!("CARGO_BIN_EXE_model-tracer");

/// The Python module the receiver decodes with.
const PROTO: &str = "opentelemetry.proto.collector.logs.v1.logs_service_pb2";

/// A child process, killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads `stdout` on a thread of its own and sends the rest of the first
/// line that starts with `prefix`.
fn first_line_after(
    stdout: impl Read + Send + 'static,
    prefix: &'static str,
) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.strip_prefix(prefix) {
                let _ = tx.send(rest.to_string());
            }
        }
    });
    rx
}

/// The receiver and the file of what it decoded.
struct Receiver {
    _child: Killed,
    port: u16,
    out: PathBuf,
}

impl Receiver {
    fn start(name: &str) -> Receiver {
        let dir = scratch_dir(env!("CARGO_TARGET_TMPDIR"), name);
        let out = dir.join("records.jsonl");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/otlp_receiver.py");
        let mut child = Command::new("python3")
            .arg(&script)
            .arg("--out")
            .arg(&out)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("python3 {}: {e}", script.display()));
        let stdout = child.stdout.take().expect("piped stdout");
        let child = Killed(child);
        let port = first_line_after(stdout, "listening on ")
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("the receiver printed no `listening on` line in 30 s"));
        let port = port
            .parse()
            .unwrap_or_else(|e| panic!("port {port:?}: {e}"));
        Receiver {
            _child: child,
            port,
            out,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The records decoded so far (each line whole: the receiver flushes
    /// after each export).
    fn records(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits (at most `limit`) until `done` holds of the records.
    fn wait_for(&self, limit: Duration, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let start = Instant::now();
        loop {
            let records = self.records();
            if done(&records) {
                return records;
            }
            assert!(
                start.elapsed() < limit,
                "{what}: not received within {limit:?}; received {records:#?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A running server and the lines of its stderr.
struct Server {
    child: Killed,
    addr: String,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Starts `model-tracer serve --port 0` on `model` with `args`, and
    /// waits (at most two minutes) for its `listening on` line, then for
    /// `GET /health` to answer 200.
    fn start(model: &Path, args: &[&str]) -> Server {
        let mut child = Command::new(BIN)
            .arg("serve")
            .arg("--gguf")
            .arg(model)
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {BIN}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let child = Killed(child);
        let lines = Arc::new(Mutex::new(Vec::new()));
        let kept = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("server: {line}");
                kept.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        let url = first_line_after(stdout, "listening on http://")
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| panic!("the server printed no `listening on` line in 2 minutes"));
        assert!(url.starts_with("127.0.0.1:"), "{url}");
        let server = Server {
            child,
            addr: url,
            stderr: lines,
        };
        let start = Instant::now();
        while !server
            .get("/health")
            .is_ok_and(|t| t.starts_with("HTTP/1.1 200"))
        {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "/health did not answer 200 within 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    fn exchange(&self, request: &str) -> std::io::Result<String> {
        let mut s = TcpStream::connect(&self.addr)?;
        s.set_read_timeout(Some(Duration::from_secs(120)))?;
        s.write_all(request.as_bytes())?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text)
    }

    fn get(&self, path: &str) -> std::io::Result<String> {
        self.exchange(&format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        ))
    }

    /// POSTs `body` to `path` and returns the JSON of a 200 answer.
    fn post(&self, path: &str, body: &Value) -> Value {
        let body = body.to_string();
        let answer = self
            .exchange(&format!(
                "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ))
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        assert!(answer.starts_with("HTTP/1.1 200"), "POST {path}: {answer}");
        let (_, json) = answer
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("POST {path}: no body in {answer}"));
        serde_json::from_str(json).unwrap_or_else(|e| panic!("POST {path}: {e}: {json}"))
    }

    /// A chat completion and a completion; their responses.
    fn two_requests(&self) -> [Value; 2] {
        [
            self.post(
                "/v1/chat/completions",
                &json!({"messages": [{"role": "user", "content": "Name a colour."}],
                        "max_tokens": 4}),
            ),
            self.post(
                "/v1/completions",
                &json!({"prompt": "The capital of France is", "max_tokens": 4}),
            ),
        ]
    }

    fn stderr_has(&self, text: &str) -> bool {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|l| l.contains(text))
    }

    fn assert_alive(&mut self) {
        match self.child.0.try_wait() {
            Ok(None) => {}
            other => panic!("the server exited: {other:?}"),
        }
    }
}

/// The real model and the `opentelemetry-proto` package, or a skip (a
/// failure in CI).
fn prerequisites() -> Option<PathBuf> {
    let model = real_model()?;
    require(
        python_with(PROTO).is_some(),
        "the opentelemetry-proto Python package (pip install opentelemetry-proto)",
    )
    .then_some(model)
}

fn of_signal<'a>(records: &'a [Value], signal: &str) -> impl Iterator<Item = &'a Value> {
    let signal = signal.to_string();
    records
        .iter()
        .filter(move |r| r["signal"] == signal.as_str())
}

fn logs_of<'a>(records: &'a [Value], id: &str) -> Vec<&'a Value> {
    of_signal(records, "logs")
        .filter(|r| r["attributes"]["request_id"] == id)
        .collect()
}

fn span_of<'a>(records: &'a [Value], id: &str) -> Option<&'a Value> {
    of_signal(records, "traces")
        .find(|r| r["name"] == "completion" && r["attributes"]["request_id"] == id)
}

#[test]
fn an_injected_fault_reaches_the_collector_as_a_log_record_of_each_request() {
    let Some(model) = prerequisites() else { return };
    let receiver = Receiver::start("otlp-fault");
    let endpoint = receiver.endpoint();
    let mut server = Server::start(&model, &["--inject", "nan@7", "--otlp-endpoint", &endpoint]);
    let responses = server.two_requests();
    let ids: Vec<String> = responses
        .iter()
        .map(|r| r["id"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(
        ids[0].starts_with("chatcmpl-") && ids[1].starts_with("cmpl-"),
        "{ids:?}"
    );
    let records = receiver.wait_for(
        Duration::from_secs(30),
        "both requests' records and spans",
        |r| {
            ids.iter()
                .all(|id| !logs_of(r, id).is_empty() && span_of(r, id).is_some())
        },
    );

    for (id, response) in ids.iter().zip(&responses) {
        let first = &response["model_trace"]["first_anomaly"];
        assert_eq!(first["layer"], 7, "{response}");
        assert_eq!(first["kind"], "nan", "{response}");
        let logs = logs_of(&records, id);
        // One event per (layer, stage, kind) where a fault first appeared:
        // the injected NaN shows at its origin only.
        assert_eq!(logs.len(), 1, "{logs:#?}");
        let log = logs[0];
        let a = &log["attributes"];
        assert_eq!(log["resource"]["service.name"], "model-tracer", "{log}");
        assert_eq!(log["event_name"], "model_tracer.anomaly", "{log}");
        assert_eq!(log["scope"], "model_tracer::serve", "{log}");
        assert_eq!(log["severity"], "WARN", "{log}");
        assert_eq!(a["layer"], first["layer"], "{log}");
        assert_eq!(a["stage"], first["stage"], "{log}");
        assert_eq!(a["kind"], first["kind"], "{log}");
        assert_eq!(a["position"], first["position"], "{log}");
        assert_eq!(a["first"], true, "{log}");
        assert_eq!(
            a["anomalies"], response["model_trace"]["anomalies"],
            "{log}"
        );
        assert!(a["sequence"].is_i64(), "{log}");
        let text = log["body"].as_str().unwrap_or_default();
        assert!(
            text.contains("nan at layer 7") && text.contains(id.as_str()),
            "{log}"
        );

        // The request's span, its two children, and the record inside it.
        let span = span_of(&records, id).expect("waited for");
        assert_eq!(span["resource"]["service.name"], "model-tracer", "{span}");
        assert_eq!(span["parent_span_id"], "", "{span}");
        assert_eq!(span["status"], 2, "a fault makes the span an error: {span}");
        assert_eq!(
            span["attributes"]["completion_tokens"], response["usage"]["completion_tokens"],
            "{span} {response}"
        );
        assert_eq!(log["trace_id"], span["trace_id"], "{log} {span}");
        assert_eq!(log["span_id"], span["span_id"], "{log} {span}");
        let children: HashMap<&str, &Value> = of_signal(&records, "traces")
            .filter(|s| s["parent_span_id"] == span["span_id"])
            .filter_map(|s| Some((s["name"].as_str()?, s)))
            .collect();
        let (prefill, decode) = (children.get("prefill"), children.get("decode"));
        let (Some(prefill), Some(decode)) = (prefill, decode) else {
            panic!("no prefill and decode spans under {span}: {children:#?}");
        };
        let t = |s: &Value, k: &str| s[k].as_u64().unwrap_or_default();
        assert!(t(span, "start") <= t(prefill, "start"), "{span} {prefill}");
        assert!(
            t(prefill, "end") <= t(decode, "start"),
            "{prefill} {decode}"
        );
        assert!(t(decode, "end") <= t(span, "end"), "{decode} {span}");
    }
    server.assert_alive();
}

#[test]
fn a_server_without_faults_exports_no_anomaly_record() {
    let Some(model) = prerequisites() else { return };
    let receiver = Receiver::start("otlp-clean");
    let endpoint = receiver.endpoint();
    let mut server = Server::start(&model, &["--otlp-endpoint", &endpoint]);
    let responses = server.two_requests();
    // SmolLM2's first token shows residual dominance, a diagnostic and no
    // fault: an anomaly of the trace that gives no event.
    assert!(
        responses
            .iter()
            .all(|r| r["model_trace"]["anomalies"].as_u64() > Some(0)),
        "{responses:?}"
    );
    let ids: Vec<&str> = responses
        .iter()
        .map(|r| r["id"].as_str().unwrap_or_default())
        .collect();
    // The spans show that the export works; records batched with them
    // would be at most a second behind.
    receiver.wait_for(Duration::from_secs(30), "both requests' spans", |r| {
        ids.iter().all(|id| span_of(r, id).is_some())
    });
    std::thread::sleep(Duration::from_secs(3));
    let records = receiver.records();
    let logs: Vec<_> = of_signal(&records, "logs").collect();
    assert!(logs.is_empty(), "{logs:#?}");
    server.assert_alive();
}

#[test]
fn an_unreachable_collector_is_reported_and_the_server_goes_on() {
    let Some(model) = real_model() else { return };
    // A port nobody listens on: bound, then let go.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("a free port: {e}"));
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut server = Server::start(&model, &["--inject", "nan@7", "--otlp-endpoint", &endpoint]);
    server.two_requests();
    let start = Instant::now();
    while !server.stderr_has("ExportError") {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no export error on stderr within 60 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let [chat, _] = server.two_requests();
    assert_eq!(chat["model_trace"]["first_anomaly"]["layer"], 7, "{chat}");
    server.assert_alive();
}

#[test]
fn an_endpoint_that_is_no_url_exits_2_before_the_model_is_loaded() {
    for bad in [
        "127.0.0.1:4318",
        "not a url",
        "https://127.0.0.1:4318",
        "http://host:port",
    ] {
        let out = Command::new(BIN)
            .args(["serve", "--gguf", "/nonexistent/model.gguf", "--port", "0"])
            .args(["--otlp-endpoint", bad])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{BIN}: {e}"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {stderr}");
        assert!(stderr.contains("--otlp-endpoint"), "{bad}: {stderr}");
        assert!(stderr.contains("not a collector URL"), "{bad}: {stderr}");
        assert!(
            !stderr.contains("nonexistent"),
            "the model was looked at: {stderr}"
        );
    }
}
