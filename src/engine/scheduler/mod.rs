//! The worker loop: continuous batching over one backend, on its own OS thread.
//!
//! Each iteration: take new submissions, drop sequences whose client hung up (releasing their KV
//! cache), deliver pending events, admit waiting sequences up to `max_batch`, then run one step in
//! which every decoding sequence contributes its last token and prefilling sequences share at most
//! `prefill_chunk` prompt tokens (earliest admitted first). A sequence whose channel is full sits
//! out until the client catches up, so one slow reader never stalls the batch.
//!
//! The backend samples each row's next token (`Backend::step_and_sample`) from what the sequence
//! decides it with (`Sequence::sample_spec`); the worker turns tokens into events, on a helper
//! thread during the next step when `EngineConfig::overlap_output` is on (`output::OutputLane`).
//! A backend that `pipelines` is launched a step ahead instead: step N+1 goes to the device before
//! step N's tokens are collected (`pipeline.rs`).
//!
//! KV memory: when the backend's cache is bounded (`Backend::kv_capacity`), a waiting sequence
//! is admitted only when its tokens fit beside what the running ones need for their next token,
//! and before each step the running sequences' new tokens are fitted into the free blocks: prompt
//! chunks shrink to fit, and when decode rows do not fit the latest admitted sequence is
//! preempted (its cache freed, its output kept; it goes back to the front of the queue and feeds
//! its tokens again when there is room), as vLLM does.
//!
//! A failed step is assumed to have changed no KV cache: `ContextFull` ends the named sequence with
//! `Length`, `KvFull` preempts it, and the others simply run again next step; any other error (or
//! a backend panic) fails every sequence in that step and the worker carries on. A panic in the
//! backend's other calls fails at most the one sequence concerned (`reuse_prefix`) or is logged
//! (`release`): the worker thread, which serves every sequence, never unwinds.
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::Duration;

use tokenizers::Tokenizer;

use super::handle::{Admission, Shared};
use super::request::FinishReason;
use super::output::{Decoding, OutputLane};
use super::sequence::Sequence;
use super::EngineConfig;
use crate::backend::{Backend, KvCapacity, SeqId};

mod pipeline;
mod step;

/// How long the worker waits for news when every live sequence is blocked on a slow client.
const IDLE_POLL: Duration = Duration::from_millis(1);

/// Everything the worker thread owns.
pub(crate) struct Worker {
    pub backend: Box<dyn Backend>,
    pub cfg: EngineConfig,
    pub rx: Receiver<Admission>,
    pub shared: Arc<Shared>,
    /// What turns a sequence's tokens into its text (`TokenContext`).
    decoding: Decoding,
    /// The helper thread that makes a step's events during the next step
    /// (`EngineConfig::overlap_output`).
    lane: Option<OutputLane>,
    next_id: SeqId,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    /// Finished sequences whose last events the client has not taken yet.
    draining: Vec<Sequence>,
    disconnected: bool,
    /// Set when the backend refused a step with `KvFull` although its reported room let the
    /// step through: no admission until a running sequence has finished and freed its cache,
    /// so the preempted sequence does not come straight back into the same full cache.
    kv_hold: bool,
    /// Async scheduling (`Backend::pipelines`): the launched step whose tokens are not collected.
    inflight: Option<pipeline::InFlight>,
}

/// One row of a planned step: index into `running`, tokens to feed, whether logits are needed,
/// and (async scheduling) whether its one token is the one still in flight for its sequence.
struct Row {
    idx: usize,
    n: usize,
    want_logits: bool,
    follows: bool,
}

impl Worker {
    pub fn new(
        backend: Box<dyn Backend>,
        tokenizer: Arc<Tokenizer>,
        eos: Vec<u32>,
        cfg: EngineConfig,
        rx: Receiver<Admission>,
        shared: Arc<Shared>,
    ) -> Self {
        let byte_level = super::detok::is_byte_level(&tokenizer);
        // INFERD_DETOK_TABLE=0 decodes through the tokenizer (A/B runs).
        let byte_table = if std::env::var("INFERD_DETOK_TABLE").is_ok_and(|v| v == "0") { None } else { super::detok::ByteTable::shared(&tokenizer) };
        let decoding = Decoding { tokenizer, eos, byte_level, byte_table };
        // Without the thread the worker makes each step's events itself, as it would anyway.
        let lane = cfg.overlap_output.then(|| OutputLane::new(decoding.clone())).and_then(|r| {
            r.map_err(|e| tracing::warn!(error = %e, "cannot start the output thread; making events on the worker")).ok()
        });
        Self {
            backend,
            cfg,
            rx,
            shared,
            decoding,
            lane,
            next_id: 1,
            waiting: VecDeque::new(),
            running: Vec::new(),
            draining: Vec::new(),
            disconnected: false,
            kv_hold: false,
            inflight: None,
        }
    }

