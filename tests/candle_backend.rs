//! Batched forward pass of the candle backend on the real GGUF models: batch invariance, chunked
//! prefill, context limits, and error handling. Tests skip (with a message) when a model is absent.
mod candle_common;

use candle_common::*;
use inferd::backend::{Backend, BackendError, StepInput};

/// Four prompts of different lengths for `path`'s vocabulary.
fn four_prompts(path: &std::path::PathBuf) -> Vec<Vec<u32>> {
    vec![
        chatml_prompt(path, &["What", "Ġis", "Ġthe", "Ġcapital", "Ġof", "ĠFrance", "?"]),
        chatml_prompt(path, &["Write", "Ġa", "Ġpoem"]),
        chatml_prompt(path, &["Hello", "!"]),
        chatml_prompt(
            path,
            &["Explain", "Ġhow", "Ġa", "Ġcomputer", "Ġworks", "Ġin", "Ġsimple", "Ġwords", "."],
        ),
    ]
}

/// Runs the four prompts alone, then together with staggered starts, prefill in chunks of 4 mixed
/// with other sequences' decode rows; the greedy tokens must match exactly, logits within 1e-4.
fn batch_invariance(name: &str) {
    let Some(path) = real_model(name) else { return };
    let mut b = load(&path, None);
    let prompts = four_prompts(&path);
    const N: usize = 16;
    let alone: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| greedy(&mut b, 100 + i as u64, p, N))
        .collect();

    // Together: sequence i joins at step i; prompt fed in chunks of 4.
    let mut fed = vec![0usize; 4];
    let mut generated: Vec<Vec<u32>> = vec![Vec::new(); 4];
    let mut logits_seen: Vec<Vec<Vec<f32>>> = vec![Vec::new(); 4];
    let mut step_no = 0;
    let mut saw_mixed = false;
    while generated.iter().any(|g| g.len() < N) {
        let mut owned: Vec<(usize, Vec<u32>, bool)> = Vec::new();
        for i in 0..4 {
            if i > step_no || generated[i].len() >= N {
                continue;
            }
            if fed[i] < prompts[i].len() {
                let end = (fed[i] + 4).min(prompts[i].len());
                owned.push((i, prompts[i][fed[i]..end].to_vec(), end == prompts[i].len()));
                fed[i] = end;
            } else {
                owned.push((i, vec![*generated[i].last().expect("decoding")], true));
            }
        }
        let has_prefill = owned.iter().any(|(_, t, _)| t.len() > 1);
        let has_decode = owned.iter().any(|(i, t, _)| t.len() == 1 && !generated[*i].is_empty());
        saw_mixed |= has_prefill && has_decode;
        let inputs: Vec<StepInput<'_>> = owned
            .iter()
            .map(|(i, t, want)| StepInput { seq: *i as u64, tokens: t, adapter: None, want_logits: *want })
            .collect();
        let out = b.step(&inputs).expect("batched step");
        for ((i, _, want), logits) in owned.iter().zip(out) {
            assert_eq!(logits.is_some(), *want);
            if let Some(l) = logits {
                generated[*i].push(argmax(&l));
                logits_seen[*i].push(l);
            }
        }
        step_no += 1;
    }
    assert!(saw_mixed, "the schedule must mix prefill chunks and decode rows in one step");
    for i in 0..4 {
        assert_eq!(generated[i], alone[i].0, "prompt {i}: batched tokens differ from alone");
        for (s, (a, bt)) in alone[i].1.iter().zip(&logits_seen[i]).enumerate() {
            let d = max_abs_diff(a, bt);
            assert!(d < 1e-4, "prompt {i} step {s}: logits differ by {d}");
        }
    }
    for i in 0..4 {
        b.release(i as u64);
        assert_eq!(b.cached_len(i as u64), 0);
    }
}

#[test]
fn batch_invariance_smollm2() {
    batch_invariance(SMOLLM2);
}

