//! End-to-end: who may do what. Several user API keys (config list, the old single `api_key`, a
//! key file), an admin key for the adapter loading endpoints (a user key gets 403), the default
//! without an admin key (admin endpoints off), `open_admin_endpoints`, `/metrics` behind a key,
//! and CORS over raw HTTP (tests/e2e_cors_browser.rs runs a real browser against it).
mod e2e_common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use e2e_common::{assert_openai_error, repo_root, request_with, tiny_model, Response, Server};
use serde_json::{json, Value};

const MODEL: &str = "tiny-qwen2.q8_0.gguf";
const T: Duration = Duration::from_secs(60);

fn call(s: &Server, method: &str, path: &str, key: Option<&str>, body: Option<&Value>) -> Response {
    let auth = key.map(|k| format!("Bearer {k}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    let bytes = body.map(|b| serde_json::to_vec(b).unwrap());
    request_with(s.port, method, path, &headers, bytes.as_deref(), T).unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", s.stderr()))
}

/// Asserts an OpenAI-shaped error with this status and code.
fn expect(r: &Response, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    assert!(r.header("content-type").is_some_and(|c| c.starts_with("application/json")), "{:?}", r.headers);
    let v = r.json();
    assert_eq!(assert_openai_error(&v)["code"], code, "{v}");
}

/// A LoRA root holding fixture adapter B (for tiny qwen2).
fn adapter_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let from = repo_root().join("tests/fixtures/lora/adapter-b");
    let to = root.path().join("adapter-b");
    std::fs::create_dir_all(&to).unwrap();
    for e in std::fs::read_dir(&from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    root
}

fn lora_toml(root: &Path) -> String {
    format!("lora_runtime_loading = true\nlora_root = {:?}\n", root.display().to_string())
}

fn chat(s: &Server, model: &str, key: Option<&str>) -> Response {
    call(s, "POST", "/v1/chat/completions", key, Some(&json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})))
}

fn adapters(s: &Server, key: &str) -> Vec<String> {
    let v = call(s, "GET", "/v1/lora_adapters", Some(key), None).json();
    v["data"].as_array().unwrap().iter().map(|a| a["name"].as_str().unwrap().to_string()).collect()
}

#[test]
fn user_keys_and_the_admin_key() {
    let Some(model) = tiny_model(MODEL) else { return };
    let root = adapter_root();
    let key_file: PathBuf = root.path().join("keys.txt");
    std::fs::write(&key_file, "# one key per line\nsk-from-file\n").unwrap();
    let toml = format!(
        "{}api_key = \"sk-legacy\"\napi_keys = [\"sk-a\", \"sk-b\"]\napi_key_file = {:?}\nadmin_api_key = \"sk-admin\"\n",
        lora_toml(root.path()),
        key_file.display().to_string()
    );
    let s = Server::start(&model, "tiny", &toml, &[]);

    // Every user key (and the admin key) reaches every user endpoint.
    for key in ["sk-legacy", "sk-a", "sk-b", "sk-from-file", "sk-admin"] {
        assert_eq!(chat(&s, "tiny", Some(key)).status, 200, "{key}");
        assert_eq!(call(&s, "GET", "/v1/models", Some(key), None).status, 200, "{key}");
        let r = call(&s, "POST", "/tokenize", Some(key), Some(&json!({"model": "tiny", "prompt": "hi"})));
        assert_eq!(r.status, 200, "{key}: {}", r.text());
    }
    // No key, a wrong one, a near miss, another scheme: 401.
    for key in [None, Some("sk-wrong"), Some("sk-a2"), Some("sk-"), Some("")] {
        expect(&chat(&s, "tiny", key), 401, "invalid_api_key");
        expect(&call(&s, "GET", "/v1/models", key, None), 401, "invalid_api_key");
    }
    let basic = request_with(s.port, "GET", "/v1/models", &[("Authorization", "Basic sk-a")], None, T).unwrap();
    expect(&basic, 401, "invalid_api_key");

    // The admin endpoints: a user key is 403 and changes nothing; no key 401; the admin key works.
    let load = json!({"lora_name": "b", "lora_path": "adapter-b"});
    let before = adapters(&s, "sk-a");
    for key in ["sk-legacy", "sk-a", "sk-from-file"] {
        let r = call(&s, "POST", "/v1/load_lora_adapter", Some(key), Some(&load));
        expect(&r, 403, "insufficient_permissions");
        assert!(r.json()["error"]["message"].as_str().unwrap().contains("admin API key"), "{}", r.text());
    }
    expect(&call(&s, "POST", "/v1/load_lora_adapter", None, Some(&load)), 401, "invalid_api_key");
    expect(&call(&s, "POST", "/v1/load_lora_adapter", Some("sk-wrong"), Some(&load)), 401, "invalid_api_key");
    assert_eq!(adapters(&s, "sk-a"), before, "refused loads change nothing");
    expect(&chat(&s, "b", Some("sk-a")), 404, "model_not_found");
    let r = call(&s, "POST", "/v1/load_lora_adapter", Some("sk-admin"), Some(&load));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(chat(&s, "b", Some("sk-a")).status, 200, "a user may use what the admin loaded");
    expect(&call(&s, "POST", "/v1/unload_lora_adapter", Some("sk-b"), Some(&json!({"lora_name": "b"}))), 403, "insufficient_permissions");
    assert_eq!(chat(&s, "b", Some("sk-a")).status, 200, "still served after the refused unload");
    assert_eq!(call(&s, "POST", "/v1/unload_lora_adapter", Some("sk-admin"), Some(&json!({"lora_name": "b"}))).status, 200);
    expect(&chat(&s, "b", Some("sk-a")), 404, "model_not_found");

    // Open without a key.
    for path in ["/health", "/ready", "/metrics"] {
        assert_eq!(call(&s, "GET", path, None, None).status, 200, "{path}");
    }
    assert!(!s.stderr().contains("sk-a"), "keys never reach the log");
}

