//! Turning one sequence's logits into the next token: the host implementation of the backend
//! contract's sampling ([`SampleSpec`] in, [`Sampled`] out), which the CPU backends use.
//!
//! The order follows vLLM and llama.cpp: `logit_bias`, repetition penalty (prompt + output),
//! presence and frequency penalties (output only), then temperature. Temperature 0 is greedy argmax
//! (ties go to the lowest id); otherwise softmax, then top-k, top-p and min-p filtering, and a draw
//! from the sequence's own RNG, so a seed gives the same tokens whatever else shares the batch.
//!
//! Logprobs are the log-softmax of the logits *after* bias and penalties but *before* temperature
//! and the filters (vLLM's default "processed logits before temperature" is close; OpenAI reports the
//! model's distribution, not the truncated sampling one). That keeps them comparable across
//! temperatures and sums to 1 over the whole vocabulary.
use std::collections::HashMap;

use super::request::SamplingParams;

/// Token statistics a sequence keeps for the penalties.
#[derive(Debug, Default, Clone)]
pub struct TokenCounts {
    /// Tokens seen in the prompt (repetition penalty only).
    pub prompt: std::collections::HashSet<u32>,
    /// How often each token was generated (all three penalties).
    pub output: HashMap<u32, u32>,
}

impl TokenCounts {
    /// Starts the statistics from a prompt.
    pub fn from_prompt(prompt: &[u32]) -> Self {
        Self { prompt: prompt.iter().copied().collect(), output: HashMap::new() }
    }

    /// Records one generated token.
    pub fn push_output(&mut self, token: u32) {
        *self.output.entry(token).or_insert(0) += 1;
    }
}

/// Applies `logit_bias`, then the repetition penalty (divide positive, multiply negative logits of
/// every token in prompt + output), then presence and frequency penalties (output tokens), in place.
pub fn apply_penalties(logits: &mut [f32], params: &SamplingParams, counts: &TokenCounts) {
    for (&id, &bias) in &params.logit_bias {
        if let Some(l) = logits.get_mut(id as usize) {
            *l += bias;
        }
    }
    let rep = params.repetition_penalty;
    if rep != 1.0 && rep > 0.0 {
        let seen = counts.prompt.iter().chain(counts.output.keys().filter(|t| !counts.prompt.contains(t)));
        for &id in seen {
            if let Some(l) = logits.get_mut(id as usize) {
                *l = if *l > 0.0 { *l / rep } else { *l * rep };
            }
        }
    }
    if params.presence_penalty != 0.0 || params.frequency_penalty != 0.0 {
        for (&id, &n) in &counts.output {
            if let Some(l) = logits.get_mut(id as usize) {
                *l -= params.frequency_penalty * n as f32 + params.presence_penalty;
            }
        }
    }
}

/// Log-softmax over the whole vector (computed in f64 for a stable sum).
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        let n = logits.len().max(1) as f32;
        return vec![-(n.ln()); logits.len()];
    }
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let lse = max as f64 + sum.ln();
    logits.iter().map(|&l| (l as f64 - lse) as f32).collect()
}

/// Greedy choice: the highest logit, ties resolved to the lowest id. NaN logits never win.
///
/// Two passes that the compiler vectorises (a greedy step on a 150k vocabulary costs ~20 µs
/// instead of ~150 µs with one branchy pass): the largest value over 16 lanes, then the first id
/// holding it.
pub fn argmax(logits: &[f32]) -> u32 {
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = logits.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            // `v > m` is false for NaN, so NaN never becomes the maximum.
            *m = if v > *m { v } else { *m };
        }
    }
    let max = lanes.iter().chain(tail).fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    if max == f32::NEG_INFINITY {
        return 0; // nothing beats -inf: the lowest id, as a strict scan gives
    }
    logits.iter().position(|&v| v == max).unwrap_or(0) as u32
}

/// The ids of the `k` largest values, largest first (ties: lower id first).
pub fn top_indices(values: &[f32], k: usize) -> Vec<u32> {
    top_of(values, (0..values.len() as u32).collect(), k)
}

