//! A sequence's output side: what turns its sampled tokens into the client's events (logprob
//! entries, incremental detokenisation, stop strings) and the events not yet delivered.
//!
//! It is kept apart from the rest of `Sequence` because the next step needs only the tokens, not
//! their text: with `EngineConfig::overlap_output` the worker lends each sequence's `Output` to a
//! helper thread (`OutputLane`) that makes step N's events while the backend runs step N+1. A stop
//! string found there ends the sequence one step late, and the worker drops that sequence's
//! step N+1 token unseen, so the client gets the same events either way.
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{mpsc, Arc};

use tokenizers::Tokenizer;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::mpsc::Sender;

use super::detok::{token_bytes, ByteTable, IncrementalDetokenizer};
use super::request::{Event, FinishReason, GenRequest, LogprobEntry, TokenLogprob};
use super::sampler::TokenLogprobs;
use super::stop::StopMatcher;

/// Read-only context the worker shares with every sequence when it turns a token into events.
pub struct TokenContext<'a> {
    pub tokenizer: &'a Arc<Tokenizer>,
    pub eos: &'a [u32],
    pub byte_level: bool,
    /// The tokenizer's byte table, when it is byte-level BPE (`detok::ByteTable`).
    pub bytes: Option<&'a ByteTable>,
    pub max_context: usize,
}

/// The model's tokenizer and what goes with it, from which each sequence's tokens become text.
#[derive(Clone)]
pub(crate) struct Decoding {
    pub tokenizer: Arc<Tokenizer>,
    pub eos: Vec<u32>,
    pub byte_level: bool,
    /// The tokenizer's byte table (byte-level BPE tokenizers only): detokenisation without the
    /// tokenizer's allocations.
    pub byte_table: Option<Arc<ByteTable>>,
}

impl Decoding {
    /// The context of a sequence's `on_sampled` / `finish`, for a backend of `max_context`
    /// positions. A method of this part of the worker alone, so that it can be taken beside a
    /// mutable borrow of a running sequence.
    pub fn ctx(&self, max_context: usize) -> TokenContext<'_> {
        TokenContext {
            tokenizer: &self.tokenizer,
            eos: &self.eos,
            byte_level: self.byte_level,
            bytes: self.byte_table.as_deref(),
            max_context,
        }
    }
}

/// A sampled token whose events are still to be made.
#[derive(Debug)]
pub struct Emit {
    pub token: u32,
    /// Its logprobs, when the request asked for them.
    pub logprobs: Option<TokenLogprobs>,
    /// The sequence's completion tokens, this one included (for `Done`'s usage).
    pub generated: usize,
}

/// One sequence's events and what makes them.
pub struct Output {
    detok: IncrementalDetokenizer,
    stop: StopMatcher,
    tx: Sender<Event>,
    /// Events produced but not yet accepted by the channel (the client is slow).
    pending: VecDeque<Event>,
    prompt_tokens: usize,
    /// Prompt tokens the backend took from its prefix cache at the first admission.
    pub cached_prompt_tokens: usize,
}

impl Output {
    pub fn new(req: &GenRequest, tx: Sender<Event>) -> Self {
        Self {
            detok: IncrementalDetokenizer::new(&req.prompt_tokens),
            stop: StopMatcher::new(&req.stop),
            tx,
            pending: VecDeque::new(),
            prompt_tokens: req.prompt_tokens.len(),
            cached_prompt_tokens: 0,
        }
    }

    /// No event waits for the client.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Hands pending events to the channel; stops at the first full slot. Returns false when the
    /// receiver is gone (the pending events are dropped).
    pub fn flush(&mut self) -> bool {
        if self.tx.is_closed() {
            self.pending.clear();
            return false;
        }
        while let Some(ev) = self.pending.pop_front() {
            match self.tx.try_send(ev) {
                Ok(()) => {}
                Err(TrySendError::Full(ev)) => {
                    self.pending.push_front(ev);
                    return true;
                }
                Err(TrySendError::Closed(_)) => {
                    self.pending.clear();
                    return false;
                }
            }
        }
        true
    }

    /// Queues an error event.
    pub fn error(&mut self, msg: String) {
        self.pending.push_back(Event::Error(msg));
    }

    /// Queues a sampled token's event. Returns true when its text completes a stop string: then
    /// `Done` (finish reason `Stop`) is queued as well and the sequence has ended.
    pub fn token(&mut self, e: &Emit, ctx: &TokenContext<'_>) -> bool {
        let logprob = e.logprobs.as_ref().map(|lp| logprob_entry(lp, e.token, ctx));
        let piece = self.detok.push_with(ctx.tokenizer, ctx.bytes, e.token);
        let out = self.stop.push(&piece);
        if out.stopped {
            // A stop-completing token with no text and no logprobs gets no event of its own.
            if !out.text.is_empty() || logprob.is_some() {
                self.pending.push_back(Event::Token { text: out.text, token_id: e.token, logprob });
            }
            self.done(FinishReason::Stop, e.generated);
            return true;
        }
        self.pending.push_back(Event::Token { text: out.text, token_id: e.token, logprob });
        false
    }

