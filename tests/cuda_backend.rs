//! The candle backend on CUDA against the same backend on the CPU (run on a machine with an
//! NVIDIA GPU; `scripts/cuda_check.sh` runs this executable there): greedy tokens and logits on
//! the tiny models, a sequence alone against the same sequence in a mixed batch of 64, and the
//! paged KV cache under pressure through the engine. Compiled only with `--features cuda`.
//!
//! Fixtures are found below the repository root (`INFERD_REPO`, else the build's own root, else
//! the working directory), since the executable may run on another machine.
#![cfg(feature = "cuda")]
mod cuda_common;
mod reference_common;

use std::path::PathBuf;
use std::sync::Arc;

use inferd::backend::candle::CandleBackend;
use inferd::backend::cuda::gpu::Dtype;
use inferd::backend::cuda::{CudaBackend, CudaOptions};
use inferd::backend::{Backend, SeqId, StepInput};
use inferd::model::WeightsFormat;
use reference_common::Rng;

fn repo() -> PathBuf {
    if let Ok(r) = std::env::var("INFERD_REPO") {
        return PathBuf::from(r);
    }
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    if built.join("tests/fixtures").exists() {
        built
    } else {
        std::env::current_dir().expect("a working directory")
    }
}

fn weights(name: &str) -> WeightsFormat {
    let p = repo().join("tests/fixtures/generated").join(name);
    assert!(p.exists(), "{} is missing (scripts/make_tiny_model.py)", p.display());
    if p.is_dir() {
        WeightsFormat::Safetensors { dir: p }
    } else {
        WeightsFormat::Gguf(p)
    }
}

fn gpu(name: &str, dtype: Dtype) -> CudaBackend {
    let opts = CudaOptions { dtype, gpu_memory_fraction: 0.5, ..CudaOptions::default() };
    CudaBackend::load(&weights(name), &opts).unwrap_or_else(|e| panic!("{name} on cuda:0: {e}"))
}

fn cpu(name: &str) -> CandleBackend {
    CandleBackend::load(&weights(name), &candle_core::Device::Cpu, None).expect("loads on the CPU")
}

fn argmax(v: &[f32]) -> u32 {
    (0..v.len()).fold(0, |best, i| if v[i] > v[best] { i } else { best }) as u32
}

/// Greedy decoding of `n` tokens: the tokens and every step's logits.
fn greedy(b: &mut dyn Backend, seq: SeqId, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    greedy_after(b, seq, prompt.to_vec(), n)
}

/// Feeds `feed` (the rest of a prompt), then decodes `n` greedy tokens; releases `seq`.
fn greedy_after(b: &mut dyn Backend, seq: SeqId, mut feed: Vec<u32>, n: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let (mut toks, mut logits) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let l = b.step(&[StepInput { seq, tokens: &feed, adapter: None, want_logits: true }]).expect("step").remove(0).expect("logits");
        let t = argmax(&l);
        toks.push(t);
        logits.push(l);
        feed = vec![t];
    }
    b.release(seq);
    (toks, logits)
}

fn prompts() -> Vec<Vec<u32>> {
    vec![(1..17).collect(), vec![510, 72, 101, 300, 421, 33, 7, 9, 200, 201, 202, 203, 404], vec![42]]
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter().zip(b).flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs())).fold(0.0, f32::max)
}

