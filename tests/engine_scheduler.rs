//! Scheduler behaviour against a deterministic mock backend.
mod engine_common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use engine_common::*;
use inferd::engine::{spawn, EngineConfig, Event, FinishReason, SamplingParams, SubmitError};

fn cfg(max_batch: usize) -> EngineConfig {
    EngineConfig { max_batch, max_waiting: 64, prefill_chunk: 256, channel_capacity: 64, overlap_output: false }
}

fn engine(b: MockBackend, c: EngineConfig) -> inferd::engine::EngineHandle {
    let (tok, eos) = tiny_tokenizer();
    spawn(Box::new(b), Arc::new(tok), vec![eos], c)
}

fn prompts() -> Vec<Vec<u32>> {
    vec![vec![104, 101, 108], vec![1, 2, 3, 4, 5, 6, 7], vec![200; 40], vec![50]]
}

fn run_alone(p: Vec<u32>, s: SamplingParams) -> Vec<u32> {
    let (tok, eos) = tiny_tokenizer();
    let (b, _) = MockBackend::new(tok.get_vocab_size(true), eos);
    let h = engine(b, cfg(1));
    collect(h.submit(req(p, 24, s)).unwrap()).ids
}

fn run_together(ps: Vec<Vec<u32>>, s: SamplingParams, c: EngineConfig) -> Vec<Vec<u32>> {
    let (tok, eos) = tiny_tokenizer();
    let (b, _) = MockBackend::new(tok.get_vocab_size(true), eos);
    let h = engine(b, c);
    let rxs: Vec<_> = ps.into_iter().map(|p| h.submit(req(p, 24, s.clone())).unwrap()).collect();
    rxs.into_iter().map(|rx| collect(rx).ids).collect()
}

#[test]
fn greedy_follows_the_mock_argmax_and_ignores_batching() {
    let (tok, eos) = tiny_tokenizer();
    let vocab = tok.get_vocab_size(true);
    // Expected greedy ids computed straight from the mock's logits.
    let mut hist = vec![104u32, 101, 108];
    let mut want = Vec::new();
    for _ in 0..24 {
        let l = mock_logits(&hist, vocab, eos);
        let t = inferd::engine::sampler::argmax(&l);
        want.push(t);
        hist.push(t);
    }
    assert_eq!(run_alone(prompts()[0].clone(), greedy()), want);
    let alone: Vec<_> = prompts().into_iter().map(|p| run_alone(p, greedy())).collect();
    let together = run_together(prompts(), greedy(), cfg(4));
    assert_eq!(alone, together);
    let mut small = cfg(2);
    small.prefill_chunk = 5;
    assert_eq!(alone, run_together(prompts(), greedy(), small));
}

#[test]
fn seeded_sampling_ignores_batching() {
    let s = SamplingParams { temperature: 0.9, top_p: 0.95, top_k: 50, seed: Some(1234), ..SamplingParams::default() };
    let alone: Vec<_> = prompts().into_iter().map(|p| run_alone(p, s.clone())).collect();
    assert_eq!(alone, run_together(prompts(), s.clone(), cfg(4)));
    let mut small = cfg(3);
    small.prefill_chunk = 3;
    assert_eq!(alone, run_together(prompts(), s.clone(), small));
    // A different seed gives a different continuation.
    let other = SamplingParams { seed: Some(99), ..s };
    assert_ne!(alone[1], run_alone(prompts()[1].clone(), other));
}

#[test]
fn cancellation_frees_within_one_step() {
    let (tok, eos) = tiny_tokenizer();
    let (mut b, log) = MockBackend::new(tok.get_vocab_size(true), eos);
    b.delay = Duration::from_millis(2);
    let h = engine(b, cfg(4));
    let keep = h.submit(req(vec![1, 2], 400, greedy())).unwrap();
    let mut rx = h.submit(req(vec![3, 4], 400, greedy())).unwrap();
    for _ in 0..5 {
        assert!(matches!(rx.blocking_recv(), Some(Event::Token { .. })));
    }
    let steps_at_drop = log.lock().unwrap().steps.len();
    drop(rx);
    let t0 = Instant::now();
    let released = loop {
        let l = log.lock().unwrap();
        if let Some(&(at, _)) = l.releases.iter().find(|r| r.1 == 2) {
            break at;
        }
        drop(l);
        assert!(t0.elapsed() < Duration::from_secs(5), "sequence never released");
        std::thread::sleep(Duration::from_millis(1));
    };
    assert!(released <= steps_at_drop + 1, "released after step {released}, dropped at {steps_at_drop}");
    let l = log.lock().unwrap();
    let later = l.steps[released..].iter().filter(|s| s.iter().any(|r| r.0 == 2)).count();
    assert_eq!(later, 0, "cancelled sequence stepped after release");
    drop(l);
    drop(keep);
}

