//! End-to-end: the real `inferd` binary on the tiny llama GGUF, over HTTP. Response shapes,
//! streaming, text completions, stop strings, `n`, seeds, and llama.cpp's greedy reference.
mod e2e_common;

use std::time::{SystemTime, UNIX_EPOCH};

use e2e_common::{chat_text, hf_encode, parse_stream, repo_root, smol_prompt, tiny_model, Server};
use serde_json::{json, Value};

const MODEL: &str = "tiny-llama.f32.gguf";

fn server() -> Option<Server> {
    Some(Server::tiny(&tiny_model(MODEL)?, &[]))
}

fn greedy(max_tokens: u64) -> Value {
    json!({"temperature": 0, "max_tokens": max_tokens, "ignore_eos": true})
}

/// Streams `body` and returns the parsed chunks (asserting `[DONE]` comes last, once).
fn stream_chunks(s: &Server, path: &str, body: &Value) -> Vec<Value> {
    let mut st = s.stream(path, body);
    assert_eq!(st.status, 200, "stream status");
    assert!(st.header("content-type").is_some_and(|c| c.starts_with("text/event-stream")), "{:?}", st.headers);
    let datas = st.collect_all().expect("read stream");
    parse_stream(&datas)
}

/// Concatenated `delta.content` of choice `index` across chat chunks.
fn chat_stream_text(chunks: &[Value], index: u64) -> String {
    chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().cloned().unwrap_or_default())
        .filter(|ch| ch["index"] == index)
        .filter_map(|ch| ch["delta"]["content"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn chat_non_stream_exact_shape_and_usage() {
    let Some(s) = server() else { return };
    let r = s.chat("Hello", greedy(12));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("content-type").is_some_and(|c| c.starts_with("application/json")));
    let v = r.json();
    assert!(v["id"].as_str().is_some_and(|id| id.starts_with("chatcmpl-") && id.len() > 9), "{v}");
    assert_eq!(v["object"], "chat.completion");
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let created = v["created"].as_u64().expect("created");
    assert!(created + 120 >= now && created <= now + 5, "created {created} vs now {now}");
    assert_eq!(v["model"], "tiny");
    let choices = v["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 1);
    assert_eq!(choices[0]["index"], 0);
    assert_eq!(choices[0]["message"]["role"], "assistant");
    assert!(!chat_text(&v, 0).is_empty());
    assert_eq!(choices[0]["finish_reason"], "length");
    // Prompt tokens: the hand-rendered template through the HF tokenizer (not the server's code).
    let prompt = hf_encode(&smol_prompt("Hello")).len() as u64;
    assert_eq!(v["usage"]["prompt_tokens"], prompt, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 12);
    assert_eq!(v["usage"]["total_tokens"], prompt + 12);
}

#[test]
fn chat_stream_matches_non_stream() {
    let Some(s) = server() else { return };
    let whole = s.chat("Tell me a story", greedy(20)).json();
    let expected = chat_text(&whole, 0);
    let mut body = s.chat_body("Tell me a story", greedy(20));
    e2e_common::merge(&mut body, json!({"stream": true, "stream_options": {"include_usage": true}}));
    let chunks = stream_chunks(&s, "/v1/chat/completions", &body);
    let id = chunks[0]["id"].as_str().expect("id").to_string();
    assert!(id.starts_with("chatcmpl-"));
    for c in &chunks {
        assert_eq!(c["id"], id.as_str(), "one id across chunks");
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["model"], "tiny");
    }
    // Role first, with empty content.
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[0]["choices"][0]["delta"]["content"], "");
    assert_eq!(chat_stream_text(&chunks, 0), expected);
    // Then a finish chunk with an empty delta, then the usage chunk with no choices.
    let n = chunks.len();
    assert!(n >= 4);
    let finish = &chunks[n - 2]["choices"][0];
    assert_eq!(finish["finish_reason"], "length");
    assert_eq!(finish["delta"], json!({}));
    for c in &chunks[..n - 2] {
        assert!(c["choices"][0]["finish_reason"].is_null(), "early finish: {c}");
        assert!(c["usage"].is_null(), "usage only on the last chunk: {c}");
    }
    let last = &chunks[n - 1];
    assert_eq!(last["choices"], json!([]));
    // The same prompt again: all of it but the last token comes from the prefix cache.
    let prompt = whole["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(last["usage"]["prompt_tokens_details"]["cached_tokens"], prompt - 1, "the repeated prompt is cached");
    // The finished sequences' positions are what the prefix cache holds, and /metrics says so.
    let metrics = s.get("/metrics").text();
    let held: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("inferd_prefix_cache_bytes{model=\"tiny\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no inferd_prefix_cache_bytes for tiny:\n{metrics}"));
    assert!(held > 0.0, "the prefix cache holds the finished requests: {held} bytes");
    let strip = |u: &serde_json::Value| { let mut u = u.clone(); u.as_object_mut().unwrap().remove("prompt_tokens_details"); u };
    assert_eq!(strip(&last["usage"]), strip(&whole["usage"]), "stream usage equals non-stream usage");
}

