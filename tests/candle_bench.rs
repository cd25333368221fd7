//! Decode throughput of the candle backend on the real models, for 1, 4 and 8 concurrent
//! sequences. Ignored by default; run in release mode:
//! `cargo test --release --test candle_bench -- --ignored --nocapture`
mod candle_common;

use std::time::Instant;

use candle_common::*;
use inferd::backend::{Backend, StepInput};

fn bench(name: &str) {
    let Some(path) = real_model(name) else { return };
    let mut b = load(&path, None);
    let prompt = chatml_prompt(&path, &["Write", "Ġa", "Ġstory", "Ġabout", "Ġa", "Ġcat", "."]);
    const STEPS: usize = 64;
    for n_seq in [1usize, 4, 8] {
        let seqs: Vec<u64> = (0..n_seq as u64).map(|s| 1000 * n_seq as u64 + s).collect();
        let prefill: Vec<StepInput<'_>> = seqs
            .iter()
            .map(|&seq| StepInput { seq, tokens: &prompt, adapter: None, want_logits: true })
            .collect();
        let t0 = Instant::now();
        let out = b.step(&prefill).expect("prefill");
        let prefill_s = t0.elapsed().as_secs_f64();
        let mut last: Vec<u32> = out.iter().map(|l| argmax(l.as_ref().expect("logits"))).collect();
        let t0 = Instant::now();
        for _ in 0..STEPS {
            let toks: Vec<[u32; 1]> = last.iter().map(|&t| [t]).collect();
            let inputs: Vec<StepInput<'_>> = seqs
                .iter()
                .zip(&toks)
                .map(|(&seq, t)| StepInput { seq, tokens: t, adapter: None, want_logits: true })
                .collect();
            let out = b.step(&inputs).expect("decode");
            last = out.iter().map(|l| argmax(l.as_ref().expect("logits"))).collect();
        }
        let dt = t0.elapsed().as_secs_f64();
        println!(
            "{name}: {n_seq} seq: prefill {} tok in {:.1} ms; decode {:.1} tok/s total, {:.1} tok/s per seq",
            prompt.len() * n_seq,
            prefill_s * 1e3,
            (STEPS * n_seq) as f64 / dt,
            STEPS as f64 / dt
        );
        for s in seqs {
            b.release(s);
        }
    }
}

#[test]
#[ignore]
fn decode_throughput_smollm2() {
    bench(SMOLLM2);
}

#[test]
#[ignore]
fn decode_throughput_qwen() {
    bench(QWEN);
}
