//! End-to-end connection hardening (`[server]` header_read_timeout_secs, keep_alive_timeout_secs,
//! max_connections, http2_max_concurrent_streams, body_read_timeout_secs, request_timeout_secs)
//! against the real binary, and graceful shutdown draining a stream. Figures go to stderr (run
//! with `--nocapture` to see them); docs/reliability.md records a run.
mod e2e_common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use e2e_common::{assert_openai_error, parse_stream, request, tiny_model, Server, SseStream, READ_TIMEOUT};
use serde_json::json;

const MODEL: &str = "tiny-llama.f32.gguf";

/// Open file descriptors of process `pid` (Linux: /proc/PID/fd).
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// Connections on `port` that the server process `pid` has accepted (an open socket of its own):
/// its socket inodes matched against the kernel's TCP table. Unlike [`fd_count`], other files the
/// server opens or closes meanwhile (a model file, a log, the readiness probe's connection) do
/// not count, and connections still in the kernel's backlog do not either.
fn accepted_count(pid: u32, port: u16) -> usize {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter_map(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']').map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
    let local = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // sl local rem st ... inode(9); state 0A is the listener
            f.len() > 9 && f[1].ends_with(&local) && f[3] != "0A" && inodes.contains(f[9])
        })
        .count()
}

/// Raises this process's open-file soft limit to its hard limit; returns the soft limit.
fn raise_nofile() -> usize {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain calls on a struct owned here.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        let want = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
            lim = want;
        }
    }
    lim.rlim_cur as usize
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_nodelay(true).unwrap();
    s
}

/// Polls `f` every 50 ms until it holds or `timeout` passes; returns whether it held.
fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether the server has closed `s` (EOF or reset), waiting at most `wait`.
fn closed_by_server(s: &mut TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 256];
    match s.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe),
    }
}

/// Thousands of connections send half a request line and then nothing (slowloris), a few more
/// drip a byte every 300 ms: requests are still served at once, and every one of them is closed
/// after the header read timeout (2 s here), whether it keeps sending bytes or not. The server's
/// open file descriptors show them held, then freed.
#[test]
fn half_open_connections_are_served_around_and_freed_after_the_header_timeout() {
    let Some(model) = tiny_model(MODEL) else { return };
    let s = Server::start(&model, "tiny", "header_read_timeout_secs = 2", &[]);
    let pid = s.pid();
    let base = fd_count(pid);
    let n = 3000.min(raise_nofile().saturating_sub(200));
    assert!(n >= 500, "this process may open too few files for the test: ulimit -n");

    let t0 = Instant::now();
    let mut half: Vec<TcpStream> = (0..n)
        .map(|_| {
            let mut c = connect(s.port);
            c.write_all(b"POST /v1/chat/completions HTT").expect("half a request line");
            c
        })
        .collect();
    let opened_s = t0.elapsed().as_secs_f64();
    // Drippers: one byte of a never-ending header every 300 ms.
    // Drippers: one byte of a never-ending header every 300 ms, until a write fails (the second
    // write after the server closed the connection).
    let drippers: Vec<_> = (0..10)
        .map(|_| {
            let mut c = connect(s.port);
            std::thread::spawn(move || {
                let start = Instant::now();
                c.write_all(b"GET /health HTTP/1.1\r\nX-Slow: ").unwrap();
                while start.elapsed() < Duration::from_secs(20) {
                    std::thread::sleep(Duration::from_millis(300));
                    if c.write_all(b"a").is_err() {
                        return Some(start.elapsed());
                    }
                }
                None
            })
        })
        .collect();

    let mut peak = 0;
    assert!(
        wait_until(Duration::from_secs(5), || {
            peak = peak.max(fd_count(pid));
            peak >= base + n
        }),
        "the server should hold all {n} connections: {peak} fds, {base} before; opened in {opened_s:.2} s; stderr:\n{}",
        s.stderr()
    );
    let held_s = t0.elapsed().as_secs_f64();

    // Still serving, at once, while they are held.
    let t = Instant::now();
    let r = s.chat("hi", json!({"max_tokens": 2}));
    assert_eq!(r.status, 200, "{}", r.text());
    let served_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut st = s.stream("/v1/chat/completions", &s.chat_body("hi", json!({"max_tokens": 4, "stream": true})));
    assert_eq!(st.status, 200);
    parse_stream(&st.collect_all().unwrap());
    let during = fd_count(pid);
    assert!(during >= base + n, "still held while serving: {during}");

    // Freed after the timeout (2 s from each accept), not before.
    assert!(wait_until(Duration::from_secs(15), || fd_count(pid) <= base + 2), "fds: {} (base {base})", fd_count(pid));
    let freed_s = t0.elapsed().as_secs_f64();
    assert!(freed_s >= 1.9, "freed after {freed_s:.2} s: before the 2 s timeout?");
    let closed = half.iter_mut().map(|c| closed_by_server(c, Duration::from_secs(2))).filter(|&b| b).count();
    assert_eq!(closed, n, "every half-open connection is closed by the server");
    let drip: Vec<Option<Duration>> = drippers.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(drip.iter().all(|d| d.is_some_and(|d| d < Duration::from_secs(10))), "drippers cut off: {drip:?}");
    let after = s.chat("hi", json!({"max_tokens": 2}));
    assert_eq!(after.status, 200);
    eprintln!(
        "half-open: {n} connections opened in {opened_s:.2} s, all held by the server after {held_s:.2} s \
         (fds {base} -> peak {peak}); a chat request answered in {served_ms:.0} ms meanwhile; all freed \
         {freed_s:.2} s after the first was opened (fds back to {}); 10 drippers cut off after {:?}",
        fd_count(pid),
        drip.iter().flatten().max().unwrap()
    );
    assert!(!s.stderr().contains("panicked"), "{}", s.stderr());
}

