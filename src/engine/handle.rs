//! `spawn` and `EngineHandle`: the async world's door into the worker thread.
//!
//! Submitting never blocks: a waiting slot is reserved with an atomic counter (so overload is
//! answered at once with `QueueFull`), then the request goes over an unbounded std channel whose
//! length that counter bounds.
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use tokenizers::Tokenizer;
use tokio::sync::mpsc as tokio_mpsc;

use super::request::{Event, GenRequest};
use super::scheduler::Worker;
use super::{EngineConfig, SubmitError};
use crate::backend::Backend;

/// A submission on its way to the worker.
pub(crate) struct Admission {
    pub req: GenRequest,
    pub tx: tokio_mpsc::Sender<Event>,
    /// When `submit` queued it (queue time and end-to-end latency count from here).
    pub arrived: std::time::Instant,
}

/// Counters the worker publishes and the handle reads.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Submitted but not yet running (in the channel or the worker's waiting queue).
    pub waiting: AtomicUsize,
    pub running: AtomicUsize,
    pub generated: AtomicU64,
    /// Prompt tokens fed to the backend.
    pub prompt_fed: AtomicU64,
    /// Backend steps, and the nanoseconds spent in them.
    pub steps: AtomicU64,
    pub step_nanos: AtomicU64,
    /// Nanoseconds spent after the steps: sampling, stop matching, detokenisation.
    pub sample_nanos: AtomicU64,
    /// Nanoseconds the worker waited with nothing to run (no sequence, or every one waiting on
    /// its client): with the two above, what a step's wall time splits into.
    pub idle_nanos: AtomicU64,
    /// Sequences put back in the queue because the KV cache was full.
    pub preemptions: AtomicU64,
    /// Tokens whose events were made beside the next step (`EngineConfig::overlap_output`), and
    /// sampled tokens dropped because their sequence had ended in the meantime (a stop string
    /// found in the previous token's text while the step ran).
    pub overlapped: AtomicU64,
    pub dropped: AtomicU64,
    /// Tokens whose keys and values came from the prefix cache instead of being computed.
    pub prefix_hits: AtomicU64,
    /// KV cache blocks in use and in all (0 and 0 when the cache is unbounded).
    pub kv_used_blocks: AtomicUsize,
    pub kv_total_blocks: AtomicUsize,
    /// Bytes the backend's prefix cache holds for finished sequences.
    pub prefix_cache_bytes: AtomicUsize,
    /// Latency histograms and finished requests by reason.
    pub latency: super::metrics::LatencyMetrics,
    pub alive: AtomicBool,
    pub max_context: usize,
    pub vocab_size: usize,
}

/// A snapshot of the engine's load, for metrics and health.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EngineStats {
    /// Sequences in the running batch (prefilling or decoding).
    pub running: usize,
    /// Sequences submitted and not yet running.
    pub waiting: usize,
    /// Tokens sampled since the engine started.
    pub generated_tokens: u64,
    /// Prompt tokens run through the model since the engine started.
    pub prompt_tokens: u64,
    /// Forward steps since the engine started.
    pub steps: u64,
    /// Seconds spent in forward steps.
    pub step_seconds: f64,
    /// Seconds spent sampling and detokenising after the steps.
    pub sample_seconds: f64,
    /// Seconds the worker waited with nothing to run.
    pub idle_seconds: f64,
    /// Sequences preempted (KV cache full) since the engine started.
    pub preemptions: u64,
    /// Tokens whose events were made on the output thread beside the next step.
    pub overlapped_tokens: u64,
    /// Sampled tokens dropped because their sequence had ended while the step ran (a stop
    /// string found one step late by the output thread); never seen by a client.
    pub dropped_tokens: u64,
    /// Tokens taken from the prefix cache instead of computed, since the engine started.
    pub prefix_cache_tokens: u64,
    /// Fraction of the KV cache in use, in [0, 1] (0 when the cache is unbounded).
    pub kv_cache_usage: f64,
    /// Bytes the prefix cache holds for finished sequences.
    pub prefix_cache_bytes: u64,
    /// Time to first token, per output token, end to end and in the queue; requests by outcome.
    pub latency: super::metrics::LatencySnapshot,
}

/// Cheap, cloneable handle to one engine worker. Dropping every handle stops the worker once its
/// sequences are done.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Admission>,
    shared: Arc<Shared>,
    cfg: EngineConfig,
}

/// Marks the engine dead when the worker thread ends, even by panic.
struct AliveGuard(Arc<Shared>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.alive.store(false, Ordering::SeqCst);
    }
}

