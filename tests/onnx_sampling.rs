//! `step_and_sample` of the onnx backend against the host's sampler on the same logits, over
//! random batches of greedy, drawing, logprobs and penalised rows.
//!
//! Two backends on the same device get the same steps: one samples (`step_and_sample`), the
//! other returns its logits (`step`), which the engine's sampler then samples on the host. On the
//! CPU every row is sampled on the host, so the tokens must be identical. On a GPU
//! (`INFERD_TEST_ONNX_DEVICE=cuda:0`, run by scripts/cuda_check.sh) the logits stay on the
//! device: greedy rows must get the host's argmax and drawing rows the draw
//! `gpu_sampling::reference_draw` makes from the host's distribution (draws within 1e-4 of a
//! boundary of the cumulative distribution are not compared: the device's weights may differ in
//! their last bits); rows with logprobs or penalties still come to the host and must be identical.
//! `INFERD_TEST_ONNX_MODELS` (paths joined by ':') adds model directories (an fp16 CUDA export).
mod reference_common;

use std::path::PathBuf;

use inferd::backend::gpu_sampling::reference_draw;
use inferd::backend::{Backend, SampleSpec, StepInput};
use inferd::engine::request::SamplingParams;
use inferd::engine::sampler::{sample, TokenCounts};
use reference_common::Rng;

fn models() -> Vec<PathBuf> {
    let mut dirs = vec![PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx/tiny-qwen2")];
    if let Ok(extra) = std::env::var("INFERD_TEST_ONNX_MODELS") {
        dirs.extend(extra.split(':').filter(|s| !s.is_empty()).map(PathBuf::from));
    }
    dirs
}

/// What a row asks of the sampler.
#[derive(Clone)]
struct Ask {
    params: SamplingParams,
    uniform: Option<f64>,
    logprobs: Option<usize>,
}

fn random_ask(rng: &mut Rng) -> Ask {
    let draw = |rng: &mut Rng| SamplingParams {
        temperature: rng.pick(&[0.3f32, 0.7, 1.0, 1.5]),
        top_k: rng.pick(&[0usize, 1, 5, 40]),
        top_p: rng.pick(&[1.0f32, 0.9, 0.5]),
        min_p: rng.pick(&[0.0f32, 0.05]),
        ..SamplingParams::default()
    };
    match rng.below(5) {
        0 | 1 => Ask { params: SamplingParams { temperature: 0.0, ..SamplingParams::default() }, uniform: None, logprobs: None },
        2 | 3 => Ask { params: draw(rng), uniform: Some(rng.uniform()), logprobs: None },
        _ if rng.chance(0.5) => Ask { params: draw(rng), uniform: Some(rng.uniform()), logprobs: Some(rng.below(3)) },
        _ => Ask { params: SamplingParams { presence_penalty: 0.8, temperature: 0.0, ..SamplingParams::default() }, uniform: None, logprobs: None },
    }
}

#[test]
fn sampled_tokens_are_the_host_samplers_over_random_batches() {
    let on_gpu = reference_common::onnx_test_device() != inferd::config::Device::Cpu;
    for dir in models() {
        let mut sampled = reference_common::load_onnx(&dir, 2, 8, Some(256), None);
        let mut plain = reference_common::load_onnx(&dir, 2, 8, Some(256), None);
        assert_eq!(sampled.logits_on_device(), on_gpu, "logits stay on the device exactly on a GPU");
        let vocab = sampled.vocab_size();
        let mut rng = Rng(0x5eed_0001);
        let (mut compared, mut skipped, mut on_device) = (0usize, 0usize, 0usize);
        for round in 0..6u64 {
            let n = 1 + rng.below(8);
            // Each sequence: its pending tokens (a prompt, then one sampled token at a time).
            let mut pending: Vec<Vec<u32>> = (0..n).map(|_| (0..1 + rng.below(20)).map(|_| rng.below(vocab) as u32).collect()).collect();
            let counts = TokenCounts::default();
            for _step in 0..10 {
                let seqs: Vec<u64> = (0..n as u64).map(|i| round * 100 + i).collect();
                // A prompt may arrive in two chunks; the first wants no logits.
                let chunks: Vec<usize> = pending.iter().map(|p| if p.len() > 4 && rng.chance(0.3) { p.len() / 2 } else { p.len() }).collect();
                let inputs: Vec<StepInput<'_>> = (0..n)
                    .map(|i| StepInput { seq: seqs[i], tokens: &pending[i][..chunks[i]], adapter: None, want_logits: chunks[i] == pending[i].len() })
                    .collect();
                let asks: Vec<Ask> = (0..n).map(|_| random_ask(&mut rng)).collect();
                let specs: Vec<Option<SampleSpec<'_>>> = inputs
                    .iter()
                    .zip(&asks)
                    .map(|(inp, a)| inp.want_logits.then_some(SampleSpec { params: &a.params, counts: &counts, uniform: a.uniform, logprobs: a.logprobs, mask: None }))
                    .collect();
                let got = sampled.step_and_sample(&inputs, &specs).expect("step_and_sample");
                let logits = plain.step(&inputs).expect("step");
                let mut next = Vec::with_capacity(n);
                for i in 0..n {
                    let (Some(spec), Some(l)) = (&specs[i], &logits[i]) else {
                        assert!(got[i].is_none(), "a row that wants no logits gets no token");
                        next.push(pending[i][chunks[i]..].to_vec());
                        continue;
                    };
                    let g = got[i].as_ref().expect("a row with a spec gets a token");
                    let host = sample(l.clone(), spec);
                    let device_row = on_gpu && spec.logprobs.is_none() && spec.params.presence_penalty == 0.0;
                    if device_row && spec.uniform.is_some() {
                        on_device += 1;
                        let (want, margin) = reference_draw(l, spec.params, spec.uniform.expect("drawing row"));
                        if margin < 1e-4 {
                            skipped += 1;
                        } else {
                            assert_eq!(g.token, want, "round {round} row {i}: the device's draw ({:?})", spec.params);
                            compared += 1;
                        }
                    } else {
                        on_device += usize::from(device_row);
                        assert_eq!(g.token, host.token, "round {round} row {i}: {:?} logprobs {:?}", spec.params, spec.logprobs);
                        assert_eq!(g.logprobs, host.logprobs, "the host's logprobs");
                        compared += 1;
                    }
                    next.push(vec![g.token]);
                }
                pending = next;
            }
            for &s in &(0..n as u64).map(|i| round * 100 + i).collect::<Vec<_>>() {
                sampled.release(s);
                plain.release(s);
            }
        }
        eprintln!("{}: {compared} rows compared, {skipped} draws within 1e-4 of a boundary, {on_device} rows picked on the device", dir.display());
        assert!(compared > 200, "{compared} rows compared");
        assert_eq!(on_device > 0, on_gpu);
    }
}