/// The safe default: without an admin key the admin endpoints answer 403 for everyone, even
/// with run-time loading on and even on a server with no keys at all.
#[test]
fn admin_endpoints_are_off_without_an_admin_key() {
    let Some(model) = tiny_model(MODEL) else { return };
    let root = adapter_root();
    let load = json!({"lora_name": "b", "lora_path": "adapter-b"});

    let s = Server::start(&model, "tiny", &format!("{}api_keys = [\"sk-user\"]\n", lora_toml(root.path())), &[]);
    let r = call(&s, "POST", "/v1/load_lora_adapter", Some("sk-user"), Some(&load));
    expect(&r, 403, "admin_endpoints_disabled");
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("admin_api_key"), "{}", r.text());
    expect(&call(&s, "POST", "/v1/load_lora_adapter", None, Some(&load)), 401, "invalid_api_key");
    expect(&call(&s, "POST", "/v1/unload_lora_adapter", Some("sk-user"), Some(&json!({"lora_name": "x"}))), 403, "admin_endpoints_disabled");
    drop(s);

    let open = Server::start(&model, "tiny", &lora_toml(root.path()), &[]);
    expect(&call(&open, "POST", "/v1/load_lora_adapter", None, Some(&load)), 403, "admin_endpoints_disabled");
    assert_eq!(chat(&open, "tiny", None).status, 200, "user endpoints stay open without keys");
}

/// `open_admin_endpoints = true` (no admin key): the admin endpoints take whoever the user-key
/// check lets through, as before the admin key existed.
#[test]
fn open_admin_endpoints_let_users_load_adapters() {
    let Some(model) = tiny_model(MODEL) else { return };
    let root = adapter_root();
    let load = json!({"lora_name": "b", "lora_path": "adapter-b"});
    let toml = format!("{}open_admin_endpoints = true\napi_keys = [\"sk-user\"]\n", lora_toml(root.path()));
    let s = Server::start(&model, "tiny", &toml, &[]);
    expect(&call(&s, "POST", "/v1/load_lora_adapter", None, Some(&load)), 401, "invalid_api_key");
    let r = call(&s, "POST", "/v1/load_lora_adapter", Some("sk-user"), Some(&load));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(chat(&s, "b", Some("sk-user")).status, 200);
}

