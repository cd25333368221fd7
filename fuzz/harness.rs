//! The fuzz harness: one in-process inferd (the real router, the real engine and candle backend on
//! the tiny generated llama, `tests/fixtures/generated/tiny-llama`, run-time LoRA loading on,
//! user and admin keys, CORS), and one function per target that feeds it a fuzzer's bytes and
//! checks the answer.
//!
//! Shared by the libFuzzer targets (`fuzz/fuzz_targets/*.rs`, through `fuzz/src/lib.rs`) and by
//! `tests/fuzz_corpus.rs` (corpus replay and a short mutation run in CI), which include this file
//! as a module. It only uses crates both have.
//!
//! A failure is any of: a panic anywhere in the process (libFuzzer aborts on it; the test sees the
//! hook's flag), a 5xx, a response body that is not what its content type says (JSON that does
//! not parse, an error without OpenAI's shape, an SSE stream with an error event or without its
//! `[DONE]`), a request not answered within [`REQUEST_TIMEOUT`], sequences still running in the
//! engine after their response ended, or a dead engine worker. Memory blow-ups are libFuzzer's
//! `-rss_limit_mb`.
#![allow(dead_code)]
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once, OnceLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use inferd::http::{AppState, Generator, ModelEntry};
use inferd::lora::{AdapterRegistry, RegistryConfig};
use serde_json::{json, Value};
use tower::ServiceExt;

pub const USER_KEY: &str = "fuzz-user-key";
pub const ADMIN_KEY: &str = "fuzz-admin-key";
/// The tiny llama with its own (SmolLM-style) chat template.
pub const MODEL: &str = "tiny";
/// The same engine under a second id with Qwen's tool-aware template (when
/// `models/qwen-tokenizer/tokenizer_config.json` is there), so `tools` reach a template that
/// renders them.
pub const TOOLS_MODEL: &str = "tiny-tools";
/// The served context: small, so that a fuzzed `max_tokens` cannot make one input slow.
pub const CONTEXT: usize = 640;
/// An answer not complete within this is a hang.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// The browser origin CORS lets through.
pub const ORIGIN: &str = "https://app.example";

/// The fuzz targets. Each takes raw bytes (see [`run`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The bytes are the body of `POST /v1/chat/completions`.
    Chat,
    /// The bytes are the body of `POST /v1/completions`.
    Completions,
    /// Byte 0 picks `/tokenize` (even) or `/detokenize` (odd); the rest is the body.
    Tokenize,
    /// Byte 0 picks load (with the admin key), unload, or load with a user key (must be 403);
    /// the rest is the body. A loaded adapter then serves a chat completion.
    Admin,
    /// Adapter files: byte 0 picks the format (even: PEFT `adapter_model.safetensors`, odd: mlx-lm
    /// `adapters.safetensors`), bytes 1-2 the length (LE) of `adapter_config.json`, which follows;
    /// the rest is the weights file. Loaded through the endpoint; when it loads, it serves a chat
    /// completion with logprobs and a streamed completion with n = 2.
    Adapter,
    /// Raw bytes on a TCP connection to the real connection loop (HTTP/1.1 or HTTP/2): request
    /// line, headers (keys, CORS, content length and encodings), bodies, pipelining.
    RawHttp,
}

impl Target {
    pub const ALL: [Target; 6] = [Target::Chat, Target::Completions, Target::Tokenize, Target::Admin, Target::Adapter, Target::RawHttp];

    /// The target's name: its fuzz binary and its corpus folder `fuzz/corpus/<name>`.
    pub fn name(self) -> &'static str {
        match self {
            Target::Chat => "chat",
            Target::Completions => "completions",
            Target::Tokenize => "tokenize",
            Target::Admin => "admin",
            Target::Adapter => "adapter",
            Target::RawHttp => "raw_http",
        }
    }
}

/// The repository root (this file is `fuzz/harness.rs`; the including crate is the repository's
/// or `fuzz/`'s).
pub fn repo_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    if here.join("harness.rs").is_file() {
        here.parent().expect("fuzz/ has a parent").to_path_buf()
    } else {
        here.to_path_buf()
    }
}

