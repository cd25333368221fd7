//! `POST /tokenize` and `POST /detokenize`: the model's own tokenizer over HTTP, in the shapes
//! vLLM and llama.cpp's server answer (clients count prompt tokens or build prompts of an exact
//! length with them; `bench/bench.py` does).
//!
//! - `/tokenize` takes `prompt` (vLLM) or `content` (llama.cpp), or chat `messages` rendered with
//!   the model's template (`add_generation_prompt`, default true). `add_special_tokens` (vLLM) or
//!   `add_special` (llama.cpp) decides whether the tokenizer adds its special tokens to a prompt
//!   (default true, as `/v1/completions` does; a rendered chat already holds them: default
//!   false). Answers `{"tokens", "count", "max_model_len"}`.
//! - `/detokenize` takes `tokens` and answers the text as both `prompt` (vLLM) and `content`
//!   (llama.cpp).
//!
//! `model` may be left out when one model is served. Unknown models are 404, everything else a
//! client gets wrong is a 400 naming the field.
use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::extract::ApiJson;
use super::messages::chat_messages;
use super::respond::blocking;
use super::state::{AppState, ModelEntry};
use super::validate::{encode, token_ids};

/// `POST /tokenize` body.
#[derive(Debug, Default, Deserialize)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub content: Option<String>,
    pub messages: Option<Vec<Value>>,
    pub add_generation_prompt: Option<bool>,
    pub add_special_tokens: Option<bool>,
    pub add_special: Option<bool>,
}

/// `POST /detokenize` body.
#[derive(Debug, Default, Deserialize)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Option<Vec<i64>>,
}

/// The base model a request names (an adapter name means its base: adapters share its
/// tokenizer), or the only served model when none is named.
fn model_for(state: &AppState, model: Option<&str>) -> Result<ModelEntry, ApiError> {
    match model {
        Some(id) if !id.is_empty() => Ok(state.resolve(id)?.0),
        _ => {
            let mut all = state.models();
            match (all.next(), all.next()) {
                (Some(m), None) => Ok(m.clone()),
                _ => Err(ApiError::invalid("you must provide a model parameter", Some("model"))),
            }
        }
    }
}

/// Token ids of a prompt or of rendered chat messages.
pub async fn tokenize(State(state): State<AppState>, ApiJson(req): ApiJson<TokenizeRequest>) -> Result<Json<Value>, ApiError> {
    let model = model_for(&state, req.model.as_deref())?;
    let ctx = model.generator.max_context();
    let ids = blocking(move || tokens_of(&req, &model)).await?;
    Ok(Json(json!({"tokens": ids, "count": ids.len(), "max_model_len": ctx})))
}

fn tokens_of(req: &TokenizeRequest, model: &ModelEntry) -> Result<Vec<u32>, ApiError> {
    let special = req.add_special_tokens.or(req.add_special);
    let (text, param, special) = match (&req.prompt, &req.content, &req.messages) {
        (Some(p), None, None) => (p.clone(), "prompt", special.unwrap_or(true)),
        (None, Some(c), None) => (c.clone(), "content", special.unwrap_or(true)),
        (None, None, Some(m)) => (render_chat(model, m, req.add_generation_prompt.unwrap_or(true))?, "messages", special.unwrap_or(false)),
        (None, None, None) => {
            return Err(ApiError::invalid("Missing required parameter: one of 'prompt', 'content' or 'messages'.", Some("prompt")))
        }
        _ => return Err(ApiError::invalid("Give only one of 'prompt', 'content' and 'messages'.", Some("prompt"))),
    };
    Ok(encode(model, &text, special, param)?)
}

fn render_chat(model: &ModelEntry, messages: &[Value], add_generation_prompt: bool) -> Result<String, ApiError> {
    let Some(template) = &model.chat_template else {
        let msg = format!("The model `{}` has no chat template; tokenize a 'prompt' instead.", model.id);
        return Err(ApiError::invalid(msg, Some("messages")));
    };
    if messages.is_empty() {
        return Err(ApiError::invalid("'messages' must contain at least one message.", Some("messages")));
    }
    let messages = chat_messages(messages)?;
    template
        .render(&messages, None, add_generation_prompt)
        .map_err(|e| ApiError::invalid(format!("Could not apply the chat template: {e}"), Some("messages")))
}

/// The text of token ids (special tokens included, as llama.cpp and vLLM show them).
pub async fn detokenize(State(state): State<AppState>, ApiJson(req): ApiJson<DetokenizeRequest>) -> Result<Json<Value>, ApiError> {
    let model = model_for(&state, req.model.as_deref())?;
    let Some(tokens) = req.tokens else {
        return Err(ApiError::invalid("Missing required parameter: 'tokens'.", Some("tokens")));
    };
    let text = blocking(move || {
        let ids = token_ids(&tokens, &model, "tokens")?;
        model.tokenizer.decode(&ids, false).map_err(|e| ApiError::invalid(format!("Could not decode the tokens: {e}"), Some("tokens")))
    })
    .await?;
    Ok(Json(json!({"prompt": text, "content": text})))
}
