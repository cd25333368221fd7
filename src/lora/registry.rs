//! Which adapters are served: name -> (base model, current version), with run-time loading
//! restricted to a root directory and a memory budget.
//!
//! A request resolves its `model` once, at admission, and keeps the `Arc` of the version it got
//! (a lease): loading a new version under the same name, or unloading it, only changes what
//! later requests get. Loads are serialised, read and checked off the async runtime by the
//! caller, and only replace the registry entry once the new version is fully valid, so a bad
//! adapter leaves everything as it was.
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::adapter::{live_bytes, BaseDims, LoraAdapter};
use super::formats::read_adapter;

/// Why an adapter operation failed; `status` is the HTTP status to answer with.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraError {
    pub status: u16,
    pub message: String,
}

impl LoraError {
    fn bad(message: impl Into<String>) -> Self {
        Self { status: 400, message: message.into() }
    }
    fn not_found(message: impl Into<String>) -> Self {
        Self { status: 404, message: message.into() }
    }
}

impl std::fmt::Display for LoraError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// A served adapter version.
#[derive(Debug, Clone)]
pub struct Served {
    pub base: String,
    pub adapter: Arc<LoraAdapter>,
}

#[derive(Debug, Default)]
pub struct RegistryConfig {
    /// Some: `POST /v1/load_lora_adapter` may load adapters found below this directory.
    pub runtime_root: Option<PathBuf>,
    /// Most bytes all live adapter weights may take (loaded ones and old versions still leased).
    pub budget_bytes: usize,
}

pub struct AdapterRegistry {
    cfg: RegistryConfig,
    /// Base model id -> the sizes adapters must fit (None: its backend cannot apply adapters).
    bases: HashMap<String, Option<BaseDims>>,
    served: Mutex<HashMap<String, Served>>,
    /// Serialises loads: two loads never race for the budget or the same name.
    load_turn: Mutex<()>,
}

impl AdapterRegistry {
    pub fn new(cfg: RegistryConfig, bases: HashMap<String, Option<BaseDims>>) -> Self {
        Self { cfg, bases, served: Mutex::new(HashMap::new()), load_turn: Mutex::new(()) }
    }

    /// No adapters and no run-time loading.
    pub fn empty() -> Self {
        Self::new(RegistryConfig::default(), HashMap::new())
    }

    pub fn runtime_loading(&self) -> bool {
        self.cfg.runtime_root.is_some()
    }

    /// The error of the run-time endpoints while run-time loading is off.
    pub fn require_runtime_loading(&self) -> Result<&Path, LoraError> {
        self.cfg.runtime_root.as_deref().ok_or_else(|| {
            LoraError::not_found("run-time LoRA loading is disabled (set [server] lora_runtime_loading = true and lora_root)")
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Served>> {
        self.served.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current version served under `name`.
    pub fn resolve(&self, name: &str) -> Option<Served> {
        self.lock().get(name).cloned()
    }

    /// Every served adapter, by name.
    pub fn list(&self) -> Vec<(String, Served)> {
        let mut v: Vec<_> = self.lock().iter().map(|(k, s)| (k.clone(), s.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// The single base model, when there is exactly one (run-time loads may leave it out).
    pub fn only_base(&self) -> Option<&str> {
        let mut it = self.bases.keys();
        match (it.next(), it.next()) {
            (Some(b), None) => Some(b),
            _ => None,
        }
    }

    /// Resolves a client-given path below the run-time root: relative to the root or absolute,
    /// and after following symlinks still inside it. Anything else is refused.
    pub fn runtime_path(&self, raw: &str) -> Result<PathBuf, LoraError> {
        let root = self.require_runtime_loading()?;
        if raw.is_empty() {
            return Err(LoraError::bad("lora_path is empty"));
        }
        let p = Path::new(raw);
        if p.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(LoraError::bad(format!("lora_path '{raw}' must not contain '..'")));
        }
        let root = root
            .canonicalize()
            .map_err(|e| LoraError { status: 500, message: format!("the adapter root {} is unusable: {e}", root.display()) })?;
        let joined = if p.is_absolute() { p.to_path_buf() } else { root.join(p) };
        let real = joined.canonicalize().map_err(|_| LoraError::bad(format!("lora_path '{raw}' does not exist")))?;
        if !real.starts_with(&root) {
            return Err(LoraError::bad(format!("lora_path '{raw}' is outside the adapter root {}", root.display())));
        }
        Ok(real)
    }

    /// Reads the adapter in `dir`, checks it against `base` and the budget, then serves it as
    /// `name` (replacing the current version only when `replace`). Blocking: call it off the
    /// async runtime. On any error nothing changes.
    pub fn load(&self, name: &str, dir: &Path, base: Option<&str>, replace: bool) -> Result<Arc<LoraAdapter>, LoraError> {
        let _turn = self.load_turn.lock().unwrap_or_else(|e| e.into_inner());
        if name.trim().is_empty() || name.len() > 256 {
            return Err(LoraError::bad("lora_name must be 1 to 256 characters"));
        }
        if self.bases.contains_key(name) {
            return Err(LoraError::bad(format!("'{name}' is the id of a base model; pick another adapter name")));
        }
        let base = match base {
            Some(b) => b.to_string(),
            None => self.only_base().map(str::to_string).ok_or_else(|| {
                LoraError::bad("several base models are served: name one with base_model_name")
            })?,
        };
        let dims = match self.bases.get(&base) {
            None => return Err(LoraError::not_found(format!("base model '{base}' is not served"))),
            Some(None) => return Err(LoraError::bad(format!("model '{base}' cannot apply LoRA adapters"))),
            Some(Some(d)) => *d,
        };
        if !replace && self.lock().contains_key(name) {
            return Err(LoraError::bad(format!("the adapter '{name}' is already loaded (pass load_inplace: true to replace it)")));
        }
        let adapter = read_adapter(name, dir).map_err(|e| LoraError::bad(format!("adapter '{name}': {e}")))?;
        let adapter = adapter.bind(&dims).map_err(|e| LoraError::bad(format!("adapter '{name}' does not fit '{base}': {e}")))?;
        // live_bytes() already counts the new adapter; a version this load replaces stays counted
        // until the last request holding it ends.
        if live_bytes() > self.cfg.budget_bytes {
            return Err(LoraError::bad(format!(
                "adapter '{name}' ({} MiB) would exceed the LoRA memory budget of {} MiB; unload another adapter first",
                adapter.bytes() >> 20,
                self.cfg.budget_bytes >> 20
            )));
        }
        let adapter = Arc::new(adapter);
        self.lock().insert(name.to_string(), Served { base, adapter: Arc::clone(&adapter) });
        tracing::info!(adapter = name, rank = adapter.rank, bytes = adapter.bytes(), format = adapter.format, "LoRA adapter loaded");
        Ok(adapter)
    }

    /// Stops serving `name`; requests already holding it finish with it.
    pub fn unload(&self, name: &str) -> Result<(), LoraError> {
        match self.lock().remove(name) {
            Some(_) => {
                tracing::info!(adapter = name, "LoRA adapter unloaded");
                Ok(())
            }
            None => Err(LoraError::not_found(format!("the adapter '{name}' is not loaded"))),
        }
    }
}
