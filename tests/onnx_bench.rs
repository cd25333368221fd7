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
    let opts = OnnxOptions {
        library: None,
        session: SessionSpec { device: Device::Cpu, intra_op_threads: 2, inter_op_threads: 1 },
        max_batch: 8,
        max_context: None,
        fixed_shapes: None,
        gpu_memory_fraction: 0.9,
    };
    let mut b = OnnxBackend::load(std::path::Path::new(&dir), &opts).expect("load");
    b.prepare().expect("prepare");
    let prompt: Vec<u32> = (0..30u32).map(|i| 1000 + i * 7).collect();
    for batch in [1usize, 8] {
        for round in 0..3 {
            let seqs: Vec<u64> = (0..batch as u64).map(|i| 100 * (round as u64 + 1) + i).collect();
            let inputs: Vec<StepInput> = seqs.iter().map(|&s| StepInput { seq: s, tokens: &prompt, adapter: None, want_logits: true }).collect();
            let mut next: Vec<u32> = b.step(&inputs).expect("prefill").into_iter().map(|l| argmax(&l.unwrap())).collect();
            let steps = 128;
            let t = Instant::now();
            for _ in 0..steps {
                let toks: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
                let inputs: Vec<StepInput> = seqs.iter().zip(&toks).map(|(&s, t)| StepInput { seq: s, tokens: t, adapter: None, want_logits: true }).collect();
                next = b.step(&inputs).expect("decode").into_iter().map(|l| argmax(&l.unwrap())).collect();
            }
            let secs = t.elapsed().as_secs_f64();
            eprintln!("batch {batch} round {round}: {:.1} ms/step, {:.1} tok/s total", 1000.0 * secs / steps as f64, (batch * steps) as f64 / secs);
            for s in seqs {
                b.release(s);
            }
        }
    }
}
