//! One step's checks and one ONNX Runtime `Run` over a range of slots (which runs a step makes
//! is `step.rs`'s choice), and reading a row's logits back.
use std::ffi::CString;

use super::run::{self, Dtype, View};
use super::{shapes, OnnxBackend, RowOut};
use crate::backend::gpu_sampling::{Route, PARAM_BYTES};
use crate::backend::{check_rows, BackendError, StepInput};

impl OnnxBackend {
    pub(super) fn check(&self, inputs: &[StepInput<'_>]) -> Result<(), BackendError> {
        check_rows(inputs, self.cfg.vocab_size, self.kv.shape.max_len, |seq| self.kv.len_of(seq), |a| {
            let graph = self.lora.as_ref().ok_or_else(|| BackendError::Compute("this ONNX graph has no LoRA inputs (export it with --lora-inputs)".into()))?;
            graph.check(a).map_err(|e| BackendError::Compute(format!("adapter '{}': {e}", a.name)))
        })?;
        let new = inputs.iter().filter(|inp| self.kv.slot(inp.seq).is_none()).count();
        let free = self.kv.free_slots();
        if new > free {
            return Err(BackendError::Compute(format!(
                "{new} new sequences but only {free} free KV cache slots (max_batch {})",
                self.kv.shape.slots
            )));
        }
        Ok(())
    }

    /// Runs `tokens` (`[b, s]`, row-major) for slots `first..first + b`, each row `r` holding
    /// `lens[r]` positions before the step. Writes logits `[b, s, vocab]` (`[b, 1, vocab]` for a
    /// pruned graph) into `self.logits`.
    ///
    /// GroupQueryAttention takes each row's length from its mask (`seqlens_k = ones - 1`) and
    /// writes the new K/V at that length; the mask's width must stay within the buffers' layout
    /// (`kv.reserve` grows it) and the rotary cache (`max_len <= context_length`). A padding row
    /// of a full sequence therefore gets `max_len` ones and overwrites its own last position,
    /// which is never read again (a full sequence cannot step).
    pub(super) fn forward(
        &mut self,
        first: usize,
        b: usize,
        s: usize,
        tokens: &mut [i64],
        lens: &[usize],
        new: &[usize],
        extra: &[(CString, View)],
    ) -> Result<(), BackendError> {
        let max_len = self.kv.shape.max_len;
        // Fixed shapes: the chunk is padded; its padding positions count as tokens in this run
        // (each row's real length is what the caller records afterwards).
        let longest = lens.iter().copied().max().unwrap_or(0);
        let sp = if self.fixed_shapes { shapes::chunk_len(s, max_len - longest.min(max_len)) } else { s };
        let mut padded;
        let (s, tokens, padding) = if sp == s {
            (s, tokens, None)
        } else {
            padded = vec![0i64; b * sp];
            for r in 0..b {
                padded[r * sp..r * sp + s].copy_from_slice(&tokens[r * s..(r + 1) * s]);
            }
            (sp, &mut padded[..], Some(sp))
        };
        let ones: Vec<usize> = lens.iter().zip(new).map(|(&l, &n)| (l + padding.unwrap_or(n)).min(max_len)).collect();
        let total = ones.iter().copied().max().unwrap_or(s);
        self.kv.reserve(total);
        let mut mask = vec![0i64; b * total];
        for (r, &n) in ones.iter().enumerate() {
            mask[r * total..r * total + n].fill(1);
        }
        // Positions only for graphs that take them (the builder's GQA graphs derive their own).
        let mut pos: Vec<i64> = match self.names.position_ids {
            Some(_) => lens.iter().flat_map(|&l| (l..l + s).map(|p| p as i64)).collect(),
            None => Vec::new(),
        };
        let vocab = self.cfg.vocab_size;
        let rows = if self.last_only { 1 } else { s };
        if let Some(d) = &self.sampler {
            // Device logits: one row per sequence (`device` is made only for such graphs).
            if rows != 1 || b > d.rows() {
                return Err(BackendError::Compute(format!("{b} rows of {rows} positions exceed the device's logits buffer of {} rows", d.rows())));
            }
        } else {
            let need = (b * rows * vocab * self.logits_dtype.bytes()).div_ceil(8);
            if self.logits.len() < need {
                self.logits.resize(need, 0);
            }
        }
        let (bi, si, ti) = (b as i64, s as i64, total as i64);
        let e = |m: String| BackendError::Compute(m);
        let ids = View::ids(&self.host, tokens, &[bi, si]).map_err(e)?;
        let mask_v = View::ids(&self.host, &mut mask, &[bi, ti]).map_err(e)?;
        let pos_v = if pos.is_empty() { None } else { Some(View::ids(&self.host, &mut pos, &[bi, si]).map_err(e)?) };
        let logits_shape = [bi, rows as i64, vocab as i64];
        let logits = match &self.sampler {
            // SAFETY: the device buffer holds the sampler's rows (>= b, checked above) of vocab
            // elements of logits_dtype on the cache's device, and outlives the run.
            Some(d) => unsafe { View::float(&self.kv.memory_info, self.logits_dtype, d.target(), &logits_shape) },
            // SAFETY: the logits buffer holds b*rows*vocab elements of logits_dtype and outlives the run.
            None => unsafe { View::float(&self.host, self.logits_dtype, self.logits.as_mut_ptr().cast(), &logits_shape) },
        }
        .map_err(e)?;
        let kv_shape = [bi, self.kv.shape.kv_heads as i64, self.kv.cap() as i64, self.kv.shape.head_size as i64];
        let mut kv_views = Vec::with_capacity(2 * self.cfg.num_layers);
        for layer in 0..self.cfg.num_layers {
            for value in [false, true] {
                let ptr = self.kv.slot_ptr(layer, value, first);
                // SAFETY: slots first..first+b of this buffer are contiguous and allocated on the
                // device of kv.memory_info; the buffers outlive the run.
                kv_views.push(unsafe { View::float(&self.kv.memory_info, self.kv_dtype, ptr, &kv_shape) }.map_err(e)?);
            }
        }
        // Each row's logits come from its last real position (rows are right-padded).
        let mut index: Vec<i64> = new.iter().map(|&n| n.clamp(1, s) as i64 - 1).collect();
        let index_v = match self.names.logits_index {
            Some(_) => Some(View::ids(&self.host, &mut index, &[bi, 1]).map_err(e)?),
            None => None,
        };
        let mut inputs = vec![(self.names.input_ids.as_c_str(), &ids), (self.names.attention_mask.as_c_str(), &mask_v)];
        if let (Some(n), Some(v)) = (&self.names.logits_index, &index_v) {
            inputs.push((n.as_c_str(), v));
        }
        if let (Some(p), Some(v)) = (&self.names.position_ids, &pos_v) {
            inputs.push((p.as_c_str(), v));
        }
        inputs.extend(extra.iter().map(|(n, v)| (n.as_c_str(), v)));
        let mut outputs = vec![(self.names.logits.as_c_str(), &logits)];
        for (layer, ((pk, pv), (ok, ov))) in self.names.past.iter().zip(&self.names.present).enumerate() {
            let (k, v) = (&kv_views[2 * layer], &kv_views[2 * layer + 1]);
            inputs.push((pk.as_c_str(), k));
            inputs.push((pv.as_c_str(), v));
            outputs.push((ok.as_c_str(), k));
            outputs.push((ov.as_c_str(), v));
        }
        run::run(&mut self.session, &inputs, &outputs).map_err(|m| BackendError::Compute(format!("ONNX Runtime: {m}")))
    }

    /// After a run of `b` rows with `s` tokens each: gives each pick `(input index, batch row,
    /// position)` its row's logits, or the token the device picked for it (`routes`).
    pub(super) fn emit(&mut self, s: usize, b: usize, picks: &[(usize, usize, usize)], out: &mut [Option<RowOut>]) -> Result<(), BackendError> {
        let Some(d) = self.sampler.as_mut() else {
            for &(i, r, pos) in picks {
                out[i] = Some(RowOut::Logits(self.logits_at(s, r, pos)));
            }
            return Ok(());
        };
        let routes = &self.routes;
        let route = |i: usize| routes.get(i).map_or(Route::Host, |r| r.0);
        let ids = if picks.iter().any(|&(i, ..)| route(i) != Route::Host) {
            let params = picks.iter().any(|&(i, ..)| route(i) == Route::Device).then(|| {
                let mut p = vec![0u8; b * PARAM_BYTES];
                for &(i, r, _) in picks.iter().filter(|&&(i, ..)| route(i) == Route::Device) {
                    p[r * PARAM_BYTES..(r + 1) * PARAM_BYTES].copy_from_slice(&routes[i].1);
                }
                p
            });
            d.pick(b, params.as_deref())?
        } else {
            d.widen(b)?;
            Vec::new()
        };
        for &(i, r, _) in picks {
            out[i] = Some(match route(i) {
                Route::Host => RowOut::Logits(d.row(r)?),
                _ => RowOut::Token(ids[r] as u32),
            });
        }
        Ok(())
    }

    /// Logits of batch row `row` at position `pos` after a run with `s` tokens per row, as f32
    /// (a pruned graph returns only the last position, whatever `pos`).
    pub(super) fn logits_at(&self, s: usize, row: usize, pos: usize) -> Vec<f32> {
        let vocab = self.cfg.vocab_size;
        let start = if self.last_only { row * vocab } else { (row * s + pos) * vocab };
        match self.logits_dtype {
            Dtype::F32 => {
                // SAFETY: the buffer holds at least b*s*vocab f32 written by the last run.
                let all: &[f32] = unsafe { std::slice::from_raw_parts(self.logits.as_ptr().cast(), start + vocab) };
                all[start..].to_vec()
            }
            Dtype::F16 => {
                // SAFETY: as above, for f16.
                let all: &[half::f16] = unsafe { std::slice::from_raw_parts(self.logits.as_ptr().cast(), start + vocab) };
                all[start..].iter().map(|x| x.to_f32()).collect()
            }
        }
    }
}
