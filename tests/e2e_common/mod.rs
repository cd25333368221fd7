//! Shared helpers of the end-to-end tests: start the real `inferd` binary on a free port and talk
//! to it over raw HTTP/1.1 (`Connection: close`), including an incremental SSE reader.
//!
//! Every socket operation has a timeout, so a hung server fails a test instead of hanging CI.
#![allow(dead_code)]

mod http;

#[allow(unused_imports)]
pub use http::{request, request_with, Response, SseStream};

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a server may take to answer `/health` after starting.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Default read timeout of one request (debug builds are slow; generous but bounded).
pub const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// The binary under test: `INFERD_BIN` when set (CI builds release once), else Cargo's own.
pub fn inferd_bin() -> PathBuf {
    match std::env::var_os("INFERD_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_inferd")),
    }
}

/// The repository root (paths of fixtures and models are relative to it).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A generated tiny model, or None (with a message) when the fixtures were not generated.
pub fn tiny_model(name: &str) -> Option<PathBuf> {
    let p = repo_root().join("tests/fixtures/generated").join(name);
    if p.exists() {
        Some(p)
    } else {
        eprintln!(
            "SKIP: {} is missing; run `.venv/bin/python scripts/make_tiny_model.py tests/fixtures/generated`",
            p.display()
        );
        None
    }
}

/// A free TCP port on 127.0.0.1 (bind port 0, read it back, release it).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// A running `inferd serve`; killed on drop. Its stderr goes to a file, printed when start fails.
pub struct Server {
    child: Child,
    pub port: u16,
    /// Id the model is served under.
    pub model_id: String,
    pub stderr_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Serves `model` as `model_id` with the given `[server]` config lines and extra flags.
    pub fn start(model: &Path, model_id: &str, server_toml: &str, extra: &[&str]) -> Server {
        Self::start_with(Some(model), model_id, &format!("[server]\n{server_toml}\n"), extra)
    }

    /// Serves what a whole config file declares (`[[models]]` included; no `--model`).
    pub fn from_config(config_toml: &str, model_id: &str, extra: &[&str]) -> Server {
        Self::start_with(None, model_id, config_toml, extra)
    }

    fn start_with(model: Option<&Path>, model_id: &str, config_toml: &str, extra: &[&str]) -> Server {
        let mut last = String::new();
        for _attempt in 0..3 {
            match Self::try_start(model, model_id, config_toml, extra) {
                Ok(s) => return s,
                Err(e) => last = e,
            }
        }
        panic!("inferd did not start: {last}");
    }

    /// Serves `model` with defaults.
    pub fn tiny(model: &Path, extra: &[&str]) -> Server {
        Self::start(model, "tiny", "", extra)
    }