/// Starts the worker thread that owns `backend` and returns a handle to it.
///
/// `eos_token_ids` end a sequence (finish reason `stop`) unless the request sets `ignore_eos`.
/// If the OS refuses to start the thread, the returned handle reports `is_alive() == false` and
/// every `submit` fails with `SubmitError::Closed`.
pub fn spawn(
    backend: Box<dyn Backend>,
    tokenizer: Arc<Tokenizer>,
    eos_token_ids: Vec<u32>,
    cfg: EngineConfig,
) -> EngineHandle {
    let shared = Arc::new(Shared {
        waiting: AtomicUsize::new(0),
        running: AtomicUsize::new(0),
        generated: AtomicU64::new(0),
        prompt_fed: AtomicU64::new(0),
        steps: AtomicU64::new(0),
        step_nanos: AtomicU64::new(0),
        sample_nanos: AtomicU64::new(0),
        idle_nanos: AtomicU64::new(0),
        preemptions: AtomicU64::new(0),
        overlapped: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
        prefix_hits: AtomicU64::new(0),
        kv_used_blocks: AtomicUsize::new(0),
        kv_total_blocks: AtomicUsize::new(0),
        prefix_cache_bytes: AtomicUsize::new(0),
        latency: Default::default(),
        alive: AtomicBool::new(true),
        max_context: backend.max_context(),
        vocab_size: backend.vocab_size(),
    });
    let (tx, rx) = mpsc::channel();
    let worker = Worker::new(backend, tokenizer, eos_token_ids, cfg.clone(), rx, Arc::clone(&shared));
    let guard_shared = Arc::clone(&shared);
    let started = std::thread::Builder::new().name("inferd-engine".into()).spawn(move || {
        let _guard = AliveGuard(guard_shared);
        worker.run();
    });
    if let Err(e) = started {
        tracing::error!(error = %e, "cannot start the engine worker thread");
        shared.alive.store(false, Ordering::SeqCst);
    }
    EngineHandle { tx, shared, cfg }
}

impl EngineHandle {
    /// Queues one sequence. Returns its event stream: `Token`s, then one `Done` or `Error`.
    /// Dropping the receiver cancels the sequence.
    pub fn submit(&self, req: GenRequest) -> Result<tokio_mpsc::Receiver<Event>, SubmitError> {
        if !self.is_alive() {
            return Err(SubmitError::Closed);
        }
        let limit = self.cfg.max_waiting.max(1);
        let reserved = self
            .shared
            .waiting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| (w < limit).then_some(w + 1));
        if let Err(waiting) = reserved {
            return Err(SubmitError::QueueFull { retry_after_secs: self.retry_after(waiting) });
        }
        let (tx, rx) = tokio_mpsc::channel(self.cfg.channel_capacity.max(1));
        if self.tx.send(Admission { req, tx, arrived: std::time::Instant::now() }).is_err() {
            self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::Closed);
        }
        Ok(rx)
    }

    /// A rough wait before retrying: one second per full batch queued ahead, within [1, 30].
    fn retry_after(&self, waiting: usize) -> u64 {
        (1 + waiting / self.cfg.max_batch.max(1)).clamp(1, 30) as u64
    }

    /// Most tokens (prompt + generated) one sequence may hold.
    pub fn max_context(&self) -> usize {
        self.shared.max_context
    }

    /// Size of the model's logits vector (valid token ids are below it).
    pub fn vocab_size(&self) -> usize {
        self.shared.vocab_size
    }

    /// Current load.
    pub fn stats(&self) -> EngineStats {
        EngineStats {
            running: self.shared.running.load(Ordering::SeqCst),
            waiting: self.shared.waiting.load(Ordering::SeqCst),
            generated_tokens: self.shared.generated.load(Ordering::Relaxed),
            prompt_tokens: self.shared.prompt_fed.load(Ordering::Relaxed),
            steps: self.shared.steps.load(Ordering::Relaxed),
            step_seconds: self.shared.step_nanos.load(Ordering::Relaxed) as f64 * 1e-9,
            sample_seconds: self.shared.sample_nanos.load(Ordering::Relaxed) as f64 * 1e-9,
            idle_seconds: self.shared.idle_nanos.load(Ordering::Relaxed) as f64 * 1e-9,
            preemptions: self.shared.preemptions.load(Ordering::Relaxed),
            overlapped_tokens: self.shared.overlapped.load(Ordering::Relaxed),
            dropped_tokens: self.shared.dropped.load(Ordering::Relaxed),
            prefix_cache_tokens: self.shared.prefix_hits.load(Ordering::Relaxed),
            kv_cache_usage: match self.shared.kv_total_blocks.load(Ordering::Relaxed) {
                0 => 0.0,
                total => self.shared.kv_used_blocks.load(Ordering::Relaxed) as f64 / total as f64,
            },
            prefix_cache_bytes: self.shared.prefix_cache_bytes.load(Ordering::Relaxed) as u64,
            latency: self.shared.latency.snapshot(),
        }
    }

    /// Whether the worker thread is still running.
    pub fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::SeqCst)
    }
}