/// At `max_connections` the server stops accepting: a further connection waits (it is not
/// refused) and is served as soon as a slot frees, here when the idle ones hit the header
/// timeout. The server never holds more than the cap.
#[test]
fn connections_over_the_cap_wait_for_a_free_slot() {
    let Some(model) = tiny_model(MODEL) else { return };
    let s = Server::start(&model, "tiny", "max_connections = 16\nheader_read_timeout_secs = 3", &[]);
    let pid = s.pid();
    let idle: Vec<TcpStream> = (0..16).map(|_| connect(s.port)).collect();
    assert!(
        wait_until(Duration::from_secs(10), || accepted_count(pid, s.port) == 16),
        "16 accepted: {} (fds {})",
        accepted_count(pid, s.port),
        fd_count(pid)
    );
    let t = Instant::now();
    let mut extra = connect(s.port); // completes in the kernel's backlog
    extra.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    extra.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut buf = Vec::new();
    let early = extra.read_to_end(&mut buf);
    assert!(early.is_err() && buf.is_empty(), "no answer while the cap is reached: {early:?} {buf:?}");
    assert_eq!(accepted_count(pid, s.port), 16, "never more than the cap");
    extra.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    extra.read_to_end(&mut buf).expect("answered once a slot frees");
    let waited = t.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(waited > 1.5, "waited {waited:.2} s");
    drop(idle);
    eprintln!("cap 16: the 17th connection waited {waited:.2} s (idle ones closed at the 3 s header timeout), then got 200");
}

/// The keep-alive timeout, not the header timeout, bounds the wait between requests on one
/// connection; a fresh silent connection gets the header timeout.
#[test]
fn keep_alive_timeout_between_requests() {
    let Some(model) = tiny_model(MODEL) else { return };
    let s = Server::start(&model, "tiny", "header_read_timeout_secs = 1\nkeep_alive_timeout_secs = 3", &[]);
    let get = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
    let read_response = |c: &mut TcpStream| {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.ends_with(b"{\"status\":\"ok\"}") {
            let n = c.read(&mut buf).expect("response");
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        assert!(got.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got));
    };
    let mut c = connect(s.port);
    c.write_all(get).unwrap();
    read_response(&mut c);
    std::thread::sleep(Duration::from_secs(2)); // past the header timeout, within keep-alive
    c.write_all(get).unwrap();
    read_response(&mut c);
    let t = Instant::now();
    assert!(closed_by_server(&mut c, Duration::from_secs(10)));
    let idle_close = t.elapsed().as_secs_f64();
    assert!((2.5..6.0).contains(&idle_close), "closed {idle_close:.2} s after the response");

    let mut fresh = connect(s.port);
    let t = Instant::now();
    assert!(closed_by_server(&mut fresh, Duration::from_secs(10)));
    let fresh_close = t.elapsed().as_secs_f64();
    assert!((0.7..3.0).contains(&fresh_close), "fresh connection closed after {fresh_close:.2} s");
    eprintln!("keep-alive 3 s: idle connection closed {idle_close:.2} s after its last response; a silent new one after {fresh_close:.2} s (header timeout 1 s)");
}

