//! `POST /tokenize` and `POST /detokenize` with the real Qwen2 tokenizer.
use std::sync::Arc;

use axum::http::StatusCode;
use serde_json::json;

use super::support::*;
use crate::http::state::{AppState, Limits};

fn one() -> axum::Router {
    app(Arc::new(FakeGen::new(vec![hello_script()])))
}

#[tokio::test]
async fn tokenize_prompt_content_and_messages() {
    // vLLM's field, with the model named.
    let (s, v) = json_of(send(one(), post_json("/tokenize", &json!({"model": MODEL, "prompt": "Hello world"}))).await).await;
    assert_eq!((s, v), (StatusCode::OK, json!({"tokens": [9707, 1879], "count": 2, "max_model_len": 4096})));
    // llama.cpp's field, model left out (one model served).
    let (s, v) = json_of(send(one(), post_json("/tokenize", &json!({"content": "Hello world"}))).await).await;
    assert_eq!((s, v["tokens"].clone()), (StatusCode::OK, json!([9707, 1879])));
    // Special-token text is read as the special token (Qwen's tokenizer adds no BOS of its own).
    let (_, v) = json_of(send(one(), post_json("/tokenize", &json!({"prompt": "<|im_end|>"}))).await).await;
    assert_eq!(v["tokens"], json!([151645]));
    // Chat messages through the model's template (ChatML), with the generation prompt.
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Hello world"}]});
    let (s, v) = json_of(send(one(), post_json("/tokenize", &body)).await).await;
    assert_eq!(s, StatusCode::OK);
    let im_start = 151644;
    let im_end = 151645;
    let nl = 198;
    let user = 872;
    let assistant = 77091;
    let want = json!([im_start, user, nl, 9707, 1879, im_end, nl, im_start, assistant, nl]);
    assert_eq!((v["tokens"].clone(), v["count"].clone()), (want, json!(10)));
    let body = json!({"messages": [{"role": "user", "content": "Hello world"}], "add_generation_prompt": false});
    let (_, v) = json_of(send(one(), post_json("/tokenize", &body)).await).await;
    assert_eq!(v["tokens"], json!([im_start, user, nl, 9707, 1879, im_end, nl]));
}

#[tokio::test]
async fn detokenize_round_trips() {
    let (s, v) = json_of(send(one(), post_json("/detokenize", &json!({"model": MODEL, "tokens": [9707, 1879, 151645]}))).await).await;
    assert_eq!((s, v), (StatusCode::OK, json!({"prompt": "Hello world<|im_end|>", "content": "Hello world<|im_end|>"})));
    let (s, v) = json_of(send(one(), post_json("/detokenize", &json!({"tokens": []}))).await).await;
    assert_eq!((s, v["content"].clone()), (StatusCode::OK, json!("")));
}

#[tokio::test]
async fn tokenize_errors_are_openai_shaped_4xx() {
    let cases = [
        ("/tokenize", json!({}), StatusCode::BAD_REQUEST, "prompt"),
        ("/tokenize", json!({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}), StatusCode::BAD_REQUEST, "prompt"),
        ("/tokenize", json!({"messages": []}), StatusCode::BAD_REQUEST, "messages"),
        ("/tokenize", json!({"messages": [{"role": "nobody", "content": "b"}]}), StatusCode::BAD_REQUEST, "messages[0].role"),
        ("/tokenize", json!({"model": "nope", "prompt": "a"}), StatusCode::NOT_FOUND, "model"),
        ("/tokenize", json!({"prompt": 5}), StatusCode::BAD_REQUEST, ""),
        ("/detokenize", json!({}), StatusCode::BAD_REQUEST, "tokens"),
        ("/detokenize", json!({"tokens": [9707, -1]}), StatusCode::BAD_REQUEST, "tokens"),
        ("/detokenize", json!({"tokens": [999999999]}), StatusCode::BAD_REQUEST, "tokens"),
    ];
    for (path, body, status, param) in cases {
        let (s, msg, p, _) = api_error(send(one(), post_json(path, &body)).await).await;
        assert_eq!(s, status, "{path} {body}: {msg}");
        if !param.is_empty() {
            assert_eq!(p, json!(param), "{path} {body}: {msg}");
        }
    }
}

#[tokio::test]
async fn model_is_required_when_several_are_served_and_the_api_key_applies() {
    let g: Arc<FakeGen> = Arc::new(FakeGen::new(vec![hello_script()]));
    let state = AppState::new(vec![entry(g.clone(), "a"), entry(g.clone(), "b")], Limits::default());
    let (s, _, p, _) = api_error(send(crate::http::router(state.clone()), post_json("/tokenize", &json!({"prompt": "x"}))).await).await;
    assert_eq!((s, p), (StatusCode::BAD_REQUEST, json!("model")));
    let (s, v) = json_of(send(crate::http::router(state), post_json("/tokenize", &json!({"model": "b", "prompt": "x"}))).await).await;
    assert_eq!((s, v["count"].clone()), (StatusCode::OK, json!(1)));
    let limits = Limits { auth: crate::http::auth::Auth::user_key("k"), ..Limits::default() };
    let (s, _, _, _) = api_error(send(crate::http::router(state_with(g, limits)), post_json("/tokenize", &json!({"prompt": "x"}))).await).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}
