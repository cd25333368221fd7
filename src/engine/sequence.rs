//! One sequence's life inside the worker: its tokens, how far the backend has seen them, sampling
//! state, and its output side (`output::Output`: detokeniser, stop matcher and the events not yet
//! delivered), which may be lent to the output lane for the length of a step.
use rand::rngs::StdRng;
use rand::Rng;
use rand::SeedableRng;
use tokio::sync::mpsc::Sender;

use super::output::{Emit, Emitted, Job, Output};
pub use super::output::TokenContext;
use super::request::{Event, FinishReason, GenRequest};
use super::sampler::{SampleSpec, Sampled, TokenCounts};
use crate::backend::SeqId;

/// Per-sequence state owned by the worker thread.
pub struct Sequence {
    pub id: SeqId,
    pub req: GenRequest,
    /// Prompt followed by every generated token.
    pub tokens: Vec<u32>,
    /// How many of `tokens` the backend has in its KV cache (or in a launched step).
    pub fed: usize,
    /// Async scheduling (`Backend::launch`): samples launched and not collected yet (0 to 2),
    /// and whether a launched row already feeds the token the oldest of them gives.
    pub sampling: u8,
    pub ahead: bool,
    pub generated: usize,
    counts: TokenCounts,
    rng: StdRng,
    /// The output side; `None` only while the output lane holds it, within a step.
    out: Option<Box<Output>>,
    /// The last sampled token, when its events are still to be made (`settle` or the lane).
    later: Option<Emit>,
    /// Set once `Done` or `Error` is queued: the sequence only delivers its queued events from
    /// then on.
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
}

