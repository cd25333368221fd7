//! LoRA rows on the candle backend's CUDA path (`src/backend/cuda/lora.rs`), run on a machine
//! with an NVIDIA GPU (`scripts/cuda_check.sh`): logits with each adapter against transformers +
//! PEFT, and base and adapter rows mixed at random in steps (prompt chunks, decode rows, CUDA
//! graphs) against each sequence alone. Compiled only with `--features cuda`.
#![cfg(feature = "cuda")]
mod cuda_common;
mod reference_common;

use std::path::PathBuf;
use std::sync::Arc;

use inferd::backend::cuda::gpu::Dtype;
use inferd::backend::cuda::lora_stack::StackSize;
use inferd::backend::cuda::{CudaBackend, CudaOptions};
use inferd::backend::{Backend, SampleSpec, SeqId, StepInput};
use inferd::engine::sampler::TokenCounts;
use inferd::engine::SamplingParams;
use inferd::lora::{read_adapter, LoraAdapter};
use inferd::model::WeightsFormat;
use reference_common::{argmax, lora_reference_file, max_abs_diff, Rng};

fn repo() -> PathBuf {
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    if built.join("tests/fixtures").exists() {
        built
    } else {
        std::env::current_dir().expect("a working directory")
    }
}

/// The two ways adapter rows are applied: the tiled kernel (no stacks), and stacks that hold
/// every test adapter (ranks 4 and 8, at most 4 in a step).
const MODES: [Option<StackSize>; 2] = [None, Some(StackSize { slots: 4, rank: 8 })];

fn gpu(name: &str, dtype: Dtype, lora_stack: Option<StackSize>) -> CudaBackend {
    let p = repo().join("tests/fixtures/generated").join(name);
    assert!(p.exists(), "{} is missing (scripts/make_tiny_model.py)", p.display());
    let w = if p.is_dir() { WeightsFormat::Safetensors { dir: p } } else { WeightsFormat::Gguf(p) };
    CudaBackend::load(&w, &CudaOptions { dtype, gpu_memory_fraction: 0.5, lora_stack, ..CudaOptions::default() }).unwrap_or_else(|e| panic!("{name} on cuda:0: {e}"))
}

/// Every adapter step of `g` went the way `lora_stack` says (stacks that hold every adapter of
/// the test: all of them through the stacks; none: all through the tiled kernel).
fn assert_lora_path(g: &CudaBackend, lora_stack: Option<StackSize>, what: &str) {
    let (stacked, tiled) = g.lora_steps();
    match lora_stack {
        Some(_) => assert!(stacked > 0 && tiled == 0, "{what}: {stacked} steps through the stacks, {tiled} through the tiled kernel"),
        None => assert!(stacked == 0 && tiled > 0, "{what}: {stacked} steps through the stacks, {tiled} through the tiled kernel"),
    }
}

/// An adapter of tests/fixtures/lora bound to `b`'s base, as the server's registry binds it.
fn bound(b: &CudaBackend, name: &str) -> Arc<LoraAdapter> {
    let a = read_adapter(name, &repo().join("tests/fixtures/lora").join(name)).expect("adapter reads");
    Arc::new(a.bind(&b.lora_dims().expect("the CUDA backend applies adapters")).expect("the adapter fits"))
}