    /// Runs until every handle is dropped and all sequences are done.
    pub fn run(mut self) {
        if let Err(e) = self.backend.prepare() {
            tracing::warn!(error = %e, "the backend's warm-up failed; serving without it");
        }
        loop {
            if !self.intake() {
                break;
            }
            self.reap();
            self.admit();
            self.publish();
            if self.backend.pipelines() && self.inflight.is_some() && self.running.iter().any(|s| s.waits_for_flight(self.backend.max_context())) {
                // A row needs the token in flight before it can be planned (penalties, a grammar).
                self.drain();
                continue;
            }
            let rows = self.plan();
            let rows = self.fit_kv(rows);
            if rows.is_empty() && self.inflight.is_some() {
                self.drain();
                continue;
            }
            if rows.is_empty() {
                // No step to overlap with: the owed events are made now.
                self.settle_all();
                if self.running.is_empty() && self.waiting.is_empty() && self.draining.is_empty() {
                    continue; // intake blocks next time
                }
                self.wait_for_news();
                continue;
            }
            if self.backend.pipelines() {
                self.launch(rows);
            } else {
                self.step(rows);
            }
            self.reap();
            self.publish();
        }
        for s in std::mem::take(&mut self.running) {
            self.release(s.id);
        }
    }

    /// Frees a sequence's cache in the backend. A panic there is logged and swallowed: the
    /// sequence is gone either way, and the worker must outlive it (it serves every other one).
    fn release(&mut self, seq: SeqId) {
        let backend = &mut self.backend;
        if catch_unwind(AssertUnwindSafe(|| backend.release(seq))).is_err() {
            tracing::error!(seq, "the model backend panicked while releasing a sequence's cache");
        }
    }

    /// Takes new submissions; blocks when there is nothing to do. Returns false to stop the worker.
    fn intake(&mut self) -> bool {
        let idle = self.running.is_empty() && self.waiting.is_empty() && self.draining.is_empty();
        if idle {
            if self.disconnected {
                return false;
            }
            let t = std::time::Instant::now();
            let got = self.rx.recv();
            self.shared.idle_nanos.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
            match got {
                Ok(a) => self.enqueue(a),
                Err(_) => return false,
            }
        }
        loop {
            match self.rx.try_recv() {
                Ok(a) => self.enqueue(a),
                Err(TryRecvError::Empty) => return true,
                Err(TryRecvError::Disconnected) => {
                    self.disconnected = true;
                    return true;
                }
            }
        }
    }

    /// Sleeps briefly (or until a submission arrives) when every sequence waits on its client.
    fn wait_for_news(&mut self) {
        let t = std::time::Instant::now();
        let got = if self.disconnected {
            std::thread::sleep(IDLE_POLL);
            None
        } else {
            Some(self.rx.recv_timeout(IDLE_POLL))
        };
        self.shared.idle_nanos.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let Some(got) = got else { return };
        match got {
            Ok(a) => self.enqueue(a),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => self.disconnected = true,
        }
    }

