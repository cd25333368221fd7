//! In-process decode timing of the onnx backend on the real Qwen2.5-Coder-0.5B int4 export, the
//! same measurement onnxruntime-genai's loop gets in bench/ort_genai_bench.py (no HTTP, no
//! clients sharing the cores). Ignored by default (needs the export, and timings never go in
//! tests): `INFERD_ONNX_BENCH_MODEL=models/qwen2.5-coder-0.5b-instruct-onnx-int4 cargo test
//! --release --test onnx_bench -- --ignored --nocapture`.
use std::time::Instant;

use inferd::backend::onnx::{OnnxBackend, OnnxOptions, SessionSpec};
use inferd::backend::{Backend, StepInput};
use inferd::config::Device;
// The server's own greedy choice, so the timed step includes what serving adds per token.
use inferd::engine::sampler::argmax;

#[test]
#[ignore]
fn decode_throughput_onnx() {
    let Ok(dir) = std::env::var("INFERD_ONNX_BENCH_MODEL") else {
        eprintln!("set INFERD_ONNX_BENCH_MODEL to an export_onnx.py directory");
        return;
    };
    // The graph with its int4 projections merged (the default) and as exported, alternating.
    let open = |fuse: bool| {
        let opts = OnnxOptions {
            library: None,
            session: SessionSpec { device: Device::Cpu, intra_op_threads: 2, inter_op_threads: 1 },
            max_batch: 8,
            max_context: None,
            fixed_shapes: None,
            fuse_projections: Some(fuse),
        };
        let mut b = OnnxBackend::load(std::path::Path::new(&dir), &opts).expect("load");
        b.prepare().expect("prepare");
        b
    };
    let mut backends = [("merged", open(true)), ("exported", open(false))];
    let prompt: Vec<u32> = (0..30u32).map(|i| 1000 + i * 7).collect();
    for batch in [1usize, 8] {
        // Each backend decodes its own `batch` sequences in blocks of steps that alternate (the
        // order flips every block), so the two are timed within a fraction of a second of each
        // other on this drifting machine.
        let mut next: Vec<Vec<u32>> = Vec::new();
        let seqs: Vec<u64> = (0..batch as u64).collect();
        for (_, b) in backends.iter_mut() {
            let inputs: Vec<StepInput> = seqs.iter().map(|&s| StepInput { seq: s, tokens: &prompt, adapter: None, want_logits: true }).collect();
            next.push(b.step(&inputs).expect("prefill").into_iter().map(|l| argmax(&l.unwrap())).collect());
        }
        let blocks: usize = std::env::var("INFERD_ONNX_BENCH_BLOCKS").ok().and_then(|v| v.parse().ok()).unwrap_or(40);
        let per_block = 8;
        let mut ms = vec![Vec::with_capacity(blocks); backends.len()];
        for block in 0..blocks {
            for k in 0..backends.len() {
                let k = if block % 2 == 0 { k } else { backends.len() - 1 - k };
                let t = Instant::now();
                for _ in 0..per_block {
                    let toks: Vec<[u32; 1]> = next[k].iter().map(|&t| [t]).collect();
                    let inputs: Vec<StepInput> = seqs.iter().zip(&toks).map(|(&s, t)| StepInput { seq: s, tokens: t, adapter: None, want_logits: true }).collect();
                    next[k] = backends[k].1.step(&inputs).expect("decode").into_iter().map(|l| argmax(&l.unwrap())).collect();
                }
                ms[k].push(1000.0 * t.elapsed().as_secs_f64() / per_block as f64);
            }
        }
        assert_eq!(next[0], next[1], "both graphs decode the same tokens");
        let median = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        for ((name, _), m) in backends.iter().zip(&ms) {
            eprintln!("{name:>8} batch {batch}: median {:.2} ms/step ({:.1} tok/s), fastest {:.2} ms", median(m), batch as f64 * 1000.0 / median(m), m.iter().copied().fold(f64::MAX, f64::min));
        }
        let ratios: Vec<f64> = ms[0].iter().zip(&ms[1]).map(|(a, b)| a / b).collect();
        eprintln!("batch {batch}: step time {} / {}, median of {blocks} adjacent pairs of {per_block}-step blocks: {:.3}", backends[0].0, backends[1].0, median(&ratios));
        for (_, b) in backends.iter_mut() {
            for &s in &seqs {
                b.release(s);
            }
        }
    }
}
