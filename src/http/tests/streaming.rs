//! SSE responses through the full router, parsed back into chunks.
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use futures::StreamExt;
use serde_json::{json, Value};

use super::support::*;
use crate::engine::{Event, FinishReason};

async fn stream_chunks(g: Arc<FakeGen>, path: &str, body: Value) -> (Vec<Value>, Option<String>) {
    let resp = send(app(g), post_json(path, &body)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let ct = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    let data = sse_data(&body_bytes(resp).await);
    let (last, rest) = data.split_last().expect("at least [DONE]");
    assert_eq!(last, "[DONE]");
    let chunks = rest.iter().map(|d| serde_json::from_str(d).expect("chunk is JSON")).collect();
    (chunks, Some(last.clone()))
}

#[tokio::test]
async fn chat_stream_role_deltas_finish_usage_done() {
    let g = Arc::new(FakeGen::new(vec![hello_script()]));
    let body = chat_body(json!({"stream": true, "stream_options": {"include_usage": true}}));
    let (chunks, _) = stream_chunks(g.clone(), "/v1/chat/completions", body).await;
    let p = g.seen()[0].prompt_tokens.len();
    assert_eq!(chunks.len(), 5, "{chunks:?}");
    let id = chunks[0]["id"].as_str().expect("id").to_string();
    assert!(id.starts_with("chatcmpl-"));
    for c in &chunks {
        assert_eq!((c["id"].as_str(), c["object"].as_str(), c["model"].as_str()), (Some(id.as_str()), Some("chat.completion.chunk"), Some(MODEL)));
        assert!(c["created"].is_u64() && c["system_fingerprint"].is_string());
    }
    let choice = |i: usize| chunks[i]["choices"][0].clone();
    assert_eq!(choice(0), json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}));
    assert_eq!(choice(1)["delta"], json!({"content": "Hello"}));
    assert_eq!(choice(2)["delta"], json!({"content": " world"}));
    assert_eq!(choice(3), json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": "stop"}));
    for c in &chunks[..4] {
        assert_eq!(c.get("usage"), Some(&Value::Null), "usage: null on content chunks");
    }
    assert_eq!(chunks[4]["choices"], json!([]));
    assert_eq!(chunks[4]["usage"], json!({"prompt_tokens": p, "completion_tokens": 2, "total_tokens": p + 2, "prompt_tokens_details": {"cached_tokens": 0}}));
}

#[tokio::test]
async fn chat_stream_without_usage_has_no_usage_key() {
    let g = Arc::new(FakeGen::new(vec![hello_script()]));
    let (chunks, _) = stream_chunks(g, "/v1/chat/completions", chat_body(json!({"stream": true}))).await;
    assert_eq!(chunks.len(), 4);
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));
}

#[tokio::test]
async fn chat_stream_n2_interleaves_by_index() {
    let g = Arc::new(FakeGen::new(vec![hello_script(), vec![tok("Yo", 1), done(FinishReason::Length, 0, 1)]]));
    let body = chat_body(json!({"stream": true, "n": 2, "stream_options": {"include_usage": true}}));
    let (chunks, _) = stream_chunks(g.clone(), "/v1/chat/completions", body).await;
    let text = |i: u64| -> String {
        chunks.iter().flat_map(|c| c["choices"].as_array().cloned().unwrap_or_default())
            .filter(|ch| ch["index"] == i).filter_map(|ch| ch["delta"]["content"].as_str().map(str::to_string)).collect()
    };
    assert_eq!((text(0), text(1)), ("Hello world".to_string(), "Yo".to_string()));
    let finishes: Vec<_> = chunks.iter().filter_map(|c| {
        let ch = &c["choices"][0];
        ch["finish_reason"].as_str().map(|f| (ch["index"].as_u64(), f.to_string()))
    }).collect();
    assert_eq!(finishes.len(), 2);
    assert!(finishes.contains(&(Some(0), "stop".into())) && finishes.contains(&(Some(1), "length".into())));
    let roles = chunks.iter().filter(|c| c["choices"][0]["delta"]["role"] == "assistant").count();
    assert_eq!(roles, 2, "one role chunk per choice");
    let p = g.seen()[0].prompt_tokens.len();
    assert_eq!(chunks.last().expect("usage")["usage"]["completion_tokens"], 3);
    assert_eq!(chunks.last().expect("usage")["usage"]["prompt_tokens"], p);
}