    fn enqueue(&mut self, a: Admission) {
        let id = self.next_id;
        self.next_id += 1;
        let mut seq = Sequence::new(id, a.req, a.tx, a.arrived);
        let max = self.backend.max_context();
        let problem = if seq.req.prompt_tokens.is_empty() {
            Some("the prompt is empty".to_string())
        } else if seq.req.prompt_tokens.len() > max {
            Some(format!("the prompt has {} tokens, more than the context length of {max}", seq.req.prompt_tokens.len()))
        } else {
            None
        };
        let problem = problem.or_else(|| {
            let cap = self.backend.kv_capacity()?;
            let need = cap.blocks(seq.tokens.len() + 1);
            (need > cap.total_blocks).then(|| {
                format!(
                    "the prompt needs {need} KV cache blocks of {} positions but the whole cache holds {}",
                    cap.block_size, cap.total_blocks
                )
            })
        });
        if let Some(msg) = problem {
            self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
            seq.fail(msg);
            self.ended(&seq);
            self.draining.push(seq);
            return;
        }
        if seq.req.max_new_tokens == 0 {
            self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
            let last = seq.tokens.last().copied().unwrap_or(0);
            seq.finish(FinishReason::Length, &self.decoding.ctx(self.backend.max_context()), last);
            self.ended(&seq);
            self.draining.push(seq);
            return;
        }
        self.waiting.push_back(seq);
    }