/// The `k` ids among `idx` with the largest values, largest first (ties: lower id first).
fn top_of(values: &[f32], mut idx: Vec<u32>, k: usize) -> Vec<u32> {
    let k = k.min(idx.len());
    if k == 0 {
        return Vec::new();
    }
    let cmp = |a: &u32, b: &u32| values[*b as usize].total_cmp(&values[*a as usize]).then(a.cmp(b));
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
    }
    idx.sort_unstable_by(cmp);
    idx
}

/// Weights below this fraction of the top one are candidates for top-k/top-p only when the
/// tokens above it cannot decide the cut (keeps the per-token sort small on real, peaked logits).
const CANDIDATE_FLOOR: f32 = 1e-6;

/// The sampling distribution after temperature, top-k, top-p and min-p: (token, probability)
/// pairs, renormalised to sum to 1; most likely first after top-k/top-p truncation, id order when
/// neither applies (no full-vocabulary sort per token). Like vLLM and llama.cpp, top-p applies to
/// the distribution renormalised over the top-k survivors. Requires `temperature > 0`.
pub fn filtered_distribution(logits: &[f32], params: &SamplingParams) -> Vec<(u32, f32)> {
    let inv_t = 1.0 / params.temperature.max(1e-6);
    let mut max = f32::NEG_INFINITY;
    for &l in logits {
        if l > max {
            max = l;
        }
    }
    if !max.is_finite() {
        return vec![(argmax(logits), 1.0)];
    }
    // Unnormalised weights: the most likely token has weight exactly 1.
    let mut w = vec![0.0f32; logits.len()];
    let mut total = 0.0f64;
    for (wi, &l) in w.iter_mut().zip(logits) {
        let e = ((l - max) * inv_t).exp();
        *wi = if e.is_nan() { 0.0 } else { e };
        total += *wi as f64;
    }
    let truncating = params.top_k > 0 || params.top_p < 1.0;
    let mut keep: Vec<u32> = if truncating {
        let mut cand = Vec::new();
        let mut cand_mass = 0.0f64;
        for (i, &wi) in w.iter().enumerate() {
            if wi >= CANDIDATE_FLOOR {
                cand.push(i as u32);
                cand_mass += wi as f64;
            }
        }
        let k_ok = params.top_k == 0 || cand.len() >= params.top_k;
        let p_ok = params.top_p >= 1.0 || params.top_k > 0 || cand_mass >= params.top_p as f64 * total;
        if !(k_ok && p_ok) {
            cand = (0..w.len() as u32).collect();
        }
        let k_limit = if params.top_k == 0 { cand.len() } else { params.top_k.min(cand.len()) };
        if params.top_p < 1.0 {
            let mass = if params.top_k == 0 {
                total
            } else {
                top_of(&w, cand.clone(), k_limit).iter().map(|&i| w[i as usize] as f64).sum()
            };
            let target = params.top_p as f64 * mass;
            // Grow the sorted prefix until it covers top_p (usually a few dozen tokens).
            let mut want = 64.min(k_limit);
            loop {
                let top = top_of(&w, cand.clone(), want);
                let mut cum = 0.0f64;
                let cut = top.iter().position(|&i| {
                    cum += w[i as usize] as f64;
                    cum >= target
                });
                match cut {
                    Some(n) => break top[..=n].to_vec(),
                    None if want >= k_limit => break top,
                    None => want = (want * 4).min(k_limit),
                }
            }
        } else {
            top_of(&w, cand, k_limit)
        }
    } else {
        (0..w.len() as u32).filter(|&i| w[i as usize] > 0.0).collect()
    };
    // min-p: drop tokens below min_p times the most likely one (weight 1, always kept).
    if params.min_p > 0.0 {
        keep.retain(|&i| w[i as usize] >= params.min_p);
    }
    if keep.is_empty() {
        keep.push(argmax(logits));
    }
    let kept_total: f64 = keep.iter().map(|&i| w[i as usize] as f64).sum();
    if kept_total <= 0.0 {
        return vec![(argmax(logits), 1.0)];
    }
    keep.into_iter().map(|i| (i, (w[i as usize] as f64 / kept_total) as f32)).collect()
}

