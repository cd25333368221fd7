//! What the CUDA tests share: async scheduling's comparison, each request's events in one mode of
//! the engine against the synchronous engine's.
#![allow(dead_code)]
use std::sync::Arc;

use inferd::backend::cuda::CudaBackend;
use inferd::engine::{spawn, EngineConfig, EngineStats, Event, GenRequest};

/// Each request's events from an engine over `backend` (async scheduling as it was loaded, the
/// output lane as `lane`), every request submitted at once, and the engine's counters after.
pub fn events_of(backend: CudaBackend, tokenizer: &Arc<tokenizers::Tokenizer>, reqs: Vec<GenRequest>, prefill_chunk: usize, lane: bool) -> (Vec<Vec<Event>>, EngineStats) {
    let config = EngineConfig { max_batch: reqs.len(), max_waiting: 64, prefill_chunk, channel_capacity: 64, overlap_output: lane };
    let h = spawn(Box::new(backend), Arc::clone(tokenizer), vec![], config);
    let rxs: Vec<_> = reqs.into_iter().map(|r| h.submit(r).expect("queued")).collect();
    let outs = rxs
        .into_iter()
        .map(|mut rx| {
            let mut evs = Vec::new();
            while let Some(ev) = rx.blocking_recv() {
                evs.push(ev);
            }
            evs
        })
        .collect();
    (outs, h.stats())
}

/// `run(pipeline, kv_blocks, lane)` in each of `modes` gives every request the events of
/// `run(false, None, false)`, the synchronous engine with a large cache, none of which failed.
pub fn assert_modes_match(label: &str, modes: &[(bool, Option<usize>, bool)], run: impl Fn(bool, Option<usize>, bool) -> (Vec<Vec<Event>>, EngineStats)) {
    let (want, _) = run(false, None, false);
    for &(pipeline, blocks, lane) in modes {
        let (got, stats) = run(pipeline, blocks, lane);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(!w.iter().any(|e| matches!(e, Event::Error(_))), "{label}: request {i} failed: {w:?}");
            assert_eq!(g, w, "{label}, pipeline {pipeline}, blocks {blocks:?}, lane {lane}: request {i} differs from the synchronous engine");
        }
        eprintln!("{label}, pipeline {pipeline}, blocks {blocks:?}, lane {lane}: {} requests equal; {} steps, {} preemptions, {} dropped tokens", want.len(), stats.steps, stats.preemptions, stats.dropped_tokens);
    }
}
