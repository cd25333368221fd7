//! `GET /v1/models`, `GET /v1/models/{id}`, `GET /health`, `GET /ready`.
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::error::ApiError;
use super::state::{AppState, ModelEntry};
use super::types::{ModelList, ModelObject};

fn object(m: &ModelEntry) -> ModelObject {
    ModelObject { id: m.id.clone(), object: "model", created: m.created, owned_by: m.owned_by.clone(), parent: None, root: None }
}

fn adapter_object(state: &AppState, name: &str, s: &crate::lora::Served) -> ModelObject {
    ModelObject {
        id: name.to_string(),
        object: "model",
        created: state.model(&s.base).map_or(0, |m| m.created),
        owned_by: "inferd".into(),
        parent: Some(s.base.clone()),
        root: Some(s.adapter.path.display().to_string()),
    }
}

/// Lists the served models, then the LoRA adapters (each with its base model as `parent`).
pub async fn list(State(state): State<AppState>) -> Json<ModelList> {
    let mut data: Vec<ModelObject> = state.models().map(object).collect();
    data.extend(state.adapters.list().iter().map(|(n, s)| adapter_object(&state, n, s)));
    Json(ModelList { object: "list", data })
}

/// One served model; ids may contain `/` (hub ids).
pub async fn retrieve(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<ModelObject>, ApiError> {
    let Path(id) = id.map_err(|e| ApiError::invalid(format!("Invalid model id in the path: {e}"), Some("model")))?;
    if let Some(m) = state.model(&id) {
        return Ok(Json(object(m)));
    }
    state.adapters.resolve(&id).map(|s| Json(adapter_object(&state, &id, &s))).ok_or_else(|| ApiError::model_not_found(&id))
}

/// Liveness: the process answers.
pub async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Readiness: 200 when every model's worker is alive, else 503 naming the ones that are not.
pub async fn ready(State(state): State<AppState>) -> Response {
    let down: Vec<&str> = state.models().filter(|m| !m.generator.is_alive()).map(|m| m.id.as_str()).collect();
    if down.is_empty() {
        Json(json!({"status": "ready"})).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "not_ready", "models_down": down}))).into_response()
    }
}
