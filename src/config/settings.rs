//! The typed configuration `inferd serve` runs with, and why loading it can fail.
use std::path::PathBuf;

use crate::engine::EngineConfig;

/// Which backend runs a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Candle,
    Onnx,
}

impl std::str::FromStr for BackendKind {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "candle" => Ok(Self::Candle),
            "onnx" | "ort" => Ok(Self::Onnx),
            _ => Err(ConfigError::Backend(s.to_string())),
        }
    }
}

/// Where a model runs: for the onnx backend, the execution provider and its device id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
    /// Apple's CoreML (onnx backend on macOS only).
    CoreMl,
}

impl Device {
    /// `execution_target` + `device_id`, the onnx backend's spelling of a device.
    pub(super) fn from_target(target: &str, device_id: Option<usize>) -> Result<Device, ConfigError> {
        let bad = || ConfigError::Value {
            name: "execution_target".into(),
            value: target.to_string(),
            reason: "expected \"cpu\", \"cuda\" or \"coreml\"".into(),
        };
        match (target.trim().to_ascii_lowercase().as_str(), device_id) {
            ("cpu", None | Some(0)) => Ok(Device::Cpu),
            ("cuda", id) => Ok(Device::Cuda(id.unwrap_or(0))),
            ("coreml", None | Some(0)) => Ok(Device::CoreMl),
            ("cpu" | "coreml", Some(id)) => Err(ConfigError::Value {
                name: "device_id".into(),
                value: id.to_string(),
                reason: format!("execution target '{target}' has only device 0"),
            }),
            _ => Err(bad()),
        }
    }
}

impl std::str::FromStr for Device {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim().to_ascii_lowercase();
        if t == "cpu" {
            return Ok(Self::Cpu);
        }
        if t == "cuda" {
            return Ok(Self::Cuda(0));
        }
        if t == "coreml" {
            return Ok(Self::CoreMl);
        }
        t.strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Self::Cuda)
            .ok_or_else(|| ConfigError::Device(s.to_string()))
    }
}

/// Everything `inferd serve` needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub server: ServerConfig,
    pub models: Vec<ModelConfig>,
    pub adapters: Vec<AdapterConfig>,
}

/// One `[[adapters]]` entry: a LoRA adapter served from start-up.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    /// The name requests select it by (their `model` field).
    pub name: String,
    /// PEFT or mlx-lm adapter directory.
    pub path: PathBuf,
    /// Id of the base model it runs on (may be left out when one model is served).
    pub base: Option<String>,
}

/// `[server]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    pub max_body_bytes: usize,
    /// Requests waiting per model before 429.
    pub max_waiting: usize,
    /// User API keys (`api_key`, `api_keys`, the lines of `api_key_file`, `INFERD_API_KEY`):
    /// when any is set, `/v1/*`, `/tokenize` and `/detokenize` need `Authorization: Bearer <one>`.
    pub api_keys: Vec<String>,
    /// The key of the admin endpoints (adapter loading and unloading); a user key gets 403.
    pub admin_api_key: Option<String>,
    /// Without an admin key, opens the admin endpoints to every caller the user keys let in
    /// (default: without an admin key they answer 403).
    pub open_admin_endpoints: bool,
    /// `/metrics` needs a user or admin key (when any is configured).
    pub metrics_require_key: bool,
    /// Browser origins allowed to call the server (CORS), `scheme://host[:port]` or `*`.
    pub cors_allowed_origins: Vec<String>,
    /// A new connection's first request head must arrive within this many seconds.
    pub header_read_timeout_secs: u64,
    /// After a response, the next request head on the connection must arrive within this.
    pub keep_alive_timeout_secs: u64,
    /// A request body must arrive within this many seconds of its head (408 beyond).
    pub body_read_timeout_secs: u64,
    /// Deadline of non-streaming completions in seconds (504 beyond); None: no deadline.
    pub request_timeout_secs: Option<u64>,
    /// Most connections open at once; further ones wait to be accepted.
    pub max_connections: usize,
    /// Most requests in flight on one HTTP/2 connection.
    pub http2_max_concurrent_streams: u32,
    /// CPU threads of the forward pass (None: every CPU this process may use).
    pub threads: Option<usize>,
    /// Threads of the async runtime that serves HTTP (None: [`default_http_threads`]).
    pub http_threads: Option<usize>,
    /// The ONNX Runtime shared library for onnx models (None: `ORT_DYLIB_PATH`, then the copy
    /// `scripts/fetch_onnxruntime.sh` installs under `runtimes/`).
    pub onnxruntime_library: Option<PathBuf>,
    /// Some: `POST /v1/load_lora_adapter` may load adapters found below this directory.
    pub lora_root: Option<PathBuf>,
    /// Most MiB all LoRA adapter weights may take.
    pub lora_budget_mb: usize,
}

