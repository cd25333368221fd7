//! The engine: checked requests, continuous-batching scheduler on a worker thread, sampling,
//! stop strings and incremental detokenisation.
//!
//! `spawn` moves a `Backend` onto its own OS thread and returns an `EngineHandle`; `submit` queues a
//! checked `GenRequest` and returns the receiving end of that sequence's bounded event channel.
//! Dropping the receiver cancels the sequence (freed within one step).
//!
//! Event contract: one `Token` per sampled token (text may be empty while a partial character or a
//! possible stop string is held back; EOS, and a stop-completing token with no text and no
//! logprobs, get none), then exactly one `Done` or `Error`. Text held back when the
//! sequence ends by length is appended to the last token's event; when it ends by EOS it rides on
//! a `Token` event whose id is the EOS token (logprob None). Concatenating every `text` gives the
//! final output.
pub mod detok;
mod masks;
mod handle;
pub mod metrics;
mod output;
pub mod pool;
pub mod request;
pub mod sampler;
mod scheduler;
mod sequence;
pub mod stop;

pub use handle::{spawn, EngineHandle, EngineStats};
pub use pool::EnginePool;
pub use request::{Event, FinishReason, GenRequest, LogprobEntry, SamplingParams, TokenLogprob};

/// Knobs of one engine (one worker).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most sequences decoding together in one step.
    pub max_batch: usize,
    /// Most sequences waiting for a slot; beyond that `submit` fails with `QueueFull` (HTTP 429).
    pub max_waiting: usize,
    /// Most prompt tokens one step processes in total, so a long prefill is split into chunks and
    /// running streams keep getting a token per step.
    pub prefill_chunk: usize,
    /// Capacity of each sequence's event channel.
    pub channel_capacity: usize,
    /// Make each step's events (detokenisation, stop strings, logprob entries) on a helper thread
    /// while the backend runs the next step (`output::OutputLane`). Worth it when the step runs
    /// on a device and the CPU would otherwise wait; on a CPU backend the helper would take a
    /// core from the forward pass.
    pub overlap_output: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self { max_batch: 16, max_waiting: 64, prefill_chunk: 256, channel_capacity: 64, overlap_output: false }
    }
}

/// Why `EngineHandle::submit` refused a request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    /// The waiting queue is full; retry after roughly this many seconds.
    #[error("the server is overloaded: too many requests waiting")]
    QueueFull { retry_after_secs: u64 },
    /// The worker thread has stopped.
    #[error("the model worker has stopped")]
    Closed,
}
