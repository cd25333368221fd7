//! End-to-end: every client mistake and overload answers with the right status and OpenAI's
//! error JSON `{"error":{"message","type","param","code"}}`, and the server keeps serving.
mod e2e_common;

use std::time::Duration;

use e2e_common::{assert_openai_error, tiny_model, Server, SseStream};
use serde_json::{json, Value};

const MODEL: &str = "tiny-llama.f32.gguf";

/// Asserts status and error shape; returns the error member.
fn expect_error(r: &e2e_common::Response, status: u16) -> Value {
    assert_eq!(r.status, status, "{}", r.text());
    assert!(r.header("content-type").is_some_and(|c| c.starts_with("application/json")), "{:?}", r.headers);
    let v = r.json();
    Value::Object(assert_openai_error(&v).clone())
}

#[test]
fn bad_requests_are_openai_400s() {
    let Some(model) = tiny_model(MODEL) else { return };
    let s = Server::tiny(&model, &[]);
    let chat = "/v1/chat/completions";

    let e = expect_error(&s.post_raw(chat, b"{\"model\": \"tiny\", \"messages\": ["), 400);
    assert_eq!(e["type"], "invalid_request_error");

    let e = expect_error(&s.post_raw(chat, b"[1, 2]"), 400);
    assert_eq!(e["type"], "invalid_request_error");

    let e = expect_error(&s.post(chat, &s.chat_body("hi", json!({"temperature": "hot"}))), 400);
    assert_eq!(e["param"], "temperature", "wrong type names the field: {e}");

    let e = expect_error(&s.post(chat, &s.chat_body("hi", json!({"max_tokens": "ten"}))), 400);
    assert_eq!(e["param"], "max_tokens");

    let e = expect_error(&s.chat("hi", json!({"temperature": 3})), 400);
    assert_eq!(e["param"], "temperature");
    assert!(e["message"].as_str().unwrap().contains("temperature"), "{e}");

    let e = expect_error(&s.chat("hi", json!({"max_tokens": 0})), 400);
    assert_eq!(e["param"], "max_tokens");

    let e = expect_error(&s.chat("hi", json!({"n": 0})), 400);
    assert_eq!(e["param"], "n");

    let body = json!({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]});
    let e = expect_error(&s.post(chat, &body), 400);
    assert_eq!(e["param"], "messages[0].role");

    let e = expect_error(&s.post(chat, &json!({"model": "tiny"})), 400);
    assert_eq!(e["param"], "messages");

    let e = expect_error(&s.post(chat, &json!({"messages": [{"role": "user", "content": "hi"}]})), 400);
    assert_eq!(e["param"], "model");

    let body = json!({"model": "tiny", "prompt": [1, 2, 999999], "max_tokens": 2});
    let e = expect_error(&s.post("/v1/completions", &body), 400);
    assert_eq!(e["param"], "prompt");

    let e = expect_error(&s.chat("hi", json!({"stream": false, "stream_options": {"include_usage": true}})), 400);
    assert_eq!(e["param"], "stream_options");

    // A streaming request that fails validation is a plain JSON 400 too, not an event stream.
    let e = expect_error(&s.chat("hi", json!({"stream": true, "temperature": -1})), 400);
    assert_eq!(e["param"], "temperature");

    // Still serving after all that.
    assert_eq!(s.chat("hi", json!({"max_tokens": 2})).status, 200);
}

#[test]
fn unknown_model_and_route_are_404s() {
    let Some(model) = tiny_model(MODEL) else { return };
    let s = Server::tiny(&model, &[]);
    let body = json!({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]});
    let e = expect_error(&s.post("/v1/chat/completions", &body), 404);
    assert_eq!(e["code"], "model_not_found");
    assert_eq!(e["param"], "model");
    assert!(e["message"].as_str().unwrap().contains("gpt-9"));
    let e = expect_error(&s.post("/v1/completions", &json!({"model": "gpt-9", "prompt": "x"})), 404);
    assert_eq!(e["code"], "model_not_found");
    expect_error(&s.get("/v1/models/gpt-9"), 404);
    expect_error(&s.get("/v1/nope"), 404);
    expect_error(&s.get("/v1/chat/completions"), 405);
}

