//! The host's work beside the device's as a property. With a step's events made on a helper
//! thread while the backend runs the next step (the output lane, `EngineConfig::overlap_output`),
//! with step N+1 launched before step N's tokens are collected (async scheduling,
//! `Backend::pipelines`), and with both, every request gets exactly the events the synchronous
//! worker gives it (same tokens, text pieces, logprobs, finish reason and usage), even when a
//! stop string or EOS is found one step late and that sequence's next token is dropped.
//!
//! Each trial draws a mix of 8 to 28 requests (greedy and seeded sampling, penalties, a JSON
//! grammar, logprobs, EOS and `ignore_eos`, lengths, small or large event channels, a bounded KV cache that forces
//! preemption, prefill chunks) and stop strings cut from the requests' own output, so that many
//! sequences stop on them. `OVERLAP_SEED=N` replays one trial and `OVERLAP_TRIALS=N` runs more.
mod engine_common;

use std::sync::Arc;

use engine_common::*;
use inferd::engine::{spawn, EngineConfig, EngineStats, Event, GenRequest, SamplingParams};
use inferd::structured::Structured;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A trial: the requests and the engine and backend they run on.
#[derive(Clone)]
struct Trial {
    reqs: Vec<GenRequest>,
    /// Requests that answer in JSON (each run gets its own matchers).
    json: Vec<bool>,
    cfg: EngineConfig,
    kv: Option<(usize, usize)>,
    eos_at_len: Option<usize>,
}

/// How the worker runs the trial: the output lane, async scheduling.
#[derive(Debug, Clone, Copy)]
struct Mode {
    lane: bool,
    pipelined: bool,
}

const SYNC: Mode = Mode { lane: false, pipelined: false };
const MODES: [Mode; 3] = [Mode { lane: true, pipelined: false }, Mode { lane: false, pipelined: true }, Mode { lane: true, pipelined: true }];

/// What a run did besides its events: the engine's counters and (pipelined) the launches that
/// had following rows and those rows.
struct Ran {
    stats: EngineStats,
    follows: (usize, usize),
}

fn run(t: &Trial, mode: Mode) -> (Vec<Collected>, Ran) {
    let (tok, eos) = tiny_tokenizer();
    let (mut b, _) = MockBackend::new(tok.get_vocab_size(true), eos);
    b.kv = t.kv;
    b.eos_at_len = t.eos_at_len;
    let mut follow_log = None;
    let b: Box<dyn inferd::backend::Backend> = if mode.pipelined {
        let p = Pipelining::new(b);
        follow_log = Some(Arc::clone(&p.follow_log));
        Box::new(p)
    } else {
        Box::new(b)
    };
    let tok = Arc::new(tok);
    let structured = Structured::new(Arc::clone(&tok), tok.get_vocab_size(true), Some(eos));
    let h = spawn(b, tok, vec![eos], EngineConfig { overlap_output: mode.lane, ..t.cfg.clone() });
    let rxs: Vec<_> = t
        .reqs
        .iter()
        .zip(&t.json)
        .map(|(r, &json)| {
            let mut r = r.clone();
            if json {
                r.constraint = Some(structured.constraints(inferd::structured::grammar::json_object(), 1).expect("the JSON grammar compiles").remove(0));
            }
            h.submit(r).expect("the queue has room")
        })
        .collect();
    // Each client reads on its own thread, so a small channel fills and empties as in a server.
    let got = std::thread::scope(|sc| rxs.into_iter().map(|rx| sc.spawn(move || collect(rx))).collect::<Vec<_>>().into_iter().map(|j| j.join().unwrap()).collect());
    let stats = h.stats();
    drop(h);
    let follows = follow_log.map_or((0, 0), |l| *l.lock().unwrap());
    (got, Ran { stats, follows })
}

