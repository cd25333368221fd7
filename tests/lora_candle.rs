//! LoRA on the candle backend with the tiny adapters of tests/fixtures/lora (scripts/make_tiny_lora.py):
//! logits against transformers + PEFT (tiny qwen2; tiny llama as GGUF, whose q/k rows llama.cpp
//! permutes, and as safetensors), mlx-lm's format against PEFT's, a mixed batch (base, A and B rows
//! in one step) against each alone, and the errors bad adapters give.
mod reference_common;

use std::path::PathBuf;
use std::sync::Arc;

use inferd::backend::candle::CandleBackend;
use inferd::backend::{Backend, SeqId, StepInput};
use inferd::lora::{read_adapter, LoraAdapter};
use inferd::model::WeightsFormat;
use reference_common::{argmax, lora_reference as reference, lora_reference_file, max_abs_diff, Case};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn base() -> Option<CandleBackend> {
    let dir = root().join("tests/fixtures/generated/tiny-qwen2");
    if !dir.exists() {
        eprintln!("SKIPPED: {} is missing (run scripts/make_tiny_model.py)", dir.display());
        return None;
    }
    Some(CandleBackend::load(&WeightsFormat::Safetensors { dir }, &candle_core::Device::Cpu, None).expect("load"))
}

fn adapter(name: &str) -> Arc<LoraAdapter> {
    Arc::new(read_adapter(name, &root().join("tests/fixtures/lora").join(name)).expect("adapter reads"))
}

/// An adapter bound to `b`'s base, as the server's registry binds every load.
fn bound(b: &CandleBackend, name: &str) -> Arc<LoraAdapter> {
    let a = read_adapter(name, &root().join("tests/fixtures/lora").join(name)).expect("adapter reads");
    Arc::new(a.bind(&b.lora_dims().expect("candle applies adapters")).expect("the adapter fits"))
}

fn generated(name: &str) -> PathBuf {
    let p = root().join("tests/fixtures/generated").join(name);
    assert!(p.exists(), "{} is missing (run scripts/make_tiny_model.py)", p.display());
    p
}

/// Worst |logit diff| of `b` with each reference case's adapter (by name; `mlx` swaps in the
/// mlx-lm copy of llama-adapter-all) against the reference, over every step; also checks the
/// greedy tokens when `exact_tokens`.
fn llama_vs_reference(b: &mut CandleBackend, cases: &[Case], mlx: bool, exact_tokens: bool) -> f32 {
    let mut worst = 0f32;
    for (i, case) in cases.iter().enumerate() {
        let lease = case.adapter.as_deref().map(|n| bound(b, if mlx && n == "llama-adapter-all" { "llama-adapter-all-mlx" } else { n }));
        let got = run(b, 500 + i as SeqId, case, lease.as_ref());
        for (s, (g, r)) in got.iter().zip(&case.steps).enumerate() {
            worst = worst.max(max_abs_diff(g, r));
            if exact_tokens {
                if let Some(&want) = case.greedy.get(s) {
                    assert_eq!(argmax(g), want, "{:?} {} greedy token {s}", case.adapter, case.name);
                }
            }
        }
    }
    worst
}

#[test]
fn llama_gguf_and_safetensors_with_adapters_on_all_seven_modules_match_transformers_and_peft_within_1e4() {
    // tiny-llama.f32.gguf holds q/k rows in llama.cpp's interleaved order; the adapters' lora_B
    // rows are in Hugging Face's. The safetensors directory holds the same weights in HF order.
    let cases = lora_reference_file("llama-reference.json");
    assert!(cases.iter().any(|c| c.adapter.as_deref() == Some("llama-adapter-all")) && cases.iter().any(|c| c.adapter.as_deref() == Some("llama-adapter-qk")));
    for model in ["tiny-llama.f32.gguf", "tiny-llama"] {
        let path = generated(model);
        let w = if path.is_dir() { WeightsFormat::Safetensors { dir: path } } else { WeightsFormat::Gguf(path) };
        let mut b = CandleBackend::load(&w, &candle_core::Device::Cpu, None).expect("load");
        for mlx in [false, true] {
            let d = llama_vs_reference(&mut b, &cases, mlx, true);
            eprintln!("{model} ({}): max |logit diff| vs transformers + PEFT {d:e}", if mlx { "mlx-lm copy" } else { "PEFT" });
            assert!(d < 1e-4, "{model} ({}): {d} from transformers + PEFT", if mlx { "mlx-lm copy" } else { "PEFT" });
        }
    }
}