#[test]
fn logits_with_each_adapter_match_transformers_and_peft() {
    // (model, reference, f32 tolerance): the Q4_1 file's reference is on its dequantized weights,
    // which the GPU multiplies by exactly.
    let models = [
        ("tiny-qwen2", "reference.json"),
        ("tiny-llama.f32.gguf", "llama-reference.json"),
        ("tiny-llama", "llama-reference.json"),
        ("tiny-llama.q4_1.gguf", "llama-q4_1-reference.json"),
    ];
    for (dtype, tol) in [(Dtype::F32, 1e-3f32), (Dtype::F16, 0.1)] {
        for ((model, reference), stack) in models.into_iter().flat_map(|m| MODES.map(|s| (m, s))) {
            let cases = lora_reference_file(reference);
            assert!(cases.iter().any(|c| c.adapter.is_some()), "{reference} has adapter cases");
            let mut g = gpu(model, dtype, stack);
            let mut worst = 0f32;
            for (i, case) in cases.iter().enumerate() {
                let a = case.adapter.as_deref().map(|n| bound(&g, n));
                let seq = i as SeqId;
                let mut feed = case.prompt.clone();
                for (s, want) in case.steps.iter().enumerate() {
                    let l = g.step(&[StepInput { seq, tokens: &feed, adapter: a.as_ref(), want_logits: true }]).expect("step").remove(0).expect("logits");
                    worst = worst.max(max_abs_diff(&l, want));
                    if let (Dtype::F32, Some(&t)) = (dtype, case.greedy.get(s)) {
                        assert_eq!(argmax(&l), t, "{model} {:?} {} step {s}: greedy token vs PEFT", case.adapter, case.name);
                    }
                    feed = vec![case.greedy.get(s).copied().unwrap_or(0)];
                }
                g.release(seq);
            }
            eprintln!("{model} {dtype:?} (stacks {stack:?}): base and adapter rows vs transformers + PEFT, max |logit diff| {worst:e} (tolerance {tol:e})");
            assert!(worst < tol, "{model} {dtype:?} (stacks {stack:?}): {worst} from transformers + PEFT");
            assert_lora_path(&g, stack, model);
        }
    }
}

/// One sequence of a randomized schedule: its prompt, adapter (index into the adapters, None:
/// base model) and the step it arrives at.
struct Plan {
    prompt: Vec<u32>,
    adapter: Option<usize>,
    arrives: usize,
}

/// Runs `plans` together through `step_and_sample` (greedy): prompts in chunks of up to `chunk`
/// tokens beside the others' decode rows, each sequence from its arrival step until it has `n`
/// tokens. Returns each sequence's tokens.
fn together(g: &mut CudaBackend, adapters: &[Arc<LoraAdapter>], plans: &[Plan], seq0: SeqId, chunk: usize, n: usize) -> Vec<Vec<u32>> {
    let greedy = SamplingParams { temperature: 0.0, ..SamplingParams::default() };
    let counts = TokenCounts::default();
    let mut fed = vec![0usize; plans.len()];
    let mut next: Vec<Vec<u32>> = vec![Vec::new(); plans.len()];
    let mut got: Vec<Vec<u32>> = vec![Vec::new(); plans.len()];
    let mut step = 0;
    while got.iter().any(|t| t.len() < n) {
        let mut rows: Vec<(usize, Vec<u32>, bool)> = Vec::new();
        for (i, p) in plans.iter().enumerate() {
            if got[i].len() >= n || p.arrives > step {
                continue;
            }
            if fed[i] < p.prompt.len() {
                let k = (p.prompt.len() - fed[i]).min(chunk);
                rows.push((i, p.prompt[fed[i]..fed[i] + k].to_vec(), fed[i] + k == p.prompt.len()));
                fed[i] += k;
            } else {
                rows.push((i, next[i].clone(), true));
            }
        }
        step += 1;
        if rows.is_empty() {
            continue;
        }
        let inputs: Vec<StepInput> = rows
            .iter()
            .map(|(i, t, w)| StepInput { seq: seq0 + *i as SeqId, tokens: t, adapter: plans[*i].adapter.map(|a| &adapters[a]), want_logits: *w })
            .collect();
        let specs: Vec<Option<SampleSpec>> = rows.iter().map(|(_, _, w)| w.then_some(SampleSpec { params: &greedy, counts: &counts, uniform: None, logprobs: None, mask: None })).collect();
        for ((i, _, _), s) in rows.iter().zip(g.step_and_sample(&inputs, &specs).expect("mixed step")) {
            if let Some(s) = s {
                got[*i].push(s.token);
                next[*i] = vec![s.token];
            }
        }
    }
    for i in 0..plans.len() {
        g.release(seq0 + i as SeqId);
    }
    got
}