#[test]
fn prompt_longer_than_context_is_400() {
    let Some(model) = tiny_model(MODEL) else { return };
    let s = Server::tiny(&model, &["--context-length", "64"]);
    let long = "word ".repeat(200);
    let e = expect_error(&s.chat(&long, json!({"max_tokens": 4})), 400);
    assert_eq!(e["code"], "context_length_exceeded");
    assert_eq!(e["param"], "messages");
    assert!(e["message"].as_str().unwrap().contains("64"), "{e}");
    let e = expect_error(&s.post("/v1/completions", &json!({"model": "tiny", "prompt": long, "max_tokens": 4})), 400);
    assert_eq!(e["code"], "context_length_exceeded");
    // Prompt fits but prompt + max_tokens does not.
    let e = expect_error(&s.post("/v1/completions", &json!({"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 62})), 400);
    assert_eq!(e["code"], "context_length_exceeded");
    // Within the context: fine.
    let r = s.post("/v1/completions", &json!({"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 61, "ignore_eos": true}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["usage"]["completion_tokens"], 61);
}

#[test]
fn oversized_body_is_413() {
    let Some(model) = tiny_model(MODEL) else { return };
    let s = Server::start(&model, "tiny", "max_body_bytes = 100000", &[]);
    let big = "a".repeat(2 * 1024 * 1024);
    let body = serde_json::to_vec(&json!({"model": "tiny", "messages": [{"role": "user", "content": big}]})).unwrap();
    let e = expect_error(&s.post_raw("/v1/chat/completions", &body), 413);
    assert!(e["message"].as_str().unwrap().contains("100000"), "{e}");
    // A declared Content-Length over the limit is refused at once, before the body arrives
    // (the server used to wait for the whole body first).
    {
        use std::io::{Read, Write};
        let mut sock = std::net::TcpStream::connect(("127.0.0.1", s.port)).expect("connect");
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\n\r\n{\"model\"";
        sock.write_all(head.as_bytes()).unwrap();
        let mut got = [0u8; 12];
        sock.read_exact(&mut got).expect("an answer before the body is sent");
        assert_eq!(&got, b"HTTP/1.1 413", "{}", String::from_utf8_lossy(&got));
    }
    // Just under the limit is accepted (then judged on its content: too long for the context).
    let under = "a ".repeat(20_000);
    let r = s.chat(&under, json!({"max_tokens": 1}));
    assert_ne!(r.status, 413, "{}", r.text());
    assert_eq!(s.chat("hi", json!({"max_tokens": 2})).status, 200);
}

/// One running slot and one waiting slot: a burst of long streams gets 429s with Retry-After.
#[test]
fn full_queue_is_429_with_retry_after() {
    let Some(model) = tiny_model(MODEL) else { return };
    let s = Server::start(&model, "tiny", "max_waiting = 1", &["--max-batch", "1"]);
    let body = s.chat_body("Go on forever", json!({"max_tokens": 1500, "ignore_eos": true, "stream": true}));
    let results: Vec<(u16, Option<String>, Option<Value>)> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..6)
            .map(|_| {
                let (s, body) = (&s, &body);
                sc.spawn(move || {
                    // Long streams: a queued request's head only comes once it runs, so a short
                    // timeout; what matters is whether the answer is a 429 right away.
                    match SseStream::open(s.port, "/v1/chat/completions", body, Duration::from_secs(10)) {
                        Ok(st) if st.status == 429 => {
                            let retry = st.header("retry-after").map(str::to_string);
                            let r = st.into_response().expect("429 body");
                            (429, retry, Some(r.json()))
                        }
                        Ok(st) => (st.status, None, None), // dropped: hangs up
                        Err(_) => (0, None, None),        // still queued when we gave up
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let rejected: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    assert!(!rejected.is_empty(), "expected 429s: {results:?}");
    assert!(results.iter().any(|r| r.0 == 200), "one request runs: {results:?}");
    for (_, retry, v) in rejected {
        let secs: u64 = retry.as_deref().expect("Retry-After header").parse().expect("integer Retry-After");
        assert!(secs >= 1);
        let v = v.as_ref().unwrap();
        let e = assert_openai_error(v);
        assert_eq!(e["code"], "queue_full");
    }
    // After the burst (every client hung up), the server answers again.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let r = s.chat("hi", json!({"max_tokens": 2}));
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 429, "{}", r.text());
        assert!(std::time::Instant::now() < deadline, "still 429 after 60 s");
        std::thread::sleep(Duration::from_millis(200));
    }
}
