//! Async scheduling's edges (`Backend::pipelines`, `scheduler/pipeline.rs`), on the mock backend
//! behind `Pipelining` (launch now, collect later): a refused or panicking launch and a failing
//! collect fail only their step's sequences and the worker carries on; a backend that reports a
//! full cache or context at launch preempts or ends that sequence as without pipelining. The
//! property that every request's events equal the synchronous worker's is `engine_overlap.rs`.
mod engine_common;

use std::sync::Arc;

use engine_common::*;
use inferd::engine::{spawn, EngineConfig, EngineHandle, FinishReason};

fn engine(b: MockBackend, max_batch: usize, setup: impl FnOnce(&mut Pipelining<MockBackend>)) -> EngineHandle {
    let (tok, eos) = tiny_tokenizer();
    let mut p = Pipelining::new(b);
    setup(&mut p);
    spawn(Box::new(p), Arc::new(tok), vec![eos], EngineConfig { max_batch, ..EngineConfig::default() })
}

fn mock() -> (MockBackend, Arc<std::sync::Mutex<MockLog>>) {
    let (tok, eos) = tiny_tokenizer();
    MockBackend::new(tok.get_vocab_size(true), eos)
}

fn solo(prompt: Vec<u32>, n: usize) -> Vec<u32> {
    collect(engine(mock().0, 1, |_| {}).submit(req(prompt, n, greedy())).unwrap()).ids
}

#[test]
fn a_refused_launch_fails_its_step_and_the_worker_carries_on() {
    for panics in [false, true] {
        let (mut b, log) = mock();
        if panics {
            b.panic_steps = vec![3];
        } else {
            b.fail_steps = vec![3];
        }
        let h = engine(b, 4, |_| {});
        let c = collect(h.submit(req(vec![1, 2], 50, greedy())).unwrap());
        let want = if panics { "panicked" } else { "injected failure" };
        assert!(c.error.as_deref().is_some_and(|e| e.contains(want)), "{c:?}");
        // Steps 0-2 were collected before the error: their tokens reached the client.
        assert_eq!(c.ids.len(), 3, "{c:?}");
        assert!(log.lock().unwrap().releases.iter().any(|r| r.1 == 1), "the failed sequence's cache is freed");
        assert!(h.is_alive());
        let ok = collect(h.submit(req(vec![1, 2], 5, greedy())).unwrap());
        assert_eq!((ok.finish, ok.ids.clone()), (Some(FinishReason::Length), solo(vec![1, 2], 5)));
    }
}

#[test]
fn a_failing_collect_fails_that_steps_sequences_only() {
    let (b, log) = mock();
    // Collect 4 fails. A sequence submitted after it finishes with its solo tokens.
    let h = engine(b, 4, |p| {
        p.fail_collects = vec![4];
        p.collect_delay = std::time::Duration::from_millis(2);
    });
    let a = h.submit(req(vec![5, 6, 7], 40, greedy())).unwrap();
    let b2 = h.submit(req(vec![8, 9], 40, greedy())).unwrap();
    let (ca, cb) = (collect(a), collect(b2));
    for c in [&ca, &cb] {
        assert!(c.error.as_deref().is_some_and(|e| e.contains("injected device fault")), "{c:?}");
    }
    assert!(h.is_alive());
    let ok = collect(h.submit(req(vec![3, 4], 20, greedy())).unwrap());
    assert_eq!(ok.ids, solo(vec![3, 4], 20));
    let released: Vec<_> = log.lock().unwrap().releases.iter().map(|r| r.1).collect();
    assert!(released.contains(&1) && released.contains(&2), "{released:?}");
}

#[test]
fn a_full_cache_or_context_at_launch_is_met_as_without_pipelining() {
    // The cache claims room it does not have: launches are refused with KvFull, the named
    // sequence is preempted, and every sequence still gets its solo tokens.
    let prompts: Vec<Vec<u32>> = (0..6u32).map(|i| (1..=5 + i).collect()).collect();
    let (mut b, _) = mock();
    b.kv = Some((8, 16));
    b.kv_overstate = 6;
    let h = engine(b, 6, |_| {});
    let rxs: Vec<_> = prompts.iter().map(|p| h.submit(req(p.clone(), 30, greedy())).unwrap()).collect();
    for (i, rx) in rxs.into_iter().enumerate() {
        let c = collect(rx);
        assert_eq!((c.error.as_deref(), c.completion_tokens), (None, 30), "sequence {i}");
        assert_eq!(c.ids, solo(prompts[i].clone(), 30), "sequence {i}");
    }
    assert!(h.stats().preemptions > 0);
    // The backend's context is shorter than it says: the launch that would overflow it ends the
    // sequence with Length, after the tokens that fit.
    let (mut b, _) = mock();
    b.hard_limit = 15;
    let h = engine(b, 2, |_| {});
    let c = collect(h.submit(req((1..=10).collect(), 100, greedy())).unwrap());
    assert_eq!((c.finish, c.completion_tokens, c.error), (Some(FinishReason::Length), 6, None));
}
