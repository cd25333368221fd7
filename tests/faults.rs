//! Backend faults (issue 19 item 5), through the real router, engine and candle backend on the
//! tiny llama, with a test backend (`Faulty`) that wraps the candle one and fails on a trigger:
//! a sequence whose prompt starts with the tokens [`TRIGGER`] gets a compute error or a panic in
//! its n-th step, or a panic when its cache is released or its prefix looked up.
//!
//! What must hold: the sequences of the failing step end with a clean OpenAI-shaped error (an
//! error event then `[DONE]` in a stream that had started, a 500 JSON otherwise), sequences not
//! in that step are untouched (their answers equal their solo answers), the worker stays alive
//! (`/ready` 200), and the next requests are answered exactly as before the fault.
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use inferd::backend::candle::CandleBackend;
use inferd::backend::{Backend, BackendError, KvCapacity, SeqId, StepInput};
use inferd::engine::{EngineConfig, EngineHandle};
use inferd::http::{AppState, Limits, ModelEntry};
use serde_json::{json, Value};
use tower::ServiceExt;

/// A prompt starting with these token ids arms the planned fault for its sequence.
const TRIGGER: [u32; 2] = [500, 501];
/// The prompt of the untouched requests.
const PLAIN: [u32; 3] = [10, 20, 30];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    /// `BackendError::Compute` in the armed sequence's step number `n` (0: its prefill).
    ErrorAt(usize),
    /// A panic in that step.
    PanicAt(usize),
    /// A panic in `release` of the armed sequence.
    PanicInRelease,
    /// A panic in `reuse_prefix` of the armed sequence.
    PanicInReuse,
}

#[derive(Default)]
struct Plan {
    fault: Option<Fault>,
    /// Armed sequences and the steps each has been in.
    armed: std::collections::HashMap<SeqId, usize>,
    fired: usize,
    /// Every step with an armed sequence in it takes at least this long (so a test can act while
    /// the armed sequence runs).
    slow: Duration,
    /// Sequences of every step that failed (what the fault hit).
    failed_rows: Vec<HashSet<SeqId>>,
}

struct Faulty {
    inner: CandleBackend,
    plan: Arc<Mutex<Plan>>,
}

impl Faulty {
    fn arm(&self, seq: SeqId, tokens: &[u32]) {
        let mut p = self.plan.lock().unwrap();
        if p.fault.is_some() && tokens.starts_with(&TRIGGER) {
            p.armed.entry(seq).or_insert(0);
        }
    }
}

impl Backend for Faulty {
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }
    fn max_context(&self) -> usize {
        self.inner.max_context()
    }
    fn step(&mut self, inputs: &[StepInput<'_>]) -> Result<Vec<Option<Vec<f32>>>, BackendError> {
        for i in inputs {
            if self.inner.cached_len(i.seq) == 0 {
                self.arm(i.seq, i.tokens);
            }
        }
        let hit = {
            let mut p = self.plan.lock().unwrap();
            let fault = p.fault;
            let mut hit = None;
            for i in inputs {
                if let Some(n) = p.armed.get_mut(&i.seq) {
                    match fault {
                        Some(Fault::ErrorAt(k) | Fault::PanicAt(k)) if *n == k => hit = fault,
                        _ => {}
                    }
                    *n += 1;
                }
            }
            if inputs.iter().any(|i| p.armed.contains_key(&i.seq)) {
                std::thread::sleep(p.slow);
            }
            if hit.is_some() {
                p.fault = None;
                p.fired += 1;
                p.failed_rows.push(inputs.iter().map(|i| i.seq).collect());
            }
            hit
        };
        match hit {
            Some(Fault::ErrorAt(_)) => Err(BackendError::Compute("injected fault".into())),
            // Half a step done, then the panic: the inner caches have advanced.
            Some(Fault::PanicAt(_)) => {
                let _ = self.inner.step(inputs);
                panic!("injected panic in a forward step");
            }
            _ => self.inner.step(inputs),
        }
    }
    fn kv_capacity(&self) -> Option<KvCapacity> {
        self.inner.kv_capacity()
    }
    fn reuse_prefix(&mut self, seq: SeqId, tokens: &[u32], adapter: Option<&Arc<inferd::lora::LoraAdapter>>) -> usize {
        self.arm(seq, tokens);
        let fire = {
            let mut p = self.plan.lock().unwrap();
            let fire = p.fault == Some(Fault::PanicInReuse) && p.armed.contains_key(&seq);
            if fire {
                p.fault = None;
                p.fired += 1;
            }
            fire
        };
        if fire {
            panic!("injected panic in reuse_prefix");
        }
        self.inner.reuse_prefix(seq, tokens, adapter)
    }
    fn release(&mut self, seq: SeqId) {
        let fire = {
            let mut p = self.plan.lock().unwrap();
            let fire = p.fault == Some(Fault::PanicInRelease) && p.armed.contains_key(&seq);
            if fire {
                p.fault = None;
                p.fired += 1;
            }
            fire
        };
        self.inner.release(seq);
        if fire {
            panic!("injected panic in release");
        }
    }
    fn lora_dims(&self) -> Option<inferd::lora::BaseDims> {
        self.inner.lora_dims()
    }
}

