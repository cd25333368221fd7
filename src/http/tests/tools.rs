//! Tool calls through the full router: scripted model output in Hermes format, answers in
//! OpenAI's `tool_calls` shapes, whole and streamed.
use std::sync::Arc;

use axum::http::StatusCode;
use serde_json::{json, Value};

use super::support::*;
use crate::engine::{Event, FinishReason};

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
    ])
}

/// The model's answer as token pieces, then a stop.
fn script(pieces: &[&str]) -> Vec<Event> {
    let mut s: Vec<Event> = pieces.iter().enumerate().map(|(i, p)| tok(p, 1000 + i as u32)).collect();
    s.push(done(FinishReason::Stop, 0, pieces.len()));
    s
}

const TWO_CALLS: [&str; 9] = [
    "I will check.",
    "\n<tool_call>",
    "\n{\"name\": \"get_weather\", \"arguments\": ",
    "{\"city\": ",
    "\"Paris\"}}\n",
    "</tool_call>",
    "\n<tool_call>\n{\"name\": \"get_time\", ",
    "\"arguments\": {}}\n</tool_call>",
    "",
];

#[tokio::test]
async fn parallel_calls_in_a_whole_answer() {
    let g = Arc::new(FakeGen::new(vec![script(&TWO_CALLS)]));
    let (status, v) = json_of(send(app(g), post_json("/v1/chat/completions", &chat_body(json!({"tools": tools()})))).await).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let c = &v["choices"][0];
    assert_eq!(c["finish_reason"], "tool_calls");
    assert_eq!(c["message"]["content"], "I will check.");
    let calls = c["message"]["tool_calls"].as_array().expect("tool_calls");
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0]["type"], "function");
    assert_eq!(calls[0]["function"], json!({"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}));
    assert_eq!(calls[1]["function"], json!({"name": "get_time", "arguments": "{}"}));
    let ids: Vec<&str> = calls.iter().map(|c| c["id"].as_str().expect("id")).collect();
    assert!(ids.iter().all(|i| i.starts_with("call_")) && ids[0] != ids[1], "{ids:?}");
}

#[tokio::test]
async fn only_a_call_gives_null_content() {
    let g = Arc::new(FakeGen::new(vec![script(&["<tool_call>", "{\"name\": \"get_time\", \"arguments\": {}}", "</tool_call>"])]));
    let (_, v) = json_of(send(app(g), post_json("/v1/chat/completions", &chat_body(json!({"tools": tools()})))).await).await;
    assert_eq!(v["choices"][0]["message"]["content"], Value::Null, "{v}");
    assert_eq!(v["choices"][0]["message"]["tool_calls"][0]["function"]["name"], "get_time");
}

#[tokio::test]
async fn broken_calls_and_tool_choice_none_stay_content() {
    let broken = ["<tool_call>", "{\"name\": \"get_time\", \"arguments\": {", "</tool_call>"];
    let g = Arc::new(FakeGen::new(vec![script(&broken)]));
    let (status, v) = json_of(send(app(g), post_json("/v1/chat/completions", &chat_body(json!({"tools": tools()})))).await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["choices"][0]["message"]["content"], broken.concat());
    assert!(v["choices"][0]["message"].get("tool_calls").is_none(), "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    let g = Arc::new(FakeGen::new(vec![script(&TWO_CALLS)]));
    let body = chat_body(json!({"tools": tools(), "tool_choice": "none"}));
    let (_, v) = json_of(send(app(g), post_json("/v1/chat/completions", &body)).await).await;
    assert_eq!(v["choices"][0]["message"]["content"], TWO_CALLS.concat());
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    // Without tools nothing is parsed either.
    let g = Arc::new(FakeGen::new(vec![script(&TWO_CALLS)]));
    let (_, v) = json_of(send(app(g), post_json("/v1/chat/completions", &chat_body(json!({})))).await).await;
    assert_eq!(v["choices"][0]["message"]["content"], TWO_CALLS.concat());
}

#[tokio::test]
async fn a_named_tool_choice_accepts_only_that_function() {
    let g = Arc::new(FakeGen::new(vec![script(&TWO_CALLS)]));
    let body = chat_body(json!({"tools": tools(), "tool_choice": {"type": "function", "function": {"name": "get_time"}}}));
    let (_, v) = json_of(send(app(g), post_json("/v1/chat/completions", &body)).await).await;
    let calls = v["choices"][0]["message"]["tool_calls"].as_array().expect("tool_calls");
    assert_eq!(calls.len(), 1, "{v}");
    assert_eq!(calls[0]["function"]["name"], "get_time");
    assert!(v["choices"][0]["message"]["content"].as_str().expect("content").contains("get_weather"));
}

#[tokio::test]
async fn streamed_calls_in_openai_pieces() {
    let g = Arc::new(FakeGen::new(vec![script(&TWO_CALLS)]));
    let body = chat_body(json!({"tools": tools(), "stream": true}));
    let resp = send(app(g), post_json("/v1/chat/completions", &body)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let data = sse_data(&body_bytes(resp).await);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).expect("JSON chunk")).collect();
    let mut content = String::new();
    let mut calls: Vec<(String, String, String)> = Vec::new();
    let mut finish = None;
    for c in &chunks {
        let ch = &c["choices"][0];
        if let Some(t) = ch["delta"]["content"].as_str() {
            content.push_str(t);
        }
        if let Some(tc) = ch["delta"]["tool_calls"].as_array() {
            assert_eq!(tc.len(), 1, "one call piece per chunk");
            let i = tc[0]["index"].as_u64().expect("index") as usize;
            if let Some(id) = tc[0]["id"].as_str() {
                assert_eq!(i, calls.len(), "a call starts once, in order");
                assert_eq!(tc[0]["type"], "function");
                assert_eq!(tc[0]["function"]["arguments"], "", "the first piece has the name and no arguments");
                calls.push((id.to_string(), tc[0]["function"]["name"].as_str().expect("name").to_string(), String::new()));
            } else {
                assert!(tc[0]["function"].get("name").is_none() && tc[0].get("type").is_none(), "{tc:?}");
                calls[i].2.push_str(tc[0]["function"]["arguments"].as_str().expect("arguments"));
            }
            assert!(ch["delta"].get("content").is_none(), "no content beside a call piece");
        }
        if let Some(f) = ch["finish_reason"].as_str() {
            finish = Some(f.to_string());
        }
    }
    assert_eq!(content, "I will check.\n\n", "the text around the blocks, as generated");
    assert_eq!(finish.as_deref(), Some("tool_calls"));
    let names_args: Vec<(&str, &str)> = calls.iter().map(|(_, n, a)| (n.as_str(), a.as_str())).collect();
    assert_eq!(names_args, vec![("get_weather", "{\"city\": \"Paris\"}"), ("get_time", "{}")]);
    // The weather call's arguments came in the model's two pieces.
    let pieces = chunks
        .iter()
        .filter(|c| c["choices"][0]["delta"]["tool_calls"][0]["index"] == 0 && c["choices"][0]["delta"]["tool_calls"][0].get("id").is_none())
        .count();
    assert_eq!(pieces, 2);
}

#[tokio::test]
async fn bad_tools_and_tool_choices_are_400() {
    let cases = [
        (json!({"tools": tools(), "tool_choice": {"type": "function", "function": {"name": "nope"}}}), "tool_choice.function.name"),
        (json!({"tools": tools(), "tool_choice": {"type": "function"}}), "tool_choice.function.name"),
        (json!({"tools": tools(), "tool_choice": "sometimes"}), "tool_choice"),
        (json!({"tools": tools(), "tool_choice": 3}), "tool_choice"),
        (json!({"tools": [{"type": "function", "function": {}}]}), "tools[0].function.name"),
        (json!({"tools": [{"type": "retrieval"}]}), "tools[0].type"),
        (json!({"tools": [], "tool_choice": "required"}), "tool_choice"),
        (json!({"tool_choice": {"type": "function", "function": {"name": "x"}}}), "tool_choice"),
    ];
    for (extra, param) in cases {
        let g = Arc::new(FakeGen::new(vec![hello_script()]));
        let (status, msg, p, _) = api_error(send(app(g.clone()), post_json("/v1/chat/completions", &chat_body(extra.clone()))).await).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{extra}: {msg}");
        assert_eq!(p, param, "{extra}: {msg}");
        assert!(g.seen().is_empty(), "nothing reached the model");
    }
}