    /// Delivers pending events, frees cancelled and finished sequences, drops hung-up waiters.
    fn reap(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            let s = &mut self.running[i];
            s.flush();
            // One with a step in flight is released once that step is collected.
            if (s.cancelled || s.finished) && s.sampling == 0 {
                let s = self.running.remove(i);
                self.release(s.id);
                self.kv_hold = false;
                self.ended(&s);
                if !s.is_drained() {
                    self.draining.push(s);
                }
            } else {
                i += 1;
            }
        }
        self.draining.retain_mut(|s| {
            s.flush();
            !s.is_drained()
        });
        let before = self.waiting.len();
        self.waiting.retain_mut(|s| {
            s.flush();
            !s.cancelled
        });
        let gone = before - self.waiting.len();
        if gone > 0 {
            self.shared.waiting.fetch_sub(gone, Ordering::SeqCst);
            for _ in 0..gone {
                self.shared.latency.ended(super::metrics::Outcome::Abort);
            }
        }
    }

    /// Blocks the running sequences need for their next token beyond what they hold.
    fn decode_reserve(&self, cap: &KvCapacity) -> usize {
        let next = |s: &Sequence| cap.blocks(s.tokens.len() + s.sampling as usize);
        self.running.iter().filter(|s| !s.finished && !s.cancelled).map(|s| next(s) - cap.blocks(s.fed).min(next(s))).sum()
    }

    fn admit(&mut self) {
        if self.kv_hold && !self.running.is_empty() {
            return;
        }
        self.kv_hold = false;
        let cap = self.backend.kv_capacity();
        // vLLM's watermark: keep 1% of the cache free at admission, so that a new sequence does
        // not force a preemption at the very next step.
        let mut room = cap.map(|c| c.free_blocks.saturating_sub(self.decode_reserve(&c) + c.total_blocks / 100));
        while self.running.len() < self.cfg.max_batch.max(1) {
            let Some(s) = self.waiting.front() else { break };
            if let (Some(c), Some(r)) = (cap, room.as_mut()) {
                let need = c.blocks(s.tokens.len() + 1);
                if need > *r && !self.running.is_empty() {
                    break;
                }
                *r = r.saturating_sub(need);
            }
            let mut s = self.waiting.pop_front().expect("front exists");
            self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
            if s.fed == 0 {
                let backend = &mut self.backend;
                match catch_unwind(AssertUnwindSafe(|| backend.reuse_prefix(s.id, &s.tokens, s.req.adapter.as_ref()))) {
                    Ok(0) => {}
                    Ok(n) => {
                        s.reused(n);
                        self.shared.prefix_hits.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    // Whatever the backend holds for it is dropped; `reap` ends it like a failed step.
                    Err(_) => {
                        tracing::error!(seq = s.id, "the model backend panicked while looking up a cached prefix");
                        self.release(s.id);
                        s.fail("the model backend panicked while looking up a cached prefix");
                    }
                }
            }
            if !s.admitted {
                s.admitted = true;
                self.shared.latency.queue.observe(s.arrived.elapsed());
            }
            self.running.push(s);
        }
    }

    /// Records how a sequence that leaves the worker ended, and its end-to-end latency.
    fn ended(&self, s: &Sequence) {
        let outcome = s.outcome.unwrap_or(super::metrics::Outcome::Abort);
        let m = &self.shared.latency;
        m.ended(if s.cancelled && !s.finished { super::metrics::Outcome::Abort } else { outcome });
        m.e2e.observe(s.arrived.elapsed());
    }

    /// Puts the running sequence at `idx` back at the front of the queue without its KV cache.
    fn preempt(&mut self, idx: usize) {
        let ctx = self.decoding.ctx(self.backend.max_context());
        self.running[idx].settle(&ctx);
        if self.running[idx].finished {
            // Its last token completed a stop string: it ends here instead of waiting for room.
            return self.reap();
        }
        let mut s = self.running.remove(idx);
        self.release(s.id);
        s.preempted();
        self.shared.preemptions.fetch_add(1, Ordering::Relaxed);
        self.shared.waiting.fetch_add(1, Ordering::SeqCst);
        tracing::debug!(seq = s.id, tokens = s.tokens.len(), "preempted: the KV cache is full");
        self.waiting.push_front(s);
    }

    /// Fits this step's rows into the free KV blocks (bounded caches only): decode rows first,
    /// preempting the latest admitted sequences until they fit, then prompt chunks, shrunk to fit.
    fn fit_kv(&mut self, mut rows: Vec<Row>) -> Vec<Row> {
        let Some(mut cap) = self.backend.kv_capacity() else { return rows };
        let need = |s: &Sequence, n: usize, cap: &KvCapacity| cap.blocks(s.fed + n) - cap.blocks(s.fed);
        loop {
            let decode: usize = rows.iter().filter(|r| !self.running[r.idx].is_prefilling()).map(|r| need(&self.running[r.idx], r.n, &cap)).sum();
            if decode <= cap.free_blocks || self.running.len() <= 1 {
                break;
            }
            if self.inflight.is_some() {
                // Preemption frees a sequence's cache: first the step in flight is collected,
                // and the sequences it ended free theirs.
                self.drain();
                self.reap();
            } else {
                self.preempt(self.running.len() - 1);
            }
            rows = self.plan();
            cap = self.backend.kv_capacity().expect("a bounded cache stays bounded");
        }
        let mut free = cap.free_blocks;
        for r in rows.iter().filter(|r| !self.running[r.idx].is_prefilling()) {
            free = free.saturating_sub(need(&self.running[r.idx], r.n, &cap));
        }
        rows.retain_mut(|r| {
            let s = &self.running[r.idx];
            if !s.is_prefilling() {
                return true;
            }
            let held = cap.blocks(s.fed);
            let fit = ((held + free) * cap.block_size).saturating_sub(s.fed).min(r.n);
            if fit == 0 {
                return false;
            }
            free -= cap.blocks(s.fed + fit) - held;
            r.want_logits = fit == s.unfed();
            r.n = fit;
            true
        });
        rows
    }

    /// Makes every owed event now (`Sequence::settle`).
    fn settle_all(&mut self) {
        let ctx = self.decoding.ctx(self.backend.max_context());
        for s in &mut self.running {
            s.settle(&ctx);
        }
    }

    fn publish(&self) {
        self.shared.running.store(self.running.len(), Ordering::SeqCst);
        if let Some(c) = self.backend.kv_capacity() {
            self.shared.kv_used_blocks.store(c.total_blocks - c.free_blocks.min(c.total_blocks), Ordering::Relaxed);
            self.shared.kv_total_blocks.store(c.total_blocks, Ordering::Relaxed);
        }
        self.shared.prefix_cache_bytes.store(self.backend.prefix_cache_bytes(), Ordering::Relaxed);
    }

    /// Chooses this step's rows: every decoding sequence, plus prompt chunks within the budget.
    fn plan(&self) -> Vec<Row> {
        let mut budget = self.cfg.prefill_chunk.max(1);
        let mut rows = Vec::new();
        let max_context = self.backend.max_context();
        for (idx, s) in self.running.iter().enumerate() {
            if s.sampling > 0 {
                if s.can_follow(max_context) {
                    rows.push(Row { idx, n: 1, want_logits: true, follows: true });
                }
                continue;
            }
            if !s.is_schedulable() {
                continue;
            }
            if s.is_prefilling() {
                if budget == 0 {
                    continue;
                }
                let n = s.unfed().min(budget);
                budget -= n;
                rows.push(Row { idx, n, want_logits: n == s.unfed(), follows: false });
            } else {
                rows.push(Row { idx, n: 1, want_logits: true, follows: false });
            }
        }
        rows
    }
}
