//! Every error status through the full router, each with the OpenAI error body.
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::json;

use super::support::*;
use crate::engine::SubmitError;
use crate::http::state::Limits;

fn raw_post(path: &str, body: &str, content_type: Option<&str>) -> Request<Body> {
    let mut b = Request::post(path);
    if let Some(ct) = content_type {
        b = b.header("content-type", ct);
    }
    b.body(Body::from(body.to_string())).expect("request")
}

#[tokio::test]
async fn malformed_json_is_400() {
    let g = Arc::new(FakeGen::new(vec![hello_script()]));
    let (s, msg, param, _) = api_error(send(app(g), raw_post("/v1/chat/completions", "{\"model\": ", Some("application/json"))).await).await;
    assert_eq!((s, param), (StatusCode::BAD_REQUEST, json!(null)));
    assert!(msg.contains("We could not parse the JSON body"), "{msg}");
}

#[tokio::test]
async fn missing_or_wrong_content_type_is_still_parsed() {
    let g = Arc::new(FakeGen::new(vec![hello_script()]));
    let body = chat_body(json!({})).to_string();
    let (s, v) = json_of(send(app(g.clone()), raw_post("/v1/chat/completions", &body, None)).await).await;
    assert_eq!((s, v["choices"][0]["message"]["content"].as_str()), (StatusCode::OK, Some("Hello world")));
    let (s, _) = json_of(send(app(g.clone()), raw_post("/v1/chat/completions", &body, Some("text/plain"))).await).await;
    assert_eq!(s, StatusCode::OK);
    let (s, msg, _, _) = api_error(send(app(g), raw_post("/v1/completions", "model=x", Some("application/x-www-form-urlencoded"))).await).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(msg.contains("could not parse the JSON body"));
}

#[tokio::test]
async fn wrong_type_out_of_range_unknown_role_too_long() {
    let g = Arc::new(FakeGen::new(vec![hello_script()]));
    let cases = [
        (chat_body(json!({"temperature": "hot"})), "temperature", "Invalid value for 'temperature'"),
        (chat_body(json!({"top_p": 5})), "top_p", "(0, 1]"),
        (chat_body(json!({"messages": [{"role": "robot", "content": "x"}]})), "messages[0].role", "'robot'"),
        (chat_body(json!({"max_tokens": 5000})), "messages", "maximum context length is 4096 tokens"),
        (json!({"messages": [{"role": "user", "content": "x"}]}), "model", "you must provide a model parameter"),
    ];
    for (body, want_param, fragment) in cases {
        let (s, msg, param, _) = api_error(send(app(g.clone()), post_json("/v1/chat/completions", &body)).await).await;
        assert_eq!((s, param), (StatusCode::BAD_REQUEST, json!(want_param)), "{msg}");
        assert!(msg.contains(fragment), "{msg} lacks {fragment}");
    }
    assert!(g.seen().is_empty(), "nothing invalid reaches the engine");
}

#[tokio::test]
async fn too_long_prompt_is_400_context_length_exceeded() {
    let mut g = FakeGen::new(vec![hello_script()]);
    g.ctx = 8;
    let body = json!({"model": MODEL, "prompt": "one two three four five six seven eight nine"});
    let (s, msg, param, code) = api_error(send(app(Arc::new(g)), post_json("/v1/completions", &body)).await).await;
    assert_eq!((s, param, code), (StatusCode::BAD_REQUEST, json!("prompt"), json!("context_length_exceeded")));
    assert!(msg.starts_with("This model's maximum context length is 8 tokens. However, your prompt resulted in 9 tokens."), "{msg}");
}

#[tokio::test]
async fn unknown_model_is_404() {
    let g = Arc::new(FakeGen::new(vec![hello_script()]));
    let body = json!({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]});
    let (s, msg, param, code) = api_error(send(app(g), post_json("/v1/chat/completions", &body)).await).await;
    assert_eq!((s, param, code), (StatusCode::NOT_FOUND, json!("model"), json!("model_not_found")));
    assert_eq!(msg, "The model `gpt-9` does not exist or you do not have access to it.");
}