/// Draws from a distribution of (token, probability) pairs summing to ~1, with `u` uniform in
/// [0, 1) (the sequence's own generator's next value).
pub fn draw(dist: &[(u32, f32)], u: f64) -> u32 {
    let mut cum = 0.0f64;
    for &(id, p) in dist {
        cum += p as f64;
        if u < cum {
            return id;
        }
    }
    dist.last().map(|&(id, _)| id).unwrap_or(0)
}

/// What one row of a step asks the backend to sample: everything that decides the next token,
/// so that a backend can sample where its logits are (on a GPU, only the token ids and the
/// requested logprobs need to cross to the host).
#[derive(Debug, Clone, Copy)]
pub struct SampleSpec<'a> {
    pub params: &'a SamplingParams,
    /// The sequence's prompt and output tokens, for the penalties.
    pub counts: &'a TokenCounts,
    /// A uniform value in [0, 1) from the sequence's own generator, drawn by the engine when the
    /// temperature is above 0 (None: greedy). Sampling with it is what makes a seed give the same
    /// tokens whatever else shares the batch.
    pub uniform: Option<f64>,
    /// Some(k): the chosen token's logprob and the k most likely alternatives (k may be 0).
    pub logprobs: Option<usize>,
    /// Structured outputs: the tokens the row's grammar allows (computed while the step runs;
    /// every other token is forbidden before anything else).
    pub mask: Option<&'a crate::structured::MaskSlot>,
}

/// Logprobs of one sampled token: log-softmax of the processed logits (before temperature).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub chosen: f32,
    /// The k most likely tokens and their logprobs, most likely first (ties: lower id first).
    pub top: Vec<(u32, f32)>,
}

/// What the sampler decided for one row of a step.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprobs: Option<TokenLogprobs>,
}

