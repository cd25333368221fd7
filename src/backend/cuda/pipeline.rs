//! Async scheduling on the device (`Backend::launch` / `collect`; the server's default on CUDA,
//! `INFERD_CUDA_PIPELINE=0` turns it off): the engine launches step N+1 before it collects step
//! N's tokens.
//!
//! - A row that follows the token in flight for its sequence reads it on the device: the
//!   metadata upload writes a stand-in id and `gather_ids` copies the step before's pick of that
//!   sequence's logit row over it, before this step's own picks overwrite the picks.
//! - The picks are copied to page-locked host memory (two buffers, alternating) with an event
//!   after the copy; `collect` waits on that event, not on the stream, so the next step stays
//!   queued behind it.
//! - Every upload of a step goes through page-locked staging (`Gpu::stage_uploads`): a copy from
//!   pageable memory may wait for the stream's earlier work.
//! - A step with a row sampled on the host (logprobs, penalties, bias, a grammar) runs to its end
//!   inside `launch`, as `step_and_sample` (its logits would be overwritten by the next step);
//!   its following rows get their tokens on the host, as do those of a step that grows the
//!   buffers (the picks on the device go with the old ones).
//! - A following row's token enters the block tables (the prefix cache's content) when the step
//!   before is collected, which is before the next launch grows any table again.
use std::collections::VecDeque;

use cudarc::driver::{CudaEvent, PinnedHostSlice};

use super::forward::Scratch;
use super::gpu::Gpu;
use super::CudaBackend;
use crate::backend::gpu_sampling::Route;
use crate::backend::{Backend, BackendError, SampleSpec, Sampled, SeqId, StepInput};

/// The launched steps not collected, and where their picks land on the host.
pub struct Pipeline {
    flight: VecDeque<Launched>,
    picks: [PinnedHostSlice<i32>; 2],
    next: usize,
}

/// One launched step.
struct Launched {
    /// Each input's sequence and whether it wants a token, in order.
    rows: Vec<(SeqId, bool)>,
    outcome: Outcome,
    /// Following rows whose tokens enter the block tables when the step before is collected:
    /// (sequence, the adapter's salt).
    records: Vec<(SeqId, u64)>,
}

enum Outcome {
    /// Ran to its end in `launch`.
    Known(Vec<Option<Sampled>>),
    /// Its picks land in `picks[slot]` (the first `n`) once `done` has passed.
    Device { slot: usize, n: usize, done: CudaEvent, sampled: Vec<bool> },
}

impl Launched {
    /// The logit row of `seq` (its place among the rows that want a token).
    fn logit_row(&self, seq: SeqId) -> Option<usize> {
        self.rows.iter().filter(|r| r.1).position(|r| r.0 == seq)
    }
}

impl Pipeline {
    pub fn new(gpu: &Gpu, scratch: &Scratch, max_slots: usize) -> Result<Pipeline, BackendError> {
        // Uploads of a step: the metadata and the sampling parameters (and a little alignment).
        gpu.stage_uploads(2 * scratch.meta_bytes() + (64 << 10))?;
        Ok(Pipeline { flight: VecDeque::new(), picks: [gpu.pinned(max_slots)?, gpu.pinned(max_slots)?], next: 0 })
    }
}

