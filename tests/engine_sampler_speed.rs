//! Sampling on a Qwen-sized vocabulary (151,936 logits): every setting picks a token its filters
//! allow, greedy picks the argmax, logprobs come sorted; the time per token is printed (timings are
//! never asserted).
use inferd::engine::sampler::{argmax, log_softmax, sample, top_indices, SampleSpec, TokenCounts};
use inferd::engine::SamplingParams;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[test]
fn full_vocab_sampling_respects_its_filters() {
    let l: Vec<f32> = (0..151_936u32).map(|i| ((i.wrapping_mul(2_654_435_761) >> 8) % 2000) as f32 / 100.0 - 10.0).collect();
    let mut rng = StdRng::seed_from_u64(3);
    let counts = TokenCounts::default();
    let lp = log_softmax(&l);
    for (temperature, top_k, top_p, logprobs) in [(0.0, 0, 1.0, None), (0.0, 0, 1.0, Some(5)), (0.8, 0, 1.0, None), (0.8, 40, 1.0, None), (0.8, 0, 0.9, None), (0.8, 50, 0.95, Some(3))] {
        let p = SamplingParams { temperature, top_k, top_p, min_p: 0.05, ..SamplingParams::default() };
        let t = std::time::Instant::now();
        for _ in 0..5 {
            let uniform = (temperature > 0.0).then(|| rng.random::<f64>());
            let s = sample(l.clone(), &SampleSpec { params: &p, counts: &counts, uniform, logprobs, mask: None });
            if temperature == 0.0 {
                assert_eq!(s.token, argmax(&l));
            }
            if top_k > 0 {
                assert!(top_indices(&l, top_k).contains(&s.token), "token {} outside the top {top_k}", s.token);
            }
            // min-p 0.05: the token's probability is at least 5% of the most likely one's.
            assert!(lp[s.token as usize] >= lp[argmax(&l) as usize] + 0.05f32.ln() - 1e-4);
            match (logprobs, s.logprobs) {
                (Some(k), Some(got)) => {
                    assert_eq!(got.chosen, lp[s.token as usize]);
                    assert_eq!(got.top.iter().map(|t| t.0).collect::<Vec<_>>(), top_indices(&lp, k));
                }
                (None, None) => {}
                (want, got) => panic!("asked for logprobs {want:?}, got {got:?}"),
            }
        }
        eprintln!("T={temperature} top_k={top_k} top_p={top_p} logprobs={logprobs:?}: {:?} per token", t.elapsed() / 5);
    }
}