fn draw_trial(rng: &mut StdRng) -> Trial {
    let n = rng.random_range(8..=28);
    // A grammar's mask reads the token before: such a row waits for the token in flight.
    let json: Vec<bool> = (0..n).map(|_| rng.random_bool(0.1)).collect();
    let reqs = json
        .iter()
        .map(|&json| {
            let prompt = (0..rng.random_range(1..40)).map(|_| rng.random_range(1..262u32)).collect();
            let sampling = if rng.random_bool(0.5) {
                greedy()
            } else {
                SamplingParams {
                    temperature: rng.random_range(0.5..1.3),
                    top_p: if rng.random_bool(0.5) { 0.9 } else { 1.0 },
                    top_k: if rng.random_bool(0.3) { 20 } else { 0 },
                    seed: Some(rng.random()),
                    ..SamplingParams::default()
                }
            };
            let mut sampling = sampling;
            if rng.random_bool(0.1) {
                // Penalties read the last token: such a row waits for the token in flight.
                sampling.presence_penalty = 0.5;
                sampling.repetition_penalty = 1.2;
            }
            let mut r = req(prompt, rng.random_range(1..48), sampling);
            r.logprobs = rng.random_bool(0.3).then(|| rng.random_range(0..4));
            r.ignore_eos = !json && rng.random_bool(0.2);
            r
        })
        .collect();
    let cfg = EngineConfig {
        max_batch: rng.random_range(8..=32),
        max_waiting: 64,
        prefill_chunk: *[7, 64, 256].get(rng.random_range(0..3)).unwrap(),
        channel_capacity: if rng.random_bool(0.3) { 2 } else { 64 },
        overlap_output: false,
    };
    let kv = rng.random_bool(0.3).then(|| (4, rng.random_range(40..120)));
    let eos_at_len = rng.random_bool(0.4).then(|| rng.random_range(20..80));
    Trial { reqs, json, cfg, kv, eos_at_len }
}

/// Stop strings cut from each request's own output (or one it never writes), for about two
/// requests in three.
fn add_stops(t: &mut Trial, outputs: &[Collected], rng: &mut StdRng) {
    for (r, c) in t.reqs.iter_mut().zip(outputs) {
        let chars: Vec<char> = c.text.chars().collect();
        if chars.len() < 2 || rng.random_bool(0.3) {
            continue;
        }
        let len = rng.random_range(1..=3.min(chars.len()));
        let at = rng.random_range(0..=chars.len() - len);
        r.stop = vec![chars[at..at + len].iter().collect()];
        if rng.random_bool(0.2) {
            r.stop.push("never written: \u{1F980}".into());
        }
    }
}

/// Runs one trial in every mode against the synchronous worker; returns each mode's run.
fn trial(seed: u64) -> Vec<Ran> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut t = draw_trial(&mut rng);
    let (plain, _) = run(&t, SYNC);
    add_stops(&mut t, &plain, &mut rng);
    let (want, _) = run(&t, SYNC);
    for (i, w) in want.iter().enumerate() {
        assert_eq!(w.error, None, "seed {seed}: request {i} failed on the synchronous worker");
        if t.json[i] && w.finish == Some(inferd::engine::FinishReason::Stop) && t.reqs[i].stop.is_empty() {
            // The grammar held: an answer that ended by itself is a JSON object.
            // (Read past, not into numbers: the grammar allows exponents beyond f64's range.)
            let json = w.text.trim();
            assert!(json.starts_with('{') && serde_json::from_str::<serde::de::IgnoredAny>(json).is_ok(), "seed {seed}: request {i}: {:?}", w.text);
        }
    }
    MODES
        .iter()
        .map(|&mode| {
            let (got, ran) = run(&t, mode);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.events, w.events, "seed {seed}, {mode:?}: request {i} (stop {:?}, sampling {:?}) differs from the synchronous worker's", t.reqs[i].stop, t.reqs[i].sampling);
            }
            ran
        })
        .collect()
}