#[test]
fn base_and_adapter_rows_mixed_at_random_give_what_each_gives_alone() {
    // Random schedules: up to 40 sequences, each on the base model or one of three adapters
    // (all seven modules, q and k only, a qwen2 pair), arriving at random steps, prompts of 1-40
    // tokens in random chunk sizes. Decode steps of one token a row replay CUDA graphs (with and
    // without adapter rows). Each sequence's greedy tokens must be those it gets alone.
    for (model, names) in [("tiny-llama.f32.gguf", ["llama-adapter-all", "llama-adapter-qk"]), ("tiny-qwen2", ["adapter-a", "adapter-b"])] {
        for (dtype, stack) in [Dtype::F32, Dtype::F16].into_iter().flat_map(|d| MODES.map(|s| (d, s))) {
            let mut g = gpu(model, dtype, stack);
            let adapters: Vec<Arc<LoraAdapter>> = names.iter().map(|n| bound(&g, n)).collect();
            let mut rng = Rng(0x5eed ^ dtype as u64);
            let mut seq0 = 10_000;
            for round in 0..6 {
                let count = 8 + rng.below(33);
                let plans: Vec<Plan> = (0..count)
                    .map(|_| Plan {
                        prompt: (0..1 + rng.below(40)).map(|_| rng.below(500) as u32).collect(),
                        adapter: rng.chance(0.7).then(|| rng.below(adapters.len())),
                        arrives: rng.below(6),
                    })
                    .collect();
                let chunk = 1 + rng.below(16);
                let mixed = together(&mut g, &adapters, &plans, seq0, chunk, 10);
                seq0 += 1000;
                for (i, p) in plans.iter().enumerate() {
                    let alone = together(&mut g, &adapters, &[Plan { prompt: p.prompt.clone(), adapter: p.adapter, arrives: 0 }], seq0, 64, 10);
                    seq0 += 1;
                    assert_eq!(mixed[i], alone[0], "{model} {dtype:?} (stacks {stack:?}) round {round}: sequence {i} (adapter {:?}) in a batch of {count} vs alone", p.adapter.map(|a| names[a]));
                }
                let adapted = plans.iter().filter(|p| p.adapter.is_some()).count();
                eprintln!("{model} {dtype:?} (stacks {stack:?}) round {round}: {count} sequences ({adapted} with adapters), chunks of {chunk}: each as alone");
            }
            assert_lora_path(&g, stack, model);
            // The adapters change the logits (a step that applied none would pass the above).
            let prompt: Vec<u32> = (1..20).collect();
            let mut first = |a: Option<&Arc<LoraAdapter>>, seq: SeqId| {
                let l = g.step(&[StepInput { seq, tokens: &prompt, adapter: a, want_logits: true }]).expect("step").remove(0).expect("logits");
                g.release(seq);
                l
            };
            let base = first(None, seq0);
            for (k, a) in adapters.iter().enumerate() {
                let d = max_abs_diff(&first(Some(a), seq0 + 1 + k as SeqId), &base);
                assert!(d > 1e-2, "{model} {dtype:?}: adapter {} moves the logits by only {d}", names[k]);
            }
        }
    }
}

