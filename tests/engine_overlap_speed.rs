//! What the host's work beside the device's saves: the output lane (`EngineConfig::
//! overlap_output`) and async scheduling (`Backend::pipelines`). A backend that samples "on the
//! device" (returns token ids only) and takes a fixed time per step, as a GPU backend's host
//! thread waits on its stream (pipelined: a step starts when it is launched or when the one
//! before ends, whichever is later, and `collect` waits for its end), with Qwen2.5's tokenizer
//! turning its tokens into text. Prints tokens a second in each mode, alternating, for 64 and 256
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
    pipelined: bool,
    /// Pipelined: when each launched step ends on the "device", and its tokens.
    flight: std::collections::VecDeque<(Instant, Vec<Option<Sampled>>)>,
    /// Each sequence's rows so far (the tokens depend on it).
    rows: std::collections::HashMap<SeqId, u64>,
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
        Ok(self.tokens(inputs, samples))
    }
    fn pipelines(&self) -> bool {
        self.pipelined
    }
    fn launch(&mut self, inputs: &[StepInput<'_>], samples: &[Option<SampleSpec<'_>>], _follows: &[bool]) -> Result<(), BackendError> {
        let start = self.flight.back().map_or(Instant::now(), |f| f.0.max(Instant::now()));
        let out = self.tokens(inputs, samples);
        self.flight.push_back((start + self.step, out));
        Ok(())
    }
    fn collect(&mut self) -> Result<Vec<Option<Sampled>>, BackendError> {
        let (end, out) = self.flight.pop_front().expect("a launched step");
        std::thread::sleep(end.saturating_duration_since(Instant::now()));
        Ok(out)
    }
    fn release(&mut self, seq: SeqId) {
        self.rows.remove(&seq);
    }
}

impl DeviceLike {
    fn tokens(&mut self, inputs: &[StepInput<'_>], samples: &[Option<SampleSpec<'_>>]) -> Vec<Option<Sampled>> {
        inputs
            .iter()
            .zip(samples)
            .map(|(i, s)| {
                let n = self.rows.entry(i.seq).or_default();
                *n += 1;
                let s = s.as_ref()?;
                let token = (mix(i.seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ *n << 32) % self.words as u64) as u32;
                let logprobs = s.logprobs.map(|k| TokenLogprobs { chosen: -1.0, top: (0..k as u32).map(|j| ((token + j) % self.words, -1.0 - j as f32)).collect() });
                Some(Sampled { token, logprobs })
            })
            .collect()
    }
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
fn burst(tok: &Arc<Tokenizer>, streams: usize, (overlap, pipelined): (bool, bool), stops: bool, logprobs: bool, step: Duration) -> f64 {
    let b = DeviceLike { vocab: tok.get_vocab_size(true), words: 151_643, step, pipelined, flight: Default::default(), rows: Default::default() };
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
    // (output lane, async scheduling)
    let modes = [(false, false), (true, false), (false, true), (true, true)];
    eprintln!("simulated device step {step:?}; tok/s, best of 3 alternating rounds; modes: neither, lane, async scheduling, both (ratio to neither)");
    for streams in [1, 64, 256] {
        for (stops, logprobs) in [(false, false), (true, false), (true, true)] {
            let mut got = vec![Vec::new(); modes.len()];
            for _ in 0..3 {
                for (g, &m) in got.iter_mut().zip(&modes) {
                    g.push(burst(&tok, streams, m, stops, logprobs, step));
                }
            }
            let best: Vec<f64> = got.iter().map(|v| v.iter().cloned().fold(0.0, f64::max)).collect();
            let cols: Vec<String> = best.iter().map(|b| format!("{b:>8.0} ({:.2}x)", b / best[0])).collect();
            eprintln!("{streams:>3} streams, stops {stops:<5}, logprobs {logprobs:<5}: {}", cols.join("  "));
        }
    }
}
