//! End-to-end under load: many concurrent streams all finish properly, and clients that hang up
//! mid-stream free their slots (their sequences are cancelled, not decoded to the end).
mod e2e_common;

use std::io::Read;
use std::time::{Duration, Instant};

use e2e_common::{parse_stream, tiny_model, Server, SseStream};
use serde_json::json;

const MODEL: &str = "tiny-llama.f32.gguf";

#[test]
fn sixteen_concurrent_streams_all_complete() {
    let Some(model) = tiny_model(MODEL) else { return };
    let s = Server::tiny(&model, &[]);
    let results: Vec<(String, serde_json::Value)> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..16)
            .map(|i| {
                let s = &s;
                sc.spawn(move || {
                    let body = s.chat_body(
                        &format!("Stream number {i}"),
                        json!({"temperature": 0, "max_tokens": 24, "ignore_eos": true, "stream": true,
                               "stream_options": {"include_usage": true}}),
                    );
                    let mut st = s.stream("/v1/chat/completions", &body);
                    assert_eq!(st.status, 200);
                    let chunks = parse_stream(&st.collect_all().expect("stream"));
                    let id = chunks[0]["id"].clone();
                    assert!(chunks.iter().all(|c| c["id"] == id), "one id per stream");
                    let text: String =
                        chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
                    let n = chunks.len();
                    assert_eq!(chunks[n - 2]["choices"][0]["finish_reason"], "length");
                    (text, chunks[n - 1]["usage"].clone())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("stream thread")).collect()
    });
    assert_eq!(results.len(), 16);
    for (i, (text, usage)) in results.iter().enumerate() {
        assert_eq!(usage["completion_tokens"], 24, "stream {i}");
        // Each streamed text equals the same request answered alone, non-streamed.
        let alone = s.chat(
            &format!("Stream number {i}"),
            json!({"temperature": 0, "max_tokens": 24, "ignore_eos": true}),
        );
        assert_eq!(&e2e_common::chat_text(&alone.json(), 0), text, "stream {i}");
    }
}

/// Opens a long stream, reads its first few events, then drops the socket.
fn hang_up_after(s: &Server, chunks: usize) {
    let body = s.chat_body("Keep talking", json!({"max_tokens": 1900, "ignore_eos": true, "stream": true}));
    let mut st = s.stream("/v1/chat/completions", &body);
    assert_eq!(st.status, 200);
    for _ in 0..chunks {
        assert!(st.next_data().expect("read").is_some());
    }
    drop(st);
}

/// With max_batch 8, eight streams of ~1900 tokens each would hold every slot for a long time if
/// hung-up clients kept decoding. After they hang up, a new request must start at once.
#[test]
fn hung_up_streams_free_their_slots() {
    let Some(model) = tiny_model(MODEL) else { return };
    let s = Server::tiny(&model, &["--max-batch", "8"]);
    // How long a full 1900-token stream takes here alone (a lower bound for 8 uncancelled ones),
    // extrapolated from 190 tokens.
    let t = Instant::now();
    let r = s.chat("Keep talking", json!({"max_tokens": 190, "ignore_eos": true}));
    assert_eq!(r.status, 200);
    let full = t.elapsed() * 10;

    std::thread::scope(|sc| {
        for _ in 0..8 {
            let s = &s;
            sc.spawn(move || hang_up_after(s, 3));
        }
    });
    // A fresh stream's first content token arrives quickly: the hung-up sequences were cancelled.
    // (The response head only comes with the first event, so opening is what waits.)
    let limit = (full / 4).max(Duration::from_millis(1500));
    let slow = |what: &str| {
        format!(
            "{what} after 8 hang-ups (limit {limit:?}; one full stream alone: {full:?}): \
             hung-up streams seem to keep decoding"
        )
    };
    let t = Instant::now();
    let body = s.chat_body("Are you there?", json!({"max_tokens": 4, "ignore_eos": true, "stream": true}));
    let mut st = SseStream::open(s.port, "/v1/chat/completions", &body, limit + Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("{}", slow(&format!("no response head ({e})"))));
    assert_eq!(st.status, 200);
    let role = st.next_data().expect("role").expect("role chunk");
    assert!(role.contains("assistant"));
    let first_token = t.elapsed();
    assert!(first_token < limit, "{}", slow(&format!("first token took {first_token:?}")));
    let rest = st.collect_all().expect("rest");
    assert_eq!(rest.last().map(String::as_str), Some("[DONE]"));
    // Raw hang-up in the middle of the response head and body: the server stays up.
    for cut in [10usize, 400] {
        let mut sock = std::net::TcpStream::connect(("127.0.0.1", s.port)).expect("connect");
        sock.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let body = serde_json::to_vec(&body).unwrap();
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        use std::io::Write;
        sock.write_all(head.as_bytes()).unwrap();
        sock.write_all(&body).unwrap();
        let mut buf = vec![0u8; cut];
        let _ = sock.read_exact(&mut buf);
    }
    assert_eq!(s.get("/health").status, 200);
    assert_eq!(s.chat("Still there?", json!({"max_tokens": 2})).status, 200);
}