/// The tiny model served (`INFERD_FUZZ_MODEL` overrides).
pub fn model_dir() -> PathBuf {
    std::env::var_os("INFERD_FUZZ_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("tests/fixtures/generated/tiny-llama"))
}

pub struct Harness {
    pub rt: tokio::runtime::Runtime,
    pub router: axum::Router,
    /// Where the real connection loop listens (raw_http).
    pub addr: SocketAddr,
    /// The model's engine (both ids share it).
    pub engine: Arc<dyn Generator>,
    pub state: AppState,
    /// The run-time adapter root (fixture adapters copied in; the adapter target writes `fz/`).
    pub lora_root: PathBuf,
    _tmp: tempfile::TempDir,
}

static PANICKED: AtomicBool = AtomicBool::new(false);

/// Records every panic (the previous hook still runs: libFuzzer's aborts).
fn install_panic_flag() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICKED.store(true, Ordering::SeqCst);
            prev(info);
        }));
    });
}

/// The server, started on first use.
pub fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| Harness::start().unwrap_or_else(|e| panic!("fuzz harness: {e}")))
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        if e.file_type()?.is_file() {
            std::fs::copy(e.path(), to.join(e.file_name()))?;
        }
    }
    Ok(())
}

impl Harness {
    fn start() -> Result<Harness, String> {
        install_panic_flag();
        // A write to a connection the server has closed must be an error, not a SIGPIPE (libFuzzer's
        // main, unlike Rust's, leaves the signal's default action: terminate).
        // SAFETY: setting a signal's disposition to SIG_IGN has no preconditions.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
        let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
        let lora_root = tmp.path().join("lora");
        let fixtures = repo_root().join("tests/fixtures/lora");
        for name in ["adapter-a", "adapter-b", "adapter-a-mlx", "llama-adapter-qk", "bad-rank", "bad-target", "bad-base", "bad-corrupt", "bad-missing"] {
            copy_dir(&fixtures.join(name), &lora_root.join(name)).map_err(|e| format!("{name}: {e}"))?;
        }
        // Configured as an operator would (config.toml through the real loader), so that the
        // harness follows the server's own defaults and set-up.
        let toml = format!(
            r#"[server]
api_keys = ["{USER_KEY}"]
admin_api_key = "{ADMIN_KEY}"
metrics_require_key = true
cors_allowed_origins = ["{ORIGIN}"]
header_read_timeout_secs = 5
keep_alive_timeout_secs = 5
body_read_timeout_secs = 5
lora_runtime_loading = true
lora_root = "{root}"
lora_budget_mb = 64

[[models]]
id = "{MODEL}"
source = "{model}"
context_length = {CONTEXT}
# Small, so that memory growth beyond it (libFuzzer's -rss_limit_mb) means a leak.
prefix_cache_mb = 16
"#,
            root = lora_root.display(),
            model = model_dir().display(),
        );
        let config = tmp.path().join("config.toml");
        std::fs::write(&config, toml).map_err(|e| e.to_string())?;
        let config = config.to_str().ok_or("temp path is not UTF-8")?.to_string();
        let cli = <inferd::config::Cli as clap::Parser>::try_parse_from(["inferd", "serve", "--config", config.as_str()]).map_err(|e| e.to_string())?;
        let inferd::config::Command::Serve(args) = cli.command else { return Err("not a serve command".into()) };
        let cfg = inferd::config::load_with_env(&args, &|_| None).map_err(|e| e.to_string())?;
        let (entry, dims) = inferd::serve::load_model(&cfg.models[0], &cfg.server).map_err(|e| e.to_string())?;
        let engine = Arc::clone(&entry.generator);
        let qwen = repo_root().join("models/qwen-tokenizer/tokenizer_config.json");
        let tools_template = std::fs::read_to_string(&qwen)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .and_then(|v| v["chat_template"].as_str().map(str::to_string))
            .and_then(|src| inferd::model::template::ChatTemplate::new(&src, Some("<|endoftext|>".into()), Some("<|im_end|>".into())).ok())
            .map(Arc::new)
            .or_else(|| entry.chat_template.clone());
        let tools_entry = ModelEntry { id: TOOLS_MODEL.into(), chat_template: tools_template, ..entry.clone() };
        let mut bases = std::collections::HashMap::new();
        bases.insert(MODEL.to_string(), dims);
        let registry = AdapterRegistry::new(
            RegistryConfig { runtime_root: cfg.server.lora_root.clone(), budget_bytes: cfg.server.lora_budget_mb << 20 },
            bases,
        );
        let state = AppState::new(vec![entry, tools_entry], cfg.server.limits()).with_adapters(Arc::new(registry));
        let router = inferd::http::router(state.clone());

        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().map_err(|e| e.to_string())?;
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let served = state.clone();
        rt.spawn(async move {
            let _ = inferd::http::serve_on(listener, served, std::future::pending()).await;
        });
        Ok(Harness { rt, router, addr, engine, state, lora_root, _tmp: tmp })
    }