#[tokio::test]
async fn completions_stream_with_logprobs() {
    let script = vec![tok_lp("A", 32, -0.1, &[("A", 32, -0.1), ("B", 33, -2.0)]), tok_lp("BC", 4897, -0.2, &[]), done(FinishReason::Stop, 0, 2)];
    let g = Arc::new(FakeGen::new(vec![script]));
    let body = json!({"model": MODEL, "prompt": "x", "stream": true, "logprobs": 2});
    let (chunks, _) = stream_chunks(g, "/v1/completions", body).await;
    assert_eq!(chunks.len(), 3);
    assert!(chunks.iter().all(|c| c["object"] == "text_completion" && c["id"] == chunks[0]["id"]));
    assert_eq!(chunks[0]["choices"][0], json!({"text": "A", "index": 0, "finish_reason": null,
        "logprobs": {"tokens": ["A"], "token_logprobs": [-0.1], "top_logprobs": [{"A": -0.1, "B": -2.0}], "text_offset": [0]}}));
    assert_eq!(chunks[1]["choices"][0]["logprobs"]["text_offset"], json!([1]));
    assert_eq!(chunks[2]["choices"][0], json!({"text": "", "index": 0, "logprobs": null, "finish_reason": "stop"}));
}

#[tokio::test]
async fn engine_error_mid_stream_is_an_error_event_then_done() {
    let g = Arc::new(FakeGen::new(vec![vec![tok("Hel", 1), Event::Error("CUDA out of memory".into())]]));
    let resp = send(app(g), post_json("/v1/chat/completions", &chat_body(json!({"stream": true})))).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let data = sse_data(&body_bytes(resp).await);
    assert_eq!(data.len(), 4, "{data:?}");
    let err: Value = serde_json::from_str(&data[2]).expect("json");
    assert_eq!(err, json!({"error": {"message": "CUDA out of memory", "type": "server_error", "param": null, "code": null}}));
    assert_eq!(data[3], "[DONE]");
}

#[tokio::test]
async fn engine_error_before_output_is_a_500() {
    let g = Arc::new(FakeGen::new(vec![vec![Event::Error("backend failed".into())]]));
    let (s, msg, _, _) = api_error(send(app(g.clone()), post_json("/v1/chat/completions", &chat_body(json!({"stream": true})))).await).await;
    assert_eq!((s, msg.as_str()), (StatusCode::INTERNAL_SERVER_ERROR, "backend failed"));
    let (s, _, _, _) = api_error(send(app(g), post_json("/v1/chat/completions", &chat_body(json!({})))).await).await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
}

#[tokio::test]
async fn dropping_the_stream_closes_the_engine_receiver() {
    let mut g = FakeGen::new(vec![vec![tok("Hello", 9707)]]);
    g.hold_open = true;
    let g = Arc::new(g);
    let resp = send(app(g.clone()), post_json("/v1/chat/completions", &chat_body(json!({"stream": true})))).await;
    let mut body = resp.into_body().into_data_stream();
    let first = body.next().await.expect("a frame").expect("bytes");
    assert!(String::from_utf8_lossy(&first).contains("\"role\":\"assistant\""));
    let sender = g.held.lock().expect("lock")[0].clone();
    assert!(!sender.is_closed(), "receiver alive while the client reads");
    drop(body);
    tokio::time::timeout(Duration::from_secs(2), sender.closed()).await.expect("receiver dropped after disconnect");
}

#[tokio::test]
async fn dropping_a_non_stream_request_closes_the_engine_receiver() {
    let mut g = FakeGen::new(vec![vec![tok("Hello", 9707)]]);
    g.hold_open = true;
    let g = Arc::new(g);
    let task = tokio::spawn(send(app(g.clone()), post_json("/v1/chat/completions", &chat_body(json!({})))));
    let sender = loop {
        if let Some(s) = g.held.lock().expect("lock").first().cloned() {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert!(!sender.is_closed());
    task.abort();
    tokio::time::timeout(Duration::from_secs(2), sender.closed()).await.expect("receiver dropped after abort");
}
