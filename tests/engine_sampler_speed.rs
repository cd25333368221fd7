//! Sampling cost on a Qwen-sized vocabulary (prints per-token times; asserts only that it runs).
use inferd::engine::sampler::{sample, TokenCounts};
use inferd::engine::SamplingParams;
use rand::rngs::StdRng;
use rand::SeedableRng;

#[test]
fn full_vocab_sampling_is_cheap() {
    let l: Vec<f32> = (0..151_936u32).map(|i| ((i.wrapping_mul(2_654_435_761) >> 8) % 2000) as f32 / 100.0 - 10.0).collect();
    let mut rng = StdRng::seed_from_u64(3);
    for (temperature, top_k, top_p, logprobs) in [(0.0, 0, 1.0, false), (0.0, 0, 1.0, true), (0.8, 0, 1.0, false), (0.8, 40, 1.0, false), (0.8, 0, 0.9, false), (0.8, 50, 0.95, false)] {
        let p = SamplingParams { temperature, top_k, top_p, min_p: 0.05, ..SamplingParams::default() };
        let t = std::time::Instant::now();
        for _ in 0..5 {
            sample(l.clone(), &p, &TokenCounts::default(), logprobs, &mut rng);
        }
        eprintln!("T={temperature} top_k={top_k} top_p={top_p} logprobs={logprobs}: {:?} per token", t.elapsed() / 5);
    }
}