    /// Sends one request through the router and reads the whole answer.
    pub fn send(&self, req: Request<Body>) -> Result<(StatusCode, String, Vec<u8>), String> {
        let router = self.router.clone();
        self.rt.block_on(async move {
            let fut = async move {
                let resp = router.oneshot(req).await.map_err(|e| format!("router error: {e}"))?;
                let status = resp.status();
                let ctype = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                let body = axum::body::to_bytes(resp.into_body(), 256 << 20).await.map_err(|e| format!("body error: {e}"))?;
                Ok((status, ctype, body.to_vec()))
            };
            tokio::time::timeout(REQUEST_TIMEOUT, fut).await.map_err(|_| format!("no answer within {REQUEST_TIMEOUT:?}"))?
        })
    }

    /// Sends and checks; returns the status and the body.
    pub fn exchange(&self, req: Request<Body>) -> Result<(StatusCode, Vec<u8>), String> {
        let (what, path) = (req.method().to_string(), req.uri().path().to_string());
        let (status, ctype, body) = self.send(req)?;
        if std::env::var_os("INFERD_FUZZ_DEBUG").is_some() {
            eprintln!("{what} {path} -> {status} {ctype}: {}", String::from_utf8_lossy(&body[..body.len().min(300)]));
        }
        check_response(status, &ctype, &body).map_err(|e| format!("{what} {path}: {e}"))?;
        Ok((status, body))
    }