/// A client that hangs up on a non-streamed request cancels it too: with one slot, two abandoned
/// 1900-token requests must not delay the next one.
#[test]
fn hung_up_non_stream_requests_are_cancelled() {
    let Some(model) = tiny_model(MODEL) else { return };
    let s = Server::tiny(&model, &["--max-batch", "1"]);
    let t = Instant::now();
    assert_eq!(s.chat("Keep talking", json!({"max_tokens": 190, "ignore_eos": true})).status, 200);
    let full = t.elapsed() * 10;
    let body = serde_json::to_vec(&s.chat_body("Keep talking", json!({"max_tokens": 1900, "ignore_eos": true}))).unwrap();
    for _ in 0..2 {
        use std::io::Write;
        let mut sock = std::net::TcpStream::connect(("127.0.0.1", s.port)).expect("connect");
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        sock.write_all(head.as_bytes()).unwrap();
        sock.write_all(&body).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        drop(sock);
    }
    let limit = (full / 4).max(Duration::from_millis(1500));
    let t = Instant::now();
    let r = e2e_common::request(
        s.port,
        "POST",
        "/v1/chat/completions",
        Some(&serde_json::to_vec(&s.chat_body("Next", json!({"max_tokens": 2}))).unwrap()),
        limit + Duration::from_secs(2),
    )
    .unwrap_or_else(|e| panic!("no answer within {limit:?} ({e}): abandoned requests keep decoding"));
    assert_eq!(r.status, 200);
    assert!(t.elapsed() < limit, "took {:?} (limit {limit:?}): abandoned requests keep decoding", t.elapsed());
}

/// Clients that stop reading (full socket buffers, full event channels) neither stall other
/// requests nor lose events: once they read again, their streams finish complete.
#[test]
fn stalled_readers_do_not_block_others_and_lose_nothing() {
    let Some(model) = tiny_model(MODEL) else { return };
    let s = Server::tiny(&model, &[]);
    let body = s.chat_body(
        "Stall",
        json!({"max_tokens": 600, "ignore_eos": true, "stream": true, "logprobs": true, "top_logprobs": 20,
               "temperature": 0}),
    );
    let mut stalled: Vec<SseStream> = (0..3).map(|_| s.stream("/v1/chat/completions", &body)).collect();
    std::thread::sleep(Duration::from_secs(2));
    for i in 0..3 {
        let t = Instant::now();
        let r = s.chat(&format!("Meanwhile {i}"), json!({"max_tokens": 20, "ignore_eos": true}));
        assert_eq!(r.status, 200);
        assert!(t.elapsed() < Duration::from_secs(20), "a request behind stalled readers took {:?}", t.elapsed());
    }
    let mut texts = Vec::new();
    for st in &mut stalled {
        let chunks = parse_stream(&st.collect_all().expect("stalled stream resumes"));
        // Role chunk, 600 token chunks (each with its logprobs), finish chunk.
        assert_eq!(chunks.len(), 602);
        assert_eq!(chunks[601]["choices"][0]["finish_reason"], "length");
        let lps = chunks[1..601].iter().filter(|c| c["choices"][0]["logprobs"]["content"][0]["top_logprobs"].as_array().is_some_and(|t| t.len() == 20));
        assert_eq!(lps.count(), 600);
        texts.push(chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect::<String>());
    }
    assert!(texts.iter().all(|t| *t == texts[0]), "same greedy request, same text");
}

/// `devices = ["cpu", "cpu"]`: two workers, each with its own copy of the model, behind one id;
/// concurrent requests all finish with the answers one worker gives, and /metrics sums both.
#[test]
fn two_workers_of_one_model_share_the_requests() {
    let Some(model) = tiny_model(MODEL) else { return };
    let ask = |s: &Server, i: usize| {
        let r = s.post("/v1/completions", &json!({"model": "tiny", "prompt": format!("Request {i} says"), "max_tokens": 16,
                                                "temperature": 0, "ignore_eos": true}));
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["choices"][0]["text"].as_str().unwrap().to_string()
    };
    let one = Server::tiny(&model, &[]);
    let want: Vec<String> = (0..12).map(|i| ask(&one, i)).collect();
    drop(one);
    let toml = format!("[[models]]\nid = \"tiny\"\nsource = {:?}\ndevices = [\"cpu\", \"cpu\"]\n", model.display().to_string());
    let two = Server::from_config(&toml, "tiny", &[]);
    let got: Vec<String> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..12).map(|i| { let s = &two; sc.spawn(move || ask(s, i)) }).collect();
        hs.into_iter().map(|h| h.join().expect("request thread")).collect()
    });
    assert_eq!(got, want, "answers from two workers vs one");
    let m = two.get("/metrics").text();
    assert!(m.contains("inferd_generation_tokens_total{model=\"tiny\"} 192\n"), "the pool's counters sum both workers:\n{m}");
    let log = two.stderr();
    assert!(log.contains("requests go to the least loaded worker") && log.matches("model loaded").count() == 2, "{log}");
    assert_eq!(two.get("/ready").status, 200);
}