#[test]
fn completions_text_and_token_ids_agree_with_chat() {
    let Some(s) = server() else { return };
    let chat = s.chat("Hi there", greedy(16)).json();
    let rendered = smol_prompt("Hi there");
    let ids = hf_encode(&rendered);
    for prompt in [json!(rendered), json!(ids)] {
        let r = s.post(
            "/v1/completions",
            &json!({"model": "tiny", "prompt": prompt, "temperature": 0, "max_tokens": 16, "ignore_eos": true}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        assert!(v["id"].as_str().is_some_and(|id| id.starts_with("cmpl-")), "{v}");
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["choices"][0]["index"], 0);
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["choices"][0]["text"], chat["choices"][0]["message"]["content"], "same tokens, same text");
        assert_eq!(v["usage"]["prompt_tokens"], chat["usage"]["prompt_tokens"]);
        assert_eq!(v["usage"]["completion_tokens"], chat["usage"]["completion_tokens"]);
        assert_eq!(v["usage"]["prompt_tokens"], ids.len() as u64);
    }
    // Streamed text completion: no role chunk, text deltas concatenate to the same text.
    let body = json!({"model": "tiny", "prompt": ids, "temperature": 0, "max_tokens": 16, "ignore_eos": true,
                      "stream": true});
    let chunks = stream_chunks(&s, "/v1/completions", &body);
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
    assert_eq!(text, chat_text(&chat, 0));
    assert!(chunks.iter().all(|c| c["object"] == "text_completion" && c.get("usage").is_none()));
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "length");
}

/// llama.cpp's greedy continuation of the recorded prompt ids, token for token. llama.cpp's
/// `ignore_eos` bans end-of-generation tokens; here that is `logit_bias` -100 on them.
#[test]
fn tiny_greedy_matches_llamacpp_reference() {
    let Some(s) = server() else { return };
    let path = repo_root().join("tests/fixtures/llamacpp_reference.json");
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(path).expect("reference")).expect("json");
    let entry = reference["models"]
        .as_array()
        .expect("models")
        .iter()
        .find(|m| m["model"].as_str().is_some_and(|p| p.ends_with(MODEL)))
        .expect("tiny-llama entry");
    let ids = &entry["prompt_ids"];
    let body = json!({"model": "tiny", "prompt": ids, "temperature": 0, "max_tokens": 32, "ignore_eos": true,
                      "logit_bias": {"509": -100, "511": -100}});
    let v = s.post("/v1/completions", &body).json();
    assert_eq!(v["usage"]["prompt_tokens"], ids.as_array().unwrap().len() as u64);
    assert_eq!(v["choices"][0]["text"], entry["generated_text"], "{v}");
}

/// The greedy text with a stop string taken from its middle: the output is the text before it.
#[test]
fn stop_string_cuts_before_it() {
    let Some(s) = server() else { return };
    let full = chat_text(&s.chat("Write code", greedy(32)).json(), 0);
    let chars: Vec<char> = full.chars().collect();
    // Three ASCII alphanumerics starting a few characters in (clean UTF-8 on both sides).
    let start = (4..chars.len().saturating_sub(3))
        .find(|&i| chars[i..i + 3].iter().all(char::is_ascii_alphanumeric))
        .unwrap_or_else(|| panic!("no ASCII window in {full:?}"));
    let stop: String = chars[start..start + 3].iter().collect();
    let chunks = assert_stop_cuts(&s, &full, &stop, json!([stop.clone(), "\u{1}never"]));
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "stop");
}

