//! Prefix caching on the candle backend: a new sequence whose prompt starts with tokens another
//! sequence (live or finished) has in its KV cache, with the same adapter, reuses those positions,
//! and its tokens and logits are exactly those of a run without the cache; through the engine, a
//! growing chat conversation reuses its earlier turns and reports them as cached prompt tokens.
use std::path::PathBuf;
use std::sync::Arc;

use inferd::backend::candle::CandleBackend;
use inferd::backend::{Backend, SeqId, StepInput};
use inferd::engine::{spawn, EngineConfig, Event, GenRequest, SamplingParams};
use inferd::lora::{read_adapter, LoraAdapter};
use inferd::model::WeightsFormat;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn load(prefix_bytes: usize) -> CandleBackend {
    let p = root().join("tests/fixtures/generated/tiny-qwen2.q8_0.gguf");
    assert!(p.exists(), "{} is missing (scripts/make_tiny_model.py)", p.display());
    let mut b = CandleBackend::load(&WeightsFormat::Gguf(p), &candle_core::Device::Cpu, None).expect("loads");
    b.set_prefix_cache_bytes(prefix_bytes);
    b
}

fn argmax(v: &[f32]) -> u32 {
    (0..v.len()).fold(0, |best, i| if v[i] > v[best] { i } else { best }) as u32
}

/// Feeds `tokens[from..]` (the positions before `from` are in the cache), then `n` greedy steps:
/// every step's logits.
fn run(b: &mut CandleBackend, seq: SeqId, tokens: &[u32], from: usize, n: usize, a: Option<&Arc<LoraAdapter>>) -> Vec<Vec<f32>> {
    let mut out = Vec::new();
    let mut feed = tokens[from..].to_vec();
    for _ in 0..n {
        let l = b.step(&[StepInput { seq, tokens: &feed, adapter: a, want_logits: true }]).expect("step").remove(0).expect("logits");
        feed = vec![argmax(&l)];
        out.push(l);
    }
    out
}

fn adapter(b: &CandleBackend) -> Arc<LoraAdapter> {
    let a = read_adapter("adapter-b", &root().join("tests/fixtures/lora/adapter-b")).expect("adapter");
    Arc::new(a.bind(&b.lora_dims().unwrap()).unwrap())
}

#[test]
fn a_reused_prefix_gives_the_bits_of_a_computed_one() {
    let first: Vec<u32> = (1..40).collect();
    let mut second = first.clone();
    second.extend([300, 301, 302, 7, 8]);
    let mut cold = load(0);
    let want = run(&mut cold, 1, &second, 0, 6, None);
    assert_eq!(cold.reuse_prefix(2, &second, None), 0, "prefix caching is off");

    let mut warm = load(64 << 20);
    run(&mut warm, 10, &first, 0, 3, None);
    warm.release(10); // kept for reuse
    let n = warm.reuse_prefix(11, &second, None);
    assert_eq!(n, first.len(), "the finished sequence's whole prompt is reused");
    assert_eq!(run(&mut warm, 11, &second, n, 6, None), want, "logits with a reused prefix vs computed");

    // A live sequence serves too, and a prompt equal to a cached one still computes its last token.
    let n = warm.reuse_prefix(12, &second, None);
    assert_eq!(n, second.len() - 1);
    assert_eq!(run(&mut warm, 12, &second, n, 6, None), want);
}

#[test]
fn an_adapters_cache_serves_only_that_adapter() {
    let prompt: Vec<u32> = (100..130).collect();
    let mut b = load(64 << 20);
    let a = adapter(&b);
    let with_adapter = run(&mut load(0), 1, &prompt, 0, 4, Some(&a));
    let base = run(&mut load(0), 1, &prompt, 0, 4, None);
    run(&mut b, 5, &prompt, 0, 2, Some(&a));
    b.release(5);
    assert_eq!(b.reuse_prefix(6, &prompt, None), 0, "the base model never reuses an adapter's keys and values");
    assert_eq!(run(&mut b, 6, &prompt, 0, 4, None), base);
    let n = b.reuse_prefix(7, &prompt, Some(&a));
    assert_eq!(n, prompt.len() - 1);
    assert_eq!(run(&mut b, 7, &prompt, n, 4, Some(&a)), with_adapter);
}

/// A chat that grows turn by turn through the engine: each turn's prompt is the previous prompt,
/// its answer and a new message. Returns each turn's output ids and cached prompt tokens.
fn conversation(prefix_bytes: usize) -> Vec<(Vec<u32>, usize)> {
    let opts = inferd::model::SourceOptions { cache_dir: None, offline: true, progress: false };
    let path = root().join("tests/fixtures/generated/tiny-qwen2.q8_0.gguf");
    let assets = inferd::model::load_assets(path.to_str().unwrap(), &opts).expect("assets");
    let h = spawn(Box::new(load(prefix_bytes)), Arc::clone(&assets.tokenizer), vec![], EngineConfig::default());
    let mut prompt: Vec<u32> = vec![510, 1, 2, 3, 4, 5];
    let mut turns = Vec::new();
    for turn in 0..5u32 {
        let req = GenRequest {
            prompt_tokens: prompt.clone(),
            sampling: SamplingParams { temperature: 0.0, ..SamplingParams::default() },
            max_new_tokens: 8,
            stop: vec![],
            logprobs: None,
            ignore_eos: true,
            adapter: None,
            constraint: None,
        };
        let mut rx = h.submit(req).expect("queued");
        let (mut ids, mut cached) = (Vec::new(), None);
        while let Some(ev) = rx.blocking_recv() {
            match ev {
                Event::Token { token_id, .. } => ids.push(token_id),
                Event::Done { cached_prompt_tokens, .. } => cached = Some(cached_prompt_tokens),
                Event::Error(e) => panic!("{e}"),
            }
        }
        prompt.extend(&ids);
        prompt.extend([511, 510, 100 + turn, 200 + turn]);
        turns.push((ids, cached.expect("done")));
    }
    turns
}

#[test]
fn a_growing_conversation_reuses_its_earlier_turns_with_identical_answers() {
    let off = conversation(0);
    let on = conversation(64 << 20);
    let answers = |t: &[(Vec<u32>, usize)]| t.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
    assert_eq!(answers(&on), answers(&off), "answers with and without the prefix cache");
    assert!(off.iter().all(|t| t.1 == 0));
    // Turn k's prompt starts with turn k-1's prompt and answer. The previous sequence's cache
    // holds its prompt and every answer token but the last (sampled, never fed): all of those
    // come from the cache.
    let mut prompt_len = 6;
    let mut want = 0;
    for (k, (ids, cached)) in on.iter().enumerate() {
        assert_eq!(*cached, want, "turn {k}: cached prompt tokens");
        want = prompt_len + ids.len() - 1;
        prompt_len += ids.len() + 4;
    }
}
