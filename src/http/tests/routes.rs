//! Non-streaming routes through the full router.
use std::sync::Arc;

use axum::http::StatusCode;
use serde_json::json;

use super::support::*;
use crate::engine::FinishReason;
use crate::http::state::{AppState, Limits};

#[tokio::test]
async fn health_ready_and_models() {
    let g = Arc::new(FakeGen::new(vec![hello_script()]));
    let (s, v) = json_of(send(app(g.clone()), get("/health")).await).await;
    assert_eq!((s, v), (StatusCode::OK, json!({"status": "ok"})));
    let (s, v) = json_of(send(app(g.clone()), get("/ready")).await).await;
    assert_eq!((s, v["status"].as_str()), (StatusCode::OK, Some("ready")));
    let (s, v) = json_of(send(app(g.clone()), get("/v1/models")).await).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v, json!({"object": "list", "data": [{"id": MODEL, "object": "model", "created": 1_700_000_000u64, "owned_by": "inferd"}]}));
    let (s, v) = json_of(send(app(g.clone()), get("/v1/models/test-model")).await).await;
    assert_eq!((s, v["id"].as_str(), v["object"].as_str()), (StatusCode::OK, Some(MODEL), Some("model")));
    let (s, _, param, code) = api_error(send(app(g), get("/v1/models/nope")).await).await;
    assert_eq!((s, param, code), (StatusCode::NOT_FOUND, json!("model"), json!("model_not_found")));
}

#[tokio::test]
async fn ready_is_503_when_a_worker_died_and_hub_ids_route() {
    let mut dead = FakeGen::new(vec![hello_script()]);
    dead.alive = false;
    let live: Arc<FakeGen> = Arc::new(FakeGen::new(vec![hello_script()]));
    let state = AppState::new(vec![entry(live, "org/live"), entry(Arc::new(dead), "dead")], Limits::default());
    let (s, v) = json_of(send(crate::http::router(state.clone()), get("/ready")).await).await;
    assert_eq!((s, v["models_down"].clone()), (StatusCode::SERVICE_UNAVAILABLE, json!(["dead"])));
    let (s, v) = json_of(send(crate::http::router(state), get("/v1/models/org/live")).await).await;
    assert_eq!((s, v["id"].as_str()), (StatusCode::OK, Some("org/live")));
}

