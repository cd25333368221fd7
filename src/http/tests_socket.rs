//! The router over a real TCP socket: raw HTTP/1.1 requests, client disconnect mid-stream,
//! graceful shutdown. Also an ignored test that serves a scripted model for SDK checks.
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::state::Limits;
use super::tests::support::{chat_body, hello_script, state_with, tok, FakeGen};

async fn start(g: Arc<FakeGen>) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<std::io::Result<()>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(super::serve_on(listener, state_with(g, Limits::default()), async move {
        let _ = rx.await;
    }));
    (addr, tx, task)
}

fn post(path: &str, body: &str) -> String {
    format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
}

#[tokio::test]
async fn real_socket_request_disconnect_and_graceful_shutdown() {
    let mut g = FakeGen::new(vec![hello_script(), vec![tok("Hello", 9707)]]);
    g.hold_open = false;
    let g = Arc::new(g);
    let (addr, stop, task) = start(g.clone()).await;

    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(post("/v1/chat/completions", &chat_body(serde_json::json!({})).to_string()).as_bytes()).await.expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    assert!(out.contains("\"content\":\"Hello world\""), "{out}");

    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    assert!(out.starts_with("HTTP/1.1 404"), "{out}");
    assert!(out.contains("\"code\":\"unknown_url\""), "{out}");

    stop.send(()).expect("server running");
    tokio::time::timeout(Duration::from_secs(5), task).await.expect("graceful shutdown").expect("join").expect("serve ok");
}

#[tokio::test]
async fn client_disconnect_over_tcp_cancels_the_sequence() {
    let mut g = FakeGen::new(vec![vec![tok("Hello", 9707)]]);
    g.hold_open = true;
    let g = Arc::new(g);
    let (addr, stop, _task) = start(g.clone()).await;
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let body = chat_body(serde_json::json!({"stream": true})).to_string();
    s.write_all(post("/v1/chat/completions", &body).as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 4096];
    let mut got = String::new();
    while !got.contains("\"content\":\"Hello\"") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.expect("data in time").expect("read");
        assert!(n > 0, "stream ended early: {got}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let sender = g.held.lock().expect("lock")[0].clone();
    assert!(!sender.is_closed());
    drop(s);
    tokio::time::timeout(Duration::from_secs(5), sender.closed()).await.expect("engine receiver dropped after TCP close");
    let _ = stop.send(());
}

/// Serves a scripted model on 127.0.0.1:18080 for 60 s, for checks with the OpenAI SDK:
/// `cargo test --lib sdk_server -- --ignored`.
#[tokio::test]
#[ignore]
async fn sdk_server() {
    let mut lp = Vec::new();
    for (t, id) in [("Hello", 9707u32), (" from", 504), (" inferd", 11), ("!", 0)] {
        lp.push(super::tests::support::tok_lp(t, id, -0.5, &[(t, id, -0.5), ("x", 87, -3.25)]));
    }
    lp.push(super::tests::support::done(crate::engine::FinishReason::Stop, 0, 4));
    let g = Arc::new(FakeGen::new(vec![lp]));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:18080").await.expect("bind 18080");
    let limits = Limits { max_body_bytes: 4096, ..Limits::default() };
    let _ = super::serve_on(listener, state_with(g, limits), tokio::time::sleep(Duration::from_secs(60))).await;
}
