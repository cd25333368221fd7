//! More engine behaviour: logprob normalisation, panics, waiting-queue cancellation, adapters.
mod engine_common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use engine_common::*;
use inferd::engine::{spawn, EngineConfig, EngineHandle, Event, FinishReason, SamplingParams};

fn engine(b: MockBackend, c: EngineConfig) -> EngineHandle {
    let (tok, eos) = tiny_tokenizer();
    spawn(Box::new(b), Arc::new(tok), vec![eos], c)
}

#[test]
fn handle_is_send_sync_clone() {
    fn assert_traits<T: Send + Sync + Clone + 'static>() {}
    assert_traits::<EngineHandle>();
}

#[test]
fn full_vocab_logprobs_sum_to_one_and_match_penalised_logits() {
    let (tok, eos) = tiny_tokenizer();
    let vocab = tok.get_vocab_size(true);
    let (b, _) = MockBackend::new(vocab, eos);
    let h = engine(b, EngineConfig::default());
    assert_eq!((h.vocab_size(), h.max_context()), (vocab, 4096));
    let s = SamplingParams { temperature: 0.7, seed: Some(5), ..SamplingParams::default() };
    let mut r = req(vec![10, 20, 30], 4, s);
    r.logprobs = Some(vocab);
    let c = collect(h.submit(r).unwrap());
    let mut hist = vec![10u32, 20, 30];
    for ev in &c.events {
        let Event::Token { token_id, logprob: Some(lp), .. } = ev else { continue };
        assert_eq!(lp.top.len(), vocab);
        let sum: f64 = lp.top.iter().map(|t| (t.logprob as f64).exp()).sum();
        assert!((sum - 1.0).abs() < 1e-4, "sum {sum}");
        // Logprobs are taken before temperature: they equal log_softmax of the raw mock logits.
        let want = inferd::engine::sampler::log_softmax(&mock_logits(&hist, vocab, eos));
        assert!((lp.chosen.logprob - want[*token_id as usize]).abs() < 1e-5);
        hist.push(*token_id);
    }
    assert_eq!(c.finish, Some(FinishReason::Length));
}

#[test]
fn backend_panic_fails_the_step_only() {
    let (tok, eos) = tiny_tokenizer();
    let (mut b, _) = MockBackend::new(tok.get_vocab_size(true), eos);
    b.panic_steps = vec![2];
    let h = engine(b, EngineConfig::default());
    let c = collect(h.submit(req(vec![1, 2], 20, greedy())).unwrap());
    assert!(c.error.as_deref().unwrap().contains("panicked"), "{c:?}");
    assert!(h.is_alive());
    let ok = collect(h.submit(req(vec![1, 2], 3, greedy())).unwrap());
    assert_eq!(ok.finish, Some(FinishReason::Length));
}