#[test]
fn a_cached_prefix_serves_only_its_own_adapter() {
    // A 40-token prompt computed with adapter-a: a later prompt behind it reuses its two full
    // blocks with adapter-a only (not with the base model or adapter-b), and gets the tokens of
    // a full prefill with adapter-a.
    let greedy = |g: &mut CudaBackend, seq: SeqId, prompt: &[u32], a: Option<&Arc<LoraAdapter>>| -> (usize, Vec<u32>) {
        let reused = g.reuse_prefix(seq, prompt, a);
        let mut feed = prompt[reused..].to_vec();
        let mut toks = Vec::new();
        for _ in 0..10 {
            let l = g.step(&[StepInput { seq, tokens: &feed, adapter: a, want_logits: true }]).expect("step").remove(0).expect("logits");
            toks.push(argmax(&l));
            feed = vec![argmax(&l)];
        }
        g.release(seq);
        (reused, toks)
    };
    let system: Vec<u32> = (0..40).map(|j| (j * 53 + 5) % 500).collect();
    let later: Vec<u32> = system.iter().copied().chain([7, 8, 9]).collect();
    let mut g = gpu("tiny-qwen2", Dtype::F32, None);
    let (a, b) = (bound(&g, "adapter-a"), bound(&g, "adapter-b"));
    let plain = CudaBackend::load(&WeightsFormat::Safetensors { dir: repo().join("tests/fixtures/generated/tiny-qwen2") }, &CudaOptions { dtype: Dtype::F32, gpu_memory_fraction: 0.3, prefix_caching: false, ..CudaOptions::default() });
    let mut plain = plain.expect("loads");
    assert_eq!(greedy(&mut g, 1, &system, Some(&a)).0, 0);
    assert_eq!(g.reuse_prefix(2, &later, None), 0, "the base model does not reuse adapter-a's blocks");
    g.release(2);
    assert_eq!(g.reuse_prefix(3, &later, Some(&b)), 0, "adapter-b does not reuse adapter-a's blocks");
    g.release(3);
    let (reused, got) = greedy(&mut g, 4, &later, Some(&a));
    assert_eq!(reused, 32);
    assert_eq!(got, greedy(&mut plain, 4, &later, Some(&a)).1, "tokens with adapter-a's cached prefix vs a full prefill");
    eprintln!("adapter-a's cached prefix: reused by adapter-a only (32 positions), tokens as a full prefill");
}

#[test]
fn more_adapters_than_device_slots_are_evicted_and_uploaded_again() {
    // A backend of 4 slots (so 4 adapters on the device at most) and 10 loads of the two qwen2
    // adapters (each load its own adapter, as a reload makes): steps of up to 4 sequences with
    // random loads evict the least recently used and upload again, and each sequence's tokens
    // are those its adapter gives alone. Dropping every load frees the device at the next step.
    let dir = repo().join("tests/fixtures/generated/tiny-qwen2");
    let mut g = CudaBackend::load(&WeightsFormat::Safetensors { dir }, &CudaOptions { dtype: Dtype::F32, gpu_memory_fraction: 0.3, max_slots: 4, ..CudaOptions::default() }).expect("loads");
    let files = ["adapter-a", "adapter-b"];
    let loads: Vec<Arc<LoraAdapter>> = (0..10).map(|i| bound(&g, files[i % 2])).collect();
    let prompts: Vec<Vec<u32>> = (0..4u32).map(|i| (0..3 + i * 5).map(|j| (i * 97 + j * 13) % 500).collect()).collect();
    // Alone, with the first load of each file.
    let mut want = vec![vec![Vec::new(); prompts.len()]; 2];
    for (f, w) in want.iter_mut().enumerate() {
        for (k, p) in prompts.iter().enumerate() {
            w[k] = together(&mut g, &loads[f..f + 1], &[Plan { prompt: p.clone(), adapter: Some(0), arrives: 0 }], 50_000 + (f * 10 + k) as SeqId, 64, 8).remove(0);
        }
    }
    let mut rng = Rng(77);
    for round in 0..12 {
        let picks: Vec<usize> = (0..4).map(|_| rng.below(loads.len())).collect();
        let plans: Vec<Plan> = picks.iter().enumerate().map(|(k, &a)| Plan { prompt: prompts[k].clone(), adapter: Some(a), arrives: rng.below(3) }).collect();
        let got = together(&mut g, &loads, &plans, 60_000 + round * 10, 1 + rng.below(8), 8);
        for (k, &a) in picks.iter().enumerate() {
            assert_eq!(got[k], want[a % 2][k], "round {round}: sequence {k} with load {a} ({})", files[a % 2]);
        }
        assert!(g.resident_adapters() <= 4, "at most the slots' adapters on the device");
    }
    drop(loads);
    let l = g.step(&[StepInput { seq: 70_000, tokens: &[1, 2, 3], adapter: None, want_logits: true }]).expect("step");
    assert!(l[0].is_some());
    g.release(70_000);
    assert_eq!(g.resident_adapters(), 0, "adapters no request holds leave the device");
    eprintln!("10 loads of 2 adapters over 4 slots, 12 random rounds: tokens as alone; none left after the last drop");
}