    fn try_start(model: Option<&Path>, model_id: &str, config_toml: &str, extra: &[&str]) -> Result<Server, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let config = dir.path().join("config.toml");
        std::fs::write(&config, config_toml).map_err(|e| e.to_string())?;
        let stderr_path = dir.path().join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).map_err(|e| e.to_string())?;
        let port = free_port();
        let port_s = port.to_string();
        let mut args: Vec<&str> = vec!["serve", "--config"];
        let config_s = config.to_string_lossy().to_string();
        let model_s = model.map(|m| m.to_string_lossy().to_string());
        args.extend([config_s.as_str(), "--host", "127.0.0.1", "--port", &port_s]);
        if let Some(m) = &model_s {
            args.extend(["--model", m.as_str(), "--model-id", model_id]);
        }
        args.extend_from_slice(extra);
        let child = Command::new(inferd_bin())
            .args(&args)
            .env("RUST_LOG", "info,tower_http=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", inferd_bin().display()))?;
        let mut server = Server { child, port, model_id: model_id.to_string(), stderr_path, _dir: dir };
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!("inferd exited with {status} before answering /health:\n{}", server.stderr()));
            }
            if let Ok(r) = request(port, "GET", "/health", None, Duration::from_secs(2)) {
                if r.status == 200 {
                    return Ok(server);
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!("no /health answer within {START_TIMEOUT:?}:\n{}", server.stderr()))
    }

    /// What the server wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        wait_child(&mut self.child, timeout)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// POSTs JSON and reads the whole answer.
    pub fn post(&self, path: &str, body: &Value) -> Response {
        let bytes = serde_json::to_vec(body).expect("serialise");
        self.post_raw(path, &bytes)
    }

    /// POSTs raw bytes as the body.
    pub fn post_raw(&self, path: &str, body: &[u8]) -> Response {
        request(self.port, "POST", path, Some(body), READ_TIMEOUT)
            .unwrap_or_else(|e| panic!("POST {path} failed: {e}\nserver stderr:\n{}", self.stderr()))
    }

    /// GETs a path.
    pub fn get(&self, path: &str) -> Response {
        request(self.port, "GET", path, None, READ_TIMEOUT)
            .unwrap_or_else(|e| panic!("GET {path} failed: {e}\nserver stderr:\n{}", self.stderr()))
    }

    /// Opens a streaming POST; read events with `SseStream::next_data`.
    pub fn stream(&self, path: &str, body: &Value) -> SseStream {
        SseStream::open(self.port, path, body, READ_TIMEOUT)
            .unwrap_or_else(|e| panic!("stream {path} failed: {e}\nserver stderr:\n{}", self.stderr()))
    }

    /// Chat completion (non-streamed) with the given extra fields merged into the body.
    pub fn chat(&self, content: &str, extra: Value) -> Response {
        self.post("/v1/chat/completions", &self.chat_body(content, extra))
    }

    /// A chat body for `content` with `extra` fields merged in.
    pub fn chat_body(&self, content: &str, extra: Value) -> Value {
        let mut body = serde_json::json!({
            "model": self.model_id,
            "messages": [{"role": "user", "content": content}],
        });
        merge(&mut body, extra);
        body
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits up to `timeout` for `child` to exit.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// Merges the fields of object `extra` into object `body`.
pub fn merge(body: &mut Value, extra: Value) {
    if let (Some(b), Value::Object(e)) = (body.as_object_mut(), extra) {
        for (k, v) in e {
            b.insert(k, v);
        }
    }
}

/// The data payloads of one stream parsed: every one but `[DONE]` must be JSON; asserts the last
/// payload is `[DONE]` and it appears once.
pub fn parse_stream(datas: &[String]) -> Vec<Value> {
    assert_eq!(datas.last().map(String::as_str), Some("[DONE]"), "stream must end with [DONE]: {datas:?}");
    assert_eq!(datas.iter().filter(|d| *d == "[DONE]").count(), 1, "one [DONE]: {datas:?}");
    datas[..datas.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("chunk is not JSON ({e}): {d}")))
        .collect()
}

/// Asserts `v` is an OpenAI error object and returns its `error` member.
pub fn assert_openai_error(v: &Value) -> &serde_json::Map<String, Value> {
    let err = v.get("error").and_then(Value::as_object).unwrap_or_else(|| panic!("no error object: {v}"));
    for k in ["message", "type", "param", "code"] {
        assert!(err.contains_key(k), "error lacks '{k}': {v}");
    }
    assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()), "empty message: {v}");
    assert!(err["type"].is_string(), "type must be a string: {v}");
    err
}

/// The message content of choice `i` of a non-streamed chat completion.
pub fn chat_text(v: &Value, i: usize) -> String {
    v["choices"][i]["message"]["content"].as_str().unwrap_or_else(|| panic!("no content: {v}")).to_string()
}

/// The tiny models' shared Hugging Face tokenizer (`tiny-qwen2/tokenizer.json`): an encoder
/// independent of the server's GGUF vocabulary code, to check prompt token counts against.
pub fn hf_encode(text: &str) -> Vec<u32> {
    let path = repo_root().join("tests/fixtures/generated/tiny-qwen2/tokenizer.json");
    let tok = tokenizers::Tokenizer::from_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    tok.encode(text, false).expect("encode").get_ids().to_vec()
}

/// `tiny-llama`'s chat template (SmolLM2-Instruct's) rendered for one user message, written out
/// by hand: the default system prompt, then the user turn, then the assistant header.
pub fn smol_prompt(user: &str) -> String {
    format!(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    )
}
