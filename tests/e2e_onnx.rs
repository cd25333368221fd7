//! The onnx backend through the real binary: greedy output identical to the candle backend on the
//! same tiny Qwen2 weights (ONNX export vs safetensors), under concurrency too, and clear start-up
//! errors for a missing library and for a model the backend cannot load.
mod e2e_common;

use std::process::{Command, Stdio};
use std::time::Duration;

use e2e_common::{inferd_bin, repo_root, tiny_model, wait_child, Server};
use serde_json::{json, Value};

const PROMPTS: [&str; 4] = ["Hello there", "Write a function that adds two numbers", "a", "def fib(n):"];

fn onnx_fixture() -> std::path::PathBuf {
    repo_root().join("tests/fixtures/onnx/tiny-qwen2")
}

/// Greedy chat answer: text and per-token logprobs.
fn greedy(s: &Server, prompt: &str) -> (String, Vec<f64>) {
    let v = s.chat(prompt, json!({"temperature": 0, "max_tokens": 24, "ignore_eos": true, "logprobs": true}));
    assert_eq!(v.status, 200, "{}", v.text());
    let v = v.json();
    let c = &v["choices"][0];
    let lps = c["logprobs"]["content"].as_array().expect("logprobs").iter().map(|t| t["logprob"].as_f64().unwrap()).collect();
    (c["message"]["content"].as_str().unwrap().to_string(), lps)
}

fn assert_close(a: &[f64], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    let d = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
    assert!(d < tol, "{what}: logprobs differ by {d}");
}

#[test]
fn onnx_and_candle_give_the_same_greedy_tokens_alone_and_concurrently() {
    let Some(st) = tiny_model("tiny-qwen2") else { return };
    let candle = Server::tiny(&st, &[]);
    let onnx = Server::tiny(&onnx_fixture(), &["--backend", "onnx"]);
    let mut alone = Vec::new();
    for p in PROMPTS {
        let (ct, cl) = greedy(&candle, p);
        let (ot, ol) = greedy(&onnx, p);
        assert_eq!(ot, ct, "prompt {p:?}: onnx vs candle greedy text");
        assert_close(&ol, &cl, 1e-3, p);
        alone.push((ot, ol));
    }
    // All four at once on the onnx server (batched decode with rows joining at different steps).
    let together: Vec<(String, Vec<f64>)> = std::thread::scope(|sc| {
        let hs: Vec<_> = PROMPTS.iter().map(|p| sc.spawn(|| greedy(&onnx, p))).collect();
        hs.into_iter().map(|h| h.join().expect("request thread")).collect()
    });
    for ((p, a), t) in PROMPTS.iter().zip(&alone).zip(&together) {
        assert_eq!(t.0, a.0, "prompt {p:?}: concurrent vs alone");
        assert_close(&t.1, &a.1, 1e-5, p);
    }
}

#[test]
fn onnx_streams_the_same_text_as_non_streamed() {
    let onnx = Server::tiny(&onnx_fixture(), &["--backend", "onnx"]);
    let (text, _) = greedy(&onnx, PROMPTS[1]);
    let body = onnx.chat_body(PROMPTS[1], json!({"temperature": 0, "max_tokens": 24, "ignore_eos": true, "stream": true}));
    let mut sse = onnx.stream("/v1/chat/completions", &body);
    let mut streamed = String::new();
    while let Some(data) = sse.next_data().expect("read SSE") {
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&data).expect("chunk json");
        if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
            streamed.push_str(t);
        }
    }
    assert_eq!(streamed, text);
}

/// Runs `inferd serve` expecting it to exit with an error; returns its stderr.
fn start_fails(config: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("config.toml");
    std::fs::write(&cfg, config).expect("write config");
    let mut cmd = Command::new(inferd_bin());
    cmd.args(["serve", "--config", cfg.to_str().unwrap(), "--port", "0"]).args(args);
    cmd.env_remove("ORT_DYLIB_PATH");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn");
    let mut child = out;
    let status = wait_child(&mut child, Duration::from_secs(60)).expect("inferd exits instead of serving");
    assert!(!status.success(), "inferd must refuse to start");
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!err.contains("panicked"), "no panic: {err}");
    err
}

#[test]
fn a_missing_or_broken_library_is_one_clear_sentence() {
    let model = onnx_fixture();
    let m = model.to_str().unwrap();
    let err = start_fails("[server]\nonnxruntime_library = \"/nonexistent/libonnxruntime.so\"\n", &["--model", m, "--backend", "onnx"], &[]);
    assert!(err.contains("/nonexistent/libonnxruntime.so does not exist; run scripts/fetch_onnxruntime.sh"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("libonnxruntime.so");
    std::fs::write(&fake, b"not a library").unwrap();
    let err = start_fails("[server]\n", &["--model", m, "--backend", "onnx"], &[("ORT_DYLIB_PATH", fake.to_str().unwrap())]);
    assert!(err.contains("cannot load the ONNX Runtime library") && err.contains("fetch_onnxruntime.sh"), "{err}");
}

#[test]
fn wrong_model_kinds_and_providers_are_refused_at_start() {
    let model = onnx_fixture();
    let m = model.to_str().unwrap();
    let err = start_fails("[server]\n", &["--model", m], &[]);
    assert!(err.contains("is an ONNX model directory") && err.contains("backend = \"onnx\""), "{err}");
    let gguf = repo_root().join("tests/fixtures/generated/tiny-qwen2.f32.gguf");
    if gguf.exists() {
        let err = start_fails("[server]\n", &["--model", gguf.to_str().unwrap(), "--backend", "onnx"], &[]);
        assert!(err.contains("scripts/export_onnx.py"), "{err}");
    }
    let err = start_fails("[server]\n", &["--model", m, "--backend", "onnx", "--device", "coreml"], &[]);
    assert!(err.contains("CoreML"), "{err}");
    // The provider's error comes once, not again after a retry of the graph as exported.
    assert!(!err.contains("did not load"), "{err}");
    if !cfg!(feature = "cuda") {
        let err = start_fails("[server]\n", &["--model", m, "--backend", "onnx", "--device", "cuda:0"], &[]);
        assert!(err.contains("no CUDA support") && err.contains("--features cuda"), "{err}");
        assert!(!err.contains("did not load"), "{err}");
    }
}