    /// Waits until the engine has no running or waiting sequence (every answer so far ended).
    pub fn settle(&self) -> Result<(), String> {
        let t = Instant::now();
        loop {
            if !self.engine.is_alive() {
                return Err("the engine worker died".into());
            }
            let s = self.engine.stats().ok_or("the engine publishes no stats")?;
            if s.running == 0 && s.waiting == 0 {
                return Ok(());
            }
            if t.elapsed() > Duration::from_secs(10) {
                return Err(format!("sequences left in the engine 10 s after their answers: running {}, waiting {}", s.running, s.waiting));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn unload_all(&self) {
        for (name, _) in self.state.adapters.list() {
            let _ = self.state.adapters.unload(&name);
        }
    }
}

pub fn post(path: &str, body: impl Into<Body>, key: Option<&str>) -> Request<Body> {
    let mut b = Request::post(path).header("content-type", "application/json");
    if let Some(k) = key {
        b = b.header("authorization", format!("Bearer {k}"));
    }
    b.body(body.into()).expect("a valid request")
}

/// Checks an answer: no 5xx; a JSON body parses, and an error has OpenAI's shape; an SSE stream
/// has only JSON `data:` events (none an error) and ends with `[DONE]`.
pub fn check_response(status: StatusCode, ctype: &str, body: &[u8]) -> Result<(), String> {
    let text = || String::from_utf8_lossy(&body[..body.len().min(600)]).into_owned();
    if status.is_server_error() {
        return Err(format!("{status}: {}", text()));
    }
    if ctype.starts_with("application/json") {
        let v: Value = serde_json::from_slice(body).map_err(|e| format!("{status} body is not JSON ({e}): {}", text()))?;
        check_numbers(&v)?;
        if !status.is_success() {
            let e = &v["error"];
            if !(e["message"].is_string() && e["type"].is_string() && e.get("param").is_some() && e.get("code").is_some()) {
                return Err(format!("{status} error without OpenAI's shape: {}", text()));
            }
        }
    } else if ctype.starts_with("text/event-stream") {
        let s = std::str::from_utf8(body).map_err(|_| "the SSE body is not UTF-8".to_string())?;
        let mut done = false;
        for line in s.lines() {
            let Some(data) = line.strip_prefix("data: ") else { continue };
            if done {
                return Err("an event after [DONE]".into());
            }
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let v: Value = serde_json::from_str(data).map_err(|e| format!("SSE event is not JSON ({e}): {data}"))?;
            if v.get("error").is_some() {
                return Err(format!("error event in the stream: {data}"));
            }
            check_numbers(&v)?;
        }
        if !done {
            return Err(format!("the stream did not end with [DONE]: {}", text()));
        }
    } else if status.is_client_error() {
        return Err(format!("{status} with content type '{ctype}': {}", text()));
    }
    Ok(())
}

/// Logprobs must be numbers: serde_json writes a NaN or infinite f64 as `null`, which OpenAI
/// clients refuse (`logprob` is a required float).
fn check_numbers(v: &Value) -> Result<(), String> {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let bad = match k.as_str() {
                    "logprob" => !x.is_number(),
                    "token_logprobs" => x.as_array().is_some_and(|a| a.iter().any(|n| !n.is_number())),
                    // Text completions: one {token: logprob} map per token.
                    "top_logprobs" => x.as_array().is_some_and(|a| {
                        a.iter().filter_map(Value::as_object).filter(|o| !o.contains_key("logprob")).any(|o| o.values().any(|n| !n.is_number()))
                    }),
                    _ => false,
                };
                if bad {
                    return Err(format!("'{k}' is not a number: {}", serde_json::to_string(m).unwrap_or_default()));
                }
                check_numbers(x)?;
            }
            Ok(())
        }
        Value::Array(a) => a.iter().try_for_each(check_numbers),
        _ => Ok(()),
    }
}

/// Feeds one input to a target; Err describes the failure.
pub fn run(target: Target, data: &[u8]) -> Result<(), String> {
    let h = harness();
    PANICKED.store(false, Ordering::SeqCst);
    let r = match target {
        Target::Chat => h.exchange(post("/v1/chat/completions", data.to_vec(), Some(USER_KEY))).map(drop),
        Target::Completions => h.exchange(post("/v1/completions", data.to_vec(), Some(USER_KEY))).map(drop),
        Target::Tokenize => match data.split_first() {
            Some((sel, body)) => {
                let path = if sel % 2 == 0 { "/tokenize" } else { "/detokenize" };
                h.exchange(post(path, body.to_vec(), Some(USER_KEY))).map(drop)
            }
            None => Ok(()),
        },
        Target::Admin => admin(h, data),
        Target::Adapter => adapter(h, data),
        Target::RawHttp => raw_http(h, data),
    };
    h.unload_all();
    let r = r.and_then(|()| h.settle());
    if PANICKED.swap(false, Ordering::SeqCst) {
        return Err(format!("a panic while serving this input ({})", r.err().unwrap_or_else(|| "answered normally".into())));
    }
    r
}

/// A chat completion on `model` (an adapter name): greedy, with logprobs, 3 tokens.
fn chat_on(h: &Harness, model: &str) -> Result<(), String> {
    let body = json!({"model": model, "messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 3,
                      "temperature": 0, "logprobs": true, "top_logprobs": 3});
    h.exchange(post("/v1/chat/completions", body.to_string(), Some(USER_KEY))).map(drop)
}