/// Greedy "Write code" with `stop` (the request's field) ends right before the first `cut` in
/// `full`, with finish_reason stop, and streamed gives the same text with nothing of the stop
/// string leaking. Returns the stream's chunks.
fn assert_stop_cuts(s: &Server, full: &str, cut: &str, stop: Value) -> Vec<Value> {
    let expected = &full[..full.find(cut).unwrap()];
    let mut extra = greedy(32);
    e2e_common::merge(&mut extra, json!({ "stop": stop }));
    let v = s.chat("Write code", extra.clone()).json();
    assert_eq!(chat_text(&v, 0), expected, "stop {cut:?} in {full:?}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    e2e_common::merge(&mut extra, json!({"stream": true}));
    let chunks = stream_chunks(s, "/v1/chat/completions", &s.chat_body("Write code", extra));
    assert_eq!(chat_stream_text(&chunks, 0), expected);
    chunks
}

#[test]
fn n2_with_seed_differs_and_repeats() {
    let Some(s) = server() else { return };
    let extra = json!({"n": 2, "seed": 42, "temperature": 1.0, "max_tokens": 16, "ignore_eos": true});
    let a = s.chat("Pick a word", extra.clone()).json();
    let choices = a["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 2);
    assert_eq!(choices[0]["index"], 0);
    assert_eq!(choices[1]["index"], 1);
    assert_ne!(chat_text(&a, 0), chat_text(&a, 1), "two choices should differ");
    assert_eq!(a["usage"]["completion_tokens"], 32, "completion tokens summed over choices");
    let b = s.chat("Pick a word", extra).json();
    assert_eq!((chat_text(&a, 0), chat_text(&a, 1)), (chat_text(&b, 0), chat_text(&b, 1)), "same seed, same texts");
    // Streamed n=2: both indices appear, each with its own role chunk and finish.
    let body = s.chat_body("Pick a word", json!({"n": 2, "seed": 42, "temperature": 1.0, "max_tokens": 16,
                                                  "ignore_eos": true, "stream": true}));
    let chunks = stream_chunks(&s, "/v1/chat/completions", &body);
    assert_eq!(chat_stream_text(&chunks, 0), chat_text(&a, 0));
    assert_eq!(chat_stream_text(&chunks, 1), chat_text(&a, 1));
    for i in [0u64, 1] {
        let own: Vec<&Value> =
            chunks.iter().flat_map(|c| c["choices"].as_array().unwrap().iter()).filter(|ch| ch["index"] == i).collect();
        assert_eq!(own[0]["delta"]["role"], "assistant");
        assert_eq!(own.last().unwrap()["finish_reason"], "length");
    }
}

/// A seeded temperature-1 request gives the same text alone and while other requests run, and
/// a greedy one gives the same text alone and batched with 7 others.
#[test]
fn seeded_and_greedy_outputs_do_not_depend_on_the_batch() {
    let Some(s) = server() else { return };
    let seeded = json!({"seed": 7, "temperature": 1.0, "max_tokens": 24, "ignore_eos": true});
    let alone_seeded = chat_text(&s.chat("Seeded prompt", seeded.clone()).json(), 0);
    let alone_greedy = chat_text(&s.chat("Greedy prompt", greedy(24)).json(), 0);
    let (busy_seeded, busy_greedy) = std::thread::scope(|sc| {
        let others: Vec<_> = (0..7)
            .map(|i| {
                let s = &s;
                sc.spawn(move || {
                    let extra = json!({"temperature": 0.8, "max_tokens": 40 + i * 3, "ignore_eos": true});
                    s.chat(&format!("Other request number {i} with a longer prompt"), extra).status
                })
            })
            .collect();
        let sd = sc.spawn(|| chat_text(&s.chat("Seeded prompt", seeded.clone()).json(), 0));
        let gr = sc.spawn(|| chat_text(&s.chat("Greedy prompt", greedy(24)).json(), 0));
        for o in others {
            assert_eq!(o.join().unwrap(), 200);
        }
        (sd.join().unwrap(), gr.join().unwrap())
    });
    assert_eq!(busy_seeded, alone_seeded, "seeded sampling must not depend on other requests");
    assert_eq!(busy_greedy, alone_greedy, "greedy text must not depend on the batch");
}

#[test]
fn models_list_and_health() {
    let Some(s) = server() else { return };
    let v = s.get("/v1/models").json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "tiny");
    assert_eq!(v["data"][0]["object"], "model");
    assert_eq!(s.get("/v1/models/tiny").json()["id"], "tiny");
    assert_eq!(s.get("/health").status, 200);
    assert_eq!(s.get("/ready").status, 200);
}

/// A stop string made of the last character of one token and the first of the next: matching
/// must work across token boundaries, streamed or not.
#[test]
fn stop_string_across_a_token_boundary() {
    let Some(s) = server() else { return };
    let mut extra = greedy(32);
    e2e_common::merge(&mut extra, json!({"logprobs": true}));
    let v = s.chat("Write code", extra).json();
    let full = chat_text(&v, 0);
    let tokens: Vec<String> = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("logprobs")
        .iter()
        .map(|t| t["token"].as_str().unwrap().to_string())
        .collect();
    let printable = |c: char| c.is_ascii_graphic();
    let stop = tokens
        .windows(2)
        .filter_map(|w| {
            let (a, b) = (w[0].chars().last()?, w[1].chars().next()?);
            (printable(a) && printable(b)).then(|| format!("{a}{b}"))
        })
        .find(|stop| full.contains(stop.as_str()))
        .unwrap_or_else(|| panic!("no boundary pair in {tokens:?}"));
    assert_stop_cuts(&s, &full, &stop, json!(stop));
}

/// A prompt several prefill chunks long (1200 tokens, chunk 256) gives the same greedy text
/// alone and while other sequences decode between its chunks.
#[test]
fn long_prompt_chunked_prefill_is_batch_invariant() {
    let Some(s) = server() else { return };
    // Deterministic pseudo-random ids below the 509 ordinary tokens.
    let mut x: u64 = 12345;
    let ids: Vec<u64> = (0..1200)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 33) % 509
        })
        .collect();
    let body = json!({"model": "tiny", "prompt": ids, "temperature": 0, "max_tokens": 24, "ignore_eos": true});
    let alone = s.post("/v1/completions", &body).json();
    assert_eq!(alone["usage"]["prompt_tokens"], 1200);
    let busy = std::thread::scope(|sc| {
        let others: Vec<_> = (0..4)
            .map(|i| {
                let s = &s;
                sc.spawn(move || s.chat(&format!("Decode {i}"), greedy(80)).status)
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(30));
        let r = s.post("/v1/completions", &body).json();
        for o in others {
            assert_eq!(o.join().unwrap(), 200);
        }
        r
    });
    assert_eq!(busy["choices"][0]["text"], alone["choices"][0]["text"]);
}