#[test]
fn stacks_take_steps_whose_adapters_fit_and_leave_the_rest_to_the_tiled_kernel() {
    // Stacks of 2 slots of rank 4 and four loads of the qwen2 adapters: three of adapter-a (rank
    // 4) and one of adapter-b (rank 8). Steps with two adapter-a loads go through the stacks (a
    // third load takes the least recently used slot); three loads in a step, or adapter-b, take
    // the tiled kernel. Every sequence's tokens must be those of its adapter's file alone on a
    // backend without stacks.
    let dir = repo().join("tests/fixtures/generated/tiny-qwen2");
    let load = |lora_stack| CudaBackend::load(&WeightsFormat::Safetensors { dir: dir.clone() }, &CudaOptions { dtype: Dtype::F32, gpu_memory_fraction: 0.2, lora_stack, ..CudaOptions::default() }).expect("loads");
    let (mut g, mut plain) = (load(Some(StackSize { slots: 2, rank: 4 })), load(None));
    let files = ["adapter-a", "adapter-a", "adapter-a", "adapter-b"];
    let loads: Vec<Arc<LoraAdapter>> = files.iter().map(|f| bound(&g, f)).collect();
    let prompts: Vec<Vec<u32>> = (0..3u32).map(|i| (0..4 + i * 6).map(|j| (i * 71 + j * 17) % 500).collect()).collect();
    let alone = |plain: &mut CudaBackend, f: &str, k: usize, seq: SeqId| {
        let a = [bound(plain, f)];
        together(plain, &a, &[Plan { prompt: prompts[k].clone(), adapter: Some(0), arrives: 0 }], seq, 64, 8).remove(0)
    };
    // (loads of the round's three sequences, None: base model; whether the stacks take it)
    let rounds: [([Option<usize>; 3], bool); 6] = [
        ([Some(0), Some(1), None], true),
        ([Some(2), Some(0), Some(0)], true),
        ([Some(0), Some(1), Some(2)], false),
        ([Some(1), None, Some(1)], true),
        ([Some(0), Some(3), None], false),
        ([Some(2), Some(1), Some(2)], true),
    ];
    let mut seq = 90_000;
    for (round, (picks, stacked)) in rounds.iter().enumerate() {
        let before = g.lora_steps();
        let plans: Vec<Plan> = picks.iter().enumerate().map(|(k, &a)| Plan { prompt: prompts[k].clone(), adapter: a, arrives: k % 2 }).collect();
        let got = together(&mut g, &loads, &plans, seq, 5, 8);
        seq += 10;
        for (k, &a) in picks.iter().enumerate() {
            let want = match a {
                Some(a) => alone(&mut plain, files[a], k, seq + k as SeqId),
                None => together(&mut plain, &[], &[Plan { prompt: prompts[k].clone(), adapter: None, arrives: 0 }], seq + k as SeqId, 64, 8).remove(0),
            };
            assert_eq!(got[k], want, "round {round}: sequence {k} with load {a:?}");
        }
        seq += 10;
        let after = g.lora_steps();
        let (s, t) = (after.0 - before.0, after.1 - before.1);
        if *stacked {
            assert!(s > 0 && t == 0, "round {round}: {s} steps through the stacks, {t} through the tiled kernel; all should take the stacks");
        } else {
            assert!(t > 0, "round {round}: no step through the tiled kernel");
        }
    }
    eprintln!("stacks of 2x4: rounds through the stacks and the tiled kernel, tokens as alone without stacks");
}