/// A body that does not arrive within body_read_timeout_secs: 408, OpenAI-shaped.
#[test]
fn a_body_that_does_not_arrive_is_408() {
    let Some(model) = tiny_model(MODEL) else { return };
    let s = Server::start(&model, "tiny", "body_read_timeout_secs = 1", &[]);
    let mut c = connect(s.port);
    c.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\"")
        .unwrap();
    let t = Instant::now();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = Vec::new();
    let _ = c.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    let body: serde_json::Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(assert_openai_error(&body)["code"], "request_timeout");
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(s.chat("hi", json!({"max_tokens": 2})).status, 200);
}

/// request_timeout_secs: a non-streaming completion over it is a 504 and is cancelled (its rows
/// leave the batch: a request after it is served at once); streams are not cut.
#[test]
fn non_streaming_deadline_is_504_and_cancels() {
    let Some(model) = tiny_model(MODEL) else { return };
    let s = Server::start(&model, "tiny", "request_timeout_secs = 1", &[]);
    // 16 choices of 2000 tokens: about 3 s on 2 CPUs.
    let long = json!({"model": "tiny", "prompt": "Once", "max_tokens": 2000, "ignore_eos": true, "n": 16});
    let t = Instant::now();
    let r = s.post("/v1/completions", &long);
    let took = t.elapsed().as_secs_f64();
    assert_eq!(r.status, 504, "{}", r.text());
    let v = r.json();
    let e = assert_openai_error(&v);
    assert_eq!(e["code"], "deadline_exceeded");
    assert!((0.9..2.5).contains(&took), "answered after {took:.2} s");
    let t = Instant::now();
    assert_eq!(s.chat("hi", json!({"max_tokens": 2})).status, 200);
    let next_ms = t.elapsed().as_secs_f64() * 1e3;
    // A stream longer than the deadline runs to its end.
    let t = Instant::now();
    let mut st = s.stream("/v1/completions", &json!({"model": "tiny", "prompt": "Once", "max_tokens": 2000, "ignore_eos": true, "n": 16, "stream": true}));
    assert_eq!(st.status, 200);
    let chunks = parse_stream(&st.collect_all().unwrap());
    let stream_s = t.elapsed().as_secs_f64();
    let finished = chunks.iter().filter(|c| c["choices"][0]["finish_reason"] == "length").count();
    assert_eq!(finished, 16, "every choice of the stream ends by length");
    eprintln!("deadline 1 s: 504 after {took:.2} s, next request {next_ms:.0} ms; a {stream_s:.1} s stream ran to its end");
}

// --- HTTP/2 (prior knowledge) by hand: the client must be able to break the stream limit. ---

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK "literal header field without indexing, new name", no Huffman (short strings only).
fn hpack(headers: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in headers {
        out.push(0);
        out.push(k.len() as u8);
        out.extend_from_slice(k.as_bytes());
        out.push(v.len() as u8);
        out.extend_from_slice(v.as_bytes());
    }
    out
}

/// Reads one frame: (type, flags, stream, payload).
fn read_frame(c: &mut TcpStream) -> std::io::Result<(u8, u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    c.read_exact(&mut head)?;
    let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0; len];
    c.read_exact(&mut payload)?;
    Ok((head[3], head[4], stream, payload))
}