/// Text-completion logprobs (legacy format) key alternatives by token text. Tokens that are
/// single bytes of a multi-byte character all read "\u{FFFD}" and used to overwrite each other
/// (the chosen token's own entry could vanish or carry another token's logprob); they are named
/// `bytes:\xNN` now, as OpenAI does. Greedy: the chosen token is the best of its alternatives.
#[test]
fn legacy_logprobs_keep_every_alternative() {
    let Some(s) = server() else { return };
    let prompt = hf_encode(&smol_prompt("Write a Python function that checks whether a number is prime."));
    let body = json!({"model": "tiny", "prompt": prompt, "temperature": 0, "max_tokens": 32, "ignore_eos": true,
                      "logprobs": 5, "logit_bias": {"509": -100, "511": -100}});
    let v = s.post("/v1/completions", &body).json();
    let lp = &v["choices"][0]["logprobs"];
    let tokens = lp["tokens"].as_array().expect("tokens");
    assert_eq!(tokens.len(), 32);
    let mut byte_tokens = 0;
    for (i, tok) in tokens.iter().enumerate() {
        let name = tok.as_str().unwrap();
        byte_tokens += name.starts_with("bytes:") as usize;
        assert!(!name.contains('\u{FFFD}'), "step {i}: {name:?} should be named by its bytes");
        let top = lp["top_logprobs"][i].as_object().expect("top map");
        assert_eq!(top.len(), 5, "step {i}: alternatives collided: {top:?}");
        let chosen = lp["token_logprobs"][i].as_f64().unwrap();
        assert_eq!(top.get(name).and_then(Value::as_f64), Some(chosen), "step {i}: {name:?} in {top:?}");
        assert!(top.values().all(|x| x.as_f64().unwrap() <= chosen + 1e-6), "step {i}: greedy picks the best");
    }
    assert!(byte_tokens > 0, "the tiny model's greedy text has partial-UTF-8 tokens: {tokens:?}");
}
