//! Server configuration: config.toml, then environment, then flags (each overriding the one
//! before). `inferd serve` with no arguments reads `./config.toml` if it exists.
//!
//! `cli.rs` holds the command line, `settings.rs` the typed result, `file.rs` the config file;
//! this file layers the environment and the flags over the file and checks the whole.
mod cli;
mod file;
mod settings;

use std::path::{Path, PathBuf};

pub use cli::{Cli, Command, ConvertArgs, ServeArgs};
pub use settings::{default_http_threads, AdapterConfig, BackendKind, Config, ConfigError, Device, ModelConfig, ServerConfig, ToolCallParser};


const DEFAULT_CONFIG: &str = "config.toml";

/// Loads the configuration for `inferd serve` from the file, the process environment and `args`.
pub fn load(args: &ServeArgs) -> Result<Config, ConfigError> {
    load_with_env(args, &|k| std::env::var(k).ok())
}

/// The environment variable `name` as an unsigned number, when set.
fn number<T: std::str::FromStr<Err = std::num::ParseIntError>>(
    env: &dyn Fn(&str) -> Option<String>,
    name: &str,
) -> Result<Option<T>, ConfigError> {
    env(name)
        .map(|v| {
            v.trim().parse().map_err(|e: std::num::ParseIntError| ConfigError::Value { name: name.into(), value: v.clone(), reason: e.to_string() })
        })
        .transpose()
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
    let (mut server, mut models, adapters) = file::read(path.as_deref())?;

    // Environment.
    if let Some(h) = env("INFERD_HOST") {
        server.host = h;
    }
    if let Some(p) = number::<u16>(env, "INFERD_PORT")? {
        server.port = p;
    }
    // Thread counts: 0 means the default.
    if let Some(n) = number::<usize>(env, "INFERD_THREADS")? {
        server.threads = Some(n).filter(|&n| n > 0);
    }
    if let Some(n) = number::<usize>(env, "INFERD_HTTP_THREADS")? {
        server.http_threads = Some(n).filter(|&n| n > 0);
    }
    // Secrets from the environment (e.g. a container's), beside or instead of the file's.
    if let Some(k) = env("INFERD_API_KEY").filter(|k| !k.trim().is_empty()) {
        server.api_keys.push(k.trim().to_string());
    }
    if let Some(k) = env("INFERD_ADMIN_API_KEY").filter(|k| !k.trim().is_empty()) {
        server.admin_api_key = Some(k.trim().to_string());
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
    if let Some(t) = args.http_threads {
        server.http_threads = Some(t).filter(|&n| n > 0);
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
    override_all(&mut models, args.device.as_deref().map(str::parse::<Device>).transpose()?, |m, d| {
        m.device = d;
        m.devices = vec![d];
    });
    override_all(&mut models, args.max_batch, |m, n| m.max_batch = Some(n));
    override_all(&mut models, args.context_length, |m, n| m.context_length = Some(n));
    override_all(&mut models, args.gpu_memory_fraction, |m, f| m.gpu_memory_fraction = f);

    check(&server, &models, &adapters)?;
    Ok(Config { server, models, adapters })
}

/// API keys go into an HTTP header and are compared byte for byte: printable ASCII without
/// spaces. The admin key must differ from every user key. Errors never print a key.
fn check_keys(server: &ServerConfig) -> Result<(), ConfigError> {
    let printable = |k: &str| k.bytes().all(|b| (0x21..=0x7e).contains(&b));
    if let Some(i) = server.api_keys.iter().position(|k| !printable(k)) {
        return Err(ConfigError::Invalid(format!(
            "user API key #{} (api_key, api_keys, api_key_file or INFERD_API_KEY) has spaces or characters outside printable ASCII",
            i + 1
        )));
    }
    if let Some(admin) = &server.admin_api_key {
        if !printable(admin) {
            return Err(ConfigError::Invalid("admin_api_key has spaces or characters outside printable ASCII".into()));
        }
        if server.api_keys.iter().any(|k| k == admin) {
            return Err(ConfigError::Invalid("admin_api_key must differ from every user API key".into()));
        }
        if server.open_admin_endpoints {
            return Err(ConfigError::Invalid(
                "open_admin_endpoints = true opens the admin endpoints when there is no admin_api_key; set one or the other".into(),
            ));
        }
    }
    Ok(())
}

/// A model with default settings, served under `id` or the id derived from its spec.
fn model_from_spec(spec: &str, id: Option<&str>) -> ModelConfig {
    ModelConfig {
        id: id.map(str::to_string).unwrap_or_else(|| model_id_from_spec(spec)),
        source: spec.to_string(),
        backend: BackendKind::Candle,
        devices: vec![Device::Cpu],
        device: Device::Cpu,
        max_batch: None,
        gpu_memory_fraction: ModelConfig::DEFAULT_GPU_MEMORY_FRACTION,
        context_length: None,
        prefill_chunk: None,
        kv_cache_mb: None,
        prefix_cache_mb: None,
        tool_call_parser: settings::ToolCallParser::Auto,
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

fn check(server: &ServerConfig, models: &[ModelConfig], adapters: &[AdapterConfig]) -> Result<(), ConfigError> {
    if models.is_empty() {
        return Err(ConfigError::NoModels);
    }
    if server.max_body_bytes < 1024 {
        return Err(ConfigError::Invalid("server.max_body_bytes must be at least 1024".into()));
    }
    if server.max_waiting == 0 {
        return Err(ConfigError::Invalid("server.max_waiting must be at least 1".into()));
    }
    check_keys(server)?;
    for (name, v) in [
        ("header_read_timeout_secs", server.header_read_timeout_secs),
        ("keep_alive_timeout_secs", server.keep_alive_timeout_secs),
        ("body_read_timeout_secs", server.body_read_timeout_secs),
        ("max_connections", server.max_connections as u64),
        ("http2_max_concurrent_streams", u64::from(server.http2_max_concurrent_streams)),
    ] {
        if v == 0 {
            return Err(ConfigError::Invalid(format!("server.{name} must be at least 1")));
        }
    }
    for (i, m) in models.iter().enumerate() {
        if !(m.gpu_memory_fraction > 0.0 && m.gpu_memory_fraction <= 1.0) {
            return Err(ConfigError::Invalid(format!("model '{}': gpu_memory_fraction must be in (0, 1]", m.id)));
        }
        if m.id.trim().is_empty() || m.source.trim().is_empty() {
            return Err(ConfigError::Invalid(format!("models[{i}]: id and source must not be empty")));
        }
        if models[..i].iter().any(|o| o.id == m.id) {
            return Err(ConfigError::Invalid(format!("duplicate model id '{}'", m.id)));
        }
        if m.max_batch == Some(0) || m.prefill_chunk == Some(0) || m.kv_cache_mb == Some(0) {
            return Err(ConfigError::Invalid(format!("model '{}': max_batch, prefill_chunk and kv_cache_mb must be at least 1", m.id)));
        }
        if m.context_length.is_some_and(|c| c < 2) {
            return Err(ConfigError::Invalid(format!("model '{}': context_length must be at least 2", m.id)));
        }
    }
    for (i, a) in adapters.iter().enumerate() {
        if a.name.trim().is_empty() || adapters[..i].iter().any(|o| o.name == a.name) || models.iter().any(|m| m.id == a.name) {
            return Err(ConfigError::Invalid(format!("adapter name '{}' is empty, repeated or the id of a model", a.name)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