#[test]
fn llama_q4_1_gguf_with_adapters_stays_within_the_activation_rounding_of_its_own_reference() {
    // Q4_1 matmuls round the activations to 8 bits (as ggml does), which moves this model's logits
    // by up to ~0.6 against an exact product of the dequantised weights (tests/fixtures/lora/
    // README.md); an adapter applied in the wrong q/k row order moves them by ~18.
    let cases = lora_reference_file("llama-q4_1-reference.json");
    let mut b = CandleBackend::load(&WeightsFormat::Gguf(generated("tiny-llama.q4_1.gguf")), &candle_core::Device::Cpu, None).expect("load");
    let d = llama_vs_reference(&mut b, &cases, false, false);
    eprintln!("tiny-llama.q4_1.gguf: max |logit diff| vs transformers + PEFT on its dequantised weights {d:e}");
    assert!(d < 1.5, "{d} from transformers + PEFT on the dequantised Q4_1 weights");
}


#[test]
fn llama_q4_1_gguf_dequantized_to_f32_matches_its_reference_within_1e4() {
    // The same Q4_1 file with every tensor dequantized to F32 (the twin the GPU's real-model test
    // compares against): without the 8-bit activation rounding, the CPU backend gives the exact
    // product of the dequantised weights, adapters included, and the reference's greedy tokens.
    let cases = lora_reference_file("llama-q4_1-reference.json");
    let dst = std::env::temp_dir().join(format!("inferd-q4_1-dequantized-{}.gguf", std::process::id()));
    reference_common::dequantized_gguf(&generated("tiny-llama.q4_1.gguf"), &dst);
    let mut b = CandleBackend::load(&WeightsFormat::Gguf(dst.clone()), &candle_core::Device::Cpu, None).expect("load");
    let _ = std::fs::remove_file(&dst);
    let d = llama_vs_reference(&mut b, &cases, false, true);
    eprintln!("tiny-llama.q4_1.gguf dequantized to F32: max |logit diff| vs transformers + PEFT {d:e}");
    assert!(d < 1e-4, "{d} from transformers + PEFT on the dequantised Q4_1 weights");
}

fn step(b: &mut CandleBackend, seq: SeqId, tokens: &[u32], a: Option<&Arc<LoraAdapter>>) -> Vec<f32> {
    b.step(&[StepInput { seq, tokens, adapter: a, want_logits: true }]).expect("step").remove(0).expect("logits")
}

/// Prompt then the reference's greedy tokens; every step's logits.
fn run(b: &mut CandleBackend, seq: SeqId, case: &Case, a: Option<&Arc<LoraAdapter>>) -> Vec<Vec<f32>> {
    let mut out = vec![step(b, seq, &case.prompt, a)];
    for &t in &case.greedy {
        out.push(step(b, seq, &[t], a));
    }
    b.release(seq);
    out
}

#[test]
fn logits_with_each_adapter_match_transformers_and_peft_within_1e4() {
    let Some(mut b) = base() else { return };
    let (a, bb) = (adapter("adapter-a"), adapter("adapter-b"));
    let mut worst = 0f32;
    let mut changed = [false, false];
    let cases = reference();
    for (i, case) in cases.iter().enumerate() {
        let lease = match case.adapter.as_deref() {
            None => None,
            Some("adapter-a") => Some(&a),
            Some("adapter-b") => Some(&bb),
            Some(other) => panic!("unknown adapter {other} in the reference"),
        };
        let got = run(&mut b, i as SeqId, case, lease);
        for (s, (g, r)) in got.iter().zip(&case.steps).enumerate() {
            let d = max_abs_diff(g, r);
            worst = worst.max(d);
            assert!(d < 1e-4, "{:?} step {s}: {d} from PEFT", case.adapter);
            if let Some(&want) = case.greedy.get(s) {
                assert_eq!(argmax(g), want, "{:?} greedy token {s}", case.adapter);
            }
        }
        if let Some(name) = &case.adapter {
            let base_case = cases.iter().find(|c| c.adapter.is_none() && c.prompt == case.prompt).unwrap();
            changed[usize::from(name == "adapter-b")] |= base_case.greedy != case.greedy;
        }
    }
    assert!(changed[0] && changed[1], "both adapters change the greedy tokens");
    eprintln!("candle + LoRA vs transformers + PEFT: max |logit diff| {worst:e}");
}

