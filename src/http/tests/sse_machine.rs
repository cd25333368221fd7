//! The chunk state machine alone, without a server.
use serde_json::json;

use super::support::{done, tok, tok_lp};
use crate::engine::{Event, FinishReason};
use crate::http::sse::{Frame, Mode, ResponseMeta, StreamAssembler};

fn meta() -> ResponseMeta {
    ResponseMeta { id: "chatcmpl-x".into(), created: 1, model: "m".into(), system_fingerprint: "fp".into() }
}

fn data(f: &Frame) -> serde_json::Value {
    match f {
        Frame::Data(v) => v.clone(),
        Frame::Done => json!("[DONE]"),
    }
}

#[test]
fn chat_sequence_for_one_choice() {
    let mut a = StreamAssembler::new(meta(), Mode::Chat, 1, 5, true, false);
    let f = a.push(0, tok("Hi", 1));
    assert_eq!(f.len(), 2, "role chunk then content");
    assert_eq!(data(&f[0]), json!({"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "system_fingerprint": "fp", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}], "usage": null}));
    assert_eq!(data(&f[1])["choices"][0]["delta"], json!({"content": "Hi"}));
    assert!(a.push(0, tok("", 2)).is_empty(), "held-back text without logprobs sends nothing");
    let f = a.push(0, done(FinishReason::Length, 5, 2));
    assert_eq!(f.len(), 3);
    assert_eq!(data(&f[0])["choices"][0]["finish_reason"], "length");
    assert_eq!(data(&f[1])["usage"], json!({"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7, "prompt_tokens_details": {"cached_tokens": 0}}));
    assert_eq!(f[2], Frame::Done);
    assert!(a.is_ended());
    assert!(a.push(0, tok("late", 3)).is_empty());
}

#[test]
fn done_waits_for_every_choice() {
    let mut a = StreamAssembler::new(meta(), Mode::Text, 2, 3, false, false);
    let f = a.push(1, done(FinishReason::Stop, 3, 0));
    assert_eq!(f.len(), 1, "finish chunk of choice 1 only, no role chunk for text");
    assert_eq!(data(&f[0])["choices"][0], json!({"text": "", "index": 1, "logprobs": null, "finish_reason": "stop"}));
    assert!(data(&f[0]).get("usage").is_none());
    let f = a.push(0, tok("x", 1));
    assert_eq!(data(&f[0])["choices"][0]["text"], "x");
    let f = a.push(0, done(FinishReason::Stop, 3, 1));
    assert_eq!(f.last(), Some(&Frame::Done));
    assert_eq!(a.usage().completion_tokens, 1);
}

#[test]
fn errors_and_closed_channels_end_the_stream_once() {
    let mut a = StreamAssembler::new(meta(), Mode::Chat, 2, 3, false, false);
    a.push(0, tok("x", 1));
    let f = a.push(1, Event::Error("boom".into()));
    assert_eq!(f.len(), 2, "no role chunk before an error");
    assert_eq!(data(&f[0])["error"]["message"], "boom");
    assert_eq!(f.last(), Some(&Frame::Done));
    assert!(a.closed(0).is_empty() && a.push(0, tok("y", 2)).is_empty());

    let mut b = StreamAssembler::new(meta(), Mode::Chat, 1, 3, false, false);
    b.push(0, tok("x", 1));
    let f = b.closed(0);
    assert!(data(&f[0])["error"]["message"].as_str().is_some_and(|m| m.contains("worker stopped")));
    let mut c = StreamAssembler::new(meta(), Mode::Chat, 1, 3, false, false);
    c.push(0, done(FinishReason::Stop, 3, 0));
    assert!(c.closed(0).is_empty(), "a finished choice closing is normal");
}

#[test]
fn chat_chunk_logprobs_have_content_and_null_refusal() {
    // OpenAI's ChoiceLogprobs requires both keys (tests/python/test_openai_schema.py checks the
    // whole chunk against the published schema).
    let mut a = StreamAssembler::new(meta(), Mode::Chat, 1, 3, false, true);
    let f = a.push(0, tok_lp("Hi", 7, -0.25, &[("Hi", 7, -0.25)]));
    assert_eq!(data(&f[1])["choices"][0]["logprobs"], json!({"content": [{"token": "Hi", "logprob": -0.25,
        "bytes": [72, 105], "top_logprobs": [{"token": "Hi", "logprob": -0.25, "bytes": [72, 105]}]}], "refusal": null}));
}

#[test]
fn stream_error_event_is_the_api_error_body() {
    let mut a = StreamAssembler::new(meta(), Mode::Text, 1, 3, false, false);
    let f = a.push(0, Event::Error("boom".into()));
    assert_eq!(data(&f[0]), crate::http::ApiError::internal("boom").body());
    assert_eq!(data(&f[0]), json!({"error": {"message": "boom", "type": "server_error", "param": null, "code": null}}));
}

#[test]
fn text_chunks_leave_usage_out_until_the_usage_chunk() {
    // OpenAI's CreateCompletionResponse (shared by streamed text chunks) has a non-nullable usage.
    let mut a = StreamAssembler::new(meta(), Mode::Text, 1, 3, true, false);
    let f = a.push(0, tok("x", 1));
    assert!(data(&f[0]).get("usage").is_none());
    let f = a.push(0, done(FinishReason::Stop, 3, 1));
    assert_eq!(f.len(), 3);
    assert!(data(&f[0]).get("usage").is_none());
    assert_eq!(data(&f[1])["choices"], json!([]));
    assert_eq!(data(&f[1])["usage"], json!({"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4, "prompt_tokens_details": {"cached_tokens": 0}}));
}
