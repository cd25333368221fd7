//! LoRA adapter management with vLLM's request shapes: `POST /v1/load_lora_adapter`
//! (`lora_name`, `lora_path`, optional `base_model_name` and `load_inplace`),
//! `POST /v1/unload_lora_adapter` (`lora_name`), and `GET /v1/lora_adapters` (a listing).
//! Loading reads only below the configured root and happens off the async runtime.
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::extract::ApiJson;
use super::respond::blocking;
use super::state::AppState;
use crate::lora::LoraError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadRequest {
    pub lora_name: String,
    pub lora_path: String,
    #[serde(default)]
    pub base_model_name: Option<String>,
    /// Replace an adapter already loaded under this name (vLLM's flag).
    #[serde(default)]
    pub load_inplace: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnloadRequest {
    pub lora_name: String,
    #[serde(default)]
    pub lora_int_id: Option<i64>,
}

fn api(e: LoraError) -> ApiError {
    match e.status {
        404 => ApiError::not_found(e.message).with_code("lora_not_found"),
        400 => ApiError::invalid(e.message, None).with_code("invalid_lora"),
        _ => ApiError::internal(e.message),
    }
}

/// Loads (or with `load_inplace`, replaces) an adapter. Requests already running keep the
/// version they started with.
pub async fn load(State(state): State<AppState>, ApiJson(req): ApiJson<LoadRequest>) -> Result<String, ApiError> {
    let reg = state.adapters.clone();
    let path = reg.runtime_path(&req.lora_path).map_err(api)?;
    let name = req.lora_name.clone();
    let t = std::time::Instant::now();
    blocking(move || {
        reg.load(&req.lora_name, &path, req.base_model_name.as_deref(), req.load_inplace).map(|_| ()).map_err(api)
    })
    .await?;
    tracing::info!(adapter = %name, ms = t.elapsed().as_millis() as u64, "LoRA adapter loaded at run time");
    Ok(format!("Success: LoRA adapter '{name}' added successfully."))
}

/// Stops serving an adapter by name.
pub async fn unload(State(state): State<AppState>, ApiJson(req): ApiJson<UnloadRequest>) -> Result<String, ApiError> {
    state.adapters.require_runtime_loading().map_err(api)?;
    state.adapters.unload(&req.lora_name).map_err(api)?;
    Ok(format!("Success: LoRA adapter '{}' removed successfully.", req.lora_name))
}

/// The served adapters with their base model, rank, size and source.
pub async fn list(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let data: Vec<Value> = state
        .adapters
        .list()
        .into_iter()
        .map(|(name, s)| {
            json!({"name": name, "base_model": s.base, "path": s.adapter.path.display().to_string(),
                   "format": s.adapter.format, "rank": s.adapter.rank, "bytes": s.adapter.bytes()})
        })
        .collect();
    (StatusCode::OK, Json(json!({"object": "list", "data": data, "runtime_loading": state.adapters.runtime_loading()})))
}
