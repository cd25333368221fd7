//! Which rows of a GPU step are sampled on the device, and their parameters as the CUDA
//! backend's `sample_rows` kernel (`src/backend/cuda/kernels.cu`) reads them (32 bytes a row).
//! Plain Rust, built without the `cuda` feature too, so that CI runs its tests.
//!
//! A row is sampled on the device when it draws (temperature > 0, with the sequence's uniform)
//! and needs nothing the kernel does not do: no logprobs, no penalties, no `logit_bias`, no
//! grammar mask. Then only its token id crosses to the host. Plain greedy rows take the argmax
//! kernel's pick; every other row copies its logits to the host and uses the engine's sampler.
//! `INFERD_CUDA_DEVICE_SAMPLING=0` sends every drawing row to the host sampler (A/B runs).
//!
//! The kernel's distribution is the host sampler's (temperature, then top-k, top-p over the top-k
//! survivors, min-p); it draws the kept tokens in id order, so a seed gives other tokens than on
//! the CPU (the CPU and GPU logits differ in their last bits anyway), the same ones on every run
//! and in any batch.
use crate::backend::SampleSpec;

/// Bytes of one row's parameters: inv_t f32 | top_k i32 | top_p f32 | min_p f32 | u f64 | on i32 | pad.
pub const PARAM_BYTES: usize = 32;

/// How one logit row is sampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The argmax kernel's pick.
    Greedy,
    /// `sample_rows` on the device.
    Device,
    /// The logits row to the host and the engine's sampler.
    Host,
}

/// `INFERD_CUDA_DEVICE_SAMPLING=0` turns device sampling off.
pub fn enabled_from_env() -> bool {
    std::env::var("INFERD_CUDA_DEVICE_SAMPLING").map_or(true, |v| v != "0")
}

/// Where a row with this spec is sampled.
pub fn route(spec: &SampleSpec<'_>, device_sampling: bool) -> Route {
    let p = spec.params;
    let plain = spec.logprobs.is_none() && spec.mask.is_none() && p.logit_bias.is_empty() && p.repetition_penalty == 1.0 && p.presence_penalty == 0.0 && p.frequency_penalty == 0.0;
    match (p.temperature > 0.0, spec.uniform) {
        (false, _) if plain => Route::Greedy,
        (true, Some(_)) if plain && device_sampling => Route::Device,
        _ => Route::Host,
    }
}

/// One row's parameters; `None` is a row the kernel leaves alone (all zeros).
pub fn params(row: Option<(&crate::engine::request::SamplingParams, f64)>) -> [u8; PARAM_BYTES] {
    let mut b = [0u8; PARAM_BYTES];
    let Some((p, u)) = row else {
        return b;
    };
    b[0..4].copy_from_slice(&(1.0f32 / p.temperature.max(1e-6)).to_le_bytes());
    b[4..8].copy_from_slice(&(p.top_k.min(i32::MAX as usize) as i32).to_le_bytes());
    b[8..12].copy_from_slice(&p.top_p.to_le_bytes());
    b[12..16].copy_from_slice(&p.min_p.to_le_bytes());
    b[16..24].copy_from_slice(&u.to_le_bytes());
    b[24..28].copy_from_slice(&1i32.to_le_bytes());
    b
}

/// Appends one row's parameters (`params`).
pub fn push_params(out: &mut Vec<u8>, row: Option<(&crate::engine::request::SamplingParams, f64)>) {
    out.extend_from_slice(&params(row));
}

