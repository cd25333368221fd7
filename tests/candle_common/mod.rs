//! Helpers shared by the candle backend tests: locating real models, building prompt ids from a
//! GGUF vocabulary, greedy decoding through the `Backend` trait.
#![allow(dead_code)]
use std::path::PathBuf;

use candle_core::quantized::gguf_file;
use inferd::backend::candle::CandleBackend;
use inferd::backend::{Backend, SeqId, StepInput};
use inferd::model::WeightsFormat;

pub const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const QWEN: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";

/// Path of a real model under models/, or None (with a message) when it is not there.
pub fn real_model(name: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models").join(name);
    if p.exists() {
        Some(p)
    } else {
        eprintln!("SKIPPED: {} is missing (run scripts/fetch_models.sh)", p.display());
        None
    }
}

/// Loads a GGUF into the backend on the CPU.
pub fn load(path: &PathBuf, max_context: Option<usize>) -> CandleBackend {
    CandleBackend::load(&WeightsFormat::Gguf(path.clone()), &candle_core::Device::Cpu, max_context)
        .expect("model loads")
}

/// Token ids of vocabulary pieces (byte-level BPE spelling: 'Ġ' = space, 'Ċ' = newline), looked
/// up in the GGUF's own `tokenizer.ggml.tokens`. A piece that is not one token is split greedily
/// into the longest matching vocabulary prefixes (valid ids, not necessarily canonical BPE).
pub fn vocab_ids(path: &PathBuf, pieces: &[&str]) -> Vec<u32> {
    let mut f = std::fs::File::open(path).expect("open gguf");
    let ct = gguf_file::Content::read(&mut f).expect("read gguf");
    let tokens = ct.metadata["tokenizer.ggml.tokens"].to_vec().expect("token list");
    let index: std::collections::HashMap<&str, u32> = tokens
        .iter()
        .enumerate()
        .filter_map(|(i, t)| t.to_string().ok().map(|s| (s.as_str(), i as u32)))
        .collect();
    let mut ids = Vec::new();
    for p in pieces {
        let mut rest: &str = p;
        while !rest.is_empty() {
            let end = (1..=rest.len())
                .rev()
                .filter(|&e| rest.is_char_boundary(e))
                .find(|&e| index.contains_key(&rest[..e]))
                .unwrap_or_else(|| panic!("no vocabulary prefix for {rest:?}"));
            ids.push(index[&rest[..end]]);
            rest = &rest[end..];
        }
    }
    ids
}

/// A ChatML prompt "<|im_start|>user\n{words}<|im_end|>\n<|im_start|>assistant\n" as ids.
pub fn chatml_prompt(path: &PathBuf, words: &[&str]) -> Vec<u32> {
    let mut pieces = vec!["<|im_start|>", "user", "Ċ"];
    pieces.extend_from_slice(words);
    pieces.extend_from_slice(&["<|im_end|>", "Ċ", "<|im_start|>", "assistant", "Ċ"]);
    vocab_ids(path, &pieces)
}

/// Index of the largest logit (first one on ties).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Prefills `prompt` in one step, then decodes greedily; returns the generated ids and the logits
/// that chose each of them.
pub fn greedy(b: &mut CandleBackend, seq: SeqId, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    greedy_banning(b, seq, prompt, n, &[])
}

/// `greedy`, never picking a `banned` id (llama.cpp's `ignore_eos` bans end-of-generation ids).
pub fn greedy_banning(
    b: &mut CandleBackend,
    seq: SeqId,
    prompt: &[u32],
    n: usize,
    banned: &[u32],
) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut out = Vec::new();
    let mut all_logits = Vec::new();
    let mut input = prompt.to_vec();
    for _ in 0..n {
        let step = [StepInput { seq, tokens: &input, adapter: None, want_logits: true }];
        let logits = b.step(&step).expect("step").remove(0).expect("logits");
        let mut masked = logits.clone();
        for &id in banned {
            masked[id as usize] = f32::NEG_INFINITY;
        }
        let t = argmax(&masked);
        out.push(t);
        all_logits.push(logits);
        input = vec![t];
    }
    (out, all_logits)
}