fn tiny() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/generated/tiny-llama");
    if p.join("config.json").is_file() {
        Some(p)
    } else {
        eprintln!("SKIP: {} is missing (scripts/make_tiny_model.py)", p.display());
        None
    }
}

struct Served {
    rt: tokio::runtime::Runtime,
    router: axum::Router,
    engine: EngineHandle,
    plan: Arc<Mutex<Plan>>,
}

/// Keeps the injected panics' messages out of the test log (others print as usual).
fn quiet_injected_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = info.payload().downcast_ref::<&str>().copied().unwrap_or("");
            if !msg.starts_with("injected panic") {
                prev(info);
            }
        }));
    });
}

/// The tiny llama behind `Faulty`, served by the real router as model "tiny".
fn serve(max_batch: usize) -> Option<Served> {
    quiet_injected_panics();
    let dir = tiny()?;
    let spec = dir.to_str().unwrap();
    let opts = inferd::model::SourceOptions { cache_dir: None, offline: true, progress: false };
    let assets = inferd::model::load_assets(spec, &opts).unwrap();
    let inner = CandleBackend::load(&assets.weights, &candle_core::Device::Cpu, Some(256)).unwrap();
    let plan = Arc::new(Mutex::new(Plan::default()));
    let backend = Faulty { inner, plan: Arc::clone(&plan) };
    let cfg = EngineConfig { max_batch, ..EngineConfig::default() };
    let engine = inferd::engine::spawn(Box::new(backend), Arc::clone(&assets.tokenizer), assets.eos_token_ids.clone(), cfg);
    // The entry as the server builds it (whatever fields it has), on the faulty engine.
    let cli = <inferd::config::Cli as clap::Parser>::try_parse_from(["inferd", "serve", "--model", spec, "--model-id", "tiny"]).unwrap();
    let inferd::config::Command::Serve(args) = cli.command else { unreachable!() };
    let cfg = inferd::config::load_with_env(&args, &|_| None).unwrap();
    let (entry, _) = inferd::serve::load_model(&cfg.models[0], &cfg.server).unwrap();
    let entry = ModelEntry { generator: Arc::new(engine.clone()), ..entry };
    let router = inferd::http::router(AppState::new(vec![entry], Limits::default()));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    Some(Served { rt, router, engine, plan })
}

struct Answer {
    status: StatusCode,
    ctype: String,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    /// The `data:` payloads of an SSE body.
    fn events(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.body).lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect()
    }
}