#[tokio::test]
async fn body_over_limit_is_413_json() {
    let g = Arc::new(FakeGen::new(vec![hello_script()]));
    let router = crate::http::router(state_with(g, Limits { max_body_bytes: 2048, ..Limits::default() }));
    let body = chat_body(json!({"messages": [{"role": "user", "content": "x".repeat(4000)}]}));
    let (s, msg, _, code) = api_error(send(router.clone(), post_json("/v1/chat/completions", &body)).await).await;
    assert_eq!((s, code), (StatusCode::PAYLOAD_TOO_LARGE, json!("request_too_large")));
    assert!(msg.contains("the limit is 2048 bytes"), "{msg}");
    // Without a Content-Length (streamed body) the limit still holds.
    let stream = futures::stream::iter(vec![Ok::<_, std::io::Error>(axum::body::Bytes::from(body.to_string()))]);
    let req = Request::post("/v1/chat/completions").body(Body::from_stream(stream)).expect("request");
    let (s, _, _, _) = api_error(send(router, req).await).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn queue_full_is_429_with_retry_after() {
    let mut g = FakeGen::new(vec![hello_script()]);
    g.refuse = Some(SubmitError::QueueFull { retry_after_secs: 3 });
    let resp = send(app(Arc::new(g)), post_json("/v1/chat/completions", &chat_body(json!({})))).await;
    assert_eq!(resp.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("3"));
    let (s, _, _, code) = api_error(resp).await;
    assert_eq!((s, code), (StatusCode::TOO_MANY_REQUESTS, json!("queue_full")));
}

#[tokio::test]
async fn stopped_worker_is_503() {
    let mut g = FakeGen::new(vec![hello_script()]);
    g.refuse = Some(SubmitError::Closed);
    let (s, _, _, _) = api_error(send(app(Arc::new(g)), post_json("/v1/completions", &json!({"model": MODEL, "prompt": "x"}))).await).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn unknown_route_404_and_wrong_method_405() {
    let g = Arc::new(FakeGen::new(vec![hello_script()]));
    let (s, msg, _, code) = api_error(send(app(g.clone()), get("/v1/nothing")).await).await;
    assert_eq!((s, msg.as_str(), code), (StatusCode::NOT_FOUND, "Invalid URL (GET /v1/nothing)", json!("unknown_url")));
    let (s, msg, _, _) = api_error(send(app(g.clone()), get("/v1/chat/completions")).await).await;
    assert_eq!((s, msg.as_str()), (StatusCode::METHOD_NOT_ALLOWED, "Method GET is not allowed for /v1/chat/completions"));
    let (s, _, _, _) = api_error(send(app(g), post_json("/v1/models", &json!({}))).await).await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn model_without_chat_template_is_400() {
    let g: Arc<FakeGen> = Arc::new(FakeGen::new(vec![hello_script()]));
    let mut e = entry(g, MODEL);
    e.chat_template = None;
    let router = crate::http::router(crate::http::AppState::new(vec![e], Limits::default()));
    let (s, msg, param, _) = api_error(send(router, post_json("/v1/chat/completions", &chat_body(json!({})))).await).await;
    assert_eq!((s, param), (StatusCode::BAD_REQUEST, json!("model")));
    assert!(msg.contains("has no chat template"), "{msg}");
}

struct PanickingGen;

impl crate::http::Generator for PanickingGen {
    fn submit(&self, _req: crate::engine::GenRequest) -> Result<tokio::sync::mpsc::Receiver<crate::engine::Event>, SubmitError> {
        panic!("bug in the engine handle")
    }
    fn max_context(&self) -> usize {
        4096
    }
}

#[tokio::test]
async fn a_panicking_handler_is_a_json_500() {
    let state = crate::http::AppState::new(vec![entry(Arc::new(PanickingGen), MODEL)], Limits::default());
    let resp = send(crate::http::router(state), post_json("/v1/chat/completions", &chat_body(json!({})))).await;
    let (s, msg, _, _) = api_error(resp).await;
    assert_eq!((s, msg.as_str()), (StatusCode::INTERNAL_SERVER_ERROR, "The server had an error while processing your request."));
}