#[test]
fn the_mlx_lm_copy_of_adapter_a_gives_adapter_a() {
    let Some(mut b) = base() else { return };
    let (peft, mlx) = (adapter("adapter-a"), adapter("adapter-a-mlx"));
    assert_eq!((peft.format, mlx.format), ("peft", "mlx"));
    assert_eq!(peft.modules.keys().collect::<Vec<_>>(), mlx.modules.keys().collect::<Vec<_>>());
    let case = &reference()[0];
    let x = run(&mut b, 1, case, Some(&peft));
    let y = run(&mut b, 2, case, Some(&mlx));
    for (s, (p, m)) in x.iter().zip(&y).enumerate() {
        assert!(max_abs_diff(p, m) < 1e-5, "step {s}");
    }
}

#[test]
fn base_a_and_b_rows_in_one_batch_give_exactly_what_each_gives_alone() {
    // The Q8_0 GGUF of the same model: its matmul kernels are batch invariant (candle's dense f32
    // matmul is not), so any difference would come from the LoRA rows.
    let gguf = root().join("tests/fixtures/generated/tiny-qwen2.q8_0.gguf");
    if !gguf.exists() {
        eprintln!("SKIPPED: {} is missing", gguf.display());
        return;
    }
    let mut b = CandleBackend::load(&WeightsFormat::Gguf(gguf), &candle_core::Device::Cpu, None).expect("load");
    let (a, bb) = (adapter("adapter-a"), adapter("adapter-b"));
    let cases = reference();
    let prompt = &cases[0].prompt;
    let leases = [None, Some(&a), Some(&bb), Some(&a)];
    let alone: Vec<Vec<Vec<f32>>> = leases
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let mut toks = vec![prompt.clone()];
            let mut out = Vec::new();
            for _ in 0..6 {
                let lg = step(&mut b, 100 + i as SeqId, toks.last().unwrap(), *l);
                toks.push(vec![argmax(&lg)]);
                out.push(lg);
            }
            b.release(100 + i as SeqId);
            out
        })
        .collect();
    // Together: the four sequences step side by side (the last joins one step late).
    let mut next: Vec<Vec<u32>> = vec![prompt.clone(); 4];
    let mut got: Vec<Vec<Vec<f32>>> = vec![Vec::new(); 4];
    for round in 0..7 {
        let live: Vec<usize> = (0..4).filter(|&i| (i < 3 || round > 0) && got[i].len() < 6).collect();
        let inputs: Vec<StepInput> = live
            .iter()
            .map(|&i| StepInput { seq: i as SeqId, tokens: &next[i], adapter: leases[i], want_logits: true })
            .collect();
        let out = b.step(&inputs).expect("mixed step");
        for (&i, l) in live.iter().zip(out) {
            let l = l.unwrap();
            next[i] = vec![argmax(&l)];
            got[i].push(l);
        }
    }
    for i in 0..4 {
        let d = got[i].iter().zip(&alone[i]).map(|(x, y)| max_abs_diff(x, y)).fold(0f32, f32::max);
        assert!(got[i] == alone[i], "sequence {i} ({:?}) differs in the mixed batch by {d}", leases[i].map(|a| &a.name));
    }
    assert_ne!(alone[0], alone[1], "adapter A changes the logits");
}

#[test]
fn bad_adapters_get_one_clear_sentence() {
    let Some(b) = base() else { return };
    let dims = b.lora_dims().expect("candle applies adapters");
    let dir = root().join("tests/fixtures/lora");
    let err = |name: &str| match read_adapter(name, &dir.join(name)) {
        Err(e) => e,
        Ok(a) => a.check_fits(&dims).expect_err("must not fit"),
    };
    let cases = [
        ("bad-rank", "rank"),
        ("bad-target", "fc1"),
        ("bad-base", "different base model"),
        ("bad-corrupt", "cannot read"),
        ("bad-missing", "neither adapter_model.safetensors"),
        ("no-such-dir", "not a directory"),
    ];
    for (name, want) in cases {
        let e = err(name);
        assert!(e.contains(want), "{name}: {e}");
        assert!(!e.contains('\n'), "{name}: one line: {e}");
    }
}