#[test]
fn queue_full_is_immediate() {
    let (tok, eos) = tiny_tokenizer();
    let (mut b, _) = MockBackend::new(tok.get_vocab_size(true), eos);
    b.delay = Duration::from_millis(20);
    let h = engine(b, EngineConfig { max_batch: 1, max_waiting: 2, prefill_chunk: 64, channel_capacity: 64, overlap_output: false });
    let _a = h.submit(req(vec![1], 1000, greedy())).unwrap();
    let t0 = Instant::now();
    while h.stats().running < 1 {
        assert!(t0.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(1));
    }
    let _b = h.submit(req(vec![2], 10, greedy())).unwrap();
    let _c = h.submit(req(vec![3], 10, greedy())).unwrap();
    let t = Instant::now();
    let err = h.submit(req(vec![4], 10, greedy())).unwrap_err();
    assert!(t.elapsed() < Duration::from_millis(50));
    assert!(matches!(err, SubmitError::QueueFull { retry_after_secs } if retry_after_secs >= 1));
    let st = h.stats();
    assert_eq!((st.running, st.waiting), (1, 2));
}

#[test]
fn long_prompt_is_chunked_while_decode_continues() {
    let (tok, eos) = tiny_tokenizer();
    let (mut b, log) = MockBackend::new(tok.get_vocab_size(true), eos);
    b.delay = Duration::from_millis(1); // A needs ~300 ms: it is still decoding throughout B's prefill
    let h = engine(b, EngineConfig { max_batch: 4, max_waiting: 8, prefill_chunk: 64, channel_capacity: 1024, overlap_output: false });
    let mut rx_a = h.submit(req(vec![7, 8, 9], 300, greedy())).unwrap();
    assert!(matches!(rx_a.blocking_recv(), Some(Event::Token { .. })));
    let long: Vec<u32> = (0..2000).map(|i| (i % 250) as u32).collect();
    let rx_b = h.submit(req(long, 5, greedy())).unwrap();
    let b = collect(rx_b);
    let a = collect(rx_a);
    assert_eq!(b.finish, Some(FinishReason::Length));
    assert_eq!(b.completion_tokens, 5);
    assert_eq!(a.completion_tokens, 300);
    let l = log.lock().unwrap();
    let prefill: Vec<_> = l.steps.iter().filter(|s| s.iter().any(|r| r.0 == 2 && r.1 > 1)).collect();
    assert_eq!(prefill.len(), 2000usize.div_ceil(64));
    for (i, s) in prefill.iter().enumerate() {
        let prompt_tokens: usize = s.iter().filter(|r| r.1 > 1).map(|r| r.1).sum();
        assert!(prompt_tokens <= 64);
        let row_b = s.iter().find(|r| r.0 == 2).unwrap();
        assert_eq!(row_b.2, i == prefill.len() - 1, "want_logits only on the final chunk");
        assert!(s.contains(&(1, 1, true)), "stream A missed a decode step during prefill: {s:?}");
    }
}

#[test]
fn slow_consumer_does_not_block_others() {
    let (tok, eos) = tiny_tokenizer();
    let (b, log) = MockBackend::new(tok.get_vocab_size(true), eos);
    let h = engine(b, EngineConfig { max_batch: 4, max_waiting: 8, prefill_chunk: 64, channel_capacity: 2, overlap_output: false });
    let slow = h.submit(req(vec![1, 2, 3], 50, greedy())).unwrap();
    let fast = collect(h.submit(req(vec![4, 5, 6], 50, greedy())).unwrap());
    assert_eq!(fast.finish, Some(FinishReason::Length));
    assert_eq!(fast.completion_tokens, 50);
    let slow_steps = log.lock().unwrap().steps.iter().filter(|s| s.iter().any(|r| r.0 == 1)).count();
    assert!(slow_steps <= 4, "slow sequence kept stepping: {slow_steps}");
    let s = collect(slow);
    assert_eq!((s.finish, s.completion_tokens, s.ids.len()), (Some(FinishReason::Length), 50, 50));
    assert_eq!(s.ids[..24], run_alone(vec![1, 2, 3], greedy())[..], "sitting out must not change the output");
}

