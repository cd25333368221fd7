//! Prefix caching on the onnx backend (CPU provider, host KV buffers): a new sequence whose
//! prompt starts with tokens a finished or live sequence held gets those positions copied into
//! its slot, and its logits are then exactly those of a run without the cache, on the fp32 and
//! the int4 export.
mod reference_common;
use std::path::PathBuf;

use inferd::backend::onnx::OnnxBackend;
use inferd::backend::{Backend, SeqId, StepInput};
use reference_common::{argmax, assert_same_steps};

fn load(dir: &str, prefix_bytes: usize) -> OnnxBackend {
    load_from("tests/fixtures/onnx", dir, prefix_bytes)
}

fn load_lora(graph: &str, prefix_bytes: usize) -> OnnxBackend {
    load_from("tests/fixtures/lora", graph, prefix_bytes)
}

fn load_from(fixtures: &str, dir: &str, prefix_bytes: usize) -> OnnxBackend {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(fixtures).join(dir);
    let mut b = reference_common::load_onnx(&path, 2, 4, None, None);
    b.set_prefix_cache_bytes(prefix_bytes);
    b
}

/// Feeds `tokens[from..]`, then `n - 1` greedy tokens: every step's logits.
fn run(b: &mut OnnxBackend, seq: SeqId, tokens: &[u32], from: usize, n: usize) -> Vec<Vec<f32>> {
    let mut out = Vec::new();
    let mut feed = tokens[from..].to_vec();
    for _ in 0..n {
        let l = b.step(&[StepInput { seq, tokens: &feed, adapter: None, want_logits: true }]).expect("step").remove(0).expect("logits");
        feed = vec![argmax(&l)];
        out.push(l);
    }
    out
}

fn on_host() -> bool {
    matches!(reference_common::onnx_test_device(), inferd::config::Device::Cpu)
}

#[test]
fn a_reused_prefix_gives_the_bits_of_a_computed_one() {
    for dir in ["tiny-qwen2", "tiny-qwen2-int4"] {
        let first: Vec<u32> = (1..40).collect();
        let mut second = first.clone();
        second.extend([300, 301, 302, 7, 8]);
        let mut cold = load(dir, 0);
        let want = run(&mut cold, 1, &second, 0, 6);
        assert_eq!(cold.reuse_prefix(2, &second, None), 0, "{dir}: prefix caching is off");

        let mut warm = load(dir, 64 << 20);
        run(&mut warm, 10, &first, 0, 3);
        warm.release(10); // kept for reuse
        let n = warm.reuse_prefix(11, &second, None);
        if !on_host() {
            assert_eq!(n, 0, "{dir}: device KV buffers keep nothing");
            continue;
        }
        assert_eq!(n, first.len(), "{dir}: the shared prompt is reused");
        let got = run(&mut warm, 11, &second, n, 6);
        assert_same_steps(&got, &want, &format!("{dir}: reused prefix vs computed"));

        // From a live sequence too, and a prompt equal to what is cached keeps one token to run.
        let n = warm.reuse_prefix(12, &second, None);
        assert_eq!(n, second.len() - 1, "{dir}: from the live sequence 11, all but the last token");
        let got = run(&mut warm, 12, &second, n, 6);
        assert_same_steps(&got, &want, &format!("{dir}: live prefix vs computed"));
    }
}

#[test]
fn a_conversation_reuses_its_earlier_turns_with_identical_answers() {
    if !on_host() {
        return;
    }
    // Each turn's prompt is the previous turn's prompt, its answer and a new question.
    let (mut cold, mut warm) = (load("tiny-qwen2", 0), load("tiny-qwen2", 64 << 20));
    let mut history: Vec<u32> = (5..25).collect();
    for turn in 0..4u64 {
        let seq = 100 + turn;
        let reused = warm.reuse_prefix(seq, &history, None);
        assert_eq!(reused > 0, turn > 0, "turn {turn}: reused {reused}");
        let want = run(&mut cold, seq, &history, 0, 5);
        let got = run(&mut warm, seq, &history, reused, 5);
        assert_same_steps(&got, &want, &format!("turn {turn}"));
        cold.release(seq);
        warm.release(seq);
        history.extend(want.iter().take(4).map(|l| argmax(l)));
        history.extend([40 + turn as u32, 41, 42]);
    }
}

/// Reads an adapter and binds it to the base the way the server's registry does.
fn adapter(b: &OnnxBackend, name: &str) -> std::sync::Arc<inferd::lora::LoraAdapter> {
    let dims = b.lora_dims().expect("the graph takes adapters");
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora").join(name);
    std::sync::Arc::new(inferd::lora::read_adapter(name, &dir).expect("adapter reads").bind(&dims).expect("adapter fits"))
}

#[test]
fn positions_computed_under_an_adapter_serve_only_that_adapter() {
    if !on_host() {
        return;
    }
    // With the LoRA row mask (one run mixes adapters) and without it (one run per adapter).
    for graph in ["tiny-qwen2-onnx-lora", "tiny-qwen2-onnx-lora-nomask"] {
        let mut b = load_lora(graph, 64 << 20);
        let (a, other) = (adapter(&b, "adapter-a"), adapter(&b, "adapter-b"));
        let prompt: Vec<u32> = (30..50).collect();
        let mut longer = prompt.clone();
        longer.extend([7, 8, 9]);
        let step = |b: &mut OnnxBackend, seq: SeqId, tokens: &[u32], ad| {
            b.step(&[StepInput { seq, tokens, adapter: ad, want_logits: true }]).expect("step").remove(0).expect("logits")
        };
        // A live sequence under adapter A, then the same sequence finished and kept.
        step(&mut b, 1, &prompt, Some(&a));
        for phase in ["live", "kept"] {
            assert_eq!(b.reuse_prefix(10, &longer, None), 0, "{graph}: the base model reused adapter A's {phase} positions");
            assert_eq!(b.reuse_prefix(11, &longer, Some(&other)), 0, "{graph}: adapter B reused adapter A's {phase} positions");
            let n = b.reuse_prefix(12, &longer, Some(&a));
            // Live: sequence 1's prompt; kept: also sequence 12's, which held all of `longer`.
            let want_n = if phase == "live" { prompt.len() } else { longer.len() - 1 };
            assert_eq!(n, want_n, "{graph}: adapter A reuses its own {phase} positions");
            let got = step(&mut b, 12, &longer[n..], Some(&a));
            let mut cold = load_lora(graph, 0);
            let want = step(&mut cold, 1, &longer, Some(&a));
            assert_same_steps(&[got], &[want], &format!("{graph}: adapter A from its {phase} positions vs computed"));
            b.release(12);
            b.release(1);
        }
    }
}