fn admin(h: &Harness, data: &[u8]) -> Result<(), String> {
    let Some((sel, body)) = data.split_first() else { return Ok(()) };
    match sel % 3 {
        0 => {
            let (status, _) = h.exchange(post("/v1/load_lora_adapter", body.to_vec(), Some(ADMIN_KEY)))?;
            if status.is_success() {
                let name = serde_json::from_slice::<Value>(body).ok().and_then(|v| v["lora_name"].as_str().map(str::to_string));
                if let Some(name) = name.filter(|n| h.state.adapters.resolve(n).is_some()) {
                    chat_on(h, &name)?;
                }
            }
            Ok(())
        }
        1 => {
            let dir = h.state.adapters.runtime_path("adapter-a").map_err(|e| e.message)?;
            h.state.adapters.load("a", &dir, None, true).map_err(|e| e.message)?;
            h.exchange(post("/v1/unload_lora_adapter", body.to_vec(), Some(ADMIN_KEY))).map(drop)
        }
        _ => {
            let (status, _) = h.exchange(post("/v1/load_lora_adapter", body.to_vec(), Some(USER_KEY)))?;
            if status != StatusCode::FORBIDDEN {
                return Err(format!("a user key loading an adapter got {status}, not 403"));
            }
            Ok(())
        }
    }
}

fn adapter(h: &Harness, data: &[u8]) -> Result<(), String> {
    if data.len() < 3 {
        return Ok(());
    }
    let len = (u16::from_le_bytes([data[1], data[2]]) as usize).min(data.len() - 3);
    let (config, weights) = data[3..].split_at(len);
    let dir = h.lora_root.join("fz");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("adapter_config.json"), config).map_err(|e| e.to_string())?;
    let file = if data[0] % 2 == 0 { "adapter_model.safetensors" } else { "adapters.safetensors" };
    std::fs::write(dir.join(file), weights).map_err(|e| e.to_string())?;
    let load = json!({"lora_name": "fz", "lora_path": "fz", "load_inplace": true});
    let (status, _) = h.exchange(post("/v1/load_lora_adapter", load.to_string(), Some(ADMIN_KEY)))?;
    if status.is_success() {
        chat_on(h, "fz")?;
        let body = json!({"model": "fz", "prompt": "Once upon", "max_tokens": 4, "n": 2, "stream": true, "temperature": 1.0, "seed": 7});
        h.exchange(post("/v1/completions", body.to_string(), Some(USER_KEY)))?;
    }
    Ok(())
}

/// The status codes of the HTTP/1 responses in `bytes` (each at the start of a line: bodies are
/// JSON on one line or SSE `data:` lines, so a status line cannot be faked by one).
pub fn http1_statuses(bytes: &[u8]) -> Vec<u16> {
    let mut out = Vec::new();
    let mut i = 0;
    while i + 12 <= bytes.len() {
        let at_line = i == 0 || bytes[i - 1] == b'\n';
        if at_line && (bytes[i..].starts_with(b"HTTP/1.1 ") || bytes[i..].starts_with(b"HTTP/1.0 ")) {
            if let Some(code) = std::str::from_utf8(&bytes[i + 9..i + 12]).ok().and_then(|s| s.parse().ok()) {
                out.push(code);
            }
        }
        i += 1;
    }
    out
}

fn raw_http(h: &Harness, data: &[u8]) -> Result<(), String> {
    let mut s = std::net::TcpStream::connect(h.addr).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(REQUEST_TIMEOUT)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(REQUEST_TIMEOUT)).map_err(|e| e.to_string())?;
    // The server may answer and close before everything is written (e.g. a 413): not a failure.
    let _ = s.write_all(data);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut resp = Vec::new();
    let t = Instant::now();
    let mut buf = [0u8; 64 << 10];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => resp.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                return Err(format!("the connection was neither answered nor closed within {:?}", t.elapsed()))
            }
            // A reset after the answer (the server closed with unread input): keep what came.
            Err(_) => break,
        }
    }
    if let Some(code) = http1_statuses(&resp).into_iter().find(|c| *c >= 500) {
        return Err(format!("HTTP {code}: {}", String::from_utf8_lossy(&resp[..resp.len().min(600)])));
    }
    Ok(())
}