#[test]
fn context_full_ends_with_length() {
    let (tok, eos) = tiny_tokenizer();
    let (mut b, _) = MockBackend::new(tok.get_vocab_size(true), eos);
    b.max_context = 20;
    b.hard_limit = 20;
    let h = engine(b, cfg(2));
    let c = collect(h.submit(req((1..=10).collect(), 100, greedy())).unwrap());
    assert_eq!((c.finish, c.completion_tokens), (Some(FinishReason::Length), 10));
    // The backend refusing first (its advertised context is larger) also ends with Length.
    let (mut b, _) = MockBackend::new(tok.get_vocab_size(true), eos);
    b.hard_limit = 15;
    let h = engine(b, cfg(2));
    let c = collect(h.submit(req((1..=10).collect(), 100, greedy())).unwrap());
    assert_eq!((c.finish, c.completion_tokens), (Some(FinishReason::Length), 6));
    assert!(c.error.is_none());
}

#[test]
fn backend_error_fails_the_step_and_the_worker_survives() {
    let (tok, eos) = tiny_tokenizer();
    let (mut b, log) = MockBackend::new(tok.get_vocab_size(true), eos);
    b.fail_steps = vec![3];
    b.delay = Duration::from_millis(1);
    let h = engine(b, cfg(2));
    let a = h.submit(req(vec![1], 50, greedy())).unwrap();
    let c = collect(a);
    assert!(c.error.as_deref().unwrap().contains("injected failure"), "{c:?}");
    assert_eq!(c.finish, None);
    assert!(log.lock().unwrap().releases.iter().any(|r| r.1 == 1));
    assert!(h.is_alive());
    let ok = collect(h.submit(req(vec![1], 5, greedy())).unwrap());
    assert_eq!((ok.finish, ok.ids.len()), (Some(FinishReason::Length), 5));
}

#[test]
fn eos_stops_and_is_not_emitted_unless_ignored() {
    let (tok, eos) = tiny_tokenizer();
    let (mut b, _) = MockBackend::new(tok.get_vocab_size(true), eos);
    b.eos_at_len = Some(8);
    let h = engine(b, cfg(2));
    let c = collect(h.submit(req(vec![1, 2, 3], 50, greedy())).unwrap());
    assert_eq!((c.finish, c.completion_tokens), (Some(FinishReason::Stop), 6));
    assert_eq!(c.ids.len(), 5);
    assert!(!c.ids.contains(&eos));
    let mut r = req(vec![1, 2, 3], 10, greedy());
    r.ignore_eos = true;
    let c = collect(h.submit(r).unwrap());
    assert_eq!((c.finish, c.completion_tokens), (Some(FinishReason::Length), 10));
    assert_eq!(c.ids[5..], [eos; 5]);
    assert!(!c.text.contains("<eos>"));
}

#[test]
fn stop_string_across_tokens_through_the_engine() {
    let (tok, eos) = tiny_tokenizer();
    let (mut b, _) = MockBackend::new(tok.get_vocab_size(true), eos);
    let ids = |s: &str| tok.encode(s, false).unwrap().get_ids().to_vec();
    let script: Vec<u32> = ids("hello world END more");
    b.script = Some(script.clone());
    let h = engine(b, cfg(2));
    let mut r = req(vec![1, 2], 50, greedy());
    r.stop = vec!["END".into(), "zzz".into()];
    let c = collect(h.submit(r).unwrap());
    assert_eq!(c.text, "hello world ");
    assert_eq!(c.finish, Some(FinishReason::Stop));
    // Without a stop string the same script runs to max_new_tokens and flushes everything.
    let c = collect(h.submit(req(vec![1, 2], script.len(), greedy())).unwrap());
    assert_eq!(c.text, "hello world END more");
    assert_eq!(c.text, tok.decode(&script, true).unwrap());
}

#[test]
fn logprobs_report_chosen_and_top_alternatives() {
    let (tok, eos) = tiny_tokenizer();
    let (b, _) = MockBackend::new(tok.get_vocab_size(true), eos);
    let h = engine(b, cfg(2));
    let mut r = req(vec![9, 9], 3, greedy());
    r.logprobs = Some(3);
    let c = collect(h.submit(r).unwrap());
    for ev in &c.events {
        if let Event::Token { token_id, logprob: Some(lp), .. } = ev {
            assert_eq!(lp.chosen.token_id, *token_id);
            assert_eq!(lp.top.len(), 3);
            assert_eq!(lp.top[0], lp.chosen, "greedy picks the top token");
            assert!(lp.top[0].logprob >= lp.top[1].logprob && lp.top[1].logprob >= lp.top[2].logprob);
            assert!(lp.chosen.logprob < 0.0);
            if *token_id < 256 {
                assert_eq!(lp.chosen.bytes, vec![*token_id as u8]);
            }
        } else if let Event::Token { .. } = ev {
            panic!("missing logprobs: {ev:?}");
        }
    }
    assert_eq!(c.ids.len(), 3);
    assert_eq!(h.stats().generated_tokens, 3);
}
