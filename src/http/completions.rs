//! `POST /v1/completions` (legacy text completions).
use axum::extract::State;
use axum::response::Response;

use super::error::ApiError;
use super::extract::ApiJson;
use super::respond::{blocking, new_meta, respond};
use super::sse::Mode;
use super::state::AppState;
use super::types::CompletionRequest;
use super::validate::{require_model, validate_completion};

/// Continues a raw prompt (text or token ids) and generates `n` choices.
pub async fn completions(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let model_id = require_model(&req.common)?.to_string();
    let (entry, adapter) = state.resolve(&model_id)?;
    let max_n = state.limits.max_n;
    let generator = entry.generator.clone();
    let validated = blocking(move || validate_completion(&req, &entry, max_n).map_err(ApiError::from)).await?
        .with_adapter(adapter);
    let meta = new_meta(&state, "cmpl", &model_id);
    Ok(respond(Mode::Text, meta, validated, generator, state.limits.request_timeout).await)
}
