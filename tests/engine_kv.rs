//! The scheduler with a bounded KV cache (a mock backend that counts blocks): more sequences than
//! the cache holds all finish with exactly the tokens they get alone, through preemption, with no
//! request lost; a prompt longer than the whole cache is refused with a clear error; a backend
//! that reports `KvFull` for one sequence preempts that sequence only.
mod engine_common;

use std::sync::Arc;

use engine_common::*;
use inferd::engine::{spawn, EngineConfig, EngineHandle, FinishReason, SamplingParams};

fn engine(b: MockBackend, max_batch: usize, prefill_chunk: usize) -> EngineHandle {
    let (tok, eos) = tiny_tokenizer();
    spawn(Box::new(b), Arc::new(tok), vec![eos], EngineConfig { max_batch, max_waiting: 64, prefill_chunk, channel_capacity: 64, overlap_output: false })
}

fn mock() -> MockBackend {
    let (tok, eos) = tiny_tokenizer();
    MockBackend::new(tok.get_vocab_size(true), eos).0
}

/// Prompts of 1 to 30 tokens.
fn prompts(n: usize) -> Vec<Vec<u32>> {
    (0..n).map(|i| (0..1 + (i * 7) % 30).map(|j| ((i * 31 + j * 17) % 250) as u32 + 1).collect()).collect()
}

fn alone(p: &[u32], max_new: usize, s: &SamplingParams) -> Vec<u32> {
    collect(engine(mock(), 1, 256).submit(req(p.to_vec(), max_new, s.clone())).unwrap()).ids
}

#[test]
fn more_sequences_than_kv_blocks_all_finish_with_their_solo_tokens() {
    let seeded = SamplingParams { temperature: 0.8, top_p: 0.9, seed: Some(5), ..SamplingParams::default() };
    for (label, sampling) in [("greedy", greedy()), ("seeded", seeded)] {
        let ps = prompts(12);
        let want: Vec<Vec<u32>> = ps.iter().map(|p| alone(p, 40, &sampling)).collect();
        // 12 sequences of up to 70 positions need ~60 blocks of 16; the cache holds 20.
        for (block, total, chunk) in [(16, 20, 256), (4, 60, 7), (1, 75, 256)] {
            let mut b = mock();
            b.kv = Some((block, total));
            let h = engine(b, 8, chunk);
            let rxs: Vec<_> = ps.iter().map(|p| h.submit(req(p.clone(), 40, sampling.clone())).unwrap()).collect();
            for (i, rx) in rxs.into_iter().enumerate() {
                let c = collect(rx);
                assert_eq!(c.error, None, "{label} block {block}: sequence {i}");
                assert_eq!((c.finish, c.completion_tokens), (Some(FinishReason::Length), 40), "{label} block {block}: sequence {i}");
                assert_eq!(c.ids, want[i], "{label} block {block} x {total}: sequence {i} differs from its solo run");
            }
            let s = h.stats();
            assert!(s.preemptions > 0, "{label} block {block}: the cache was too small for all; something must have been preempted");
            eprintln!("{label}, {total} blocks of {block}: {} preemptions", s.preemptions);
        }
    }
}

#[test]
fn a_prompt_larger_than_the_whole_cache_is_refused_and_others_run() {
    let mut b = mock();
    b.kv = Some((16, 4)); // 64 positions in all
    let h = engine(b, 4, 256);
    let big = collect(h.submit(req(vec![7; 70], 5, greedy())).unwrap());
    let err = big.error.expect("refused");
    assert!(err.contains("KV cache") && err.contains("holds 4"), "{err}");
    let ok = collect(h.submit(req(vec![7; 20], 5, greedy())).unwrap());
    assert_eq!((ok.finish, ok.completion_tokens), (Some(FinishReason::Length), 5));
}

#[test]
fn kv_full_from_the_backend_preempts_only_the_named_sequence() {
    // The mock claims more room than it has, so the scheduler's fitting lets too much through
    // and the backend refuses with KvFull: the named sequence is preempted and later finishes.
    let ps = prompts(6);
    let want: Vec<Vec<u32>> = ps.iter().map(|p| alone(p, 30, &greedy())).collect();
    let mut b = mock();
    b.kv = Some((8, 16));
    b.kv_overstate = 6;
    let h = engine(b, 6, 256);
    let rxs: Vec<_> = ps.iter().map(|p| h.submit(req(p.clone(), 30, greedy())).unwrap()).collect();
    for (i, rx) in rxs.into_iter().enumerate() {
        let c = collect(rx);
        assert_eq!((c.error.as_deref(), c.completion_tokens), (None, 30), "sequence {i}");
        assert_eq!(c.ids, want[i], "sequence {i}");
    }
    assert!(h.stats().preemptions > 0);
}

/// The candle backend with a bounded KV cache (`set_kv_cache_bytes`, the `kv_cache_mb` setting):
/// sequences of the tiny qwen2 model that overflow it finish with the tokens an unbounded run
/// gives, greedy and seeded.
#[test]
fn the_candle_backend_bounded_by_bytes_preempts_and_keeps_every_answer() {
    use inferd::backend::candle::{CandleBackend, KV_BLOCK};
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/generated/tiny-qwen2.q8_0.gguf");
    assert!(path.exists(), "{} is missing (scripts/make_tiny_model.py)", path.display());
    let opts = inferd::model::SourceOptions { cache_dir: None, offline: true, progress: false };
    let assets = inferd::model::load_assets(path.to_str().unwrap(), &opts).expect("tiny model assets");
    let run = |bytes: Option<usize>, sampling: &SamplingParams| {
        let mut b = CandleBackend::load(&assets.weights, &candle_core::Device::Cpu, None).expect("load");
        if let Some(n) = bytes {
            b.set_kv_cache_bytes(Some(n)).expect("room for a block");
        }
        let h = spawn(Box::new(b), Arc::clone(&assets.tokenizer), vec![], EngineConfig { max_batch: 8, max_waiting: 64, prefill_chunk: 64, channel_capacity: 64, overlap_output: false });
        let rxs: Vec<_> = prompts(10).into_iter().map(|p| h.submit(req(p, 48, sampling.clone())).unwrap()).collect();
        let out: Vec<Vec<u32>> = rxs.into_iter().map(|rx| collect(rx).ids).collect();
        (out, h.stats().preemptions)
    };
    let probe = CandleBackend::load(&assets.weights, &candle_core::Device::Cpu, None).expect("load");
    let block_bytes = KV_BLOCK * probe.kv_bytes_per_position();
    let seeded = SamplingParams { temperature: 0.7, seed: Some(11), ..SamplingParams::default() };
    for sampling in [greedy(), seeded] {
        let (want, _) = run(None, &sampling);
        assert!(want.iter().all(|w| w.len() == 48));
        // 10 sequences of up to 78 positions need ~45 blocks; give them 16.
        let (got, preemptions) = run(Some(16 * block_bytes), &sampling);
        assert_eq!(got, want, "a bounded cache changed an answer");
        assert!(preemptions > 0, "16 blocks cannot hold all 10 sequences at once");
    }
    let mut tiny = CandleBackend::load(&assets.weights, &candle_core::Device::Cpu, None).expect("load");
    let err = tiny.set_kv_cache_bytes(Some(block_bytes - 1)).unwrap_err().to_string();
    assert!(err.contains("cannot hold one block"), "{err}");
}
