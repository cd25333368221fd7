//! Shared state of the HTTP layer: the served models (each behind a `Generator`) and server limits.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::auth::Auth;
use super::conn::ConnectionLimits;
use crate::engine::{Event, GenRequest, SubmitError};
use crate::lora::{AdapterRegistry, LoraAdapter};
use crate::model::template::ChatTemplate;

/// What the HTTP layer needs from an engine: queue one checked sequence and get its event stream.
/// Dropping the returned receiver must cancel the sequence. `engine::EngineHandle` implements it;
/// tests use scripted fakes.
pub trait Generator: Send + Sync + 'static {
    /// Queues one sequence (one choice).
    fn submit(&self, req: GenRequest) -> Result<mpsc::Receiver<Event>, SubmitError>;
    /// Context length in tokens (prompt + completion) the worker accepts.
    fn max_context(&self) -> usize;
    /// Whether the worker is running; `GET /ready` reports 503 when any is not.
    fn is_alive(&self) -> bool {
        true
    }
    /// Size of the model's logits vector, when known: token ids in prompts and `logit_bias` must be
    /// below both it and the tokenizer's vocabulary.
    fn vocab_size(&self) -> Option<usize> {
        None
    }
    /// The worker's load and counters, for `GET /metrics`.
    fn stats(&self) -> Option<crate::engine::EngineStats> {
        None
    }
}

/// One served model id.
#[derive(Clone)]
pub struct ModelEntry {
    pub id: String,
    pub generator: Arc<dyn Generator>,
    pub tokenizer: Arc<tokenizers::Tokenizer>,
    /// None: chat completions are refused with a 400.
    pub chat_template: Option<Arc<ChatTemplate>>,
    /// How the model writes tool calls (None: answers are never parsed for calls).
    pub tool_format: Option<crate::tools::ToolFormat>,
    /// The model's grammar compiler for structured outputs.
    pub structured: Arc<crate::structured::Structured>,
    /// Unix seconds, shown in `/v1/models`.
    pub created: u64,
    pub owned_by: String,
}

/// Server-wide limits and settings the handlers and the connection loop consult.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// Largest `n`.
    pub max_n: usize,
    /// API keys: who may call what (`super::auth`).
    pub auth: Auth,
    /// Browser origins allowed to call the server (`super::cors`); empty: none.
    pub cors_allowed_origins: Vec<String>,
    /// A request body must arrive within this once its head has (408 beyond).
    pub body_read_timeout: Duration,
    /// Deadline of a non-streaming completion, from when it is queued (504 beyond; None: no
    /// deadline).
    pub request_timeout: Option<Duration>,
    /// Timeouts and caps of connections (`super::conn`).
    pub connections: ConnectionLimits,
}

impl Limits {
    pub const DEFAULT_BODY_READ_TIMEOUT_SECS: u64 = 60;
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 4 * 1024 * 1024,
            max_n: 16,
            auth: Auth::default(),
            cors_allowed_origins: Vec::new(),
            body_read_timeout: Duration::from_secs(Self::DEFAULT_BODY_READ_TIMEOUT_SECS),
            request_timeout: None,
            connections: ConnectionLimits::default(),
        }
    }
}

/// Everything the router shares between requests; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    models: Arc<HashMap<String, ModelEntry>>,
    /// Model ids in configuration order, for listings.
    order: Arc<Vec<String>>,
    pub limits: Limits,
    /// Reported as `system_fingerprint` in every completion.
    pub system_fingerprint: String,
    /// LoRA adapters, selected by a request's `model`.
    pub adapters: Arc<AdapterRegistry>,
    /// Responses by route and HTTP status (`/metrics`).
    pub status_counts: Arc<super::status_counts::StatusCounts>,
}

impl ModelEntry {
    /// Token ids a client may name (prompt ids, `logit_bias` keys) are below this.
    pub fn vocab_limit(&self) -> usize {
        let tok = self.tokenizer.get_vocab_size(true);
        self.generator.vocab_size().map_or(tok, |v| v.min(tok))
    }
}

impl AppState {
    /// Builds the state; later entries with a duplicate id replace earlier ones.
    pub fn new(models: Vec<ModelEntry>, limits: Limits) -> Self {
        let mut order = Vec::new();
        let mut map = HashMap::new();
        for m in models {
            if !map.contains_key(&m.id) {
                order.push(m.id.clone());
            }
            map.insert(m.id.clone(), m);
        }
        Self {
            models: Arc::new(map),
            order: Arc::new(order),
            limits,
            system_fingerprint: format!("fp_inferd_{}", env!("CARGO_PKG_VERSION")),
            adapters: Arc::new(AdapterRegistry::empty()),
            status_counts: Arc::default(),
        }
    }

    /// Serves these adapters too.
    pub fn with_adapters(mut self, adapters: Arc<AdapterRegistry>) -> Self {
        self.adapters = adapters;
        self
    }

    /// What a request's `model` names: a base model, or an adapter (vLLM's convention) with the
    /// base model it runs on and the adapter version the request will keep. Unknown: 404.
    pub fn resolve(&self, id: &str) -> Result<(ModelEntry, Option<Arc<LoraAdapter>>), super::ApiError> {
        if let Some(m) = self.model(id) {
            return Ok((m.clone(), None));
        }
        match self.adapters.resolve(id) {
            Some(s) => match self.model(&s.base) {
                Some(m) => Ok((m.clone(), Some(s.adapter))),
                None => Err(super::ApiError::model_not_found(id)),
            },
            None => Err(super::ApiError::model_not_found(id)),
        }
    }

    /// The model served under `id`.
    pub fn model(&self, id: &str) -> Option<&ModelEntry> {
        self.models.get(id)
    }

    /// All models, in configuration order.
    pub fn models(&self) -> impl Iterator<Item = &ModelEntry> {
        self.order.iter().filter_map(|id| self.models.get(id))
    }
}

/// Seconds since the Unix epoch (for `created`).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