/// With http2_max_concurrent_streams = 2 the server says so in its SETTINGS, refuses a third
/// and fourth concurrent stream with REFUSED_STREAM, serves the two it took, and takes a new
/// stream once one of them has finished.
#[test]
fn http2_streams_per_connection_are_capped() {
    let Some(model) = tiny_model(MODEL) else { return };
    let s = Server::start(&model, "tiny", "http2_max_concurrent_streams = 2", &[]);
    let mut c = connect(s.port);
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(PREFACE).unwrap();
    c.write_all(&frame(0x4, 0, 0, &[])).unwrap();
    // The server's SETTINGS: MAX_CONCURRENT_STREAMS (0x3) = 2.
    let mut max_streams = None;
    loop {
        let (kind, flags, _, payload) = read_frame(&mut c).expect("server settings");
        if kind == 0x4 && flags & 1 == 0 {
            for p in payload.chunks(6) {
                if u16::from_be_bytes([p[0], p[1]]) == 0x3 {
                    max_streams = Some(u32::from_be_bytes([p[2], p[3], p[4], p[5]]));
                }
            }
            c.write_all(&frame(0x4, 1, 0, &[])).unwrap(); // ACK
            break;
        }
    }
    assert_eq!(max_streams, Some(2));
    let post = hpack(&[
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/v1/chat/completions"),
        (":authority", "127.0.0.1"),
        ("content-type", "application/json"),
    ]);
    // Four POSTs whose bodies have not come yet: two in flight, two over the limit.
    for id in [1, 3, 5, 7] {
        c.write_all(&frame(0x1, 0x4, id, &post)).unwrap(); // END_HEADERS, no END_STREAM
    }
    let mut refused = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while refused.len() < 2 && Instant::now() < deadline {
        let (kind, _, stream, payload) = read_frame(&mut c).expect("frames");
        assert_ne!(kind, 0x7, "GOAWAY: {payload:?}");
        if kind == 0x3 {
            let code = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
            refused.push((stream, code));
        }
    }
    refused.sort();
    assert_eq!(refused, vec![(5, 0x7), (7, 0x7)], "streams 5 and 7 refused with REFUSED_STREAM");
    // Stream 1's body arrives: it is answered (":status 200" is HPACK's static index 8, 0x88).
    let body = serde_json::to_vec(&s.chat_body("hi", json!({"max_tokens": 2}))).unwrap();
    c.write_all(&frame(0x0, 0x1, 1, &body)).unwrap();
    let mut status_1 = None;
    let mut ended_1 = false;
    while !ended_1 {
        let (kind, flags, stream, payload) = read_frame(&mut c).expect("stream 1's answer");
        if stream == 1 && kind == 0x1 {
            status_1 = payload.first().copied();
        }
        if stream == 1 && (kind == 0x0 || kind == 0x1) && flags & 0x1 != 0 {
            ended_1 = true;
        }
    }
    assert_eq!(status_1, Some(0x88), "stream 1 answered 200");
    // A slot is free again: stream 9 (GET /health) is served.
    let get = hpack(&[(":method", "GET"), (":scheme", "http"), (":path", "/health"), (":authority", "127.0.0.1")]);
    c.write_all(&frame(0x1, 0x5, 9, &get)).unwrap();
    loop {
        let (kind, _, stream, payload) = read_frame(&mut c).expect("stream 9's answer");
        assert!(!(kind == 0x3 && stream == 9), "stream 9 refused");
        if stream == 9 && kind == 0x1 {
            assert_eq!(payload.first(), Some(&0x88));
            break;
        }
    }
    eprintln!("http2: SETTINGS_MAX_CONCURRENT_STREAMS = 2; streams 5 and 7 refused (REFUSED_STREAM) while 1 and 3 were open; 1 answered 200, then stream 9 served");
}

/// SIGTERM while a stream runs: the listener closes at once (new connections are refused), an
/// idle keep-alive connection and a half-open one do not hold the exit, the stream runs to its
/// `[DONE]`, and the process exits 0 right after.
#[cfg(unix)]
#[test]
fn sigterm_drains_a_running_stream_and_drops_idle_connections() {
    let Some(model) = tiny_model(MODEL) else { return };
    let mut s = Server::tiny(&model, &[]);
    // An idle keep-alive connection (one request served, then quiet) and a half-open one.
    let mut idle = connect(s.port);
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 512];
    assert!(idle.read(&mut buf).unwrap() > 0);
    let mut half = connect(s.port);
    half.write_all(b"GET /hea").unwrap();

    let body = json!({"model": "tiny", "prompt": "Once", "max_tokens": 2000, "ignore_eos": true, "n": 4, "stream": true});
    let mut st = SseStream::open(s.port, "/v1/completions", &body, READ_TIMEOUT).expect("stream");
    assert_eq!(st.status, 200);
    let first = st.next_data().unwrap().expect("a first chunk");
    let t = Instant::now();
    assert!(Command::new("kill").args(["-TERM", &s.pid().to_string()]).status().unwrap().success());
    std::thread::sleep(Duration::from_millis(300));
    let refused = request(s.port, "GET", "/health", None, Duration::from_secs(2));
    assert!(refused.is_err(), "new connections are refused while draining: {refused:?}");
    let mut datas = vec![first];
    datas.extend(st.collect_all().expect("the rest of the stream"));
    let chunks = parse_stream(&datas);
    let finished: Vec<_> = chunks.iter().filter_map(|c| c["choices"][0]["finish_reason"].as_str()).collect();
    assert_eq!(finished, vec!["length"; 4], "all four choices ran to max_tokens");
    let status = s.wait_exit(Duration::from_secs(10)).expect("exits once the stream is done");
    assert!(status.success(), "{status}: {}", s.stderr());
    eprintln!(
        "SIGTERM: stream of {} chunks finished, process exited {:.2} s after the signal",
        chunks.len(),
        t.elapsed().as_secs_f64()
    );
    assert!(closed_by_server(&mut idle, Duration::from_secs(1)));
    assert!(closed_by_server(&mut half, Duration::from_secs(1)));
}
