//! End-to-end lifecycle: API keys, configuration limits, start-up failures with a clear message,
//! and graceful shutdown on SIGTERM.
mod e2e_common;

use std::process::{Command, Stdio};
use std::time::Duration;

use e2e_common::{assert_openai_error, inferd_bin, request_with, tiny_model, wait_child, Server, READ_TIMEOUT};
use serde_json::json;

const MODEL: &str = "tiny-llama.f32.gguf";

#[test]
fn api_key_guards_v1_but_not_health() {
    let Some(model) = tiny_model(MODEL) else { return };
    let s = Server::start(&model, "tiny", "api_key = \"sk-e2e\"", &[]);
    let body = serde_json::to_vec(&s.chat_body("hi", json!({"max_tokens": 2}))).unwrap();
    let path = "/v1/chat/completions";
    let r = request_with(s.port, "POST", path, &[], Some(&body), READ_TIMEOUT).unwrap();
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(assert_openai_error(&r.json())["code"], "invalid_api_key");
    let wrong = [("Authorization", "Bearer sk-wrong")];
    assert_eq!(request_with(s.port, "POST", path, &wrong, Some(&body), READ_TIMEOUT).unwrap().status, 401);
    let right = [("Authorization", "Bearer sk-e2e")];
    let r = request_with(s.port, "POST", path, &right, Some(&body), READ_TIMEOUT).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["usage"]["completion_tokens"], 2);
    assert_eq!(request_with(s.port, "GET", "/v1/models", &right, None, READ_TIMEOUT).unwrap().status, 200);
    assert_eq!(s.get("/health").status, 200, "health needs no key");
}

/// Each choice takes a waiting slot: with max_waiting = 1, `n` = 2 could never be admitted.
/// It used to be answered 429 forever (retryable, so clients looped); now it is a 400 naming `n`.
#[test]
fn n_above_queue_capacity_is_400_not_endless_429() {
    let Some(model) = tiny_model(MODEL) else { return };
    let s = Server::start(&model, "tiny", "max_waiting = 1", &[]);
    let r = s.chat("hi", json!({"n": 2, "max_tokens": 2}));
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(assert_openai_error(&r.json())["param"], "n");
    assert_eq!(s.chat("hi", json!({"n": 1, "max_tokens": 2})).status, 200);
}

/// A model file that does not exist: the process exits non-zero at once, naming the file.
#[test]
fn missing_model_fails_start_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    std::fs::write(&cfg, "[server]\n").unwrap();
    let missing = dir.path().join("no-such-model.gguf");
    let mut child = Command::new(inferd_bin())
        .args(["serve", "--config", cfg.to_str().unwrap(), "--port", "1", "--model", missing.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run inferd");
    let status = wait_child(&mut child, Duration::from_secs(30)).expect("inferd should exit");
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(err.contains("no-such-model.gguf"), "stderr should name the file: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// Bad config values are reported, not panicked on.
#[test]
fn invalid_config_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    std::fs::write(&cfg, "[server]\nmax_waiting = \"lots\"\n").unwrap();
    let out = Command::new(inferd_bin())
        .args(["serve", "--config", cfg.to_str().unwrap(), "--model", "x.gguf"])
        .stdin(Stdio::null())
        .output()
        .expect("run inferd");
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_waiting"));
}

#[cfg(unix)]
#[test]
fn sigterm_shuts_down_cleanly() {
    let Some(model) = tiny_model(MODEL) else { return };
    let mut s = Server::tiny(&model, &[]);
    assert_eq!(s.chat("hi", json!({"max_tokens": 2})).status, 200);
    let ok = Command::new("kill").args(["-TERM", &s.pid().to_string()]).status().expect("kill");
    assert!(ok.success());
    let status = s.wait_exit(Duration::from_secs(30)).expect("exits within 30 s of SIGTERM");
    assert!(status.success(), "exit status {status}; stderr:\n{}", s.stderr());
    assert!(s.stderr().contains("shutdown signal received"));
}
