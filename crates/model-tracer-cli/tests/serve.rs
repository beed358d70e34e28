//! `model-tracer serve` on the real model, driven from Python: the `openai`
//! package for the API (against `model-tracer run` on the same prompts),
//! raw HTTP for bad input while requests stream, a full queue and clients
//! that hang up, and the soak of `benches/serve_soak.py`. Each test starts
//! its own server on 127.0.0.1 with port 0 and kills it at the end, also
//! when it fails.

use std::path::Path;
use std::time::Duration;

mod serve_support;

use serve_support::{prerequisites, python, tests_dir, Server, BIN};

#[test]
fn the_openai_client_gets_what_run_generates() {
    let Some(model) = prerequisites() else { return };
    let mut server = Server::start(&model, &["--parallel", "8"]);
    let model = model.to_string_lossy().into_owned();
    python(
        &tests_dir().join("serve_openai.py"),
        &["--url", &server.url, "--bin", BIN, "--gguf", &model],
        Duration::from_secs(900),
    );
    server.assert_alive();
}

#[test]
fn an_injected_fault_is_the_first_anomaly_of_every_request() {
    let Some(model) = prerequisites() else { return };
    let mut server = Server::start(&model, &["--inject", "nan@7"]);
    let model = model.to_string_lossy().into_owned();
    python(
        &tests_dir().join("serve_openai.py"),
        &[
            "--url",
            &server.url,
            "--bin",
            BIN,
            "--gguf",
            &model,
            "--mode",
            "inject",
        ],
        Duration::from_secs(300),
    );
    server.assert_alive();
}

#[test]
fn bad_input_gets_an_error_while_other_requests_stream() {
    let Some(model) = prerequisites() else { return };
    let mut server = Server::start(&model, &["--parallel", "4", "--ctx", "512"]);
    python(
        &tests_dir().join("serve_bad_input.py"),
        &["--url", &server.url],
        Duration::from_secs(600),
    );
    server.assert_alive();
}

#[test]
fn a_full_queue_answers_503_and_clients_that_hang_up_free_their_slot() {
    let Some(model) = prerequisites() else { return };
    let mut server = Server::start(&model, &["--parallel", "1", "--queue", "1"]);
    python(
        &tests_dir().join("serve_bad_input.py"),
        &["--url", &server.url, "--mode", "queue"],
        Duration::from_secs(300),
    );
    server.assert_alive();
}

#[test]
fn a_soak_of_mixed_requests_leaves_every_slot_free_and_memory_flat() {
    let Some(model) = prerequisites() else { return };
    let mut server = Server::start(
        &model,
        &["--parallel", "4", "--ctx", "512", "--keep-traces", "8"],
    );
    let soak = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../benches/serve_soak.py");
    let pid = server.pid().to_string();
    python(
        &soak,
        &["--url", &server.url, "--pid", &pid, "--requests", "200"],
        Duration::from_secs(600),
    );
    server.assert_alive();
}