#[test]
fn events_with_the_output_lane_are_the_synchronous_events() {
    let (first, trials) = match std::env::var("OVERLAP_SEED") {
        Ok(s) => (s.parse().expect("OVERLAP_SEED is a number"), 1),
        Err(_) => (1, std::env::var("OVERLAP_TRIALS").map_or(40, |s| s.parse().expect("OVERLAP_TRIALS is a number"))),
    };
    // Per mode: tokens whose events the lane made, tokens dropped, launches with following
    // rows, following rows, preemptions.
    let mut sums = [[0u64; 5]; MODES.len()];
    for seed in first..first + trials {
        for (sum, ran) in sums.iter_mut().zip(trial(seed)) {
            let s = &ran.stats;
            for (x, v) in sum.iter_mut().zip([s.overlapped_tokens, s.dropped_tokens, ran.follows.0 as u64, ran.follows.1 as u64, s.preemptions]) {
                *x += v;
            }
        }
    }
    for (mode, s) in MODES.iter().zip(&sums) {
        eprintln!("{trials} trials, {mode:?}: events of {} tokens made by the lane, {} tokens dropped, {} launches with {} following rows, {} preemptions", s[0], s[1], s[2], s[3], s[4]);
    }
    if trials >= 20 {
        // Each mode's own path was taken, or the property says nothing about it.
        assert!(sums[0][0] > 0 && sums[2][0] > 0, "the lane never ran");
        assert!(sums[0][1] > 0 && sums[1][1] > 0, "no token was dropped after a late stop");
        assert!(sums[1][3] > 0 && sums[2][3] > 0, "no row followed a token in flight");
        assert!(sums[1][4] > 0, "nothing was preempted with pipelining");
    }
}

/// Clients that hang up while the lane holds their output or a step of theirs is in flight: the
/// others finish with their synchronous events and the engine stays up.
#[test]
fn hang_ups_beside_the_lane_leave_the_others_whole() {
    for mode in MODES {
        hang_ups(mode);
    }
}

fn hang_ups(mode: Mode) {
    let mut rng = StdRng::seed_from_u64(99);
    let mut t = draw_trial(&mut rng);
    t.cfg.channel_capacity = 1;
    t.reqs.iter_mut().for_each(|r| r.max_new_tokens = 40);
    t.json.iter_mut().for_each(|j| *j = false);
    let (want, _) = run(&t, SYNC);
    let (tok, eos) = tiny_tokenizer();
    let (mut b, _) = MockBackend::new(tok.get_vocab_size(true), eos);
    b.kv = t.kv;
    b.eos_at_len = t.eos_at_len;
    let b: Box<dyn inferd::backend::Backend> = if mode.pipelined { Box::new(Pipelining::new(b)) } else { Box::new(b) };
    let h = spawn(b, Arc::new(tok), vec![eos], EngineConfig { overlap_output: mode.lane, ..t.cfg.clone() });
    let rxs: Vec<_> = t.reqs.iter().map(|r| h.submit(r.clone()).unwrap()).collect();
    let got: Vec<Option<Collected>> = std::thread::scope(|sc| {
        let joins: Vec<_> = rxs
            .into_iter()
            .enumerate()
            .map(|(i, mut rx)| {
                sc.spawn(move || {
                    if i % 3 == 0 {
                        // Read a few events, then hang up.
                        for _ in 0..(i % 5) {
                            rx.blocking_recv();
                        }
                        None
                    } else {
                        Some(collect(rx))
                    }
                })
            })
            .collect();
        joins.into_iter().map(|j| j.join().unwrap()).collect()
    });
    for (i, g) in got.iter().enumerate() {
        if let Some(g) = g {
            assert_eq!(g.events, want[i].events, "{mode:?}: request {i} changed when others hung up");
            assert!(matches!(g.events.last(), Some(Event::Done { .. })));
        }
    }
    assert!(h.is_alive());
    let again = collect(h.submit(t.reqs[1].clone()).unwrap());
    assert_eq!(again.events, want[1].events);
}