#[test]
fn more_adapters_in_a_step_than_tile_blocks() {
    // 16 loads of the two qwen2 adapters (each load its own adapter, so 16 on the device), one
    // sequence each: a decode step of 16 rows has 16 one-row tiles and fewer tile blocks (12,
    // `lora::tile_blocks`), so some blocks take a second tile in turn. Each sequence's tokens must be
    // those its adapter's file gives alone.
    let dir = repo().join("tests/fixtures/generated/tiny-qwen2");
    let mut g = CudaBackend::load(&WeightsFormat::Safetensors { dir }, &CudaOptions { dtype: Dtype::F32, gpu_memory_fraction: 0.3, ..CudaOptions::default() }).expect("loads");
    let files = ["adapter-a", "adapter-b"];
    let loads: Vec<Arc<LoraAdapter>> = (0..16).map(|i| bound(&g, files[i % 2])).collect();
    let prompts: Vec<Vec<u32>> = (0..16u32).map(|i| (0..2 + i % 5).map(|j| (i * 31 + j * 7) % 500).collect()).collect();
    let plans: Vec<Plan> = (0..16).map(|k| Plan { prompt: prompts[k].clone(), adapter: Some(k), arrives: 0 }).collect();
    let got = together(&mut g, &loads, &plans, 80_000, 3, 8);
    assert_eq!(g.resident_adapters(), 16);
    for (k, p) in prompts.iter().enumerate() {
        let alone = together(&mut g, &loads[k % 2..k % 2 + 1], &[Plan { prompt: p.clone(), adapter: Some(0), arrives: 0 }], 81_000 + k as SeqId, 64, 8).remove(0);
        assert_eq!(got[k], alone, "sequence {k} ({})", files[k % 2]);
    }
    eprintln!("16 adapters in one step over 12 tile blocks: tokens as alone");
}

/// Async scheduling (the server's default on CUDA) with adapter rows: base, adapter-a and
/// adapter-b requests mixed (greedy and seeded device draws, stop strings, a cache small enough
/// to preempt) give every request the events of the synchronous engine, with and without the
/// output lane.
#[test]
fn async_scheduling_with_adapter_rows_gives_the_events_of_the_synchronous_engine() {
    use inferd::engine::GenRequest;
    let dir = repo().join("tests/fixtures/generated/tiny-qwen2");
    let opts = inferd::model::SourceOptions { cache_dir: None, offline: true, progress: false };
    let assets = inferd::model::load_assets(dir.to_str().unwrap(), &opts).expect("assets");
    cuda_common::assert_modes_match("adapters", &[(true, None, false), (true, Some(30), false), (true, None, true), (true, Some(30), true)], |pipeline, blocks, lane| {
        let o = CudaOptions { dtype: Dtype::F32, max_kv_blocks: blocks, gpu_memory_fraction: 0.3, pipeline, ..CudaOptions::default() };
        let b = CudaBackend::load(&assets.weights, &o).expect("loads");
        let adapters = [bound(&b, "adapter-a"), bound(&b, "adapter-b")];
        let requests = (0..40u32)
            .map(|i| {
                let prompt: Vec<u32> = (0..2 + i % 23).map(|j| (i * 13 + j * 7) % 500).collect();
                let sampling = match i % 4 {
                    0 | 1 => SamplingParams { temperature: 0.0, ..SamplingParams::default() },
                    _ => SamplingParams { temperature: 0.8, top_k: 40, seed: Some(i as u64), ..SamplingParams::default() },
                };
                let stop = if i % 6 == 0 { vec!["a".to_string()] } else { vec![] };
                let adapter = match i % 3 {
                    0 => None,
                    k => Some(Arc::clone(&adapters[k as usize - 1])),
                };
                GenRequest { prompt_tokens: prompt, sampling, max_new_tokens: 16 + (i as usize % 13), stop, logprobs: None, ignore_eos: true, adapter, constraint: None }
            })
            .collect();
        cuda_common::events_of(b, &assets.tokenizer, requests, 48, lane)
    });
}