#[test]
fn greedy_tokens_match_the_cpu_backend_and_logits_stay_within_tolerance() {
    // f32: weights, products and KV cache in f32 (only the summation order differs from the CPU);
    // f16: weights, product inputs and the KV cache rounded to f16, f32 accumulation. Quantized
    // GGUFs are compared with their dequantized reference in the next test: the CPU's Q8_0 / Q4_1
    // kernels round activations to 8 bits as ggml does, the GPU multiplies by the exact
    // dequantized weights.
    let mut failures = Vec::new();
    for dtype in [Dtype::F32, Dtype::F16] {
        for name in ["tiny-qwen2", "tiny-qwen2.f32.gguf", "tiny-llama", "tiny-llama.f32.gguf"] {
            let tol = if dtype == Dtype::F32 { 1e-3f32 } else { 0.1 };
            let (mut c, mut g) = (cpu(name), gpu(name, dtype));
            let (mut worst, mut same) = (0f32, 0);
            for (i, p) in prompts().iter().enumerate() {
                let (ct, cl) = greedy(&mut c, i as SeqId, p, 32);
                let (gt, gl) = greedy(&mut g, i as SeqId, p, 32);
                // Compare logits over the common prefix of tokens (the inputs are the same there).
                let n = ct.iter().zip(&gt).take_while(|(a, b)| a == b).count();
                same += usize::from(n == 32);
                worst = worst.max(max_diff(&gl[..n.max(1).min(32)], &cl[..n.max(1).min(32)]));
                if n < 32 {
                    failures.push(format!("{name} {dtype:?} prompt {i}: greedy tokens part at step {n}"));
                }
            }
            eprintln!("{name} {dtype:?}: {same} of 3 prompts x 32 greedy tokens identical to the CPU backend; max |logit diff| {worst:e}");
            if worst >= tol {
                failures.push(format!("{name} {dtype:?}: logits differ from the CPU backend's by {worst} (tolerance {tol})"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_quantized_gguf_matches_transformers_on_its_dequantized_weights() {
    // tests/fixtures/lora/llama-q4_1-reference.json: transformers (f32, eager) on the Q4_1 GGUF's
    // weights dequantized, teacher-forced with its own greedy tokens (scripts/make_tiny_lora.py).
    let cases: Vec<_> = reference_common::lora_reference_file("llama-q4_1-reference.json").into_iter().filter(|c| c.adapter.is_none()).collect();
    assert!(!cases.is_empty());
    for (dtype, tol) in [(Dtype::F32, 1e-3f32), (Dtype::F16, 0.1)] {
        let mut g = gpu("tiny-llama.q4_1.gguf", dtype);
        let mut worst = 0f32;
        for (i, case) in cases.iter().enumerate() {
            let mut feed = case.prompt.clone();
            for (s, want) in case.steps.iter().enumerate() {
                let l = g.step(&[StepInput { seq: i as SeqId, tokens: &feed, adapter: None, want_logits: true }]).expect("step").remove(0).expect("logits");
                worst = worst.max(l.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max));
                if dtype == Dtype::F32 {
                    if let Some(&t) = case.greedy.get(s) {
                        assert_eq!(argmax(&l), t, "{} step {s}: greedy token vs the reference", case.name);
                    }
                }
                feed = vec![case.greedy.get(s).copied().unwrap_or(0)];
            }
            g.release(i as SeqId);
        }
        eprintln!("tiny-llama.q4_1.gguf {dtype:?} vs transformers on the dequantized weights: max |logit diff| {worst:e}");
        assert!(worst < tol, "{dtype:?}: {worst} from the dequantized reference");
    }
}

#[test]
fn a_sequence_alone_and_in_a_mixed_batch_of_64_agree() {
    for dtype in [Dtype::F32, Dtype::F16] {
        let mut g = gpu("tiny-qwen2.q8_0.gguf", dtype);
        let prompts: Vec<Vec<u32>> = (0..64u32).map(|i| (0..1 + (i * 7) % 40).map(|j| (i * 31 + j * 17) % 500).collect()).collect();
        let alone: Vec<(Vec<u32>, Vec<Vec<f32>>)> = prompts.iter().enumerate().map(|(i, p)| greedy(&mut g, 1000 + i as SeqId, p, 12)).collect();
        // Together: prompts in chunks of up to 9 tokens beside the others' decode rows.
        let mut fed = vec![0usize; 64];
        let mut next: Vec<Vec<u32>> = vec![Vec::new(); 64];
        let mut got: Vec<(Vec<u32>, Vec<Vec<f32>>)> = vec![(Vec::new(), Vec::new()); 64];
        while got.iter().any(|g| g.0.len() < 12) {
            let mut rows: Vec<(usize, Vec<u32>, bool)> = Vec::new();
            for i in 0..64 {
                if got[i].0.len() >= 12 {
                    continue;
                }
                if fed[i] < prompts[i].len() {
                    let n = (prompts[i].len() - fed[i]).min(9);
                    rows.push((i, prompts[i][fed[i]..fed[i] + n].to_vec(), fed[i] + n == prompts[i].len()));
                    fed[i] += n;
                } else {
                    rows.push((i, next[i].clone(), true));
                }
            }
            let inputs: Vec<StepInput> = rows.iter().map(|(i, t, w)| StepInput { seq: *i as SeqId, tokens: t, adapter: None, want_logits: *w }).collect();
            for ((i, _, _), l) in rows.iter().zip(g.step(&inputs).expect("mixed step")) {
                if let Some(l) = l {
                    let t = argmax(&l);
                    got[*i].0.push(t);
                    got[*i].1.push(l);
                    next[*i] = vec![t];
                }
            }
        }
        let mut worst = 0f32;
        let mut parted = Vec::new();
        for i in 0..64 {
            let n = got[i].0.iter().zip(&alone[i].0).take_while(|(a, b)| a == b).count();
            if n < 12 {
                parted.push((i, n));
            }
            worst = worst.max(max_diff(&got[i].1[..n.max(1)], &alone[i].1[..n.max(1)]));
        }
        eprintln!("{dtype:?}: 64 sequences, {} part from their solo tokens {parted:?}; max |logit diff| over common tokens {worst:e}", parted.len());
        // cuBLAS picks its kernels by the batch's shape, so batched rows may differ by
        // reassociation; with f16 rounding (weights' inputs, KV cache) a last-bit difference can
        // flip one rounding step.
        assert!(parted.is_empty(), "{dtype:?}: sequences part from their solo tokens: {parted:?}");
        assert!(worst < if dtype == Dtype::F32 { 1e-3 } else { 5e-2 }, "{dtype:?}: batched logits differ from alone by {worst}");
    }
}

#[test]
fn fused_one_row_steps_match_the_unfused_launches_and_the_cpu_backend() {
    // `CudaOptions::fused_row` (f16): one-row steps fold RMSNorm, SiLU, and the q/k/v product's
    // bias, RoPE and cache write into their products (`gemv_row`, `gemv_qkv_rope`). Their inputs
    // are the unfused kernels' f16 values; only the products' summation order differs from
    // cuBLAS's. One sequence at a time, so every decode step is a one-row step,
    // through `step` and through `step_and_sample` (graph replays).
    use inferd::backend::SampleSpec;
    use inferd::engine::sampler::TokenCounts;
    use inferd::engine::SamplingParams;
    let greedy_params = SamplingParams { temperature: 0.0, ..SamplingParams::default() };
    let counts = TokenCounts::default();
    for name in ["tiny-qwen2", "tiny-qwen2.f32.gguf", "tiny-llama", "tiny-llama.f32.gguf"] {
        let load = |fused_row| CudaBackend::load(&weights(name), &CudaOptions { dtype: Dtype::F16, gpu_memory_fraction: 0.2, fused_row, ..CudaOptions::default() }).expect("loads");
        let (mut fused, mut plain, mut c) = (load(true), load(false), cpu(name));
        assert!(fused.fused_row() && !plain.fused_row(), "{name}: the fused one-row products are taken only when asked for");
        let (mut to_plain, mut to_cpu) = (0f32, 0f32);
        for (i, p) in prompts().iter().enumerate() {
            let (ft, fl) = greedy(&mut fused, i as SeqId, p, 32);
            let (pt, pl) = greedy(&mut plain, i as SeqId, p, 32);
            let (ct, cl) = greedy(&mut c, i as SeqId, p, 32);
            assert_eq!(ft, pt, "{name} prompt {i}: fused one-row steps vs unfused launches, greedy tokens");
            assert_eq!(ft, ct, "{name} prompt {i}: fused one-row steps vs the CPU backend, greedy tokens");
            to_plain = to_plain.max(max_diff(&fl, &pl));
            to_cpu = to_cpu.max(max_diff(&fl, &cl));
            // The same sequence through step_and_sample: decode steps replay a one-row graph.
            let mut next = p.clone();
            let mut got = Vec::new();
            for _ in 0..32 {
                let inputs = [StepInput { seq: 100 + i as SeqId, tokens: &next, adapter: None, want_logits: true }];
                let specs = [Some(SampleSpec { params: &greedy_params, counts: &counts, uniform: None, logprobs: None, mask: None })];
                let t = fused.step_and_sample(&inputs, &specs).expect("step").remove(0).expect("sampled").token;
                got.push(t);
                next = vec![t];
            }
            fused.release(100 + i as SeqId);
            assert_eq!(got, ft, "{name} prompt {i}: fused one-row graph replays vs `step`");
        }
        eprintln!("{name} f16: 3 prompts x 32 greedy tokens, fused one-row steps = unfused = CPU; max |logit diff| {to_plain:e} to unfused, {to_cpu:e} to the CPU");
        assert!(to_plain < 2e-2, "{name}: fused one-row logits {to_plain} from the unfused launches'");
        assert!(to_cpu < 0.1, "{name}: fused one-row logits {to_cpu} from the CPU backend's");
    }
}

#[test]
fn decode_steps_replayed_from_cuda_graphs_give_the_tokens_of_plain_launches() {
    use inferd::backend::SampleSpec;
    use inferd::engine::sampler::TokenCounts;
    use inferd::engine::SamplingParams;
    let greedy_params = SamplingParams { temperature: 0.0, ..SamplingParams::default() };
    let counts = TokenCounts::default();
    for n in [1usize, 3, 8, 13] {
        let mut g = gpu("tiny-llama.f32.gguf", Dtype::F32);
        let prompts: Vec<Vec<u32>> = (0..n as u32).map(|i| (0..3 + i % 7).map(|j| (i * 37 + j * 11) % 500).collect()).collect();
        let alone: Vec<Vec<u32>> = prompts.iter().enumerate().map(|(i, p)| greedy(&mut g, 500 + i as SeqId, p, 24).0).collect();
        // Together through step_and_sample: prefill, then 23 decode steps of n rows (padded to a
        // power of two; the first step of each size runs plainly, the second is captured, the
        // rest replay the graph).
        let mut next: Vec<Vec<u32>> = prompts.clone();
        let mut got: Vec<Vec<u32>> = vec![Vec::new(); n];
        for _ in 0..24 {
            let inputs: Vec<StepInput> = (0..n).map(|i| StepInput { seq: i as SeqId, tokens: &next[i], adapter: None, want_logits: true }).collect();
            let specs: Vec<Option<SampleSpec>> = (0..n).map(|_| Some(SampleSpec { params: &greedy_params, counts: &counts, uniform: None, logprobs: None, mask: None })).collect();
            let out = g.step_and_sample(&inputs, &specs).expect("step");
            for (i, s) in out.into_iter().enumerate() {
                let t = s.expect("sampled").token;
                got[i].push(t);
                next[i] = vec![t];
            }
        }
        assert_eq!(got, alone, "{n} rows: graph-replayed decode vs each sequence alone without graphs");
        eprintln!("{n} rows (padded to {}): 24 greedy tokens each, identical to the plain launches", n.next_power_of_two());
    }
}

#[test]
fn the_paged_cache_under_pressure_preempts_and_keeps_every_answer() {
    use inferd::engine::{spawn, EngineConfig, GenRequest, SamplingParams};
    let opts = inferd::model::SourceOptions { cache_dir: None, offline: true, progress: false };
    let path = repo().join("tests/fixtures/generated/tiny-qwen2.q8_0.gguf");
    let assets = inferd::model::load_assets(path.to_str().unwrap(), &opts).expect("assets");
    let run = |blocks: Option<usize>| {
        let o = CudaOptions { max_kv_blocks: blocks, gpu_memory_fraction: 0.5, ..CudaOptions::default() };
        let b = CudaBackend::load(&assets.weights, &o).expect("loads");
        let h = spawn(Box::new(b), Arc::clone(&assets.tokenizer), vec![], EngineConfig { max_batch: 32, max_waiting: 64, prefill_chunk: 64, channel_capacity: 64, overlap_output: false });
        let rxs: Vec<_> = (0..24u32)
            .map(|i| {
                let prompt: Vec<u32> = (0..5 + i % 30).map(|j| (i * 13 + j * 7) % 500).collect();
                let req = GenRequest { prompt_tokens: prompt, sampling: SamplingParams { temperature: 0.0, ..SamplingParams::default() }, max_new_tokens: 40, stop: vec![], logprobs: None, ignore_eos: true, adapter: None, constraint: None };
                h.submit(req).expect("queued")
            })
            .collect();
        let mut outs = Vec::new();
        for mut rx in rxs {
            let mut ids = Vec::new();
            while let Some(ev) = rx.blocking_recv() {
                match ev {
                    inferd::engine::Event::Token { token_id, .. } => ids.push(token_id),
                    inferd::engine::Event::Error(e) => panic!("a request failed: {e}"),
                    _ => {}
                }
            }
            outs.push(ids);
        }
        (outs, h.stats().preemptions)
    };
    let (want, _) = run(None);
    // 24 sequences of up to 74 positions need ~100 blocks of 16; give them 30.
    let (got, preemptions) = run(Some(30));
    assert!(want.iter().all(|w| w.len() == 40));
    assert_eq!(got, want, "answers under a full cache");
    assert!(preemptions > 0);
    eprintln!("paged cache of 30 blocks, 24 sequences: {preemptions} preemptions, every answer as with a large cache");
}

/// Async scheduling (`CudaOptions::pipeline`): the engine launches step N+1 before it collects
/// step N, following rows read their tokens on the device. A mix of greedy rows, seeded device
/// draws, rows with logprobs (sampled on the host inside `launch`), stop strings and a cache
/// small enough to preempt gives every request the events of the synchronous engine.
#[test]
fn async_scheduling_gives_every_request_the_events_of_the_synchronous_engine() {
    use inferd::engine::{GenRequest, SamplingParams};
    let opts = inferd::model::SourceOptions { cache_dir: None, offline: true, progress: false };
    let path = repo().join("tests/fixtures/generated/tiny-qwen2.q8_0.gguf");
    let assets = inferd::model::load_assets(path.to_str().unwrap(), &opts).expect("assets");
    let requests = || -> Vec<GenRequest> {
        (0..48u32)
            .map(|i| {
                let prompt: Vec<u32> = (0..3 + i % 29).map(|j| (i * 17 + j * 11) % 500).collect();
                let sampling = match i % 3 {
                    0 => SamplingParams { temperature: 0.0, ..SamplingParams::default() },
                    _ => SamplingParams { temperature: 0.9, top_p: 0.95, seed: Some(i as u64), ..SamplingParams::default() },
                };
                let logprobs = (i % 7 == 0).then_some(2);
                let stop = if i % 5 == 0 { vec!["e".to_string()] } else { vec![] };
                GenRequest { prompt_tokens: prompt, sampling, max_new_tokens: 24 + (i as usize % 17), stop, logprobs, ignore_eos: true, adapter: None, constraint: None }
            })
            .collect()
    };
    cuda_common::assert_modes_match("base rows", &[(true, None, false), (true, Some(40), false), (true, None, true), (false, Some(40), true)], |pipeline, blocks, lane| {
        let o = CudaOptions { max_kv_blocks: blocks, gpu_memory_fraction: 0.3, pipeline, ..CudaOptions::default() };
        let b = CudaBackend::load(&assets.weights, &o).expect("loads");
        cuda_common::events_of(b, &assets.tokenizer, requests(), 64, lane)
    });
}

#[test]
fn the_device_sampler_draws_what_the_host_distribution_gives() {
    use inferd::backend::gpu_sampling::reference_draw;
    use inferd::engine::SamplingParams;
    let g = gpu("tiny-qwen2.q8_0.gguf", Dtype::F16);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let (mut rows, mut skipped, mut wrong) = (0, 0, Vec::new());
    // Random rows: vocabularies of the tiny, SmolLM2 and Qwen sizes; flat and peaked logits, some
    // -inf (a grammar's or a bias's work) and a NaN; every filter alone and together.
    for batch in 0..12 {
        let width = rng.pick(&[1000usize, 49152, 151936]);
        let n = 48;
        let mut logits = Vec::new();
        let mut params = Vec::new();
        for _ in 0..n {
            let sigma = rng.pick(&[0.5f32, 2.0, 6.0]);
            let mut l: Vec<f32> = (0..width).map(|_| rng.normal() * sigma).collect();
            for _ in 0..rng.pick(&[0usize, 3, 300]) {
                let i = (rng.next() % width as u64) as usize;
                l[i] = f32::NEG_INFINITY;
            }
            if rng.next() % 8 == 0 {
                l[(rng.next() % width as u64) as usize] = f32::NAN;
            }
            let p = SamplingParams {
                temperature: rng.pick(&[0.2f32, 0.7, 1.0, 1.6]),
                top_k: rng.pick(&[0usize, 0, 1, 5, 40, 1000]),
                top_p: rng.pick(&[1.0f32, 1.0, 0.95, 0.6, 0.1]),
                min_p: rng.pick(&[0.0f32, 0.0, 0.02, 0.3]),
                ..SamplingParams::default()
            };
            params.push((p, rng.uniform()));
            logits.push(l);
        }
        let got = g.sample_on_device(&logits, &params).expect("device sampling");
        let again = g.sample_on_device(&logits, &params).expect("device sampling");
        assert_eq!(got, again, "batch {batch}: the same draws on a second run");
        let alone = g.sample_on_device(&logits[7..8], &params[7..8]).expect("one row");
        assert_eq!(alone[0], got[7], "batch {batch}: a row alone draws what it draws in the batch");
        for (i, (l, (p, u))) in logits.iter().zip(&params).enumerate() {
            let (want, margin) = reference_draw(l, p, *u);
            rows += 1;
            if margin < 1e-6 {
                skipped += 1;
            } else if got[i] != want {
                wrong.push((batch, i, width, p.temperature, p.top_k, p.top_p, p.min_p, *u, got[i], want));
            }
        }
    }
    eprintln!("device sampler: {rows} rows, {skipped} within 1e-6 of a boundary (not compared), {} differ from the host distribution's draw", wrong.len());
    assert!(wrong.is_empty(), "device draws that differ from the host's distribution: {wrong:?}");
}

#[test]
fn seeded_draws_on_the_device_do_not_depend_on_the_batch() {
    use inferd::backend::SampleSpec;
    use inferd::engine::sampler::TokenCounts;
    use inferd::engine::SamplingParams;
    let draw = SamplingParams { temperature: 0.9, top_k: 50, top_p: 0.95, min_p: 0.01, ..SamplingParams::default() };
    let greedy_params = SamplingParams { temperature: 0.0, ..SamplingParams::default() };
    let counts = TokenCounts::default();
    let n = 12usize;
    let prompts: Vec<Vec<u32>> = (0..n as u32).map(|i| (0..2 + i % 5).map(|j| (i * 53 + j * 19) % 500).collect()).collect();
    // Row i draws with uniforms from its own stream; every third row is greedy (every row when
    // `all_greedy`).
    let run = |g: &mut CudaBackend, rows: &[usize], seq0: SeqId, all_greedy: bool| -> Vec<Vec<u32>> {
        let mut rngs: Vec<Rng> = (0..n).map(|i| Rng(1 + i as u64 * 7919)).collect();
        let mut next: Vec<Vec<u32>> = prompts.clone();
        let mut got = vec![Vec::new(); n];
        for _ in 0..20 {
            let inputs: Vec<StepInput> = rows.iter().map(|&i| StepInput { seq: seq0 + i as SeqId, tokens: &next[i], adapter: None, want_logits: true }).collect();
            let us: Vec<f64> = rows.iter().map(|&i| rngs[i].uniform()).collect();
            let specs: Vec<Option<SampleSpec>> = rows
                .iter()
                .zip(&us)
                .map(|(&i, &u)| Some(if i % 3 == 0 || all_greedy { SampleSpec { params: &greedy_params, counts: &counts, uniform: None, logprobs: None, mask: None } } else { SampleSpec { params: &draw, counts: &counts, uniform: Some(u), logprobs: None, mask: None } }))
                .collect();
            let out = g.step_and_sample(&inputs, &specs).expect("step");
            for (&i, s) in rows.iter().zip(out) {
                let t = s.expect("sampled").token;
                got[i].push(t);
                next[i] = vec![t];
            }
        }
        for &i in rows {
            g.release(seq0 + i as SeqId);
        }
        got
    };
    let mut g = gpu("tiny-qwen2.q8_0.gguf", Dtype::F16);
    let all: Vec<usize> = (0..n).collect();
    let together = run(&mut g, &all, 0, false);
    let again = run(&mut g, &all, 100, false);
    assert_eq!(together, again, "the same seeds give the same tokens on a second run");
    for i in 0..n {
        let alone = run(&mut g, &[i], 200, false);
        assert_eq!(alone[i], together[i], "row {i}: alone vs in a batch of {n}");
    }
    // After drawing steps of many rows, then greedy steps of one row: a greedy batch keeps no
    // row's earlier sampling parameters (each row as greedy alone).
    let greedy_alone: Vec<Vec<u32>> = (0..n).map(|i| run(&mut g, &[i], 300, true).swap_remove(i)).collect();
    let greedy_batch = run(&mut g, &all, 400, true);
    assert_eq!(greedy_batch, greedy_alone, "greedy in a batch after drawing steps vs alone");
    let distinct = together.iter().filter(|t| t.iter().collect::<std::collections::HashSet<_>>().len() > 3).count();
    assert!(distinct >= n / 2, "drawing rows vary: {together:?}");
    eprintln!("{n} rows x 20 tokens ({} drawing on the device): identical alone, in the batch and on a second run", n - n.div_ceil(3));
}

/// Real models, which cannot be fixtures: `INFERD_TEST_REAL_GGUF` lists GGUF files (separated
/// by `:`); skipped when unset.
///
/// The GPU multiplies by the exact dequantized weights. The CPU backend's quantized kernels round
/// activations to 8 bits first, as ggml's do, and on SmolLM2 Q4_1 that alone parts the greedy
/// tokens from the exact product's at the 8th token of the first prompt (top-two margin 0.1
/// there; both on the CPU, 2026-12-03). So the reference is the CPU backend on the file's F32 twin
/// (`dequantized_gguf`: every tensor dequantized), which computes what the GPU computes:
/// - the GPU in f32 mode, free-running: the reference's 32 greedy tokens on each prompt;
/// - the GPU in f32 and f16 modes fed the reference's tokens: every step's logits within 5e-3
///   (f32) and 0.5 (f16) of the reference's (a wrong kernel moves them by units);
/// - against the quantized file on the CPU: the identical greedy prefix and the logit difference
///   are printed, not asserted.
#[test]
fn real_models_match_the_cpu_backend_on_their_dequantized_weights() {
    let Ok(list) = std::env::var("INFERD_TEST_REAL_GGUF") else {
        eprintln!("skipped: INFERD_TEST_REAL_GGUF names no model");
        return;
    };
    let opts = inferd::model::SourceOptions { cache_dir: None, offline: true, progress: false };
    let texts = ["Write a Python function that checks whether a number is prime.", "The capital of France is", "def fibonacci(n):"];
    for path in list.split(':').filter(|p| !p.is_empty()) {
        let assets = inferd::model::load_assets(path, &opts).unwrap_or_else(|e| panic!("{path}: {e}"));
        let WeightsFormat::Gguf(file) = &assets.weights else { panic!("{path}: not a GGUF file") };
        let twin = std::env::temp_dir().join(format!("inferd-real-f32-{}.gguf", std::process::id()));
        reference_common::dequantized_gguf(file, &twin);
        let mut exact = CandleBackend::load(&WeightsFormat::Gguf(twin.clone()), &candle_core::Device::Cpu, None).expect("the F32 twin loads on the CPU");
        let _ = std::fs::remove_file(&twin);
        let mut quantized = CandleBackend::load(&WeightsFormat::Gguf(file.clone()), &candle_core::Device::Cpu, None).expect("loads on the CPU");
        let prompts: Vec<Vec<u32>> = texts.iter().map(|t| assets.tokenizer.encode(*t, true).expect("encodes").get_ids().to_vec()).collect();
        let refs: Vec<(Vec<u32>, Vec<Vec<f32>>)> = prompts.iter().enumerate().map(|(k, p)| greedy(&mut exact, 7000 + k as SeqId, p, 32)).collect();
        for (dtype, tol) in [(Dtype::F32, 5e-3f32), (Dtype::F16, 0.5)] {
            let o = CudaOptions { dtype, gpu_memory_fraction: 0.3, max_context: Some(4096), ..CudaOptions::default() };
            let mut g = CudaBackend::load(&assets.weights, &o).unwrap_or_else(|e| panic!("{path} on cuda:0: {e}"));
            for (k, (p, (rt, rl))) in prompts.iter().zip(&refs).enumerate() {
                let forced = teacher_forced(&mut g, 7100 + k as SeqId, p, rt);
                let d = max_diff(&forced, rl);
                let (gt, _) = greedy(&mut g, 7200 + k as SeqId, p, 32);
                let same = gt.iter().zip(rt).take_while(|(a, b)| a == b).count();
                eprintln!("{path} {dtype:?} prompt {k}: fed the F32 twin's tokens, max |logit diff| {d:e} (tolerance {tol:e}); free-running, {same} of 32 greedy tokens as the twin's");
                assert!(d < tol, "{path} {dtype:?} prompt {:?}: logits {d} from the CPU backend on the dequantized weights", texts[k]);
                if dtype == Dtype::F32 {
                    assert_eq!(&gt, rt, "{path} prompt {:?}: GPU (f32) vs the CPU backend on the dequantized weights, greedy tokens", texts[k]);
                }
            }
        }
        for (k, (p, (rt, rl))) in prompts.iter().zip(&refs).enumerate() {
            let (qt, _) = greedy(&mut quantized, 7300 + k as SeqId, p, 32);
            let forced = teacher_forced(&mut quantized, 7400 + k as SeqId, p, rt);
            let same = qt.iter().zip(rt).take_while(|(a, b)| a == b).count();
            eprintln!("{path} prompt {k}: the CPU backend on the quantized file (8-bit activations): {same} of 32 greedy tokens as the F32 twin's; fed its tokens, max |logit diff| {:e}", max_diff(&forced, rl));
        }
    }
}

/// The logits of the prompt and then of each of `tokens` fed in turn (teacher forcing): one
/// vector per token of `tokens`, the same steps `greedy` takes when it picks those tokens.
fn teacher_forced(b: &mut dyn Backend, seq: SeqId, prompt: &[u32], tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut out = Vec::new();
    let mut feed = prompt.to_vec();
    for &t in tokens {
        out.push(b.step(&[StepInput { seq, tokens: &feed, adapter: None, want_logits: true }]).expect("step").remove(0).expect("logits"));
        feed = vec![t];
    }
    b.release(seq);
    out
}

/// Prompt `prompt` on `seq` after `reuse_prefix` (as the engine calls it), then greedy decoding:
/// the positions reused, the tokens and every step's logits.
fn greedy_reusing(b: &mut CudaBackend, seq: SeqId, prompt: &[u32], n: usize) -> (usize, Vec<u32>, Vec<Vec<f32>>) {
    let reused = b.reuse_prefix(seq, prompt, None);
    let (toks, logits) = greedy_after(b, seq, prompt[reused..].to_vec(), n);
    (reused, toks, logits)
}

#[test]
fn prompts_that_reuse_a_cached_prefix_give_the_tokens_of_a_full_prefill() {
    // Eight prompts behind one 40-token system prompt: the first computes it, the others reuse
    // its first two blocks (32 positions, shared, not copied), live or after it ended. Against
    // a backend without prefix caching: the same greedy tokens, logits within the batch
    // tolerance (the cached keys and values were computed in another step's shape).
    let system: Vec<u32> = (0..40).map(|j| (j * 37 + 11) % 500).collect();
    let prompts: Vec<Vec<u32>> = (0..8u32).map(|i| system.iter().copied().chain((0..1 + i * 3).map(|j| (i * 131 + j * 7) % 500)).collect()).collect();
    for dtype in [Dtype::F32, Dtype::F16] {
        let name = "tiny-qwen2.q8_0.gguf";
        let mut plain = CudaBackend::load(&weights(name), &CudaOptions { dtype, gpu_memory_fraction: 0.3, prefix_caching: false, ..CudaOptions::default() }).expect("loads");
        let mut cached = gpu(name, dtype);
        let mut worst = 0f32;
        for (i, p) in prompts.iter().enumerate() {
            let (none, want, want_l) = greedy_reusing(&mut plain, 100 + i as SeqId, p, 12);
            assert_eq!(none, 0, "prefix caching off reuses nothing");
            // Even prompts while another sequence still holds the prefix, odd ones after.
            let holder = (i % 2 == 0 && i > 0).then(|| {
                let seq = 900 + i as SeqId;
                let n = cached.reuse_prefix(seq, &system, None);
                assert_eq!(n, 32, "the holder shares the cached blocks too");
                cached.step(&[StepInput { seq, tokens: &system[n..], adapter: None, want_logits: false }]).expect("step");
                seq
            });
            let (reused, got, got_l) = greedy_reusing(&mut cached, 200 + i as SeqId, p, 12);
            if let Some(seq) = holder {
                cached.release(seq);
            }
            assert_eq!(reused, if i == 0 { 0 } else { 32 }, "prompt {i}: positions reused");
            assert_eq!(got, want, "{dtype:?} prompt {i}: tokens with a reused prefix vs a full prefill");
            worst = worst.max(max_diff(&got_l, &want_l));
        }
        assert!(cached.prefix_cache_bytes() > 0, "ended sequences' blocks stay cached");
        eprintln!("{dtype:?}: 7 of 8 prompts reused 32 cached positions; greedy tokens as a full prefill; max |logit diff| {worst:e}");
        assert!(worst < if dtype == Dtype::F32 { 1e-3 } else { 5e-2 }, "{dtype:?}: logits {worst} from a full prefill");
    }
}