impl ServerConfig {
    /// The HTTP layer's limits for these settings. `n` is capped by `max_waiting`: each choice
    /// takes a waiting slot, so a larger `n` could never be admitted (an endless 429).
    pub fn limits(&self) -> crate::http::Limits {
        use std::time::Duration;
        let d = crate::http::Limits::default();
        let mut auth = crate::http::auth::Auth::new(self.api_keys.clone(), self.admin_api_key.clone());
        auth.open_admin_endpoints = self.open_admin_endpoints;
        auth.metrics_require_key = self.metrics_require_key;
        crate::http::Limits {
            max_body_bytes: self.max_body_bytes,
            auth,
            max_n: d.max_n.min(self.max_waiting.max(1)),
            cors_allowed_origins: self.cors_allowed_origins.clone(),
            body_read_timeout: Duration::from_secs(self.body_read_timeout_secs),
            request_timeout: self.request_timeout_secs.map(Duration::from_secs),
            connections: crate::http::conn::ConnectionLimits {
                header_read_timeout: Duration::from_secs(self.header_read_timeout_secs),
                keep_alive_timeout: Duration::from_secs(self.keep_alive_timeout_secs),
                max_connections: self.max_connections,
                http2_max_concurrent_streams: self.http2_max_concurrent_streams,
            },
        }
    }
}

/// One `[[models]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub id: String,
    /// Model spec: GGUF path, Hugging Face style directory or hub id.
    pub source: String,
    pub backend: BackendKind,
    pub device: Device,
    /// The devices the model's workers run on, one worker each with its own copy of the weights
    /// and KV cache, requests going to the least loaded (`[device]` unless `devices` is set).
    pub devices: Vec<Device>,
    /// Most sequences decoding together (None: [`ModelConfig::DEFAULT_MAX_BATCH_GPU`] for the
    /// candle backend on a GPU, else the engine's default).
    pub max_batch: Option<usize>,
    /// The fraction of the GPU's memory the model may fill (weights, buffers, KV cache): the KV
    /// cache gets what the weights leave (candle on CUDA).
    pub gpu_memory_fraction: f64,
    pub context_length: Option<usize>,
    /// Prompt tokens per step; None: [`ModelConfig::DEFAULT_PREFILL_CHUNK_GPU`] on a GPU (a chunk
    /// of that size takes a few ms there, and every extra chunk is another pass over the
    /// weights; measured on an H100, docs/cuda.md), else the engine's default.
    pub prefill_chunk: Option<usize>,
    /// Most MiB all sequences' KV caches may take together (candle on the CPU; None: each
    /// sequence's cache grows up to the context length). When it is full, the engine preempts
    /// the latest admitted sequence instead of failing a step.
    pub kv_cache_mb: Option<usize>,
    /// MiB of finished sequences' KV caches kept for prefix reuse (candle on the CPU, onnx; 0
    /// turns prefix caching off; None: the backend's default, 512). On CUDA the cached blocks
    /// live in the paged KV cache and are taken back when it runs short: only 0 (off) matters.
    pub prefix_cache_mb: Option<usize>,
    /// How the model's tool calls are found in its answers: `auto` (from its chat template),
    /// `hermes`, `llama3_json`, `mistral`, or `none` (answers stay content).
    pub tool_call_parser: ToolCallParser,
    /// ONNX Runtime threads inside one operator (None: the server's `threads`).
    pub intra_op_threads: Option<usize>,
    /// ONNX Runtime threads running independent operators in parallel.
    pub inter_op_threads: usize,
}

impl ModelConfig {
    pub const DEFAULT_PREFILL_CHUNK_GPU: usize = 2048;
    pub const DEFAULT_MAX_BATCH_GPU: usize = 256;
    pub const DEFAULT_GPU_MEMORY_FRACTION: f64 = 0.9;

    /// Most sequences decoding together on this model's device.
    pub fn max_batch(&self) -> usize {
        self.max_batch.unwrap_or(match (self.backend, self.device) {
            (_, Device::Cuda(_)) => Self::DEFAULT_MAX_BATCH_GPU,
            _ => EngineConfig::default().max_batch,
        })
    }

