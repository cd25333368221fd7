//! One sequence's life inside the worker: its tokens, how far the backend has seen them, sampling
//! state, detokeniser, stop matcher and the events not yet delivered.
use std::collections::VecDeque;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::SeedableRng;
use tokenizers::Tokenizer;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::mpsc::Sender;

use super::detok::{token_bytes, IncrementalDetokenizer};
use super::request::{Event, FinishReason, GenRequest, LogprobEntry, TokenLogprob};
use rand::Rng;

use super::sampler::{SampleSpec, Sampled, TokenCounts};
use super::stop::StopMatcher;
use crate::backend::SeqId;

/// Read-only context the worker shares with every sequence when it turns a token into events.
pub struct TokenContext<'a> {
    pub tokenizer: &'a Arc<Tokenizer>,
    pub eos: &'a [u32],
    pub byte_level: bool,
    /// The tokenizer's byte table, when it is byte-level BPE (`detok::ByteTable`).
    pub bytes: Option<&'a super::detok::ByteTable>,
    pub max_context: usize,
}

/// Per-sequence state owned by the worker thread.
pub struct Sequence {
    pub id: SeqId,
    pub req: GenRequest,
    /// Prompt followed by every generated token.
    pub tokens: Vec<u32>,
    /// How many of `tokens` the backend has in its KV cache.
    pub fed: usize,
    pub generated: usize,
    counts: TokenCounts,
    rng: StdRng,
    detok: IncrementalDetokenizer,
    stop: StopMatcher,
    tx: Sender<Event>,
    /// Events produced but not yet accepted by the channel (the client is slow).
    pending: VecDeque<Event>,
    /// Set once `Done` or `Error` is queued: the sequence only drains `pending` from then on.
    pub finished: bool,
    /// The receiver was dropped: the sequence must be released now.
    pub cancelled: bool,
    /// When it was submitted, whether it has been admitted once, and when it last got a token
    /// (for the latency histograms).
    pub arrived: std::time::Instant,
    pub admitted: bool,
    pub last_token_at: Option<std::time::Instant>,
    /// How it ended, once it has (None while running; a hang-up is counted as an abort).
    pub outcome: Option<super::metrics::Outcome>,
    /// Prompt tokens the backend took from its prefix cache at the first admission.
    pub cached_prompt_tokens: usize,
}

impl Sequence {
    /// Creates the state at admission; draws a seed when the request has none.
    pub fn new(id: SeqId, req: GenRequest, tx: Sender<Event>, arrived: std::time::Instant) -> Self {
        let seed = req.sampling.seed.unwrap_or_else(rand::random::<u64>);
        Self {
            id,
            tokens: req.prompt_tokens.clone(),
            fed: 0,
            generated: 0,
            counts: TokenCounts::from_prompt(&req.prompt_tokens),
            rng: StdRng::seed_from_u64(seed),
            detok: IncrementalDetokenizer::new(&req.prompt_tokens),
            stop: StopMatcher::new(&req.stop),
            tx,
            pending: VecDeque::new(),
            finished: false,
            cancelled: false,
            arrived,
            admitted: false,
            last_token_at: None,
            outcome: None,
            cached_prompt_tokens: 0,
            req,
        }
    }

    /// Tokens the backend has not seen yet (a prompt chunk or the last sampled token).
    pub fn unfed(&self) -> usize {
        self.tokens.len() - self.fed
    }

    /// Still in prefill: the prompt is not all in the KV cache, or more than one token is unfed
    /// (a preempted sequence feeds its prompt and output again before it samples more).
    pub fn is_prefilling(&self) -> bool {
        self.fed < self.req.prompt_tokens.len() || self.unfed() > 1
    }

    /// Forgets the KV cache (the backend released it): the sequence feeds all its tokens again
    /// when it next runs, and its output so far stands.
    pub fn preempted(&mut self) {
        self.fed = 0;
    }

    /// Starts from `n` positions the backend already holds for it (its prefix cache).
    pub fn reused(&mut self, n: usize) {
        debug_assert!(self.fed == 0 && n < self.tokens.len(), "a prefix is reused only before the first step, and not the last token");
        self.fed = n;
        if !self.admitted {
            self.cached_prompt_tokens = n.min(self.req.prompt_tokens.len());
        }
    }

    /// May take part in the next step: alive, not finished, and no undelivered events.
    pub fn is_schedulable(&self) -> bool {
        !self.finished && !self.cancelled && self.pending.is_empty() && self.unfed() > 0
    }

    /// Tries to hand pending events to the channel; stops at the first full slot. Marks the
    /// sequence cancelled when the receiver is gone.
    pub fn flush(&mut self) {
        if self.tx.is_closed() {
            self.cancelled = true;
            self.pending.clear();
            return;
        }
        while let Some(ev) = self.pending.pop_front() {
            match self.tx.try_send(ev) {
                Ok(()) => {}
                Err(TrySendError::Full(ev)) => {
                    self.pending.push_front(ev);
                    return;
                }
                Err(TrySendError::Closed(_)) => {
                    self.cancelled = true;
                    self.pending.clear();
                    return;
                }
            }
        }
    }

