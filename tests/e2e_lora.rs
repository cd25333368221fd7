//! LoRA adapters through the real binary (candle backend, tiny Q8_0 model): selection by the
//! `model` field, the listing, vLLM's load/unload endpoints with their root restriction, bad
//! adapters that leave the server as it was, and a reload during a running stream. The load and
//! unload endpoints take the admin key (tests/e2e_access.rs checks who else may call them).
mod e2e_common;

use std::path::{Path, PathBuf};

use e2e_common::{repo_root, request_with, tiny_model, Server, READ_TIMEOUT};
use serde_json::{json, Value};

fn fixture(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures/lora").join(name)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// A root directory with the fixture adapters, plus a symlink that points out of it.
fn adapter_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    for name in ["adapter-a", "adapter-b", "adapter-a-mlx", "bad-rank", "bad-target", "bad-base", "bad-corrupt", "bad-missing"] {
        copy_dir(&fixture(name), &root.path().join(name));
    }
    std::os::unix::fs::symlink(fixture("adapter-b"), root.path().join("escape")).unwrap();
    root
}

fn start(root: &Path) -> Option<Server> {
    let model = tiny_model("tiny-qwen2.q8_0.gguf")?;
    let toml = format!(
        "lora_runtime_loading = true\nlora_root = {:?}\nadmin_api_key = \"{ADMIN_KEY}\"\n\n[[adapters]]\nname = \"a\"\npath = {:?}\nbase = \"tiny\"\n",
        root.display().to_string(),
        root.join("adapter-a").display().to_string()
    );
    Some(Server::start(&model, "tiny", &toml, &[]))
}

fn greedy(s: &Server, model: &str) -> String {
    let r = s.post("/v1/completions", &json!({"model": model, "prompt": "Once upon a time", "max_tokens": 24,
                                                "temperature": 0, "ignore_eos": true}));
    assert_eq!(r.status, 200, "{model}: {}", r.text());
    r.json()["choices"][0]["text"].as_str().unwrap().to_string()
}

const ADMIN_KEY: &str = "sk-lora-admin";

/// POSTs to an admin endpoint with the admin key.
fn admin_post(s: &Server, path: &str, body: &Value) -> e2e_common::Response {
    let auth = format!("Bearer {ADMIN_KEY}");
    let bytes = serde_json::to_vec(body).unwrap();
    request_with(s.port, "POST", path, &[("Authorization", auth.as_str())], Some(&bytes), READ_TIMEOUT)
        .unwrap_or_else(|e| panic!("POST {path}: {e}\n{}", s.stderr()))
}

fn load(s: &Server, body: Value) -> (u16, String) {
    let r = admin_post(s, "/v1/load_lora_adapter", &body);
    (r.status, r.text())
}

fn names(s: &Server) -> Vec<String> {
    let v = s.get("/v1/lora_adapters").json();
    v["data"].as_array().unwrap().iter().map(|a| a["name"].as_str().unwrap().to_string()).collect()
}

#[test]
fn adapters_are_selected_listed_loaded_and_unloaded_by_name() {
    let root = adapter_root();
    let Some(s) = start(root.path()) else { return };
    let models = s.get("/v1/models").json();
    let data = models["data"].as_array().unwrap();
    assert_eq!(data.len(), 2, "{models}");
    assert_eq!((data[1]["id"].as_str(), data[1]["parent"].as_str()), (Some("a"), Some("tiny")));
    assert!(data[0].get("parent").is_none());
    assert_eq!(s.get("/v1/models/a").json()["parent"], "tiny");

    let base = greedy(&s, "tiny");
    let a = greedy(&s, "a");
    assert_ne!(base, a, "adapter a changes the output");
    let r = s.post("/v1/completions", &json!({"model": "nope", "prompt": "x", "max_tokens": 2}));
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "model_not_found");

    // Run-time load, with vLLM's shapes; the mlx-lm copy of A gives A's text.
    let (st, text) = load(&s, json!({"lora_name": "b", "lora_path": "adapter-b"}));
    assert_eq!((st, text.as_str()), (200, "Success: LoRA adapter 'b' added successfully."));
    let b = greedy(&s, "b");
    assert!(b != base && b != a);
    let (st, _) = load(&s, json!({"lora_name": "a-mlx", "lora_path": root.path().join("adapter-a-mlx").to_str().unwrap()}));
    assert_eq!(st, 200);
    assert_eq!(greedy(&s, "a-mlx"), a);
    let (st, text) = load(&s, json!({"lora_name": "b", "lora_path": "adapter-b"}));
    assert_eq!(st, 400, "{text}");
    assert!(text.contains("already loaded"), "{text}");

    // Bad adapters and paths: a clear 4xx, nothing changes.
    let before = names(&s);
    let outside = fixture("adapter-b");
    for (path, want) in [
        ("bad-rank", "rank"),
        ("bad-target", "fc1"),
        ("bad-base", "different base model"),
        ("bad-corrupt", "cannot read"),
        ("bad-missing", "neither"),
        ("../adapter-b", "must not contain '..'"),
        (outside.to_str().unwrap(), "outside the adapter root"),
        ("escape", "outside the adapter root"),
        ("does-not-exist", "does not exist"),
    ] {
        let (st, text) = load(&s, json!({"lora_name": "x", "lora_path": path}));
        assert_eq!(st, 400, "{path}: {text}");
        assert!(text.contains(want), "{path}: {text}");
    }
    let (st, text) = load(&s, json!({"lora_name": "tiny", "lora_path": "adapter-b"}));
    assert!(st == 400 && text.contains("base model"), "{text}");
    let (st, _) = load(&s, json!({"lora_name": "y", "lora_path": "adapter-b", "base_model_name": "other"}));
    assert_eq!(st, 404);
    let (st, _) = load(&s, json!({"lora_name": "y"}));
    assert_eq!(st, 400, "missing lora_path is a 400");
    assert_eq!(names(&s), before);
    assert_eq!(greedy(&s, "a"), a);

    // Unload.
    let r = admin_post(&s, "/v1/unload_lora_adapter", &json!({"lora_name": "b"}));
    assert_eq!((r.status, r.text()), (200, "Success: LoRA adapter 'b' removed successfully.".to_string()));
    let r = s.post("/v1/completions", &json!({"model": "b", "prompt": "x", "max_tokens": 2}));
    assert_eq!(r.status, 404);
    assert_eq!(admin_post(&s, "/v1/unload_lora_adapter", &json!({"lora_name": "b"})).status, 404);
    assert_eq!(greedy(&s, "tiny"), base);
}