#[test]
fn hung_up_waiter_leaves_the_queue() {
    let (tok, eos) = tiny_tokenizer();
    let (mut b, log) = MockBackend::new(tok.get_vocab_size(true), eos);
    b.delay = Duration::from_millis(5);
    let h = engine(b, EngineConfig { max_batch: 1, max_waiting: 4, prefill_chunk: 64, channel_capacity: 8, overlap_output: false });
    let running = h.submit(req(vec![1], 200, greedy())).unwrap();
    let waiter = h.submit(req(vec![2], 5, greedy())).unwrap();
    let t0 = Instant::now();
    while h.stats().waiting != 1 || h.stats().running != 1 {
        assert!(t0.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(waiter);
    while h.stats().waiting != 0 {
        assert!(t0.elapsed() < Duration::from_secs(5), "waiter never left: {:?}", h.stats());
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(running);
    let t1 = Instant::now();
    while h.stats().running != 0 {
        assert!(t1.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(1));
    }
    // The hung-up waiter never reached the backend.
    assert!(log.lock().unwrap().steps.iter().all(|s| s.iter().all(|r| r.0 == 1)));
}

#[test]
fn adapter_and_zero_length_and_bad_prompts() {
    let (tok, eos) = tiny_tokenizer();
    let (mut b, log) = MockBackend::new(tok.get_vocab_size(true), eos);
    b.max_context = 8;
    b.hard_limit = 8;
    let h = engine(b, EngineConfig::default());
    let mut r = req(vec![1, 2], 2, greedy());
    let sql = inferd::lora::LoraAdapter::new("sql", "sql".into(), "peft", Default::default());
    r.adapter = Some(std::sync::Arc::new(sql));
    assert_eq!(collect(h.submit(r).unwrap()).completion_tokens, 2);
    assert!(log.lock().unwrap().adapters.iter().all(|a| a.as_deref() == Some("sql")));
    let c = collect(h.submit(req(vec![1], 0, greedy())).unwrap());
    assert_eq!((c.finish, c.completion_tokens, c.ids.len()), (Some(FinishReason::Length), 0, 0));
    let c = collect(h.submit(req(vec![], 3, greedy())).unwrap());
    assert!(c.error.as_deref().unwrap().contains("empty"));
    let c = collect(h.submit(req(vec![1; 9], 3, greedy())).unwrap());
    assert!(c.error.as_deref().unwrap().contains("context length of 8"));
    // A prompt that exactly fills the context still yields one token, then Length.
    let c = collect(h.submit(req(vec![1; 8], 3, greedy())).unwrap());
    assert_eq!((c.finish, c.completion_tokens), (Some(FinishReason::Length), 1));
}

#[test]
fn stats_count_generated_tokens() {
    let (tok, eos) = tiny_tokenizer();
    let (b, _) = MockBackend::new(tok.get_vocab_size(true), eos);
    let h = engine(b, EngineConfig::default());
    let rxs: Vec<_> = (0..5).map(|i| h.submit(req(vec![i + 1], 7, greedy())).unwrap()).collect();
    for rx in rxs {
        assert_eq!(collect(rx).completion_tokens, 7);
    }
    assert_eq!(h.stats().generated_tokens, 35);
    // running is republished after the worker reaps the finished sequences (a moment later).
    let t0 = Instant::now();
    while (h.stats().running, h.stats().waiting) != (0, 0) {
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", h.stats());
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn latency_histograms_and_outcomes_count_every_request() {
    let (tok, eos) = tiny_tokenizer();
    let (mut b, _) = MockBackend::new(tok.get_vocab_size(true), eos);
    b.delay = std::time::Duration::from_millis(2);
    let h = engine(b, EngineConfig { max_batch: 2, ..EngineConfig::default() });
    let rxs: Vec<_> = (0..5).map(|i| h.submit(req(vec![i + 1, 7], 6, greedy())).unwrap()).collect();
    for rx in rxs {
        assert_eq!(collect(rx).completion_tokens, 6);
    }
    // A hang-up while running counts as an abort.
    let rx = h.submit(req(vec![9, 9], 10_000, greedy())).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    drop(rx);
    let t0 = std::time::Instant::now();
    let l = loop {
        let l = h.stats().latency;
        if l.outcomes.iter().sum::<u64>() == 6 {
            break l;
        }
        assert!(t0.elapsed() < std::time::Duration::from_secs(5), "{l:?}");
        std::thread::sleep(std::time::Duration::from_millis(2));
    };
    assert_eq!(l.outcomes, [0, 5, 1, 0], "5 by length, 1 abort");
    assert_eq!((l.queue.count, l.e2e.count), (6, 6));
    assert_eq!(l.ttft.count, 6, "every request got a first token");
    assert!(l.tpot.count >= 5 * 5, "every later token is one inter-token interval");
    // With two slots and five requests, some waited in the queue: the queue sum is positive and
    // every first token came no earlier than the step's 2 ms.
    assert!(l.queue.sum > 0.0 && l.ttft.sum >= 6.0 * 0.002, "{l:?}");
    assert_eq!(*l.ttft.cumulative.last().unwrap(), l.ttft.count, "all below the largest bucket");
}