/// Picks the next token: penalties, optional logprobs, then greedy or filtered sampling.
pub fn sample(mut logits: Vec<f32>, spec: &SampleSpec<'_>) -> Sampled {
    let params = spec.params;
    if let Some(m) = spec.mask {
        m.apply(&mut logits);
    }
    apply_penalties(&mut logits, params, spec.counts);
    let lp = spec.logprobs.map(|_| log_softmax(&logits));
    debug_assert_eq!(spec.uniform.is_some(), params.temperature > 0.0, "a uniform draw exactly when sampling");
    let token = match spec.uniform {
        Some(u) if params.temperature > 0.0 => draw(&filtered_distribution(&logits, params), u),
        _ => argmax(&logits),
    };
    let logprobs = lp.zip(spec.logprobs).map(|(lp, k)| TokenLogprobs {
        chosen: lp.get(token as usize).copied().unwrap_or(f32::NEG_INFINITY),
        top: top_indices(&lp, k).into_iter().map(|id| (id, lp[id as usize])).collect(),
    });
    Sampled { token, logprobs }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn params() -> SamplingParams {
        SamplingParams::default()
    }

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() < 1e-5
    }

    #[test]
    fn logit_bias_adds() {
        let mut l = vec![1.0, 2.0, 3.0];
        let mut p = params();
        p.logit_bias.insert(0, 5.0);
        p.logit_bias.insert(2, -100.0);
        p.logit_bias.insert(99, 1.0); // out of range: ignored
        apply_penalties(&mut l, &p, &TokenCounts::default());
        assert_eq!(l, vec![6.0, 2.0, -97.0]);
    }

    #[test]
    fn repetition_penalty_divides_positive_multiplies_negative() {
        let mut l = vec![2.0, -2.0, 4.0, 1.0];
        let mut p = params();
        p.repetition_penalty = 2.0;
        let mut c = TokenCounts::from_prompt(&[0, 1]);
        c.push_output(2);
        c.push_output(2);
        apply_penalties(&mut l, &p, &c);
        assert_eq!(l, vec![1.0, -4.0, 2.0, 1.0]);
    }

    #[test]
    fn presence_and_frequency_use_output_counts_only() {
        let mut l = vec![0.0; 4];
        let mut p = params();
        p.presence_penalty = 0.5;
        p.frequency_penalty = 0.25;
        let mut c = TokenCounts::from_prompt(&[3]);
        c.push_output(1);
        c.push_output(1);
        c.push_output(2);
        apply_penalties(&mut l, &p, &c);
        assert_eq!(l, vec![0.0, -1.0, -0.75, 0.0]);
    }

    #[test]
    fn greedy_ties_go_to_lowest_id() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5, 0.5]), 1);
    }

    #[test]
    fn argmax_agrees_with_a_strict_scan_in_lanes_and_tail() {
        let strict = |l: &[f32]| {
            let (mut best, mut best_v) = (0usize, f32::NEG_INFINITY);
            for (i, &v) in l.iter().enumerate() {
                if v > best_v {
                    (best, best_v) = (i, v);
                }
            }
            best as u32
        };
        let mut rng = StdRng::seed_from_u64(7);
        for len in [1usize, 15, 16, 17, 100, 1000, 151_936] {
            // Coarse values so that ties across lanes and in the tail are common.
            let mut l: Vec<f32> = (0..len).map(|_| (rand::Rng::random_range(&mut rng, 0..50) as f32) / 4.0).collect();
            assert_eq!(argmax(&l), strict(&l), "len {len}");
            l[len - 1] = 100.0; // the maximum in the tail
            assert_eq!(argmax(&l), strict(&l), "len {len}, tail max");
            l[len / 2] = f32::NAN;
            assert_eq!(argmax(&l), strict(&l), "len {len}, NaN");
        }
        assert_eq!(argmax(&[f32::NEG_INFINITY; 40]), 0);
        assert_eq!(argmax(&[f32::NAN; 40]), 0);
        assert_eq!(argmax(&[]), 0);
    }

    #[test]
    fn top_k_keeps_k_largest() {
        let mut p = params();
        p.top_k = 2;
        let l = [0f32.ln(), 1f32.ln(), 2f32.ln(), 3f32.ln()]; // probs 0, 1/6, 2/6, 3/6
        let d = filtered_distribution(&l, &p);
        assert_eq!(d.iter().map(|x| x.0).collect::<Vec<_>>(), vec![3, 2]);
        assert!(close(d[0].1, 0.6) && close(d[1].1, 0.4));
    }

    #[test]
    fn top_p_keeps_smallest_covering_set() {
        let mut p = params();
        p.top_p = 0.65;
        let l = [0.1f32.ln(), 0.2f32.ln(), 0.3f32.ln(), 0.4f32.ln()];
        let d = filtered_distribution(&l, &p);
        // 0.4 + 0.3 = 0.7 >= 0.65: keep {3, 2}
        assert_eq!(d.iter().map(|x| x.0).collect::<Vec<_>>(), vec![3, 2]);
        assert!(close(d[0].1, 0.4 / 0.7) && close(d[1].1, 0.3 / 0.7));
        // After top-k = 3 the survivors are renormalised (0.4/0.9, 0.3/0.9, 0.2/0.9) before top-p:
        // 0.444 + 0.333 = 0.778 < 0.8, so three tokens stay.
        p.top_p = 0.8;
        p.top_k = 3;
        let d = filtered_distribution(&l, &p);
        assert_eq!(d.iter().map(|x| x.0).collect::<Vec<_>>(), vec![3, 2, 1]);
        p.top_k = 0;
        let d = filtered_distribution(&l, &p);
        // Without top-k: 0.4 + 0.3 + 0.2 = 0.9 >= 0.8 also three; with 0.68 only two.
        assert_eq!(d.len(), 3);
        p.top_p = 0.68;
        assert_eq!(filtered_distribution(&l, &p).len(), 2);
    }

    #[test]
    fn min_p_drops_below_fraction_of_max() {
        let mut p = params();
        p.min_p = 0.45;
        let l = [0.1f32.ln(), 0.2f32.ln(), 0.3f32.ln(), 0.4f32.ln()];
        let d = filtered_distribution(&l, &p);
        // floor = 0.18: keeps 0.4, 0.3, 0.2, drops 0.1 (id order: no truncation sort needed)
        assert_eq!(d.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert!(close(d[0].1, 0.2 / 0.9) && close(d[2].1, 0.4 / 0.9));
        // combined with top-k the order is by probability
        p.top_k = 2;
        let d = filtered_distribution(&l, &p);
        assert_eq!(d.iter().map(|x| x.0).collect::<Vec<_>>(), vec![3, 2]);
    }

    #[test]
    fn temperature_sharpens() {
        let mut p = params();
        p.temperature = 0.5;
        let l = [0.0, 2f32.ln()]; // probs 1/3, 2/3 at T=1; at T=0.5: 1/5, 4/5
        let d = filtered_distribution(&l, &p);
        assert_eq!(d.iter().map(|x| x.0).collect::<Vec<_>>(), vec![0, 1]);
        assert!(close(d[0].1, 0.2) && close(d[1].1, 0.8));
    }

    #[test]
    fn logprobs_sum_to_one() {
        let l: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 113) as f32 / 10.0 - 5.0).collect();
        let lp = log_softmax(&l);
        let s: f64 = lp.iter().map(|&x| (x as f64).exp()).sum();
        assert!((s - 1.0).abs() < 1e-4, "{s}");
    }

    fn spec<'a>(p: &'a SamplingParams, counts: &'a TokenCounts, rng: &mut StdRng, logprobs: Option<usize>) -> SampleSpec<'a> {
        SampleSpec { params: p, counts, uniform: (p.temperature > 0.0).then(|| rng.random::<f64>()), logprobs, mask: None }
    }

    #[test]
    fn logprobs_are_before_temperature() {
        let mut p = params();
        p.temperature = 0.01;
        p.logit_bias.insert(0, 1.0);
        let mut rng = StdRng::seed_from_u64(1);
        let counts = TokenCounts::default();
        let s = sample(vec![0.0, 1.0], &spec(&p, &counts, &mut rng, Some(2)));
        let lp = s.logprobs.unwrap();
        assert!(close(lp.chosen, 0.5f32.ln()), "{lp:?}");
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![0, 1], "a tie goes to the lower id first");
        assert!(lp.top.iter().all(|t| close(t.1, 0.5f32.ln())));
    }

    #[test]
    fn greedy_logprobs_report_the_chosen_token_and_the_top_k() {
        let p = SamplingParams { temperature: 0.0, ..params() };
        let counts = TokenCounts::default();
        let l = vec![1.0, 3.0, 2.0, 0.0];
        let s = sample(l.clone(), &SampleSpec { params: &p, counts: &counts, uniform: None, logprobs: Some(2), mask: None });
        let lp = log_softmax(&l);
        assert_eq!(s.token, 1);
        assert_eq!(s.logprobs, Some(TokenLogprobs { chosen: lp[1], top: vec![(1, lp[1]), (2, lp[2])] }));
        let none = sample(l, &SampleSpec { params: &p, counts: &counts, uniform: None, logprobs: None, mask: None });
        assert_eq!(none, Sampled { token: 1, logprobs: None });
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_matches_distribution() {
        let mut p = params();
        p.seed = Some(7);
        let l = [0.25f32.ln(), 0.75f32.ln()];
        let counts = TokenCounts::default();
        let run = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..4000).map(|_| sample(l.to_vec(), &spec(&p, &counts, &mut rng, None)).token).collect::<Vec<_>>()
        };
        let a = run(7);
        assert_eq!(a, run(7));
        let ones = a.iter().filter(|&&t| t == 1).count() as f64 / a.len() as f64;
        assert!((ones - 0.75).abs() < 0.03, "{ones}");
    }
}
