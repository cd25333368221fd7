//! Raw HTTP/1.1 client of the end-to-end tests: one request per connection (`Connection: close`),
//! chunked bodies decoded by hand, and an incremental SSE reader. Every read has a timeout.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::Value;

/// A whole HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    /// The body as JSON (panics with the body text when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("status {}: body is not JSON ({e}): {}", self.status, self.text()))
    }

    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    let name = name.to_ascii_lowercase();
    headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
}

fn connect(port: u16, timeout: Duration) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(5))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    Ok(s)
}

fn send_request(s: &mut TcpStream, port: u16, method: &str, path: &str, body: Option<&[u8]>) -> std::io::Result<()> {
    send_request_with(s, port, method, path, &[], body)
}

fn send_request_with(
    s: &mut TcpStream,
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> std::io::Result<()> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", b.len()));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    if let Some(b) = body {
        // A server may answer (413) and close before reading a large body: keep what it said.
        if let Err(e) = s.write_all(b) {
            if body.map_or(0, <[u8]>::len) < 65536 {
                return Err(e);
            }
        }
    }
    s.flush()
}

/// Reads the status line and headers.
fn read_head(r: &mut impl BufRead) -> std::io::Result<(u16, Vec<(String, String)>)> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::Error::other("connection closed inside the headers"));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    Ok((status, headers))
}

/// Reads one chunk of a chunked body; None after the last (zero-size) chunk.
fn read_chunk(r: &mut impl BufRead) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::Error::other("connection closed before the last chunk"));
    }
    let size_s = line.trim().split(';').next().unwrap_or("");
    let size = usize::from_str_radix(size_s, 16).map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
    if size == 0 {
        // Trailers (none expected) end with an empty line.
        loop {
            line.clear();
            if r.read_line(&mut line)? == 0 || line.trim().is_empty() {
                break;
            }
        }
        return Ok(None);
    }
    let mut data = vec![0; size];
    r.read_exact(&mut data)?;
    let mut crlf = [0u8; 2];
    r.read_exact(&mut crlf)?;
    Ok(Some(data))
}

fn read_body(r: &mut impl BufRead, headers: &[(String, String)]) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    if header(headers, "transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        while let Some(c) = read_chunk(r)? {
            body.extend_from_slice(&c);
        }
    } else if let Some(len) = header(headers, "content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.resize(len, 0);
        r.read_exact(&mut body)?;
    } else {
        r.read_to_end(&mut body)?;
    }
    Ok(body)
}

/// One HTTP/1.1 request with `Connection: close`; reads the whole answer within `timeout` per read.
pub fn request(port: u16, method: &str, path: &str, body: Option<&[u8]>, timeout: Duration) -> std::io::Result<Response> {
    request_with(port, method, path, &[], body, timeout)
}

/// `request` with extra headers.
pub fn request_with(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
    timeout: Duration,
) -> std::io::Result<Response> {
    let mut s = connect(port, timeout)?;
    send_request_with(&mut s, port, method, path, headers, body)?;
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r)?;
    let body = read_body(&mut r, &headers)?;
    Ok(Response { status, headers, body })
}

/// An open streaming response, read event by event.
pub struct SseStream {
    reader: BufReader<TcpStream>,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    chunked: bool,
    buf: Vec<u8>,
    eof: bool,
}

impl SseStream {
    /// Sends `body` to `path` and reads the response head.
    pub fn open(port: u16, path: &str, body: &Value, timeout: Duration) -> std::io::Result<SseStream> {
        let mut s = connect(port, timeout)?;
        let bytes = serde_json::to_vec(body).map_err(std::io::Error::other)?;
        send_request(&mut s, port, "POST", path, Some(&bytes))?;
        let mut reader = BufReader::new(s);
        let (status, headers) = read_head(&mut reader)?;
        let chunked = header(&headers, "transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        Ok(SseStream { reader, status, headers, chunked, buf: Vec::new(), eof: false })
    }

    /// The first header called `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    /// For a non-200 answer: the whole (JSON) body.
    pub fn into_response(mut self) -> std::io::Result<Response> {
        let body = read_body(&mut self.reader, &self.headers)?;
        Ok(Response { status: self.status, headers: self.headers, body })
    }

    fn fill(&mut self) -> std::io::Result<bool> {
        if self.eof {
            return Ok(false);
        }
        if self.chunked {
            match read_chunk(&mut self.reader)? {
                Some(c) => self.buf.extend_from_slice(&c),
                None => self.eof = true,
            }
        } else {
            let mut tmp = [0u8; 4096];
            let n = self.reader.read(&mut tmp)?;
            if n == 0 {
                self.eof = true;
            }
            self.buf.extend_from_slice(&tmp[..n]);
        }
        Ok(!self.eof || !self.buf.is_empty())
    }

    /// The next event's `data` (data lines joined by `\n`), skipping comment-only events
    /// (keep-alives). None at the end of the body.
    pub fn next_data(&mut self) -> std::io::Result<Option<String>> {
        loop {
            if let Some(pos) = find_event_end(&self.buf) {
                let event: Vec<u8> = self.buf.drain(..pos.0 + pos.1).collect();
                let text = String::from_utf8(event[..pos.0].to_vec()).map_err(std::io::Error::other)?;
                let data: Vec<&str> = text
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:").map(|d| d.strip_prefix(' ').unwrap_or(d)))
                    .collect();
                if data.is_empty() {
                    continue;
                }
                return Ok(Some(data.join("\n")));
            }
            if self.eof {
                if self.buf.iter().all(u8::is_ascii_whitespace) {
                    return Ok(None);
                }
                return Err(std::io::Error::other(format!(
                    "stream ended inside an event: {:?}",
                    String::from_utf8_lossy(&self.buf)
                )));
            }
            self.fill()?;
        }
    }

    /// Reads every remaining event's data until the body ends.
    pub fn collect_all(&mut self) -> std::io::Result<Vec<String>> {
        let mut out = Vec::new();
        while let Some(d) = self.next_data()? {
            out.push(d);
        }
        Ok(out)
    }
}

/// End of the first event in `buf`: (length of the event, length of the blank-line separator).
fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    for i in 0..buf.len() {
        if buf[i..].starts_with(b"\r\n\r\n") {
            return Some((i, 4));
        }
        if buf[i..].starts_with(b"\n\n") {
            return Some((i, 2));
        }
    }
    None
}