/// What the device sampler draws for these logits, on the host: the host sampler's kept tokens
/// and probabilities (`filtered_distribution`) drawn in id order with `u`. Also returns how far
/// `u` lies from the nearest boundary of that cumulative distribution: the device's weights may
/// differ from the host's in their last bit, so a test skips draws within rounding of one.
pub fn reference_draw(logits: &[f32], params: &crate::engine::request::SamplingParams, u: f64) -> (u32, f64) {
    let mut dist = crate::engine::sampler::filtered_distribution(logits, params);
    dist.sort_unstable_by_key(|&(id, _)| id);
    let total: f64 = dist.iter().map(|&(_, p)| p as f64).sum();
    let target = u * total;
    let (mut cum, mut margin, mut chosen) = (0.0f64, f64::INFINITY, None);
    for &(id, p) in &dist {
        cum += p as f64;
        margin = margin.min((cum - target).abs());
        if chosen.is_none() && target < cum {
            chosen = Some(id);
        }
    }
    (chosen.or(dist.last().map(|&(id, _)| id)).unwrap_or(0), margin)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::request::SamplingParams;
    use crate::engine::sampler::TokenCounts;

    fn spec<'a>(p: &'a SamplingParams, counts: &'a TokenCounts, u: Option<f64>, logprobs: Option<usize>) -> SampleSpec<'a> {
        SampleSpec { params: p, counts, uniform: u, logprobs, mask: None }
    }

    #[test]
    fn routes_follow_what_the_kernel_does() {
        let counts = TokenCounts::default();
        let greedy = SamplingParams { temperature: 0.0, ..Default::default() };
        let draw = SamplingParams { temperature: 0.7, top_k: 40, top_p: 0.9, ..Default::default() };
        assert_eq!(route(&spec(&greedy, &counts, None, None), true), Route::Greedy);
        assert_eq!(route(&spec(&draw, &counts, Some(0.5), None), true), Route::Device);
        assert_eq!(route(&spec(&draw, &counts, Some(0.5), None), false), Route::Host);
        assert_eq!(route(&spec(&draw, &counts, Some(0.5), Some(0)), true), Route::Host, "logprobs: host");
        assert_eq!(route(&spec(&greedy, &counts, None, Some(2)), true), Route::Host);
        let pen = SamplingParams { presence_penalty: 0.5, ..draw.clone() };
        assert_eq!(route(&spec(&pen, &counts, Some(0.5), None), true), Route::Host);
        let rep = SamplingParams { repetition_penalty: 1.1, ..greedy.clone() };
        assert_eq!(route(&spec(&rep, &counts, None, None), true), Route::Host);
        let bias = SamplingParams { logit_bias: [(3u32, 1.0f32)].into_iter().collect(), ..draw };
        assert_eq!(route(&spec(&bias, &counts, Some(0.5), None), true), Route::Host);
    }

    #[test]
    fn the_reference_draws_kept_tokens_in_id_order() {
        // Weights after T = 1: ids 0..4 with logits 0, ln 2, ln 3, ln 4 -> probabilities 0.1 .. 0.4.
        let logits: Vec<f32> = [1.0f32, 2.0, 3.0, 4.0].iter().map(|v| v.ln()).collect();
        let p = SamplingParams { temperature: 1.0, ..Default::default() };
        assert_eq!(reference_draw(&logits, &p, 0.05).0, 0);
        assert_eq!(reference_draw(&logits, &p, 0.15).0, 1);
        assert_eq!(reference_draw(&logits, &p, 0.35).0, 2);
        assert_eq!(reference_draw(&logits, &p, 0.99).0, 3);
        let (_, margin) = reference_draw(&logits, &p, 0.31);
        assert!((margin - 0.01).abs() < 1e-6, "{margin}");
        // top-k 2 keeps ids 2 and 3 (3/7 and 4/7), drawn in id order.
        let k2 = SamplingParams { top_k: 2, ..p.clone() };
        assert_eq!(reference_draw(&logits, &k2, 0.40).0, 2);
        assert_eq!(reference_draw(&logits, &k2, 0.45).0, 3);
        // min-p 0.6 of the top weight (4): keeps 3 and 4 -> ids 2 and 3 again.
        let mp = SamplingParams { min_p: 0.6, ..p };
        assert_eq!(reference_draw(&logits, &mp, 0.0).0, 2);
    }

    #[test]
    fn params_are_laid_out_as_the_kernel_reads_them() {
        let p = SamplingParams { temperature: 0.5, top_k: 7, top_p: 0.9, min_p: 0.05, ..Default::default() };
        let mut out = Vec::new();
        push_params(&mut out, None);
        push_params(&mut out, Some((&p, 0.25)));
        assert_eq!(out.len(), 2 * PARAM_BYTES);
        assert!(out[..PARAM_BYTES].iter().all(|&b| b == 0), "an off row is all zeros (on = 0)");
        let r = &out[PARAM_BYTES..];
        assert_eq!(f32::from_le_bytes(r[0..4].try_into().unwrap()), 2.0);
        assert_eq!(i32::from_le_bytes(r[4..8].try_into().unwrap()), 7);
        assert_eq!(f32::from_le_bytes(r[8..12].try_into().unwrap()), 0.9);
        assert_eq!(f32::from_le_bytes(r[12..16].try_into().unwrap()), 0.05);
        assert_eq!(f64::from_le_bytes(r[16..24].try_into().unwrap()), 0.25);
        assert_eq!(i32::from_le_bytes(r[24..28].try_into().unwrap()), 1);
    }
}
