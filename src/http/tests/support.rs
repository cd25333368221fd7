//! Fakes and helpers shared by the HTTP tests.
use std::sync::{Arc, Mutex, OnceLock};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::response::Response;
use serde_json::Value;
use tokio::sync::mpsc;
use tower::ServiceExt;

use crate::engine::{Event, FinishReason, GenRequest, LogprobEntry, SubmitError, TokenLogprob};
use crate::http::state::{AppState, Generator, Limits, ModelEntry};
use crate::model::template::ChatTemplate;

pub const MODEL: &str = "test-model";
pub const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// The real Qwen2 tokenizer (loaded once).
pub fn tokenizer() -> Arc<tokenizers::Tokenizer> {
    static TOK: OnceLock<Arc<tokenizers::Tokenizer>> = OnceLock::new();
    TOK.get_or_init(|| {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/models/qwen-tokenizer/tokenizer.json");
        Arc::new(tokenizers::Tokenizer::from_file(path).expect("models/qwen-tokenizer/tokenizer.json loads"))
    })
    .clone()
}

/// A generator that answers each submitted sequence with a scripted list of events, records the
/// requests, and can keep channels open (to observe cancellation) or refuse submissions.
pub struct FakeGen {
    pub scripts: Vec<Vec<Event>>,
    pub ctx: usize,
    pub seen: Mutex<Vec<GenRequest>>,
    /// Senders kept alive when `hold_open` is set, so a test can see them closed by the server.
    pub held: Mutex<Vec<mpsc::Sender<Event>>>,
    pub hold_open: bool,
    pub refuse: Option<SubmitError>,
    pub alive: bool,
    pub vocab: Option<usize>,
}

impl FakeGen {
    pub fn new(scripts: Vec<Vec<Event>>) -> Self {
        Self { scripts, ctx: 4096, seen: Mutex::new(Vec::new()), held: Mutex::new(Vec::new()), hold_open: false, refuse: None, alive: true, vocab: None }
    }
    pub fn seen(&self) -> Vec<GenRequest> {
        self.seen.lock().expect("lock").clone()
    }
}

impl Generator for FakeGen {
    fn submit(&self, req: GenRequest) -> Result<mpsc::Receiver<Event>, SubmitError> {
        match &self.refuse {
            Some(SubmitError::QueueFull { retry_after_secs }) => {
                return Err(SubmitError::QueueFull { retry_after_secs: *retry_after_secs })
            }
            Some(SubmitError::Closed) => return Err(SubmitError::Closed),
            None => {}
        }
        let mut seen = self.seen.lock().expect("lock");
        let script = self.scripts[seen.len() % self.scripts.len()].clone();
        seen.push(req);
        let (tx, rx) = mpsc::channel(script.len() + 1);
        for e in script {
            tx.try_send(e).expect("script fits the channel");
        }
        if self.hold_open {
            self.held.lock().expect("lock").push(tx);
        }
        Ok(rx)
    }
    fn max_context(&self) -> usize {
        self.ctx
    }
    fn is_alive(&self) -> bool {
        self.alive
    }
    fn vocab_size(&self) -> Option<usize> {
        self.vocab
    }
}

pub fn tok(text: &str, id: u32) -> Event {
    Event::Token { text: text.into(), token_id: id, logprob: None }
}

pub fn tok_lp(text: &str, id: u32, lp: f32, alts: &[(&str, u32, f32)]) -> Event {
    let tl = |t: &str, id: u32, lp: f32| TokenLogprob { token_id: id, token: t.into(), bytes: t.as_bytes().to_vec(), logprob: lp };
    Event::Token {
        text: text.into(),
        token_id: id,
        logprob: Some(LogprobEntry { chosen: tl(text, id, lp), top: alts.iter().map(|&(t, i, l)| tl(t, i, l)).collect() }),
    }
}

pub fn done(reason: FinishReason, prompt: usize, completion: usize) -> Event {
    Event::Done { finish_reason: reason, prompt_tokens: prompt, completion_tokens: completion, cached_prompt_tokens: 0 }
}

/// "Hello", " world" then stop.
pub fn hello_script() -> Vec<Event> {
    vec![tok("Hello", 9707), tok(" world", 1879), done(FinishReason::Stop, 0, 2)]
}

pub fn entry(generator: Arc<dyn Generator>, id: &str) -> ModelEntry {
    ModelEntry {
        id: id.into(),
        generator,
        tokenizer: tokenizer(),
        chat_template: Some(Arc::new(ChatTemplate::new(CHATML, None, None).expect("ChatML compiles"))),
        tool_format: Some(crate::tools::ToolFormat::Hermes),
        structured: Arc::new(crate::structured::Structured::new(tokenizer(), 151_936, Some(151_645))),
        created: 1_700_000_000,
        owned_by: "inferd".into(),
    }
}

pub fn state_with(generator: Arc<FakeGen>, limits: Limits) -> AppState {
    AppState::new(vec![entry(generator, MODEL)], limits)
}

pub fn app(generator: Arc<FakeGen>) -> axum::Router {
    crate::http::router(state_with(generator, Limits::default()))
}

pub async fn send(app: axum::Router, req: Request<Body>) -> Response {
    app.oneshot(req).await.expect("router is infallible")
}

pub fn post_json(path: &str, body: &Value) -> Request<Body> {
    Request::post(path).header("content-type", "application/json").body(Body::from(body.to_string())).expect("request")
}

pub fn get(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).expect("request")
}

pub async fn body_bytes(resp: Response) -> Vec<u8> {
    axum::body::to_bytes(resp.into_body(), usize::MAX).await.expect("body").to_vec()
}

/// Status and JSON body.
pub async fn json_of(resp: Response) -> (StatusCode, Value) {
    let status = resp.status();
    let bytes = body_bytes(resp).await;
    let v = serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)));
    (status, v)
}

/// The `data:` payloads of an SSE body, in order (keep-alive comments skipped).
pub fn sse_data(body: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(body);
    text.split("\n\n")
        .filter_map(|ev| ev.lines().find_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:"))))
        .map(str::to_string)
        .collect()
}

/// Asserts the OpenAI error shape and returns (status, message, param, code).
pub async fn api_error(resp: Response) -> (StatusCode, String, Value, Value) {
    let (status, v) = json_of(resp).await;
    let e = &v["error"];
    assert!(e["type"].is_string(), "error.type missing: {v}");
    assert!(e["message"].is_string(), "error.message missing: {v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "param/code keys missing: {v}");
    (status, e["message"].as_str().unwrap_or_default().to_string(), e["param"].clone(), e["code"].clone())
}

pub fn chat_body(extra: Value) -> Value {
    let mut body = serde_json::json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            b.insert(k.clone(), v.clone());
        }
    }
    body
}
