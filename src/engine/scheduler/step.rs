//! One step of the worker: the planned rows through the backend (with the constrained rows' token
//! masks computed meanwhile), then each row's sampled token into its sequence; a failed step
//! fails, preempts or ends only the sequences its error names (module docs of `scheduler`).
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::time::Instant;

use rand::rngs::StdRng;

use super::{Row, Worker};
use crate::backend::{BackendError, SeqId, StepInput, FOLLOWS};
use crate::engine::output::Job;
use crate::engine::request::FinishReason;
use crate::engine::sampler::{SampleSpec, Sampled};
use crate::engine::sequence::Sequence;
use crate::structured::{Constraint, MaskSlot};

/// Fewest owed events worth handing to the output lane: below it the hand-over (two channel
/// messages and a wake-up, some microseconds) costs about what making them here does (about
/// 3 us a row, docs/perf-notes.md session 15).
const LANE_MIN_ROWS: usize = 8;

/// The token of a row that follows the one in flight (`Backend::launch`).
static FOLLOWS_ONE: [u32; 1] = [FOLLOWS];

/// A step's rows as the backend takes them: each row's input and sampling spec (with the
/// generator's state after its draw, kept once the step is under way).
pub(super) struct RowInputs<'a> {
    pub inputs: Vec<StepInput<'a>>,
    pub samples: Vec<Option<SampleSpec<'a>>>,
    pub rngs: Vec<Option<StdRng>>,
}

/// The constraint of a row that samples under one.
pub(super) fn constraint<'a>(running: &'a [Sequence], r: &Row) -> Option<&'a Constraint> {
    if r.want_logits { running[r.idx].req.constraint.as_ref() } else { None }
}

pub(super) fn row_inputs<'a>(running: &'a [Sequence], rows: &[Row], masks: &'a [Option<MaskSlot>]) -> RowInputs<'a> {
    let mut ri = RowInputs { inputs: Vec::with_capacity(rows.len()), samples: Vec::with_capacity(rows.len()), rngs: Vec::with_capacity(rows.len()) };
    for (r, mask) in rows.iter().zip(masks) {
        let s = &running[r.idx];
        let (spec, rng) = if r.want_logits {
            let (mut spec, rng) = s.sample_spec();
            spec.mask = mask.as_ref();
            (Some(spec), rng)
        } else {
            (None, None)
        };
        ri.samples.push(spec);
        ri.rngs.push(rng);
        let tokens = if r.follows { &FOLLOWS_ONE[..] } else { &s.tokens[s.fed..s.fed + r.n] };
        ri.inputs.push(StepInput { seq: s.id, tokens, adapter: s.req.adapter.as_ref(), want_logits: r.want_logits });
    }
    ri
}

