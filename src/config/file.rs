//! The config file (`config.toml`): its TOML shape and its translation into the typed settings.
//! Relative paths in it are taken relative to the file's folder.
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::settings::{AdapterConfig, ConfigError, Device, ModelConfig, ServerConfig};
use crate::engine::EngineConfig;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
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
    api_keys: Option<Vec<String>>,
    api_key_file: Option<PathBuf>,
    admin_api_key: Option<String>,
    open_admin_endpoints: Option<bool>,
    metrics_require_key: Option<bool>,
    cors_allowed_origins: Option<Vec<String>>,
    header_read_timeout_secs: Option<u64>,
    keep_alive_timeout_secs: Option<u64>,
    body_read_timeout_secs: Option<u64>,
    request_timeout_secs: Option<u64>,
    max_connections: Option<usize>,
    http2_max_concurrent_streams: Option<u32>,
    threads: Option<usize>,
    http_threads: Option<usize>,
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
    devices: Option<Vec<String>>,
    execution_target: Option<String>,
    device_id: Option<usize>,
    max_batch: Option<usize>,
    context_length: Option<usize>,
    prefill_chunk: Option<usize>,
    kv_cache_mb: Option<usize>,
    prefix_cache_mb: Option<usize>,
    tool_call_parser: Option<String>,
    gpu_memory_fraction: Option<f64>,
    intra_op_threads: Option<usize>,
    inter_op_threads: Option<usize>,
}

/// What a config file (or none) declares: the server settings, the models and the adapters.
pub(super) fn read(path: Option<&Path>) -> Result<(ServerConfig, Vec<ModelConfig>, Vec<AdapterConfig>), ConfigError> {
    let (file, base) = match path {
        Some(path) => (read_file(path)?, path.parent().map(Path::to_path_buf)),
        None => (FileConfig::default(), None),
    };
    let fs = &file.server;
    let mut api_keys: Vec<String> = fs.api_key.iter().chain(fs.api_keys.iter().flatten()).cloned().collect();
    if let Some(p) = &fs.api_key_file {
        api_keys.extend(read_key_file(&relative_to(&base, p.clone()))?);
    }
    let cors_allowed_origins = fs
        .cors_allowed_origins
        .iter()
        .flatten()
        .map(|o| crate::http::cors::check_origin(o).map_err(|reason| ConfigError::Value { name: "server.cors_allowed_origins".into(), value: o.clone(), reason }))
        .collect::<Result<Vec<_>, _>>()?;
    let conn = crate::http::conn::ConnectionLimits::default();
    let server = ServerConfig {
        host: file.server.host.unwrap_or_else(|| "127.0.0.1".into()),
        port: file.server.port.unwrap_or(8080),
        max_body_bytes: file.server.max_body_bytes.unwrap_or(4 * 1024 * 1024),
        max_waiting: file.server.max_waiting.unwrap_or(EngineConfig::default().max_waiting),
        api_keys: api_keys.into_iter().filter(|k| !k.is_empty()).collect(),
        admin_api_key: file.server.admin_api_key.clone().filter(|k| !k.is_empty()),
        open_admin_endpoints: file.server.open_admin_endpoints.unwrap_or(false),
        metrics_require_key: file.server.metrics_require_key.unwrap_or(false),
        cors_allowed_origins,
        header_read_timeout_secs: file.server.header_read_timeout_secs.unwrap_or(conn.header_read_timeout.as_secs()),
        keep_alive_timeout_secs: file.server.keep_alive_timeout_secs.unwrap_or(conn.keep_alive_timeout.as_secs()),
        body_read_timeout_secs: file.server.body_read_timeout_secs.unwrap_or(crate::http::Limits::DEFAULT_BODY_READ_TIMEOUT_SECS),
        // 0 (like leaving it out) means no deadline.
        request_timeout_secs: file.server.request_timeout_secs.filter(|&s| s > 0),
        max_connections: file.server.max_connections.unwrap_or(conn.max_connections),
        http2_max_concurrent_streams: file.server.http2_max_concurrent_streams.unwrap_or(conn.http2_max_concurrent_streams),
        threads: file.server.threads.filter(|&n| n > 0),
        http_threads: file.server.http_threads.filter(|&n| n > 0),
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
    let models =
        file.models.into_iter().map(|m| model_from_file(m, base.as_deref())).collect::<Result<Vec<_>, _>>()?;
    Ok((server, models, adapters))
}

/// The keys of `api_key_file`: one per line; blank lines and lines starting with `#` are skipped.
fn read_key_file(path: &Path) -> Result<Vec<String>, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::Read { path: path.to_path_buf(), message: e.to_string() })?;
    let keys: Vec<String> =
        text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_string).collect();
    if keys.is_empty() {
        return Err(ConfigError::Read { path: path.to_path_buf(), message: "the API key file holds no key".into() });
    }
    Ok(keys)
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
    let mut cfg = super::model_from_spec(&source, m.id.as_deref());
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
    cfg.devices = vec![cfg.device];
    if let Some(list) = m.devices {
        if device_is_set || list.is_empty() {
            return Err(ConfigError::Invalid(format!("model '{}': set either device or a non-empty devices list", cfg.id)));
        }
        cfg.devices = list.iter().map(|d| d.parse()).collect::<Result<Vec<Device>, _>>()?;
        cfg.device = cfg.devices[0];
    }
    cfg.intra_op_threads = m.intra_op_threads.filter(|&n| n > 0);
    cfg.inter_op_threads = m.inter_op_threads.unwrap_or(1).max(1);
    cfg.max_batch = m.max_batch.or(cfg.max_batch);
    if let Some(f) = m.gpu_memory_fraction {
        cfg.gpu_memory_fraction = f;
    }
    cfg.context_length = m.context_length;
    cfg.prefill_chunk = m.prefill_chunk.or(cfg.prefill_chunk);
    cfg.kv_cache_mb = m.kv_cache_mb;
    cfg.prefix_cache_mb = m.prefix_cache_mb;
    if let Some(p) = m.tool_call_parser {
        cfg.tool_call_parser = p.parse()?;
    }
    Ok(cfg)
}