#[test]
fn batch_invariance_qwen() {
    batch_invariance(QWEN);
}

fn chunked_prefill(name: &str) {
    let Some(path) = real_model(name) else { return };
    let mut b = load(&path, None);
    let prompt = four_prompts(&path).remove(3);
    let one = b
        .step(&[StepInput { seq: 1, tokens: &prompt, adapter: None, want_logits: true }])
        .expect("one-shot prefill")
        .remove(0)
        .expect("logits");
    let chunks: Vec<&[u32]> = prompt.chunks(3).collect();
    let mut last = None;
    for (i, c) in chunks.iter().enumerate() {
        let want = i + 1 == chunks.len();
        let out = b
            .step(&[StepInput { seq: 2, tokens: c, adapter: None, want_logits: want }])
            .expect("chunk")
            .remove(0);
        assert_eq!(out.is_some(), want);
        last = out;
    }
    let last = last.expect("last chunk logits");
    assert_eq!(b.cached_len(2), prompt.len());
    let d = max_abs_diff(&one, &last);
    assert!(d < 1e-4, "chunked prefill logits differ by {d}");
    assert_eq!(argmax(&one), argmax(&last));
}

#[test]
fn chunked_prefill_matches_one_shot_smollm2() {
    chunked_prefill(SMOLLM2);
}

#[test]
fn chunked_prefill_matches_one_shot_qwen() {
    chunked_prefill(QWEN);
}

#[test]
fn context_full_adapter_and_bad_input_are_errors_not_panics() {
    let Some(path) = real_model(SMOLLM2) else { return };
    let mut b = load(&path, Some(8));
    assert_eq!(b.max_context(), 8);
    assert_eq!(b.vocab_size(), 49152);
    let toks = [1u32, 2, 3, 4, 5, 6];
    let ok = b.step(&[StepInput { seq: 7, tokens: &toks, adapter: None, want_logits: true }]);
    assert_eq!(ok.expect("fits").len(), 1);
    let full = b.step(&[StepInput { seq: 7, tokens: &toks[..3], adapter: None, want_logits: true }]);
    assert!(matches!(full, Err(BackendError::ContextFull { seq: 7, max: 8 })), "{full:?}");
    assert_eq!(b.cached_len(7), 6, "a refused step leaves the cache as it was");
    // An adapter made for another base model (the tiny fixture's hidden size is 64).
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora/adapter-a");
    let other = std::sync::Arc::new(inferd::lora::read_adapter("a", &dir).expect("adapter reads"));
    let lora = b.step(&[StepInput { seq: 8, tokens: &toks, adapter: Some(&other), want_logits: true }]);
    match lora {
        Err(BackendError::Compute(m)) => assert!(m.contains("different base model"), "{m}"),
        other => panic!("expected Compute error, got {other:?}"),
    }
    assert_eq!(b.cached_len(8), 0, "a refused adapter leaves no cache behind");
    let bad = b.step(&[StepInput { seq: 9, tokens: &[49152], adapter: None, want_logits: true }]);
    assert!(matches!(bad, Err(BackendError::Compute(_))));
    let empty = b.step(&[StepInput { seq: 9, tokens: &[], adapter: None, want_logits: true }]);
    assert!(matches!(empty, Err(BackendError::Compute(_))));
    let dup = [
        StepInput { seq: 10, tokens: &toks[..1], adapter: None, want_logits: true },
        StepInput { seq: 10, tokens: &toks[..1], adapter: None, want_logits: true },
    ];
    assert!(matches!(b.step(&dup), Err(BackendError::Compute(_))));
    // Decoding up to exactly the limit works.
    let two = b.step(&[StepInput { seq: 7, tokens: &toks[..2], adapter: None, want_logits: false }]);
    assert_eq!(two.expect("fills to the limit"), vec![None]);
    assert_eq!(b.cached_len(7), 8);
}