#[test]
fn metrics_can_require_a_key() {
    let Some(model) = tiny_model(MODEL) else { return };
    let s = Server::start(&model, "tiny", "api_keys = [\"sk-user\"]\nadmin_api_key = \"sk-admin\"\nmetrics_require_key = true", &[]);
    expect(&call(&s, "GET", "/metrics", None, None), 401, "invalid_api_key");
    expect(&call(&s, "GET", "/metrics", Some("sk-nope"), None), 401, "invalid_api_key");
    assert_eq!(call(&s, "GET", "/metrics", Some("sk-user"), None).status, 200);
    assert_eq!(call(&s, "GET", "/metrics", Some("sk-admin"), None).status, 200);
    assert_eq!(call(&s, "GET", "/health", None, None).status, 200);
    assert_eq!(call(&s, "GET", "/ready", None, None).status, 200);
}

fn header<'a>(r: &'a Response, name: &str) -> Option<&'a str> {
    r.header(name)
}

/// CORS over raw HTTP: preflights of an allowed origin are answered (before the key check) with
/// that origin, methods and the asked-for headers; other origins get no allow-origin; answers,
/// errors included, carry it for allowed origins; with no origins configured nothing is sent.
#[test]
fn cors_preflight_and_headers() {
    let Some(model) = tiny_model(MODEL) else { return };
    let allowed = "http://app.test:8000";
    let s = Server::start(&model, "tiny", &format!("api_keys = [\"sk-user\"]\ncors_allowed_origins = [\"{allowed}\"]"), &[]);
    let preflight = |origin: &str| {
        request_with(
            s.port,
            "OPTIONS",
            "/v1/chat/completions",
            &[("Origin", origin), ("Access-Control-Request-Method", "POST"), ("Access-Control-Request-Headers", "authorization,content-type,x-stainless-os")],
            None,
            T,
        )
        .unwrap()
    };
    let r = preflight(allowed);
    assert_eq!(r.status, 200, "a preflight needs no key: {}", r.text());
    assert_eq!(header(&r, "access-control-allow-origin"), Some(allowed));
    assert!(header(&r, "access-control-allow-methods").is_some_and(|m| m.contains("POST")), "{:?}", r.headers);
    assert_eq!(header(&r, "access-control-allow-headers"), Some("authorization,content-type,x-stainless-os"));
    assert!(header(&r, "access-control-allow-credentials").is_none());
    let r = preflight("http://evil.test:8000");
    assert_eq!(header(&r, "access-control-allow-origin"), None, "{:?}", r.headers);

    let body = serde_json::to_vec(&json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})).unwrap();
    let post = |origin: &str, key: &str| {
        let auth = format!("Bearer {key}");
        request_with(s.port, "POST", "/v1/chat/completions", &[("Origin", origin), ("Authorization", auth.as_str())], Some(&body), T).unwrap()
    };
    let r = post(allowed, "sk-user");
    assert_eq!(r.status, 200);
    assert_eq!(header(&r, "access-control-allow-origin"), Some(allowed));
    assert!(header(&r, "vary").is_some_and(|v| v.contains("origin")), "{:?}", r.headers);
    let r = post(allowed, "sk-wrong");
    expect(&r, 401, "invalid_api_key");
    assert_eq!(header(&r, "access-control-allow-origin"), Some(allowed), "a page can read the 401");
    let r = post("http://evil.test:8000", "sk-user");
    assert_eq!(header(&r, "access-control-allow-origin"), None);
    drop(s);

    // Not configured: no CORS headers; a preflight is just an OPTIONS request (405, JSON).
    let plain = Server::start(&model, "tiny", "", &[]);
    let r = request_with(plain.port, "OPTIONS", "/v1/chat/completions", &[("Origin", allowed), ("Access-Control-Request-Method", "POST")], None, T).unwrap();
    expect(&r, 405, "method_not_allowed");
    assert_eq!(header(&r, "access-control-allow-origin"), None);
    let r = request_with(plain.port, "GET", "/v1/models", &[("Origin", allowed)], None, T).unwrap();
    assert_eq!((r.status, header(&r, "access-control-allow-origin")), (200, None));
}
