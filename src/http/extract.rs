//! A JSON body extractor whose every rejection is an OpenAI-shaped `ApiError`, so axum's plain-text
//! 400/413/415/422 never reach a client. The Content-Type is not checked: OpenAI clients sometimes
//! omit it and the body is parsed as JSON either way.
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::ApiError;

/// The parsed body of a POST request.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let limit = req.extensions().get::<BodyLimit>().map(|l| l.0).unwrap_or(0);
        let bytes = Bytes::from_request(req, state).await.map_err(|rej| {
            if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::payload_too_large(limit)
            } else {
                ApiError::invalid(format!("Could not read the request body: {rej}"), None)
            }
        })?;
        parse_body(&bytes).map(ApiJson)
    }
}

/// The configured body limit, put into request extensions by the router so the 413 message can
/// name it.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

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
