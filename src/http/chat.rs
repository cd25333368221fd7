//! `POST /v1/chat/completions`.
use axum::extract::State;
use axum::response::Response;

use super::error::ApiError;
use super::extract::ApiJson;
use super::respond::{blocking, new_meta, respond};
use super::sse::Mode;
use super::state::AppState;
use super::types::ChatCompletionRequest;
use super::validate::{require_model, validate_chat};

/// Renders the conversation with the model's chat template and generates `n` choices.
pub async fn chat_completions(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let model_id = require_model(&req.common)?.to_string();
    let (entry, adapter) = state.resolve(&model_id)?;
    let max_n = state.limits.max_n;
    let generator = entry.generator.clone();
    let validated = blocking(move || validate_chat(&req, &entry, max_n).map_err(ApiError::from)).await?
        .with_adapter(adapter);
    let meta = new_meta(&state, "chatcmpl", &model_id);
    Ok(respond(Mode::Chat, meta, validated, generator, state.limits.request_timeout).await)
}
