//! One step of the worker: the planned rows through the backend (with the constrained rows' token
//! masks computed meanwhile), then each row's sampled token into its sequence; a failed step
//! fails, preempts or ends only the sequences its error names (module docs of `scheduler`).
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::{Row, Worker};

use crate::backend::{BackendError, SeqId, StepInput};
use crate::engine::request::FinishReason;

/// Fewest owed events worth handing to the output lane: below it the hand-over (two channel
/// messages and a wake-up, some microseconds) costs about what making them here does (about
/// 3 us a row, docs/perf-notes.md session 15).
const LANE_MIN_ROWS: usize = 8;

impl Worker {
    pub(super) fn step(&mut self, rows: Vec<Row>) {
        // The events the last step's tokens owe are made during this one (`output::OutputLane`),
        // when there are enough of them to be worth the hand-over.
        let lend = self.lane.is_some() && self.running.iter().filter(|s| s.owes_events()).count() >= LANE_MIN_ROWS;
        let jobs: Vec<_> = if lend { self.running.iter_mut().enumerate().filter_map(|(i, s)| s.lend(i)).collect() } else { Vec::new() };
        if !lend {
            self.settle_all();
        }
        let mut rngs = Vec::with_capacity(rows.len());
        let constraint = |r: &Row| if r.want_logits { self.running[r.idx].req.constraint.as_ref() } else { None };
        let masks = crate::engine::masks::slots(rows.iter().map(constraint));
        let result = {
            let mut samples = Vec::with_capacity(rows.len());
            for (r, mask) in rows.iter().zip(&masks) {
                let (spec, rng) = if r.want_logits {
                    let (mut spec, rng) = self.running[r.idx].sample_spec();
                    spec.mask = mask.as_ref();
                    (Some(spec), rng)
                } else {
                    (None, None)
                };
                samples.push(spec);
                rngs.push(rng);
            }
            let inputs: Vec<StepInput<'_>> = rows
                .iter()
                .map(|r| {
                    let s = &self.running[r.idx];
                    StepInput {
                        seq: s.id,
                        tokens: &s.tokens[s.fed..s.fed + r.n],
                        adapter: s.req.adapter.as_ref(),
                        want_logits: r.want_logits,
                    }
                })
                .collect();
            let prompt: usize = rows.iter().filter(|r| self.running[r.idx].is_prefilling()).map(|r| r.n).sum();
            self.shared.prompt_fed.fetch_add(prompt as u64, Ordering::Relaxed);
            let backend = &mut self.backend;
            let t = Instant::now();
            let mask_jobs = rows.iter().zip(&masks).filter_map(|(r, m)| Some((constraint(r)?, m.as_ref()?))).collect();
            let max_context = backend.max_context();
            let compute = || crate::engine::masks::while_computing(mask_jobs, || catch_unwind(AssertUnwindSafe(|| backend.step_and_sample(&inputs, &samples))));
            let (r, jobs) = match &self.lane {
                Some(lane) => lane.while_computing(jobs, max_context, &self.decoding, compute),
                None => (compute(), jobs),
            };
            self.shared.steps.fetch_add(1, Ordering::Relaxed);
            self.shared.step_nanos.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
            (r, jobs)
        };
        let (result, jobs) = result;
        let t = Instant::now();
        // Outputs back first: a sequence whose last token completed a stop string has ended, and
        // its row in this step is dropped below.
        self.shared.overlapped.fetch_add(jobs.len() as u64, Ordering::Relaxed);
        for job in jobs {
            let idx = job.idx;
            self.running[idx].returned(job);
        }
        let outs = match result {
            Ok(Ok(outs)) if outs.len() == rows.len() => outs,
            Ok(Ok(outs)) => {
                let msg = format!("backend returned {} results for {} inputs", outs.len(), rows.len());
                return self.fail_rows(&rows, &msg);
            }
            Ok(Err(BackendError::ContextFull { seq, .. })) => return self.context_full(&rows, seq),
            Ok(Err(BackendError::KvFull { seq })) => {
                return match self.running.iter().position(|s| s.id == seq) {
                    // Alone in the cache and still no room: it can never fit.
                    Some(idx) if self.running.len() == 1 => self.running[idx].fail("the KV cache cannot hold this sequence"),
                    Some(idx) => {
                        self.kv_hold = true;
                        self.preempt(idx);
                    }
                    None => self.fail_rows(&rows, "backend reported a full KV cache for an unknown sequence"),
                };
            }
            Ok(Err(e)) => return self.fail_rows(&rows, &e.to_string()),
            Err(_) => return self.fail_rows(&rows, "the model backend panicked during a forward pass"),
        };
        let vocab = self.backend.vocab_size();
        let ctx = self.decoding.ctx(self.backend.max_context());
        let later = self.lane.is_some();
        for ((row, out), rng) in rows.iter().zip(outs).zip(rngs) {
            let s = &mut self.running[row.idx];
            s.fed += row.n;
            if !row.want_logits {
                continue;
            }
            if s.finished || s.cancelled {
                // Ended while the step ran (a stop string in its last token's text, found one
                // step late, or a hang-up): this token is never seen.
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            match out {
                Some(sampled) if (sampled.token as usize) < vocab => {
                    // Counted before the events go out, so a client that saw `Done` sees the count.
                    self.shared.generated.fetch_add(1, Ordering::Relaxed);
                    let now = std::time::Instant::now();
                    match s.last_token_at {
                        None => self.shared.latency.ttft.observe(now - s.arrived),
                        Some(t) => self.shared.latency.tpot.observe(now - t),
                    }
                    s.last_token_at = Some(now);
                    s.on_sampled(sampled, rng, &ctx, later);
                }
                Some(sampled) => s.fail(format!("backend sampled token {} outside the vocabulary of {vocab}", sampled.token)),
                None => s.fail("backend sampled no token for a row that asked for one"),
            }
        }
        self.shared.sample_nanos.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    fn fail_rows(&mut self, rows: &[Row], msg: &str) {
        tracing::error!(error = msg, rows = rows.len(), "engine step failed");
        for r in rows {
            self.running[r.idx].fail(msg);
        }
    }

    fn context_full(&mut self, rows: &[Row], seq: SeqId) {
        let Some(r) = rows.iter().find(|r| self.running[r.idx].id == seq) else {
            return self.fail_rows(rows, "backend reported a full context for an unknown sequence");
        };
        let ctx = self.decoding.ctx(self.backend.max_context());
        let s = &mut self.running[r.idx];
        let last = s.tokens.last().copied().unwrap_or(0);
        s.finish(FinishReason::Length, &ctx, last);
    }
}