    /// Prompt tokens per step on this model's device.
    pub fn prefill_chunk(&self) -> usize {
        self.prefill_chunk.unwrap_or(match (self.backend, self.device) {
            (_, Device::Cuda(_)) => Self::DEFAULT_PREFILL_CHUNK_GPU,
            _ => EngineConfig::default().prefill_chunk,
        })
    }

    /// Whether the candle backend on CUDA runs with async scheduling (`CudaOptions::pipeline`: the
    /// next step launched before the last one's tokens are read): on unless
    /// `INFERD_CUDA_PIPELINE=0`, for A/B runs.
    pub fn cuda_pipeline(&self) -> bool {
        self.backend == BackendKind::Candle && matches!(self.device, Device::Cuda(_)) && std::env::var("INFERD_CUDA_PIPELINE").map_or(true, |v| v != "0")
    }

    /// Whether the worker makes a step's events beside the next step (`EngineConfig::
    /// overlap_output`): on a GPU without async scheduling (the ONNX backend, or candle with
    /// `INFERD_CUDA_PIPELINE=0`), where the CPU would wait for the device. Off with async
    /// scheduling: a launch returns once the step before has ended, so the worker's own work
    /// already runs while the device computes and the lane would find no wait to fill (the H200
    /// measured it equal, docs/perf-notes.md session 18), only holding each token's events a step
    /// longer. Off on the CPU, where the helper thread would take a core from the forward pass.
    /// `INFERD_OVERLAP_OUTPUT` (0 or 1) overrides it, for A/B runs.
    pub fn overlap_output(&self) -> bool {
        match std::env::var("INFERD_OVERLAP_OUTPUT").as_deref() {
            Ok("0") => false,
            Ok("1") => true,
            _ => matches!(self.device, Device::Cuda(_)) && !self.cuda_pipeline(),
        }
    }

    /// The engine knobs for this model.
    pub fn engine_config(&self, server: &ServerConfig) -> EngineConfig {
        EngineConfig {
            max_batch: self.max_batch(),
            // A burst of max_batch requests must never be refused while slots are free: they
            // wait until the worker's next loop admits them.
            max_waiting: server.max_waiting.max(self.max_batch()),
            prefill_chunk: self.prefill_chunk(),
            overlap_output: self.overlap_output(),
            ..EngineConfig::default()
        }
    }
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("unknown backend '{0}': expected 'candle' or 'onnx'")]
    Backend(String),
    #[error("invalid device '{0}': expected 'cpu', 'cuda:N' or 'coreml'")]
    Device(String),
    #[error("invalid value '{value}' for {name}: {reason}")]
    Value { name: String, value: String, reason: String },
    #[error("no model configured: pass --model SPEC or add a [[models]] entry to the config file")]
    NoModels,
    #[error("{0}")]
    Invalid(String),
}

/// Threads of the HTTP runtime when none are configured: one per 8 CPUs, at least one. The HTTP
/// side (parsing, SSE chunks) takes a few tens of microseconds per token; every further thread
/// that wakes per token competes with the forward pass on small machines (on 2 CPUs, 1 thread
/// instead of tokio's default 2 decoded about 1% faster, 37 of 56 alternating request pairs:
/// docs/perf-notes.md, session 7).
pub fn default_http_threads() -> usize {
    (std::thread::available_parallelism().map_or(1, |n| n.get()) / 8).max(1)
}

/// `[[models]] tool_call_parser`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ToolCallParser {
    /// From the chat template ([`crate::tools::ToolFormat::detect`]).
    #[default]
    Auto,
    /// Never parse answers for calls.
    None,
    Format(crate::tools::ToolFormat),
}

impl ToolCallParser {
    /// The format for a model with this chat template source (None: no parsing).
    pub fn resolve(self, template: Option<&str>) -> Option<crate::tools::ToolFormat> {
        match self {
            Self::Auto => template.map(crate::tools::ToolFormat::detect),
            Self::None => None,
            Self::Format(f) => Some(f),
        }
    }
}

impl std::str::FromStr for ToolCallParser {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "none" => Ok(Self::None),
            other => crate::tools::ToolFormat::from_name(other).map(Self::Format).ok_or_else(|| {
                ConfigError::Invalid(format!("tool_call_parser = \"{other}\": expected auto, hermes, llama3_json, mistral or none"))
            }),
        }
    }
}
