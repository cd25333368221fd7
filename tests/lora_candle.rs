//! LoRA on the candle backend with the tiny adapters of tests/fixtures/lora (scripts/make_tiny_lora.py):
//! logits against transformers + PEFT, mlx-lm's format against PEFT's, a mixed batch (base, A
//! and B rows in one step) against each alone, and the errors bad adapters give.
mod reference_common;

use std::path::PathBuf;
use std::sync::Arc;

use inferd::backend::candle::CandleBackend;
use inferd::backend::{Backend, SeqId, StepInput};
use inferd::lora::{read_adapter, LoraAdapter};
use inferd::model::WeightsFormat;
use reference_common::{argmax, lora_reference as reference, max_abs_diff, Case};

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