impl CudaBackend {
    pub(super) fn launch_step(&mut self, inputs: &[StepInput<'_>], samples: &[Option<SampleSpec<'_>>], follows: &[bool]) -> Result<(), BackendError> {
        let Some(p) = self.pipeline.as_mut() else {
            return Err(BackendError::Compute("async scheduling is off (CudaOptions::pipeline)".into()));
        };
        if p.flight.len() >= 2 {
            return Err(BackendError::Compute("a third step launched before the first was collected".into()));
        }
        let rows: Vec<(SeqId, bool)> = inputs.iter().map(|i| (i.seq, i.want_logits)).collect();
        // Each following row's token: known on the host, or the step before's pick of a logit
        // row, still on the device.
        let mut tokens = vec![0u32; inputs.len()];
        let mut on_device: Vec<Option<i32>> = vec![None; inputs.len()];
        for (k, (inp, _)) in inputs.iter().zip(follows).enumerate().filter(|(_, (_, &f))| f) {
            let before = p.flight.back().ok_or_else(|| BackendError::Compute("a row follows a step that was not launched".into()))?;
            let lr = before.logit_row(inp.seq).ok_or_else(|| BackendError::Compute(format!("sequence {}: a row follows a step that did not sample it", inp.seq)))?;
            match &before.outcome {
                Outcome::Known(outs) => {
                    let i = before.rows.iter().position(|r| r.0 == inp.seq).expect("a logit row is a row");
                    tokens[k] = outs[i].as_ref().map(|s| s.token).ok_or_else(|| BackendError::Compute(format!("sequence {}: the step before sampled it no token", inp.seq)))?;
                }
                Outcome::Device { .. } => on_device[k] = Some(lr as i32),
            }
        }
        let host_rows = inputs.iter().zip(samples).any(|(i, s)| i.want_logits && s.as_ref().is_some_and(|s| super::gpu_sampling::route(s, self.device_sampling) == Route::Host));
        // A step larger than the buffers reallocates them (`forward`), and the picks on the
        // device go with them.
        let rows_in = inputs.iter().map(|i| i.tokens.len()).sum::<usize>();
        let grows = rows_in > self.scratch.rows || rows.iter().filter(|r| r.1).count() > self.scratch.logit_rows;
        if (host_rows || grows) && on_device.iter().any(Option::is_some) {
            // The following rows' tokens are read on the host first (this step runs to its end
            // here, or the buffers that hold the picks are about to be replaced).
            let Pipeline { flight, picks, .. } = self.pipeline.as_mut().expect("checked above");
            let before = flight.back_mut().expect("a following row has a step before");
            let known = wait_picks(before, picks)?;
            for (k, inp) in inputs.iter().enumerate() {
                if on_device[k].take().is_some() {
                    let i = before.rows.iter().position(|r| r.0 == inp.seq).expect("its logit row is a row");
                    tokens[k] = known[i].as_ref().map(|s| s.token).ok_or_else(|| BackendError::Compute(format!("sequence {}: the step before sampled it no token", inp.seq)))?;
                }
            }
        }
        let real: Vec<StepInput<'_>> = inputs.iter().zip(follows).zip(&tokens).map(|((i, &f), t)| if f { StepInput { tokens: std::slice::from_ref(t), ..*i } } else { *i }).collect();
        if host_rows {
            let outs = self.step_and_sample(&real, samples)?;
            self.gpu.end_uploads()?;
            self.pipeline.as_mut().expect("checked above").flight.push_back(Launched { rows, outcome: Outcome::Known(outs), records: Vec::new() });
            return Ok(());
        }
        let routes = self.sampling_routes(&real, samples);
        self.run(&real, true, &on_device)?;
        // The real logit rows' picks (a decode graph's padding rows come after them).
        let n = inputs.iter().filter(|i| i.want_logits).count();
        let p = self.pipeline.as_mut().expect("checked above");
        let slot = p.next;
        let done = self.gpu.read_async(&self.scratch.ids, n, &mut p.picks[slot])?;
        p.next ^= 1;
        self.gpu.end_uploads()?;
        let sampled = inputs.iter().zip(&routes).filter(|(i, _)| i.want_logits).map(|(_, r)| r.is_some()).collect();
        let records = inputs.iter().zip(&on_device).filter(|(_, d)| d.is_some()).map(|(i, _)| (i.seq, i.adapter.map_or(0, |a| a.id))).collect();
        p.flight.push_back(Launched { rows, outcome: Outcome::Device { slot, n, done, sampled }, records });
        Ok(())
    }

    pub(super) fn collect_step(&mut self) -> Result<Vec<Option<Sampled>>, BackendError> {
        let p = self.pipeline.as_mut().ok_or_else(|| BackendError::Compute("async scheduling is off (CudaOptions::pipeline)".into()))?;
        let mut l = p.flight.pop_front().ok_or_else(|| BackendError::Compute("collect() without a launched step".into()))?;
        let outs = wait_picks(&mut l, &p.picks)?;
        // The next step's following rows fed these tokens: into the block tables now, in order.
        if let Some(next) = p.flight.front_mut() {
            for (seq, salt) in std::mem::take(&mut next.records) {
                if let Some(t) = l.rows.iter().position(|r| r.0 == seq).and_then(|i| outs[i].as_ref()) {
                    self.tables.record(seq, &[t.token], salt);
                }
            }
        }
        Ok(outs)
    }
}

/// A launched step's tokens, waiting for its picks when they are still on their way; the step
/// becomes `Known`.
fn wait_picks(l: &mut Launched, picks: &[PinnedHostSlice<i32>; 2]) -> Result<Vec<Option<Sampled>>, BackendError> {
    if let Outcome::Device { slot, n, done, sampled } = &l.outcome {
        done.synchronize().map_err(|e| BackendError::Compute(format!("CUDA: the step on the device: {e:?}")))?;
        let host = picks[*slot].as_slice().map_err(|e| BackendError::Compute(format!("CUDA: page-locked buffer: {e:?}")))?;
        let mut k = 0;
        let outs = l
            .rows
            .iter()
            .map(|&(_, want)| {
                if !want {
                    return None;
                }
                let (pick, on) = (host[..*n][k], sampled[k]);
                k += 1;
                on.then_some(Sampled { token: pick as u32, logprobs: None })
            })
            .collect();
        l.outcome = Outcome::Known(outs);
    }
    match &l.outcome {
        Outcome::Known(outs) => Ok(outs.clone()),
        Outcome::Device { .. } => unreachable!("made Known above"),
    }
}
