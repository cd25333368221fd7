//! Decode throughput of the candle backend on the real models, for 1, 4 and 8 concurrent
//! sequences. Ignored by default; run in release mode:
//! `cargo test --release --test candle_bench -- --ignored --nocapture`
mod candle_common;

use std::time::Instant;

use candle_common::*;
use inferd::backend::{Backend, StepInput};

fn bench(name: &str) {
    bench_with(name, 1, &[1, 4, 8]);
}

/// Decode after a prompt of `repeat` copies of a short chat prompt, for each batch size.
fn bench_with(name: &str, repeat: usize, batch_sizes: &[usize]) {
    let Some(path) = real_model(name) else { return };
    let mut b = load(&path, None);
    let prompt = chatml_prompt(&path, &["Write", "Ġa", "Ġstory", "Ġabout", "Ġa", "Ġcat", "."]).repeat(repeat);
    const STEPS: usize = 64;
    for &n_seq in batch_sizes {
        let seqs: Vec<u64> = (0..n_seq as u64).map(|s| 1000 * n_seq as u64 + s).collect();
        let prefill: Vec<StepInput<'_>> = seqs
            .iter()
            .map(|&seq| StepInput { seq, tokens: &prompt, adapter: None, want_logits: true })
            .collect();
        let t0 = Instant::now();
        let out = b.step(&prefill).expect("prefill");
        let prefill_s = t0.elapsed().as_secs_f64();
        inferd::backend::candle::profile::reset();
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
        inferd::backend::candle::profile::report(&format!("{name} {n_seq} seq decode"));
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

/// Single-stream decode after a prompt of about 500 tokens (as bench/bench.py measures it).
#[test]
#[ignore]
fn decode_throughput_long_context() {
    bench_with(SMOLLM2, 33, &[1]);
    bench_with(QWEN, 33, &[1]);
}

#[test]
#[ignore]
fn decode_throughput_qwen() {
    bench(QWEN);
}

/// Stock candle-transformers on the same file, for a side-by-side figure.
fn bench_stock(name: &str) {
    use candle_core::{Device, Tensor};
    let Some(path) = real_model(name) else { return };
    let mut f = std::fs::File::open(&path).expect("open");
    let ct = candle_core::quantized::gguf_file::Content::read(&mut f).expect("gguf");
    let prompt = chatml_prompt(&path, &["Write", "Ġa", "Ġstory", "Ġabout", "Ġa", "Ġcat", "."]);
    let mut fwd: Box<dyn FnMut(&Tensor, usize) -> candle_core::Result<Tensor>> = if name == QWEN {
        let mut m = candle_transformers::models::quantized_qwen2::ModelWeights::from_gguf(ct, &mut f, &Device::Cpu).expect("load");
        Box::new(move |x, p| m.forward(x, p))
    } else {
        let mut m = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(ct, &mut f, &Device::Cpu).expect("load");
        Box::new(move |x, p| m.forward(x, p))
    };
    let ids = Tensor::new(prompt.as_slice(), &Device::Cpu).and_then(|t| t.unsqueeze(0)).expect("ids");
    let l: Vec<f32> = fwd(&ids, 0).and_then(|t| t.flatten_all()?.to_vec1()).expect("prefill");
    let mut t = argmax(&l);
    let t0 = Instant::now();
    const STEPS: usize = 64;
    for i in 0..STEPS {
        let ids = Tensor::new(&[t], &Device::Cpu).and_then(|t| t.unsqueeze(0)).expect("ids");
        let l: Vec<f32> = fwd(&ids, prompt.len() + i).and_then(|t| t.flatten_all()?.to_vec1()).expect("decode");
        t = argmax(&l);
    }
    println!("{name}: stock candle-transformers decode {:.1} tok/s", STEPS as f64 / t0.elapsed().as_secs_f64());
}

#[test]
#[ignore]
fn decode_throughput_stock() {
    bench_stock(SMOLLM2);
    bench_stock(QWEN);
}

/// Ours (1 sequence) and stock alternated three times, so machine load hits both alike.
#[test]
#[ignore]
fn decode_throughput_ab_smollm2() {
    let Some(path) = real_model(SMOLLM2) else { return };
    let mut b = load(&path, None);
    let prompt = chatml_prompt(&path, &["Write", "Ġa", "Ġstory", "Ġabout", "Ġa", "Ġcat", "."]);
    for round in 0..3u64 {
        bench_stock(SMOLLM2);
        let t0 = Instant::now();
        let _ = greedy(&mut b, 50 + round, &prompt, 65);
        println!("ours (incl. prefill) {:.1} tok/s", 65.0 / t0.elapsed().as_secs_f64());
    }
}

/// Prefill throughput: one sequence's prompt of about 250 tokens in one step, `ROUNDS` times
/// (a fresh sequence each time); prints each round and the profile of all rounds.
/// `INFERD_PREFILL_REPEAT` sets the prompt's copies of the short chat prompt (default 14).
#[test]
#[ignore]
fn prefill_throughput_qwen() {
    let Some(path) = real_model(QWEN) else { return };
    let mut b = load(&path, None);
    let repeat = std::env::var("INFERD_PREFILL_REPEAT").ok().and_then(|v| v.parse().ok()).unwrap_or(14);
    let prompt = chatml_prompt(&path, &["Write", "Ġa", "Ġstory", "Ġabout", "Ġa", "Ġcat", "."]).repeat(repeat);
    const ROUNDS: u64 = 5;
    let mut best = f64::MAX;
    inferd::backend::candle::profile::reset();
    for seq in 0..ROUNDS {
        let t0 = Instant::now();
        let out = b.step(&[StepInput { seq, tokens: &prompt, adapter: None, want_logits: true }]).expect("prefill");
        let dt = t0.elapsed().as_secs_f64();
        assert!(out[0].is_some());
        best = best.min(dt);
        println!("qwen prefill {} tok: {:.1} ms, {:.1} tok/s", prompt.len(), dt * 1e3, prompt.len() as f64 / dt);
        b.release(seq);
    }
    println!("qwen prefill {} tok: best {:.1} tok/s", prompt.len(), prompt.len() as f64 / best);
    inferd::backend::candle::profile::report("qwen prefill");
}

/// Prefill A/B in one process: the same ~210-token prompt alternately on a backend with the GEMM
/// kernels and on one built with `INFERD_NO_GEMM=1` (per-row kernels), `AB_ROUNDS` (6) times
/// each; prints every pair and the median ratio. Adjacent runs see the same machine load.
#[test]
#[ignore]
fn prefill_ab_gemm_qwen() {
    let Some(path) = real_model(QWEN) else { return };
    let mut gemm = load(&path, None);
    // No other thread of this test process reads the environment meanwhile.
    std::env::set_var("INFERD_NO_GEMM", "1");
    let mut rows = load(&path, None);
    std::env::remove_var("INFERD_NO_GEMM");
    let prompt = chatml_prompt(&path, &["Write", "Ġa", "Ġstory", "Ġabout", "Ġa", "Ġcat", "."]).repeat(14);
    let rounds: u64 = std::env::var("AB_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(6);
    let run = |b: &mut inferd::backend::candle::CandleBackend, seq: u64| {
        let t0 = Instant::now();
        let out = b.step(&[StepInput { seq, tokens: &prompt, adapter: None, want_logits: true }]).expect("prefill");
        let dt = t0.elapsed().as_secs_f64();
        b.release(seq);
        (prompt.len() as f64 / dt, out[0].clone().expect("logits"))
    };
    let mut ratios = Vec::new();
    for r in 0..rounds {
        let (a, la) = run(&mut rows, r);
        let (b, lb) = run(&mut gemm, r);
        assert!(la == lb, "GEMM and per-row kernels must give the same logits bits");
        println!("round {r}: per-row {a:.1} tok/s, gemm {b:.1} tok/s, x{:.2}", b / a);
        ratios.push(b / a);
    }
    ratios.sort_by(f64::total_cmp);
    println!("prefill {} tok: median gemm/per-row x{:.2}", prompt.len(), ratios[ratios.len() / 2]);
}
