//! What the output lane (`EngineConfig::overlap_output`) saves when the backend waits on a device:
//! a backend that samples "on the device" (returns token ids only) and sleeps a fixed time per
//! step, as a GPU backend's host thread waits on its stream, with Qwen2.5's tokenizer turning its
//! tokens into text. Prints tokens a second with the lane off and on, alternating, for 64 and 256
//! streams with and without stop strings and logprobs; timings are never asserted. Ignored by
//! default; run in release mode:
//! `cargo test --release --test engine_overlap_speed -- --ignored --nocapture`
//! (`OVERLAP_STEP_US` sets the simulated device time a step, 2000 by default.)
mod engine_common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use engine_common::*;
use inferd::backend::{Backend, BackendError, SeqId, StepInput};
use inferd::engine::sampler::{SampleSpec, Sampled, TokenLogprobs};
use inferd::engine::{spawn, EngineConfig, SamplingParams};
use tokenizers::Tokenizer;

/// Token ids drawn from a hash of the sequence and position, among the tokenizer's ordinary
/// tokens; each step sleeps for the device's time.
struct DeviceLike {
    vocab: usize,
    words: u32,
    step: Duration,
}

fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl Backend for DeviceLike {
    fn vocab_size(&self) -> usize {
        self.vocab
    }
    fn max_context(&self) -> usize {
        8192
    }
    fn step(&mut self, _: &[StepInput<'_>]) -> Result<Vec<Option<Vec<f32>>>, BackendError> {
        unreachable!("the engine calls step_and_sample")
    }
    fn step_and_sample(&mut self, inputs: &[StepInput<'_>], samples: &[Option<SampleSpec<'_>>]) -> Result<Vec<Option<Sampled>>, BackendError> {
        std::thread::sleep(self.step);
        Ok(inputs
            .iter()
            .zip(samples)
            .map(|(i, s)| {
                let s = s.as_ref()?;
                let h = mix(i.seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ *i.tokens.last().unwrap() as u64 ^ (i.tokens.len() as u64) << 40);
                let token = (h % self.words as u64) as u32;
                let logprobs = s.logprobs.map(|k| TokenLogprobs { chosen: -1.0, top: (0..k as u32).map(|j| ((token + j) % self.words, -1.0 - j as f32)).collect() });
                Some(Sampled { token, logprobs })
            })
            .collect())
    }
    fn release(&mut self, _: SeqId) {}
}

fn tokenizer() -> Option<Tokenizer> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/models/qwen-tokenizer/tokenizer.json");
    match Tokenizer::from_file(path) {
        Ok(t) => Some(t),
        Err(_) => {
            eprintln!("skipped: {path} is missing (scripts/fetch_models.sh qwen-tokenizer)");
            None
        }
    }
}

/// Tokens a second for `streams` requests of 128 tokens each.
fn burst(tok: &Arc<Tokenizer>, streams: usize, overlap: bool, stops: bool, logprobs: bool, step: Duration) -> f64 {
    let b = DeviceLike { vocab: tok.get_vocab_size(true), words: 151_643, step };
    let cfg = EngineConfig { max_batch: 256, max_waiting: 512, prefill_chunk: 2048, channel_capacity: 256, overlap_output: overlap };
    let h = spawn(Box::new(b), Arc::clone(tok), vec![151_643], cfg);
    let t = Instant::now();
    let rxs: Vec<_> = (0..streams)
        .map(|i| {
            let mut r = req(vec![(i as u32 * 7919) % 150_000 + 1; 16], 128, SamplingParams { temperature: 0.0, ..SamplingParams::default() });
            r.ignore_eos = true;
            if stops {
                r.stop = vec!["never written \u{1F980}".into(), "\n\n\n\n\n\n".into()];
            }
            r.logprobs = logprobs.then_some(2);
            h.submit(r).unwrap()
        })
        .collect();
    let n: usize = std::thread::scope(|sc| rxs.into_iter().map(|rx| sc.spawn(move || collect(rx).completion_tokens)).collect::<Vec<_>>().into_iter().map(|j| j.join().unwrap()).sum());
    n as f64 / t.elapsed().as_secs_f64()
}

#[test]
#[ignore]
fn output_lane_against_the_worker_making_events() {
    let Some(tok) = tokenizer() else { return };
    let tok = Arc::new(tok);
    let step = Duration::from_micros(std::env::var("OVERLAP_STEP_US").map_or(2000, |s| s.parse().unwrap()));
    eprintln!("simulated device step {step:?}; tok/s, lane off / on, 3 alternating rounds");
    for streams in [64, 256] {
        for (stops, logprobs) in [(false, false), (true, false), (true, true)] {
            let (mut off, mut on) = (Vec::new(), Vec::new());
            for _ in 0..3 {
                off.push(burst(&tok, streams, false, stops, logprobs, step));
                on.push(burst(&tok, streams, true, stops, logprobs, step));
            }
            let best = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
            eprintln!(
                "{streams:>3} streams, stops {stops:<5}, logprobs {logprobs:<5}: off {:>8.0}  on {:>8.0}  ratio {:.3}  (rounds off {:?} on {:?})",
                best(&off),
                best(&on),
                best(&on) / best(&off),
                off.iter().map(|x| *x as u64).collect::<Vec<_>>(),
                on.iter().map(|x| *x as u64).collect::<Vec<_>>()
            );
        }
    }
}
