//! Server configuration: config.toml, then environment, then flags (each overriding the one
//! before). `inferd serve` with no arguments reads `./config.toml` if it exists.
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

use crate::engine::EngineConfig;

/// Command line of the `inferd` binary.
#[derive(Debug, Parser)]
#[command(name = "inferd", version, about = "OpenAI-compatible LLM inference server")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// `inferd` subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the OpenAI-compatible HTTP API.
    Serve(ServeArgs),
    /// Convert a PEFT or mlx-lm LoRA adapter into ONNX Runtime's `.onnx_adapter` format, for
    /// ONNX models exported with `scripts/export_onnx.py --lora-inputs`.
    ConvertAdapter(ConvertArgs),
}

/// Flags of `inferd convert-adapter`.
#[derive(Debug, Clone, Args)]
pub struct ConvertArgs {
    /// Adapter directory (PEFT: adapter_config.json + adapter_model.safetensors; mlx-lm:
    /// adapter_config.json + adapters.safetensors).
    pub input: PathBuf,
    /// Output file (conventionally `*.onnx_adapter`).
    pub output: PathBuf,
    /// `adapter_version` written into the file.
    #[arg(long, default_value_t = 1)]
    pub adapter_version: i32,
}

/// Flags of `inferd serve`; each overrides the environment and the config file.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// Config file (default: ./config.toml when present; env INFERD_CONFIG).
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Serve this one model instead of the config's list: a GGUF file, a Hugging Face style
    /// directory or a hub id (env INFERD_MODEL).
    #[arg(long, value_name = "SPEC")]
    pub model: Option<String>,
    /// Id the model is served under (default: file stem, directory name or hub id).
    #[arg(long, value_name = "ID")]
    pub model_id: Option<String>,
    /// `candle` or `onnx` (env INFERD_BACKEND).
    #[arg(long)]
    pub backend: Option<String>,
    /// `cpu` or `cuda:N` (env INFERD_DEVICE).
    #[arg(long)]
    pub device: Option<String>,
    /// Address to bind (env INFERD_HOST; default 127.0.0.1).
    #[arg(long)]
    pub host: Option<String>,
    /// Port to bind (env INFERD_PORT; default 8080).
    #[arg(long)]
    pub port: Option<u16>,
    /// Most sequences decoded together per model.
    #[arg(long)]
    pub max_batch: Option<usize>,
    /// Context length override (default: the model's own).
    #[arg(long)]
    pub context_length: Option<usize>,
    /// CPU threads of the forward pass, shared by all CPU models (env INFERD_THREADS; default:
    /// every CPU this process may use).
    #[arg(long)]
    pub threads: Option<usize>,
}

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
    fn from_target(target: &str, device_id: Option<usize>) -> Result<Device, ConfigError> {
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
    /// When set, `/v1/*` requires `Authorization: Bearer <api_key>`.
    pub api_key: Option<String>,
    /// CPU threads of the forward pass (None: every CPU this process may use).
    pub threads: Option<usize>,
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
        let d = crate::http::Limits::default();
        crate::http::Limits {
            max_body_bytes: self.max_body_bytes,
            api_key: self.api_key.clone(),
            max_n: d.max_n.min(self.max_waiting.max(1)),
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
    pub max_batch: usize,
    pub context_length: Option<usize>,
    pub prefill_chunk: usize,
    /// ONNX Runtime threads inside one operator (None: the server's `threads`).
    pub intra_op_threads: Option<usize>,
    /// ONNX Runtime threads running independent operators in parallel.
    pub inter_op_threads: usize,
}

impl ModelConfig {
    /// The engine knobs for this model.
    pub fn engine_config(&self, server: &ServerConfig) -> EngineConfig {
        EngineConfig {
            max_batch: self.max_batch,
            max_waiting: server.max_waiting,
            prefill_chunk: self.prefill_chunk,
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

const DEFAULT_CONFIG: &str = "config.toml";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    server: FileServer,
    #[serde(default)]
    models: Vec<FileModel>,
    #[serde(default)]
    adapters: Vec<FileAdapter>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAdapter {
    name: String,
    path: PathBuf,
    base: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileServer {
    host: Option<String>,
    port: Option<u16>,
    max_body_bytes: Option<usize>,
    max_waiting: Option<usize>,
    api_key: Option<String>,
    threads: Option<usize>,
    onnxruntime_library: Option<PathBuf>,
    lora_runtime_loading: Option<bool>,
    lora_root: Option<PathBuf>,
    lora_budget_mb: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileModel {
    id: Option<String>,
    source: String,
    backend: Option<String>,
    device: Option<String>,
    execution_target: Option<String>,
    device_id: Option<usize>,
    max_batch: Option<usize>,
    context_length: Option<usize>,
    prefill_chunk: Option<usize>,
    intra_op_threads: Option<usize>,
    inter_op_threads: Option<usize>,
}

/// Loads the configuration for `inferd serve` from the file, the process environment and `args`.
pub fn load(args: &ServeArgs) -> Result<Config, ConfigError> {
    load_with_env(args, &|k| std::env::var(k).ok())
}

/// `load` with an injected environment (tests).
pub fn load_with_env(args: &ServeArgs, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    let explicit = args.config.clone().or_else(|| env("INFERD_CONFIG").map(PathBuf::from));
    // The repo's own config.toml is the default, so `inferd serve` works from any directory of a
    // checkout; ./config.toml wins when present.
    let repo_default = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_CONFIG);
    let path = match explicit {
        Some(path) => Some(path),
        None if Path::new(DEFAULT_CONFIG).is_file() => Some(PathBuf::from(DEFAULT_CONFIG)),
        None if repo_default.is_file() => Some(repo_default),
        None => None,
    };
    let (file, base) = match &path {
        Some(path) => (read_file(path)?, path.parent().map(Path::to_path_buf)),
        None => (FileConfig::default(), None),
    };
    let mut server = ServerConfig {
        host: file.server.host.unwrap_or_else(|| "127.0.0.1".into()),
        port: file.server.port.unwrap_or(8080),
        max_body_bytes: file.server.max_body_bytes.unwrap_or(4 * 1024 * 1024),
        max_waiting: file.server.max_waiting.unwrap_or(EngineConfig::default().max_waiting),
        api_key: file.server.api_key.filter(|k| !k.is_empty()),
        threads: file.server.threads.filter(|&n| n > 0),
        onnxruntime_library: file.server.onnxruntime_library.map(|p| relative_to(&base, p)),
        lora_root: match (file.server.lora_runtime_loading.unwrap_or(false), file.server.lora_root) {
            (true, Some(root)) => Some(relative_to(&base, root)),
            (true, None) => {
                return Err(ConfigError::Invalid("lora_runtime_loading = true needs lora_root (the only directory adapters are loaded from)".into()))
            }
            (false, _) => None,
        },
        lora_budget_mb: file.server.lora_budget_mb.unwrap_or(1024),
    };
    let adapters: Vec<AdapterConfig> = file
        .adapters
        .into_iter()
        .map(|a| AdapterConfig { name: a.name, path: relative_to(&base, a.path), base: a.base })
        .collect();
    let mut models =
        file.models.into_iter().map(|m| model_from_file(m, base.as_deref())).collect::<Result<Vec<_>, _>>()?;

    // Environment.
    if let Some(h) = env("INFERD_HOST") {
        server.host = h;
    }
    if let Some(p) = env("INFERD_PORT") {
        server.port = p.trim().parse().map_err(|e: std::num::ParseIntError| ConfigError::Value {
            name: "INFERD_PORT".into(),
            value: p.clone(),
            reason: e.to_string(),
        })?;
    }
    if let Some(t) = env("INFERD_THREADS") {
        let n: usize = t.trim().parse().map_err(|e: std::num::ParseIntError| ConfigError::Value {
            name: "INFERD_THREADS".into(),
            value: t.clone(),
            reason: e.to_string(),
        })?;
        server.threads = Some(n).filter(|&n| n > 0);
    }
    if let Some(spec) = env("INFERD_MODEL") {
        models = vec![model_from_spec(&spec, None)];
    }
    override_all(&mut models, env("INFERD_BACKEND").map(|b| b.parse::<BackendKind>()).transpose()?, |m, b| m.backend = b);
    override_all(&mut models, env("INFERD_DEVICE").map(|d| d.parse::<Device>()).transpose()?, |m, d| m.device = d);

    // Flags.
    if let Some(h) = &args.host {
        server.host = h.clone();
    }
    if let Some(p) = args.port {
        server.port = p;
    }
    if let Some(t) = args.threads {
        server.threads = Some(t).filter(|&n| n > 0);
    }
    if let Some(spec) = &args.model {
        models = vec![model_from_spec(spec, args.model_id.as_deref())];
    } else if let Some(id) = &args.model_id {
        match models.as_mut_slice() {
            [only] => only.id = id.clone(),
            _ => return Err(ConfigError::Invalid("--model-id needs --model or exactly one configured model".into())),
        }
    }
    override_all(&mut models, args.backend.as_deref().map(str::parse::<BackendKind>).transpose()?, |m, b| m.backend = b);
    override_all(&mut models, args.device.as_deref().map(str::parse::<Device>).transpose()?, |m, d| m.device = d);
    override_all(&mut models, args.max_batch, |m, n| m.max_batch = n);
    override_all(&mut models, args.context_length, |m, n| m.context_length = Some(n));

    check(&server, &models)?;
    for (i, a) in adapters.iter().enumerate() {
        if a.name.trim().is_empty() || adapters[..i].iter().any(|o| o.name == a.name) || models.iter().any(|m| m.id == a.name) {
            return Err(ConfigError::Invalid(format!("adapter name '{}' is empty, repeated or the id of a model", a.name)));
        }
    }
    Ok(Config { server, models, adapters })
}

/// A path from the config file, relative to the file's folder unless absolute.
fn relative_to(base: &Option<PathBuf>, p: PathBuf) -> PathBuf {
    match base {
        Some(dir) if p.is_relative() => dir.join(p),
        _ => p,
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::Read { path: path.to_path_buf(), message: e.to_string() })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.to_path_buf(), message: e.to_string() })
}

/// A `[[models]]` entry. A relative `source` path is taken relative to the config file's folder
/// when it exists there (so the file works from any working directory).
fn model_from_file(m: FileModel, base: Option<&Path>) -> Result<ModelConfig, ConfigError> {
    let source = match base {
        Some(dir) if Path::new(&m.source).is_relative() && dir.join(&m.source).exists() => {
            dir.join(&m.source).to_string_lossy().into_owned()
        }
        _ => m.source.clone(),
    };
    let mut cfg = model_from_spec(&source, m.id.as_deref());
    let device_is_set = m.device.is_some();
    if let Some(b) = m.backend {
        cfg.backend = b.parse()?;
    }
    if let Some(d) = m.device {
        cfg.device = d.parse()?;
    }
    if let Some(t) = m.execution_target {
        let d = Device::from_target(&t, m.device_id)?;
        if device_is_set && cfg.device != d {
            return Err(ConfigError::Invalid(format!(
                "model '{}': device = {:?} and execution_target = \"{t}\" disagree; set one of them",
                cfg.id, cfg.device
            )));
        }
        cfg.device = d;
    } else if m.device_id.is_some() {
        return Err(ConfigError::Invalid(format!("model '{}': device_id needs execution_target", cfg.id)));
    }
    cfg.intra_op_threads = m.intra_op_threads.filter(|&n| n > 0);
    cfg.inter_op_threads = m.inter_op_threads.unwrap_or(1).max(1);
    cfg.max_batch = m.max_batch.unwrap_or(cfg.max_batch);
    cfg.context_length = m.context_length;
    cfg.prefill_chunk = m.prefill_chunk.unwrap_or(cfg.prefill_chunk);
    Ok(cfg)
}

/// A model with default settings, served under `id` or the id derived from its spec.
fn model_from_spec(spec: &str, id: Option<&str>) -> ModelConfig {
    let d = EngineConfig::default();
    ModelConfig {
        id: id.map(str::to_string).unwrap_or_else(|| model_id_from_spec(spec)),
        source: spec.to_string(),
        backend: BackendKind::Candle,
        device: Device::Cpu,
        max_batch: d.max_batch,
        context_length: None,
        prefill_chunk: d.prefill_chunk,
        intra_op_threads: None,
        inter_op_threads: 1,
    }
}

/// Default id of a model spec: a file's stem (`x/SmolLM2.Q4_1.gguf` -> `SmolLM2.Q4_1`), a
/// directory's name, or a hub id (`org/name`) as is.
pub fn model_id_from_spec(spec: &str) -> String {
    let trimmed = spec.trim_end_matches('/');
    let path = Path::new(trimmed);
    let is_hub_id = !path.exists()
        && !trimmed.starts_with(['.', '/', '~'])
        && trimmed.matches('/').count() == 1
        && !trimmed.ends_with(".gguf");
    if is_hub_id {
        return trimmed.to_string();
    }
    let name = if path.is_dir() { path.file_name() } else { path.file_stem() };
    name.map(|n| n.to_string_lossy().into_owned()).filter(|n| !n.is_empty()).unwrap_or_else(|| trimmed.to_string())
}

fn override_all<T: Copy>(models: &mut [ModelConfig], value: Option<T>, set: impl Fn(&mut ModelConfig, T)) {
    if let Some(v) = value {
        models.iter_mut().for_each(|m| set(m, v));
    }
}

fn check(server: &ServerConfig, models: &[ModelConfig]) -> Result<(), ConfigError> {
    if models.is_empty() {
        return Err(ConfigError::NoModels);
    }
    if server.max_body_bytes < 1024 {
        return Err(ConfigError::Invalid("server.max_body_bytes must be at least 1024".into()));
    }
    if server.max_waiting == 0 {
        return Err(ConfigError::Invalid("server.max_waiting must be at least 1".into()));
    }
    for (i, m) in models.iter().enumerate() {
        if m.id.trim().is_empty() || m.source.trim().is_empty() {
            return Err(ConfigError::Invalid(format!("models[{i}]: id and source must not be empty")));
        }
        if models[..i].iter().any(|o| o.id == m.id) {
            return Err(ConfigError::Invalid(format!("duplicate model id '{}'", m.id)));
        }
        if m.max_batch == 0 || m.prefill_chunk == 0 {
            return Err(ConfigError::Invalid(format!("model '{}': max_batch and prefill_chunk must be at least 1", m.id)));
        }
        if m.context_length.is_some_and(|c| c < 2) {
            return Err(ConfigError::Invalid(format!("model '{}': context_length must be at least 2", m.id)));
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
