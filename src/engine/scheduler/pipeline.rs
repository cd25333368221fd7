//! Async scheduling (vLLM's), for a backend that `pipelines`: the worker launches step N+1
//! before it collects step N's tokens, so that its work between steps (the tokens' events, the
//! next plan and its inputs) runs while the device computes.
//!
//! A sequence with a token in flight gets a row that "follows" it: the backend feeds that token
//! from its own last picks (`Backend::launch`). Such a row is planned only when nothing in its
//! sampling depends on the token (no penalty counts, no grammar) and the token is not its last by
//! length; otherwise the worker first collects (`drain`) and plans with the token known. A
//! sequence that ends on a token in flight (EOS, a stop string) has its next row dropped unseen,
//! and it is released once no step of it is in flight. Preemption and a refused launch also
//! drain first, so they meet the same state as without pipelining.
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::step::{constraint, row_inputs, RowInputs};
use super::{Row, Worker};
use crate::backend::SeqId;

/// A launched step whose tokens are not collected: each row's sequence and whether it samples.
pub(super) struct InFlight {
    rows: Vec<(SeqId, bool)>,
}

impl Worker {
    /// Launches the planned rows, then collects the step launched before, if any.
    pub(super) fn launch(&mut self, rows: Vec<Row>) {
        let masks = crate::engine::masks::slots(rows.iter().map(|r| constraint(&self.running, r)));
        let (result, rngs) = {
            let RowInputs { inputs, samples, rngs } = row_inputs(&self.running, &rows, &masks);
            let follows: Vec<bool> = rows.iter().map(|r| r.follows).collect();
            let backend = &mut self.backend;
            let t = Instant::now();
            let mask_jobs = rows.iter().zip(&masks).filter_map(|(r, m)| Some((constraint(&self.running, r)?, m.as_ref()?))).collect();
            let r = crate::engine::masks::while_computing(mask_jobs, || catch_unwind(AssertUnwindSafe(|| backend.launch(&inputs, &samples, &follows))));
            self.shared.step_nanos.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
            (r, rngs)
        };
        match result {
            Ok(Ok(())) => {
                self.count_prompt(&rows);
                for (r, rng) in rows.iter().zip(rngs) {
                    self.running[r.idx].launched(r.n, r.want_logits, r.follows, rng);
                }
                let flight = InFlight { rows: rows.iter().map(|r| (self.running[r.idx].id, r.want_logits)).collect() };
                if let Some(before) = self.inflight.replace(flight) {
                    self.collect(before);
                }
            }
            // Nothing was launched; the step before is collected first, so that the error meets
            // no sequence with a step in flight (collecting moves no sequence in `running`).
            Ok(Err(e)) => {
                self.drain();
                self.step_failed(&rows, e);
            }
            Err(_) => {
                self.drain();
                self.fail_rows(&rows, "the model backend panicked during a forward pass");
            }
        }
    }

    /// Collects the step in flight, if any, and makes every owed event: afterwards no sequence
    /// has a step in flight or a token without its events.
    pub(super) fn drain(&mut self) {
        if let Some(f) = self.inflight.take() {
            self.collect(f);
        }
        self.settle_all();
    }

    /// Waits for a launched step's tokens (with the output lane making the last tokens' events
    /// meanwhile) and takes them into their sequences.
    fn collect(&mut self, flight: InFlight) {
        let jobs = self.lend_outputs();
        let t = Instant::now();
        let backend = &mut self.backend;
        let max_context = backend.max_context();
        let compute = move || catch_unwind(AssertUnwindSafe(move || backend.collect()));
        let (result, jobs) = match &self.lane {
            Some(lane) => lane.while_computing(jobs, max_context, &self.decoding, compute),
            None => (compute(), jobs),
        };
        self.shared.steps.fetch_add(1, Ordering::Relaxed);
        self.shared.step_nanos.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let t = Instant::now();
        self.return_outputs(jobs);
        // A sequence with a step in flight stays in `running` (`reap` and `preempt` wait for it).
        let at: HashMap<SeqId, usize> = self.running.iter().enumerate().map(|(i, s)| (s.id, i)).collect();
        debug_assert!(flight.rows.iter().all(|(id, _)| at.contains_key(id)), "a sequence left the running list with a step in flight");
        let rows: Vec<(usize, bool)> = flight.rows.iter().filter_map(|(id, w)| Some((*at.get(id)?, *w))).collect();
        for &(idx, sampled) in &rows {
            if sampled {
                self.running[idx].sampling -= 1;
            }
        }
        let msg = match result {
            Ok(Ok(outs)) if outs.len() == rows.len() => {
                let n = outs.len();
                self.take_tokens(rows, outs, vec![None; n]);
                self.shared.sample_nanos.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                return;
            }
            Ok(Ok(outs)) => format!("backend returned {} results for {} inputs", outs.len(), rows.len()),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "the model backend panicked during a forward pass".to_string(),
        };
        tracing::error!(error = msg, rows = rows.len(), "engine step failed");
        for (idx, _) in rows {
            self.running[idx].fail(msg.as_str());
        }
    }
}
