//! The output lane (`EngineConfig::overlap_output`) as a property: with a step's events made on a
//! helper thread while the backend runs the next step, every request gets exactly the events the
//! synchronous worker gives it (same tokens, text pieces, logprobs, finish reason and usage),
//! even when a stop string is found one step late and that sequence's next token is dropped.
//!
//! Each trial draws a mix of 8 to 28 requests (greedy and seeded sampling, logprobs, EOS and
//! `ignore_eos`, lengths, small or large event channels, a bounded KV cache that forces
//! preemption, prefill chunks) and stop strings cut from the requests' own output, so that many
//! sequences stop on them. `OVERLAP_SEED=N` replays one trial and `OVERLAP_TRIALS=N` runs more.
mod engine_common;

use std::sync::Arc;

use engine_common::*;
use inferd::engine::{spawn, EngineConfig, EngineStats, Event, GenRequest, SamplingParams};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A trial: the requests and the engine and backend they run on.
#[derive(Clone)]
struct Trial {
    reqs: Vec<GenRequest>,
    cfg: EngineConfig,
    kv: Option<(usize, usize)>,
    eos_at_len: Option<usize>,
}

fn run(t: &Trial, overlap: bool) -> (Vec<Collected>, EngineStats) {
    let (tok, eos) = tiny_tokenizer();
    let (mut b, _) = MockBackend::new(tok.get_vocab_size(true), eos);
    b.kv = t.kv;
    b.eos_at_len = t.eos_at_len;
    let h = spawn(Box::new(b), Arc::new(tok), vec![eos], EngineConfig { overlap_output: overlap, ..t.cfg.clone() });
    let rxs: Vec<_> = t.reqs.iter().map(|r| h.submit(r.clone()).expect("the queue has room")).collect();
    // Each client reads on its own thread, so a small channel fills and empties as in a server.
    let got = std::thread::scope(|sc| rxs.into_iter().map(|rx| sc.spawn(move || collect(rx))).collect::<Vec<_>>().into_iter().map(|j| j.join().unwrap()).collect());
    (got, h.stats())
}

fn draw_trial(rng: &mut StdRng) -> Trial {
    let n = rng.random_range(8..=28);
    let reqs = (0..n)
        .map(|_| {
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
            let mut r = req(prompt, rng.random_range(1..48), sampling);
            r.logprobs = rng.random_bool(0.3).then(|| rng.random_range(0..4));
            r.ignore_eos = rng.random_bool(0.2);
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
    Trial { reqs, cfg, kv, eos_at_len }
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

fn trial(seed: u64) -> EngineStats {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut t = draw_trial(&mut rng);
    let (plain, _) = run(&t, false);
    add_stops(&mut t, &plain, &mut rng);
    let (want, _) = run(&t, false);
    let (got, stats) = run(&t, true);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(w.error, None, "seed {seed}: request {i} failed on the synchronous worker");
        assert_eq!(g.events, w.events, "seed {seed}: request {i} (stop {:?}) differs with the output lane", t.reqs[i].stop);
    }
    stats
}

#[test]
fn events_with_the_output_lane_are_the_synchronous_events() {
    let (first, trials) = match std::env::var("OVERLAP_SEED") {
        Ok(s) => (s.parse().expect("OVERLAP_SEED is a number"), 1),
        Err(_) => (1, std::env::var("OVERLAP_TRIALS").map_or(40, |s| s.parse().expect("OVERLAP_TRIALS is a number"))),
    };
    let (mut overlapped, mut dropped) = (0, 0);
    for seed in first..first + trials {
        let s = trial(seed);
        overlapped += s.overlapped_tokens;
        dropped += s.dropped_tokens;
    }
    eprintln!("{trials} trials: {overlapped} tokens' events made beside a step, {dropped} tokens dropped after a late stop");
    assert!(overlapped > 0, "the lane never ran: the property was not exercised");
    if trials >= 20 {
        assert!(dropped > 0, "no stop string was found one step late: the dropped-token path was not exercised");
    }
}

/// Clients that hang up while the lane holds their output: the others finish with their
/// synchronous events and the engine stays up.
#[test]
fn hang_ups_beside_the_lane_leave_the_others_whole() {
    let mut rng = StdRng::seed_from_u64(99);
    let mut t = draw_trial(&mut rng);
    t.cfg.channel_capacity = 1;
    t.reqs.iter_mut().for_each(|r| r.max_new_tokens = 40);
    let (want, _) = run(&t, false);
    let (tok, eos) = tiny_tokenizer();
    let (b, _) = MockBackend::new(tok.get_vocab_size(true), eos);
    let h = spawn(Box::new(b), Arc::new(tok), vec![eos], EngineConfig { overlap_output: true, ..t.cfg.clone() });
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
            assert_eq!(g.events, want[i].events, "request {i} changed when others hung up");
            assert!(matches!(g.events.last(), Some(Event::Done { .. })));
        }
    }
    assert!(h.is_alive());
    let again = collect(h.submit(t.reqs[1].clone()).unwrap());
    assert_eq!(again.events, want[1].events);
}