    /// Ends the output normally, flushing held-back text into a last `Token` event when needed.
    pub fn finish(&mut self, reason: FinishReason, ctx: &TokenContext<'_>, last_token: u32, generated: usize) {
        let mut tail = self.detok.finish_with(ctx.tokenizer, ctx.bytes);
        tail = self.stop.push(&tail).text;
        tail.push_str(&self.stop.finish());
        if !tail.is_empty() {
            // Append to this token's own event when it is still queued (Length); otherwise (EOS,
            // whose text is never emitted) the held-back text rides on an event for the EOS id.
            match self.pending.back_mut() {
                Some(Event::Token { text, token_id, .. }) if *token_id == last_token => text.push_str(&tail),
                _ => self.pending.push_back(Event::Token { text: tail, token_id: last_token, logprob: None }),
            }
        }
        self.done(reason, generated);
    }

    fn done(&mut self, finish_reason: FinishReason, completion_tokens: usize) {
        self.pending.push_back(Event::Done {
            finish_reason,
            prompt_tokens: self.prompt_tokens,
            completion_tokens,
            cached_prompt_tokens: self.cached_prompt_tokens,
        });
    }
}

fn logprob_entry(lp: &TokenLogprobs, token: u32, ctx: &TokenContext<'_>) -> LogprobEntry {
    let entry = |id: u32, logprob: f32| {
        let bytes = token_bytes(ctx.tokenizer, id, ctx.byte_level);
        TokenLogprob { token_id: id, token: String::from_utf8_lossy(&bytes).into_owned(), bytes, logprob }
    };
    LogprobEntry { chosen: entry(token, lp.chosen), top: lp.top.iter().map(|&(id, l)| entry(id, l)).collect() }
}

/// What became of a lent output's token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Emitted {
    /// Its event is queued (and as much as the channel takes was sent).
    Queued,
    /// It completed a stop string: the sequence has ended.
    Stopped,
    /// The client has hung up.
    Gone,
    /// Making its events panicked; the sequence must fail.
    Panicked,
}

/// A sequence's output lent to the lane with the token it owes: `idx` is the sequence's place
/// in the worker's running list, which does not change while the lane holds it.
pub struct Job {
    pub idx: usize,
    pub out: Box<Output>,
    pub emit: Emit,
    pub result: Emitted,
}

impl Job {
    fn run(&mut self, ctx: &TokenContext<'_>) {
        let Job { out, emit, result, .. } = self;
        *result = match catch_unwind(AssertUnwindSafe(|| out.token(emit, ctx))) {
            Ok(true) => Emitted::Stopped,
            Ok(false) if out.flush() => Emitted::Queued,
            Ok(false) => Emitted::Gone,
            Err(_) => Emitted::Panicked,
        };
    }
}

/// The helper thread that makes one step's events while the backend runs the next.
pub struct OutputLane {
    jobs: mpsc::Sender<(Vec<Job>, usize)>,
    done: mpsc::Receiver<Vec<Job>>,
}

impl OutputLane {
    /// Starts the helper thread; it ends when the lane is dropped.
    pub fn new(decoding: Decoding) -> std::io::Result<Self> {
        let (jobs, rx) = mpsc::channel::<(Vec<Job>, usize)>();
        let (tx, done) = mpsc::channel();
        std::thread::Builder::new().name("inferd-output".into()).spawn(move || {
            for (mut batch, max_context) in rx {
                let ctx = decoding.ctx(max_context);
                for job in &mut batch {
                    job.run(&ctx);
                }
                if tx.send(batch).is_err() {
                    return;
                }
            }
        })?;
        Ok(Self { jobs, done })
    }

    /// Runs `step` while the helper thread makes the jobs' events; returns both.
    ///
    /// The lane cannot lose a job: each runs under `catch_unwind`, so the helper thread outlives
    /// any one of them. Should it be gone all the same, the jobs are run here, after `step`.
    pub fn while_computing<R>(&self, batch: Vec<Job>, max_context: usize, decoding: &Decoding, step: impl FnOnce() -> R) -> (R, Vec<Job>) {
        if batch.is_empty() {
            return (step(), batch);
        }
        if let Err(mpsc::SendError((mut batch, _))) = self.jobs.send((batch, max_context)) {
            let r = step();
            let ctx = decoding.ctx(max_context);
            batch.iter_mut().for_each(|j| j.run(&ctx));
            return (r, batch);
        }
        let r = step();
        let batch = self.done.recv().expect("the output lane's thread outlives its jobs");
        (r, batch)
    }
}