impl Sequence {
    /// Creates the state at admission; draws a seed when the request has none.
    pub fn new(id: SeqId, req: GenRequest, tx: Sender<Event>, arrived: std::time::Instant) -> Self {
        let seed = req.sampling.seed.unwrap_or_else(rand::random::<u64>);
        Self {
            id,
            tokens: req.prompt_tokens.clone(),
            fed: 0,
            sampling: 0,
            ahead: false,
            generated: 0,
            counts: TokenCounts::from_prompt(&req.prompt_tokens),
            rng: StdRng::seed_from_u64(seed),
            out: Some(Box::new(Output::new(&req, tx))),
            later: None,
            finished: false,
            cancelled: false,
            arrived,
            admitted: false,
            last_token_at: None,
            outcome: None,
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
        debug_assert!(self.sampling == 0, "a sequence is preempted only with no step in flight");
        self.fed = 0;
    }

    /// Starts from `n` positions the backend already holds for it (its prefix cache).
    pub fn reused(&mut self, n: usize) {
        debug_assert!(self.fed == 0 && n < self.tokens.len(), "a prefix is reused only before the first step, and not the last token");
        self.fed = n;
        if !self.admitted {
            self.out().cached_prompt_tokens = n.min(self.req.prompt_tokens.len());
        }
    }

    /// May take part in the next step: alive, not finished, and no undelivered events.
    pub fn is_schedulable(&self) -> bool {
        self.is_live_and_caught_up() && self.unfed() > 0
    }

    /// Async scheduling: its next row may feed the token still in flight for it. Nothing in its
    /// sampling may depend on that token (penalty counts, a grammar), and that token must not be
    /// its last by length.
    pub fn can_follow(&self, max_context: usize) -> bool {
        self.sampling == 1 && !self.ahead && self.is_live_and_caught_up() && !self.needs_its_last_token() && self.wants_another(max_context)
    }

    /// Async scheduling: it would run now, but only once the token in flight for it is known.
    pub fn waits_for_flight(&self, max_context: usize) -> bool {
        self.sampling == 1 && !self.ahead && self.is_live_and_caught_up() && self.needs_its_last_token() && self.wants_another(max_context)
    }

    /// Not finished, and the client has taken every event so far.
    fn is_live_and_caught_up(&self) -> bool {
        !self.finished && !self.cancelled && self.out.as_ref().is_none_or(|o| o.is_empty())
    }

    /// Its next sampling reads its last token: penalty counts or a grammar's state.
    fn needs_its_last_token(&self) -> bool {
        let p = &self.req.sampling;
        self.req.constraint.is_some() || p.repetition_penalty != 1.0 || p.presence_penalty != 0.0 || p.frequency_penalty != 0.0
    }

    /// Another token after the ones known and in flight is within `max_tokens` and the context.
    fn wants_another(&self, max_context: usize) -> bool {
        let flight = self.sampling as usize;
        self.generated + flight < self.req.max_new_tokens && self.tokens.len() + flight < max_context
    }

    /// Records a launched row (async scheduling): `n` tokens fed, or with `follows` the token in
    /// flight; with `want_logits` one more sample in flight, drawn with `rng` (the generator's
    /// state after its draw, kept now: the draw does not depend on the token).
    pub fn launched(&mut self, n: usize, want_logits: bool, follows: bool, rng: Option<StdRng>) {
        if follows {
            debug_assert!(self.sampling == 1 && !self.ahead && n == 1, "a row follows the one token in flight");
            self.ahead = true;
        } else {
            self.fed += n;
        }
        if want_logits {
            self.sampling += 1;
            if let Some(rng) = rng {
                self.rng = rng;
            }
        }
    }

    fn out(&mut self) -> &mut Output {
        self.out.as_deref_mut().expect("a sequence's output is lent only within a step")
    }

    /// Tries to hand pending events to the channel; stops at the first full slot. Marks the
    /// sequence cancelled when the receiver is gone.
    pub fn flush(&mut self) {
        if !self.out().flush() {
            self.cancelled = true;
        }
    }

    /// Whether everything owed to the client has been delivered (or the client is gone).
    pub fn is_drained(&self) -> bool {
        self.cancelled || self.out.as_ref().is_none_or(|o| o.is_empty())
    }

    /// Queues an error and finishes the sequence.
    pub fn fail(&mut self, msg: impl Into<String>) {
        debug_assert!(self.later.is_none(), "a sequence fails only once its last token has its events");
        if !self.finished {
            self.out().error(msg.into());
            self.finished = true;
            self.outcome = Some(super::metrics::Outcome::Error);
        }
        self.flush();
    }

    /// Ends the sequence normally, flushing held-back text into a last `Token` event when needed.
    pub fn finish(&mut self, reason: FinishReason, ctx: &TokenContext<'_>, last_token: u32) {
        // Not flushed in between: held-back text joins the last token's event when it is queued.
        self.make_owed_events(ctx);
        if self.finished {
            // Its last token completed a stop string (or it had ended before).
            return self.flush();
        }
        let generated = self.generated;
        self.out().finish(reason, ctx, last_token, generated);
        self.finished = true;
        self.outcome = Some(match reason {
            FinishReason::Stop => super::metrics::Outcome::Stop,
            FinishReason::Length => super::metrics::Outcome::Length,
        });
        self.flush();
    }

    /// Makes the events of the last sampled token now, when they are still owed.
    pub fn settle(&mut self, ctx: &TokenContext<'_>) {
        if self.make_owed_events(ctx) {
            self.flush();
        }
    }

    /// Queues the last sampled token's events when they are owed; returns whether they were.
    fn make_owed_events(&mut self, ctx: &TokenContext<'_>) -> bool {
        let Some(e) = self.later.take() else { return false };
        if self.out().token(&e, ctx) {
            self.stopped();
        }
        true
    }

    /// The last sampled token's events are still to be made.
    pub fn owes_events(&self) -> bool {
        self.later.is_some()
    }

    /// Lends the output and the token it owes to the output lane, when a token is owed.
    pub fn lend(&mut self, idx: usize) -> Option<Job> {
        let emit = self.later.take()?;
        let out = self.out.take().expect("a sequence's output is lent once a step");
        Some(Job { idx, out, emit, result: Emitted::Queued })
    }

    /// Takes the output back from the lane, with what became of the token.
    pub fn returned(&mut self, job: Job) {
        debug_assert!(self.out.is_none(), "only a lent output comes back");
        self.out = Some(job.out);
        match job.result {
            Emitted::Queued => {}
            Emitted::Stopped => self.stopped(),
            Emitted::Gone => self.cancelled = true,
            Emitted::Panicked => self.fail("the server failed while producing this sequence's output"),
        }
    }

    /// Its text completed a stop string (the `Done` event is queued).
    fn stopped(&mut self) {
        self.finished = true;
        self.outcome = Some(super::metrics::Outcome::Stop);
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
    /// state after its draw, from `sample_spec`): what the next step needs (the token, penalty
    /// counts, the grammar's commit, EOS and length) at once, and its events too unless `later`,
    /// in which case they wait in the sequence for `settle` or the output lane. A token that ends
    /// the sequence always has its events made at once. Returns the token.
    ///
    /// EOS tokens are never masked. With `ignore_eos` they are ordinary tokens (their text is
    /// empty after skip_special_tokens); otherwise sampling one ends the sequence with `Stop` and
    /// it counts in `completion_tokens` (as in vLLM) but gets no `Token` event of its own, except
    /// one carrying held-back text (a partial stop string) when there is any.
    pub fn on_sampled(&mut self, s: Sampled, rng: Option<StdRng>, ctx: &TokenContext<'_>, later: bool) -> u32 {
        debug_assert!(self.later.is_none() && !self.finished, "a token is sampled only for a live sequence whose last token has its events");
        if let Some(rng) = rng {
            self.rng = rng;
        }
        let token = s.token;
        self.tokens.push(token);
        if self.ahead {
            // A launched row feeds this token already (async scheduling).
            self.fed += 1;
            self.ahead = false;
        }
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
                self.fail(format!("structured output: {e}"));
                return token;
            }
        }
        let logprobs = s.logprobs.filter(|_| self.req.logprobs.is_some());
        self.later = Some(Emit { token, logprobs, generated: self.generated });
        let length = self.generated >= self.req.max_new_tokens || self.tokens.len() >= ctx.max_context;
        if length {
            self.finish(FinishReason::Length, ctx, token);
        } else if !later {
            self.settle(ctx);
        }
        token
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::SamplingParams;

    fn seq(max_new: usize, sampling: SamplingParams) -> (Sequence, tokio::sync::mpsc::Receiver<Event>) {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let req = GenRequest { prompt_tokens: vec![1, 2, 3], sampling, max_new_tokens: max_new, stop: vec![], logprobs: None, ignore_eos: false, adapter: None, constraint: None };
        (Sequence::new(7, req, tx, std::time::Instant::now()), rx)
    }

    /// Async scheduling's bookkeeping: a row follows the one token in flight only while another
    /// token is wanted and nothing in the sampling reads that token; the followed token counts as
    /// fed once it is known.
    #[test]
    fn a_row_follows_the_token_in_flight_only_when_nothing_reads_it() {
        let greedy = SamplingParams { temperature: 0.0, ..SamplingParams::default() };
        let (mut s, _rx) = seq(3, greedy.clone());
        s.launched(3, true, false, None);
        assert_eq!((s.fed, s.sampling, s.unfed()), (3, 1, 0));
        assert!(s.can_follow(100) && !s.waits_for_flight(100));
        // The context would be full with the token in flight: nothing follows it.
        assert!(!s.can_follow(4));
        s.launched(1, true, true, None);
        assert!(s.ahead && s.sampling == 2 && !s.can_follow(100), "one following row at a time");
        // The first token arrives: the following row fed it.
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/models/qwen-tokenizer/tokenizer.json");
        let tok = std::sync::Arc::new(tokenizers::Tokenizer::from_file(path).expect("models/qwen-tokenizer/tokenizer.json loads"));
        let decoding = crate::engine::output::Decoding { tokenizer: tok, eos: vec![], byte_level: false, byte_table: None };
        let ctx = decoding.ctx(100);
        s.sampling -= 1;
        s.on_sampled(Sampled { token: 5, logprobs: None }, None, &ctx, false);
        assert_eq!((s.fed, s.tokens.len(), s.ahead, s.generated), (4, 4, false, 1));
        // Its second token is in flight; a third is wanted (max 3): it may follow again.
        assert!(s.can_follow(100));
        s.launched(1, true, true, None);
        s.sampling -= 1;
        s.on_sampled(Sampled { token: 6, logprobs: None }, None, &ctx, false);
        // Two known, the third in flight: it is the last by max_tokens, so nothing follows it.
        assert_eq!((s.generated, s.sampling), (2, 1));
        assert!(!s.can_follow(100) && !s.waits_for_flight(100));

        // Penalties read the last token: such a sequence waits for it instead.
        let (mut p, _rx) = seq(10, SamplingParams { repetition_penalty: 1.3, ..greedy });
        p.launched(3, true, false, None);
        assert!(!p.can_follow(100) && p.waits_for_flight(100));
    }
}