#[test]
fn a_reload_during_a_running_stream_does_not_change_that_stream() {
    let root = adapter_root();
    let Some(s) = start(root.path()) else { return };
    // Long enough (about half a second of generation) that the reload lands mid-generation.
    let body = json!({"model": "a", "prompt": "Once upon a time", "max_tokens": 1500, "temperature": 0,
                      "ignore_eos": true, "stream": true});
    let collect = |sse: &mut e2e_common::SseStream, text: &mut String| {
        while let Some(d) = sse.next_data().expect("read") {
            if d == "[DONE]" {
                return true;
            }
            let v: Value = serde_json::from_str(&d).unwrap();
            text.push_str(v["choices"][0]["text"].as_str().unwrap_or(""));
            if text.len() > 20 {
                return false;
            }
        }
        true
    };
    // Undisturbed run first.
    let mut want = String::new();
    let mut sse = s.stream("/v1/completions", &body);
    while !collect(&mut sse, &mut want) {}
    want.clear();
    let mut sse = s.stream("/v1/completions", &body);
    while !collect(&mut sse, &mut want) {}

    // Same request; replace "a" with adapter B's weights while it streams.
    let mut got = String::new();
    let mut sse = s.stream("/v1/completions", &body);
    let done = collect(&mut sse, &mut got);
    assert!(!done, "the stream is still running when the reload happens");
    let (st, text) = load(&s, json!({"lora_name": "a", "lora_path": "adapter-b", "load_inplace": true}));
    assert_eq!(st, 200, "{text}");
    while !collect(&mut sse, &mut got) {}
    assert_eq!(got, want, "the running stream kept the version it started with");
    // New requests get the new version.
    let b_text = {
        let (st, _) = load(&s, json!({"lora_name": "b", "lora_path": "adapter-b"}));
        assert_eq!(st, 200);
        greedy(&s, "b")
    };
    assert_eq!(greedy(&s, "a"), b_text);
}

#[test]
fn onnx_and_candle_serve_the_same_adapters_with_the_same_greedy_text() {
    let Some(st) = tiny_model("tiny-qwen2") else { return };
    let onnx = repo_root().join("tests/fixtures/lora/tiny-qwen2-onnx-lora");
    let toml = format!(
        "\n[[adapters]]\nname = \"a\"\npath = {:?}\n\n[[adapters]]\nname = \"b\"\npath = {:?}\n",
        fixture("adapter-a").display().to_string(),
        fixture("adapter-b").display().to_string()
    );
    let candle = Server::start(&st, "tiny", &toml, &[]);
    let ort = Server::start(&onnx, "tiny", &toml, &["--backend", "onnx"]);
    let mut texts = Vec::new();
    for model in ["tiny", "a", "b"] {
        let (c, o) = (greedy(&candle, model), greedy(&ort, model));
        assert_eq!(c, o, "{model}: candle vs onnx");
        texts.push(c);
    }
    assert!(texts[0] != texts[1] && texts[1] != texts[2] && texts[0] != texts[2], "{texts:?}");
    // Concurrent requests on different adapters keep their own outputs on the onnx backend.
    let together: Vec<String> = std::thread::scope(|sc| {
        let hs: Vec<_> = ["tiny", "a", "b", "a", "tiny", "b"].iter().map(|m| sc.spawn(|| greedy(&ort, m))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (m, t) in ["tiny", "a", "b", "a", "tiny", "b"].iter().zip(&together) {
        let want = &texts[["tiny", "a", "b"].iter().position(|x| x == m).unwrap()];
        assert_eq!(t, want, "{m} under concurrency");
    }
}
