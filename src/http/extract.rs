//! A JSON body extractor whose every rejection is an OpenAI-shaped `ApiError`, so axum's plain-text
//! 400/413/415/422 never reach a client. The Content-Type is not checked: OpenAI clients sometimes
//! omit it and the body is parsed as JSON either way.
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::header::CONTENT_LENGTH;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::ApiError;

/// The parsed body of a POST request.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let rules = req.extensions().get::<BodyRules>().copied().unwrap_or_default();
        let limit = rules.limit;
        // A declared length over the limit is refused before reading anything, so the client
        // gets its 413 at once instead of the server waiting for a body it will reject.
        let declared = req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        if limit > 0 && declared.is_some_and(|len| len > limit as u64) {
            return Err(ApiError::payload_too_large(limit));
        }
        // A body that trickles in (or never comes) must not hold the connection for ever.
        let read = tokio::time::timeout(rules.read_timeout, Bytes::from_request(req, state))
            .await
            .map_err(|_| ApiError::body_timeout(rules.read_timeout.as_secs()))?;
        let bytes = read.map_err(|rej| {
            if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::payload_too_large(limit)
            } else {
                ApiError::invalid(format!("Could not read the request body: {rej}"), None)
            }
        })?;
        parse_body(&bytes).map(ApiJson)
    }
}

/// The configured body limit and read timeout, put into request extensions by the router (so
/// the 413 message can name the limit).
#[derive(Debug, Clone, Copy)]
pub struct BodyRules {
    pub limit: usize,
    pub read_timeout: std::time::Duration,
}

impl Default for BodyRules {
    fn default() -> Self {
        Self { limit: 0, read_timeout: std::time::Duration::from_secs(super::state::Limits::DEFAULT_BODY_READ_TIMEOUT_SECS) }
    }
}

/// Parses a request body: it must be a JSON object that deserialises into `T`. On a type error the
/// offending top-level field is found and named in `param`.
pub fn parse_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::invalid(
            format!("We could not parse the JSON body of your request. ({e}) The OpenAI API expects a JSON payload."),
            None,
        )
    })?;
    let Value::Object(map) = &value else {
        return Err(ApiError::invalid("The request body must be a JSON object.", None));
    };
    match serde_json::from_value::<T>(value.clone()) {
        Ok(t) => Ok(t),
        Err(whole) => {
            // Every request field is optional, so deserialising one field alone isolates the culprit.
            for (key, v) in map {
                let mut single = serde_json::Map::new();
                single.insert(key.clone(), v.clone());
                if let Err(e) = serde_json::from_value::<T>(Value::Object(single)) {
                    return Err(ApiError::invalid(format!("Invalid value for '{key}': {e}"), Some(key)));
                }
            }
            Err(ApiError::invalid(format!("Invalid request body: {whole}"), None))
        }
    }
}