#[tokio::test]
async fn chat_completion_non_stream() {
    let g = Arc::new(FakeGen::new(vec![hello_script()]));
    let body = chat_body(json!({"max_tokens": 10, "temperature": 0.7, "stop": ["END"]}));
    let (s, v) = json_of(send(app(g.clone()), post_json("/v1/chat/completions", &body)).await).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(v["id"].as_str().is_some_and(|id| id.starts_with("chatcmpl-") && id.len() == 33), "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], MODEL);
    assert!(v["created"].as_u64().is_some_and(|c| c > 1_700_000_000));
    assert_eq!(v["system_fingerprint"], format!("fp_inferd_{}", env!("CARGO_PKG_VERSION")));
    let seen = g.seen();
    let p = seen[0].prompt_tokens.len();
    assert_eq!(v["choices"], json!([{"index": 0, "message": {"role": "assistant", "content": "Hello world", "refusal": null},
        "logprobs": null, "finish_reason": "stop"}]));
    assert_eq!(v["usage"], json!({"prompt_tokens": p, "completion_tokens": 2, "total_tokens": p + 2, "prompt_tokens_details": {"cached_tokens": 0}}));
    assert_eq!(seen.len(), 1);
    assert_eq!((seen[0].max_new_tokens, seen[0].sampling.temperature, seen[0].stop.clone()), (10, 0.7, vec!["END".to_string()]));
}

#[tokio::test]
async fn chat_n2_counts_prompt_once_and_sums_completions() {
    let second = vec![tok("Bye", 1), done(FinishReason::Length, 0, 1)];
    let g = Arc::new(FakeGen::new(vec![hello_script(), second]));
    let body = chat_body(json!({"n": 2, "seed": 7}));
    let (s, v) = json_of(send(app(g.clone()), post_json("/v1/chat/completions", &body)).await).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let p = g.seen()[0].prompt_tokens.len();
    assert_eq!(v["choices"][0]["message"]["content"], "Hello world");
    assert_eq!(v["choices"][1]["message"]["content"], "Bye");
    assert_eq!((v["choices"][1]["index"].clone(), v["choices"][1]["finish_reason"].clone()), (json!(1), json!("length")));
    assert_eq!(v["usage"], json!({"prompt_tokens": p, "completion_tokens": 3, "total_tokens": p + 3, "prompt_tokens_details": {"cached_tokens": 0}}));
    let seeds: Vec<_> = g.seen().iter().map(|r| r.sampling.seed).collect();
    assert_eq!(seeds, vec![Some(7), Some(8)]);
}

#[tokio::test]
async fn chat_logprobs_shape() {
    let script = vec![tok_lp("Hi", 13048, -0.25, &[("Hi", 13048, -0.25), ("Hey", 18665, -1.5)]), done(FinishReason::Stop, 0, 1)];
    let g = Arc::new(FakeGen::new(vec![script]));
    let body = chat_body(json!({"logprobs": true, "top_logprobs": 2}));
    let (_, v) = json_of(send(app(g.clone()), post_json("/v1/chat/completions", &body)).await).await;
    assert_eq!(g.seen()[0].logprobs, Some(2));
    assert_eq!(v["choices"][0]["logprobs"], json!({"content": [{"token": "Hi", "logprob": -0.25, "bytes": [72, 105],
        "top_logprobs": [{"token": "Hi", "logprob": -0.25, "bytes": [72, 105]}, {"token": "Hey", "logprob": -1.5, "bytes": [72, 101, 121]}]}],
        "refusal": null}));
}

#[tokio::test]
async fn completions_non_stream_with_logprobs() {
    let script = vec![
        tok_lp(" big", 2409, -0.5, &[(" big", 2409, -0.5)]),
        tok_lp(" cat", 8251, -1.0, &[(" cat", 8251, -1.0)]),
        done(FinishReason::Length, 0, 2),
    ];
    let g = Arc::new(FakeGen::new(vec![script]));
    let body = json!({"model": MODEL, "prompt": "Hello world", "max_tokens": 2, "logprobs": 1});
    let (s, v) = json_of(send(app(g.clone()), post_json("/v1/completions", &body)).await).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(v["id"].as_str().is_some_and(|id| id.starts_with("cmpl-")));
    assert_eq!(v["object"], "text_completion");
    assert_eq!(g.seen()[0].prompt_tokens, vec![9707, 1879]);
    assert_eq!(v["choices"], json!([{"text": " big cat", "index": 0, "finish_reason": "length", "logprobs": {
        "tokens": [" big", " cat"], "token_logprobs": [-0.5, -1.0],
        "top_logprobs": [{" big": -0.5}, {" cat": -1.0}], "text_offset": [0, 4]}}]));
    assert_eq!(v["usage"], json!({"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4, "prompt_tokens_details": {"cached_tokens": 0}}));
}

#[tokio::test]
async fn api_key_is_enforced_on_v1_only() {
    let g = Arc::new(FakeGen::new(vec![hello_script()]));
    let limits = Limits { auth: crate::http::auth::Auth::user_key("sk-secret"), ..Limits::default() };
    let router = crate::http::router(state_with(g, limits));
    let (s, _, _, code) = api_error(send(router.clone(), get("/v1/models")).await).await;
    assert_eq!((s, code), (StatusCode::UNAUTHORIZED, json!("invalid_api_key")));
    let req = axum::http::Request::get("/v1/models").header("authorization", "Bearer sk-secret").body(axum::body::Body::empty()).expect("request");
    assert_eq!(send(router.clone(), req).await.status(), StatusCode::OK);
    assert_eq!(send(router, get("/health")).await.status(), StatusCode::OK);
}