impl Served {
    fn send(&self, method: &str, path: &str, body: Option<Value>) -> Answer {
        let req = Request::builder().method(method).uri(path).header("content-type", "application/json");
        let req = req.body(body.map_or(Body::empty(), |b| Body::from(b.to_string()))).unwrap();
        let router = self.router.clone();
        self.rt.block_on(async move {
            tokio::time::timeout(Duration::from_secs(60), async move {
                let resp = router.oneshot(req).await.unwrap();
                let status = resp.status();
                let ctype = resp.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
                let body = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap().to_vec();
                Answer { status, ctype, body }
            })
            .await
            .expect("answered within 60 s")
        })
    }

    fn complete(&self, prompt: &[u32], max_tokens: usize, stream: bool) -> Answer {
        let body = json!({"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream, "ignore_eos": true});
        self.send("POST", "/v1/completions", Some(body))
    }

    /// The greedy text of PLAIN (non-streaming), checking the answer is a 200.
    fn plain(&self, max_tokens: usize) -> String {
        let a = self.complete(&PLAIN, max_tokens, false);
        assert_eq!(a.status, StatusCode::OK, "{}", String::from_utf8_lossy(&a.body));
        a.json()["choices"][0]["text"].as_str().unwrap().to_string()
    }

    fn arm(&self, f: Fault) {
        let mut p = self.plan.lock().unwrap();
        p.fault = Some(f);
        p.armed.clear();
        p.failed_rows.clear();
    }

    fn fired(&self) -> usize {
        self.plan.lock().unwrap().fired
    }

    fn assert_serving(&self, want: &str, max_tokens: usize) {
        assert!(self.engine.is_alive(), "the engine worker died");
        assert_eq!(self.send("GET", "/ready", None).status, StatusCode::OK);
        assert_eq!(self.plain(max_tokens), want, "the next request's answer changed after the fault");
        let t = std::time::Instant::now();
        while self.engine.stats().running + self.engine.stats().waiting > 0 {
            assert!(t.elapsed() < Duration::from_secs(5), "sequences left running: {:?}", self.engine.stats());
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// An OpenAI error object whose message contains `needle`.
fn assert_error(v: &Value, needle: &str) {
    let e = &v["error"];
    assert_eq!(e["type"], "server_error", "{v}");
    assert!(e["message"].as_str().unwrap().contains(needle), "{v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
}

#[test]
fn a_failing_step_ends_its_stream_with_an_error_event_and_the_server_carries_on() {
    let Some(s) = serve(16) else { return };
    let before = s.plain(12);
    s.arm(Fault::ErrorAt(4));
    let mut prompt = TRIGGER.to_vec();
    prompt.push(7);
    let a = s.complete(&prompt, 30, true);
    assert_eq!((a.status, a.ctype.as_str()), (StatusCode::OK, "text/event-stream"));
    let events = a.events();
    let (last, rest) = events.split_last().unwrap();
    assert_eq!(last, "[DONE]", "{events:?}");
    let (err, chunks) = rest.split_last().unwrap();
    assert_error(&serde_json::from_str(err).unwrap(), "injected fault");
    // Steps 0-3 each gave a token before step 4 failed.
    let texts: Vec<Value> = chunks.iter().map(|c| serde_json::from_str::<Value>(c).unwrap()).collect();
    assert_eq!(texts.len(), 4, "{events:?}");
    assert!(texts.iter().all(|c| c["object"] == "text_completion"), "{events:?}");
    assert_eq!(s.fired(), 1);
    s.assert_serving(&before, 12);
    eprintln!("stream: {} tokens, then {err}", texts.len());
}

#[test]
fn a_panicking_step_is_a_500_and_the_next_requests_are_answered_as_before() {
    let Some(s) = serve(16) else { return };
    let before = s.plain(12);
    let mut prompt = TRIGGER.to_vec();
    prompt.extend([7, 8, 9]);
    for (fault, stream) in [(Fault::PanicAt(0), false), (Fault::PanicAt(0), true), (Fault::PanicAt(3), false), (Fault::ErrorAt(0), false)] {
        s.arm(fault);
        let a = s.complete(&prompt, 10, stream);
        // A stream whose first event is the error has sent nothing yet: a plain 500.
        assert_eq!(a.status, StatusCode::INTERNAL_SERVER_ERROR, "{fault:?} stream={stream}: {}", String::from_utf8_lossy(&a.body));
        assert!(a.ctype.starts_with("application/json"));
        let needle = if matches!(fault, Fault::ErrorAt(_)) { "injected fault" } else { "panicked" };
        assert_error(&a.json(), needle);
        s.assert_serving(&before, 12);
    }
    assert_eq!(s.fired(), 4);
}

#[test]
fn a_fault_fails_the_sequences_of_its_step_and_not_the_waiting_ones() {
    // One sequence per step: the plain request waits while the armed one runs and fails.
    let Some(s) = serve(1) else { return };
    let solo = s.plain(20);
    s.arm(Fault::PanicAt(6));
    s.plan.lock().unwrap().slow = Duration::from_millis(20);
    let mut prompt = TRIGGER.to_vec();
    prompt.push(9);
    let router = s.router.clone();
    let body = json!({"model": "tiny", "prompt": prompt, "max_tokens": 40, "temperature": 0, "stream": true, "ignore_eos": true});
    let armed = s.rt.spawn(async move {
        let req = Request::post("/v1/completions").header("content-type", "application/json").body(Body::from(body.to_string())).unwrap();
        let resp = router.oneshot(req).await.unwrap();
        axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap().to_vec()
    });
    // Queued behind the armed sequence (max_batch 1): never in the failing step.
    let t = std::time::Instant::now();
    while s.plan.lock().unwrap().armed.is_empty() {
        assert!(t.elapsed() < Duration::from_secs(10), "the armed sequence never ran");
        std::thread::sleep(Duration::from_micros(100));
    }
    let waiting = s.plain(20);
    let armed = s.rt.block_on(armed).unwrap();
    let text = String::from_utf8_lossy(&armed);
    assert!(text.contains("panicked during a forward pass"), "{text}");
    assert_eq!(waiting, solo, "the waiting request's answer changed");
    let failed = s.plan.lock().unwrap().failed_rows.clone();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].len(), 1, "only the armed sequence was in the failing step: {failed:?}");
    s.assert_serving(&solo, 20);

    // Several sequences share a step (max_batch 16): the fault fails all of them, each with a
    // clean error, and nothing else.
    let Some(s) = serve(16) else { return };
    s.arm(Fault::ErrorAt(3));
    // Slow steps: the three choices (submitted one after another) are all running by then.
    s.plan.lock().unwrap().slow = Duration::from_millis(10);
    let body = json!({"model": "tiny", "prompt": prompt, "max_tokens": 20, "n": 3, "temperature": 0, "ignore_eos": true});
    let a = s.send("POST", "/v1/completions", Some(body));
    assert_eq!(a.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_error(&a.json(), "injected fault");
    let failed = s.plan.lock().unwrap().failed_rows.clone();
    assert_eq!(failed[0].len(), 3, "{failed:?}");
    s.assert_serving(&solo, 20);
}

#[test]
fn a_panic_in_release_or_prefix_reuse_fails_one_sequence_and_the_worker_lives() {
    let Some(s) = serve(16) else { return };
    let before = s.plain(12);
    let mut prompt = TRIGGER.to_vec();
    prompt.extend([3, 4]);
    // A panic while the finished sequence's cache is released: its answer was already complete.
    s.arm(Fault::PanicInRelease);
    let a = s.complete(&prompt, 5, false);
    assert_eq!(a.status, StatusCode::OK, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(s.fired(), 1);
    s.assert_serving(&before, 12);
    // A panic while looking up a reusable prefix at admission: that sequence fails cleanly.
    s.arm(Fault::PanicInReuse);
    let a = s.complete(&prompt, 5, false);
    assert_eq!(a.status, StatusCode::INTERNAL_SERVER_ERROR, "{}", String::from_utf8_lossy(&a.body));
    assert_error(&a.json(), "panicked");
    assert_eq!(s.fired(), 2);
    s.assert_serving(&before, 12);
}
