//! What the serve tests share: the server they start (killed when
//! dropped) and the Python scripts they run, each with a bounded wait.

// Each test binary uses its own part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use model_tracer_test_support::{python_with, real_model, require};

pub const BIN: &str = env!("CARGO_BIN_EXE_model-tracer");

/// A running server, killed when dropped.
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts `model-tracer serve --port 0` on `model` with `args`, and
    /// waits (at most two minutes) for its `listening on` line, then for
    /// `GET /health` to answer 200.
    pub fn start(model: &Path, args: &[&str]) -> Server {
        let mut child = Command::new(BIN)
            .arg("serve")
            .arg("--gguf")
            .arg(model)
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {BIN}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(url) = line.strip_prefix("listening on ") {
                    let _ = tx.send(url.to_string());
                }
            }
        });
        let mut server = Server {
            child,
            url: String::new(),
        };
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(url) => server.url = url,
            Err(_) => panic!("the server printed no `listening on` line in 2 minutes"),
        }
        assert!(
            server.url.starts_with("http://127.0.0.1:"),
            "{}",
            server.url
        );
        server.wait_healthy(Duration::from_secs(60));
        server
    }

    /// Waits until `GET /health` answers 200 (at most `limit`).
    pub fn wait_healthy(&self, limit: Duration) {
        use std::io::{Read, Write};
        let addr = self.url.trim_start_matches("http://").to_string();
        let start = Instant::now();
        loop {
            let answer = std::net::TcpStream::connect(&addr).and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                s.write_all(
                    b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
                )?;
                let mut text = String::new();
                s.read_to_string(&mut text)?;
                Ok(text)
            });
            if answer.is_ok_and(|t| t.starts_with("HTTP/1.1 200")) {
                return;
            }
            assert!(
                start.elapsed() < limit,
                "{}/health did not answer 200 within {limit:?}",
                self.url
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The process id (for its resident memory).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the server is no longer running.
    pub fn assert_alive(&mut self) {
        match self.child.try_wait() {
            Ok(None) => {}
            other => panic!("the server exited: {other:?}"),
        }
    }
}

pub fn tests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests")
}

/// Runs `python3 script args…` to its end (at most `limit`), and fails
/// with its output unless it succeeds.
pub fn python(script: &Path, args: &[&str], limit: Duration) {
    let mut child = Command::new("python3")
        .arg(script)
        .args(args)
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("python3 {}: {e}", script.display()));
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                assert!(status.success(), "{} failed: {status}", script.display());
                return;
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{} took more than {limit:?}", script.display());
            }
            Err(e) => panic!("waiting for {}: {e}", script.display()),
        }
    }
}

/// The real model and the `openai` package, or a skip (a failure in CI).
pub fn prerequisites() -> Option<PathBuf> {
    let model = real_model()?;
    require(
        python_with("openai").is_some(),
        "the openai Python package (pip install openai)",
    )
    .then_some(model)
}