    /// Whether everything owed to the client has been delivered (or the client is gone).
    pub fn is_drained(&self) -> bool {
        self.cancelled || self.pending.is_empty()
    }

    /// Queues an error and finishes the sequence.
    pub fn fail(&mut self, msg: impl Into<String>) {
        if !self.finished {
            self.pending.push_back(Event::Error(msg.into()));
            self.finished = true;
            self.outcome = Some(super::metrics::Outcome::Error);
        }
        self.flush();
    }

    /// Ends the sequence normally, flushing held-back text into a last `Token` event when needed.
    pub fn finish(&mut self, reason: FinishReason, ctx: &TokenContext<'_>, last_token: u32) {
        if self.finished {
            return;
        }
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
        self.pending.push_back(Event::Done {
            finish_reason: reason,
            prompt_tokens: self.req.prompt_tokens.len(),
            completion_tokens: self.generated,
            cached_prompt_tokens: self.cached_prompt_tokens,
        });
        self.finished = true;
        self.outcome = Some(match reason {
            FinishReason::Stop => super::metrics::Outcome::Stop,
            FinishReason::Length => super::metrics::Outcome::Length,
        });
        self.flush();
    }

    /// What decides this sequence's next token, for a step that samples it, and the state of its
    /// generator after the uniform draw (when sampling at a temperature above 0). The caller
    /// keeps that state only once the step has succeeded (`on_sampled`), so a failed or retried
    /// step never shifts a seeded sequence's draws.
    pub fn sample_spec(&self) -> (SampleSpec<'_>, Option<StdRng>) {
        let (uniform, rng) = if self.req.sampling.temperature > 0.0 {
            let mut rng = self.rng.clone();
            (Some(rng.random::<f64>()), Some(rng))
        } else {
            (None, None)
        };
        let spec = SampleSpec { params: &self.req.sampling, counts: &self.counts, uniform, logprobs: self.req.logprobs, mask: None };
        (spec, rng)
    }

    /// Takes the token the backend sampled for the last fed token (with `rng`, the generator's
    /// state after its draw, from `sample_spec`) and queues its events. Returns the token.
    ///
    /// EOS tokens are never masked. With `ignore_eos` they are ordinary tokens (their text is
    /// empty after skip_special_tokens); otherwise sampling one ends the sequence with `Stop` and
    /// it counts in `completion_tokens` (as in vLLM) but gets no `Token` event of its own, except
    /// one carrying held-back text (a partial stop string) when there is any.
    pub fn on_sampled(&mut self, s: Sampled, rng: Option<StdRng>, ctx: &TokenContext<'_>) -> u32 {
        if let Some(rng) = rng {
            self.rng = rng;
        }
        let token = s.token;
        self.tokens.push(token);
        self.counts.push_output(token);
        self.generated += 1;
        let is_eos = ctx.eos.contains(&token);
        if is_eos && !self.req.ignore_eos {
            // EOS ends the sequence; its own text is never emitted.
            self.finish(FinishReason::Stop, ctx, token);
            return token;
        }
        if let Some(c) = &self.req.constraint {
            if let Err(e) = c.commit(token) {
                self.fail(&format!("structured output: {e}"));
                return token;
            }
        }
        let logprob = match (&s.logprobs, self.req.logprobs) {
            (Some(lp), Some(_)) => Some(self.logprob_entry(lp, token, ctx)),
            _ => None,
        };
        let piece = self.detok.push_with(ctx.tokenizer, ctx.bytes, token);
        let out = self.stop.push(&piece);
        if out.stopped {
            if !out.text.is_empty() || logprob.is_some() {
                self.pending.push_back(Event::Token { text: out.text, token_id: token, logprob });
            }
            self.pending.push_back(Event::Done {
                finish_reason: FinishReason::Stop,
                prompt_tokens: self.req.prompt_tokens.len(),
                completion_tokens: self.generated,
                cached_prompt_tokens: self.cached_prompt_tokens,
            });
            self.finished = true;
            self.outcome = Some(super::metrics::Outcome::Stop);
            self.flush();
            return token;
        }
        self.pending.push_back(Event::Token { text: out.text, token_id: token, logprob });
        if self.generated >= self.req.max_new_tokens || self.tokens.len() >= ctx.max_context {
            self.finish(FinishReason::Length, ctx, token);
        } else {
            self.flush();
        }
        token
    }

    fn logprob_entry(&self, lp: &super::sampler::TokenLogprobs, token: u32, ctx: &TokenContext<'_>) -> LogprobEntry {
        let entry = |id: u32, logprob: f32| {
            let bytes = token_bytes(ctx.tokenizer, id, ctx.byte_level);
            TokenLogprob { token_id: id, token: String::from_utf8_lossy(&bytes).into_owned(), bytes, logprob }
        };
        LogprobEntry { chosen: entry(token, lp.chosen), top: lp.top.iter().map(|&(id, l)| entry(id, l)).collect() }
    }
}