impl Worker {
    pub(super) fn step(&mut self, rows: Vec<Row>) {
        let jobs = self.lend_outputs();
        let masks = crate::engine::masks::slots(rows.iter().map(|r| constraint(&self.running, r)));
        let (result, jobs, rngs) = {
            let RowInputs { inputs, samples, rngs } = row_inputs(&self.running, &rows, &masks);
            self.count_prompt(&rows);
            let backend = &mut self.backend;
            let t = Instant::now();
            let mask_jobs = rows.iter().zip(&masks).filter_map(|(r, m)| Some((constraint(&self.running, r)?, m.as_ref()?))).collect();
            let max_context = backend.max_context();
            let compute = || crate::engine::masks::while_computing(mask_jobs, || catch_unwind(AssertUnwindSafe(|| backend.step_and_sample(&inputs, &samples))));
            let (r, jobs) = match &self.lane {
                Some(lane) => lane.while_computing(jobs, max_context, &self.decoding, compute),
                None => (compute(), jobs),
            };
            self.shared.steps.fetch_add(1, Ordering::Relaxed);
            self.shared.step_nanos.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
            (r, jobs, rngs)
        };
        let t = Instant::now();
        self.return_outputs(jobs);
        let outs = match result {
            Ok(Ok(outs)) if outs.len() == rows.len() => outs,
            Ok(Ok(outs)) => {
                let msg = format!("backend returned {} results for {} inputs", outs.len(), rows.len());
                return self.fail_rows(&rows, &msg);
            }
            Ok(Err(e)) => return self.step_failed(&rows, e),
            Err(_) => return self.fail_rows(&rows, "the model backend panicked during a forward pass"),
        };
        for row in &rows {
            self.running[row.idx].fed += row.n;
        }
        self.take_tokens(rows.iter().map(|r| (r.idx, r.want_logits)).collect(), outs, rngs);
        self.shared.sample_nanos.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// Counts the prompt tokens of a step's rows.
    pub(super) fn count_prompt(&self, rows: &[Row]) {
        let prompt: usize = rows.iter().filter(|r| !r.follows && self.running[r.idx].is_prefilling()).map(|r| r.n).sum();
        self.shared.prompt_fed.fetch_add(prompt as u64, Ordering::Relaxed);
    }

    /// The outputs that owe events, lent to the output lane for the next backend call, when
    /// there are enough of them to be worth the hand-over; fewer are settled here.
    pub(super) fn lend_outputs(&mut self) -> Vec<Job> {
        if self.lane.is_some() && self.running.iter().filter(|s| s.owes_events()).count() >= LANE_MIN_ROWS {
            self.running.iter_mut().enumerate().filter_map(|(i, s)| s.lend(i)).collect()
        } else {
            self.settle_all();
            Vec::new()
        }
    }

    /// Outputs back from the lane: a sequence whose last token completed a stop string has ended
    /// (and its row in the step that ran meanwhile is dropped by `take_tokens`).
    pub(super) fn return_outputs(&mut self, jobs: Vec<Job>) {
        self.shared.overlapped.fetch_add(jobs.len() as u64, Ordering::Relaxed);
        for job in jobs {
            let idx = job.idx;
            self.running[idx].returned(job);
        }
    }

    /// A step's sampled tokens into their sequences: `rows` gives each row's place in `running`
    /// and whether it sampled; `rngs` the generators' states after their draws (None where they
    /// were kept at launch).
    pub(super) fn take_tokens(&mut self, rows: Vec<(usize, bool)>, outs: Vec<Option<Sampled>>, rngs: Vec<Option<StdRng>>) {
        let vocab = self.backend.vocab_size();
        let ctx = self.decoding.ctx(self.backend.max_context());
        // Events are left owed only where the lane will take them: fewer would be made on this
        // thread anyway, after the next step is planned and launched, so they are made now and
        // the client sees them that much sooner (with async scheduling, in the H200 bench, a
        // first token came a step later: 8.0 ms against 6.7).
        let later = self.lane.is_some() && rows.iter().filter(|r| r.1).count() >= LANE_MIN_ROWS;
        for (((idx, want_logits), out), rng) in rows.into_iter().zip(outs).zip(rngs) {
            let s = &mut self.running[idx];
            if !want_logits {
                continue;
            }
            if s.finished || s.cancelled {
                // Ended while the step ran (a stop string in its last token's text, found one
                // step late, EOS in the token before, or a hang-up): this token is never seen.
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
    }

    /// A step the backend refused: a full context ends its sequence, a full cache preempts it,
    /// anything else fails the step's rows. No sequence has a step in flight here.
    pub(super) fn step_failed(&mut self, rows: &[Row], e: BackendError) {
        match e {
            BackendError::ContextFull { seq, .. } => self.context_full(rows, seq),
            BackendError::KvFull { seq } => match self.running.iter().position(|s| s.id == seq) {
                // Alone in the cache and still no room: it can never fit.
                Some(idx) if self.running.len() == 1 => self.running[idx].fail("the KV cache cannot hold this sequence"),
                Some(idx) => {
                    self.kv_hold = true;
                    self.preempt(idx);
                }
                None => self.fail_rows(rows, "backend reported a full KV cache for an unknown sequence"),
            },
            e => self.fail_rows(rows, &e.to_string()),
        }
    }

    pub(super) fn fail_rows(&mut self, rows: &[Row], msg: &str) {
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
