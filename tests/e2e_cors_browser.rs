//! CORS in a real browser engine: headless Chromium (Debian's package) loads a page from one
//! origin (a tiny static server here, on its own port) whose script calls inferd on another
//! origin with an API key (so the browser sends a preflight). From the allowed origin the
//! calls succeed (a completion, a stream, and a 401 whose JSON the page can read); from another
//! origin the browser blocks them and the POST never reaches the model.
//!
//! Skips with a message when Chromium is missing (`apt-get install -y chromium`), unless
//! INFERD_REQUIRE_CHROMIUM=1 (CI, scripts/test.sh) makes that a failure. CHROMIUM names the
//! binary (default: chromium, then chromium-browser, on PATH).
mod e2e_common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e_common::{tiny_model, wait_child, Server};

const MODEL: &str = "tiny-llama.f32.gguf";
const KEY: &str = "sk-browser";

fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CHROMIUM").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser"].iter().find_map(|name| std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file()))
}

/// The page: three calls to inferd, each result written into `#out` as one line.
fn page(inferd_port: u16) -> String {
    format!(
        r#"<!doctype html><html><head><meta charset="utf-8"><title>cors</title></head><body><pre id="out"></pre>
<script>
const base = "http://127.0.0.1:{inferd_port}";
const out = document.getElementById("out");
const say = (line) => {{ out.textContent += line + "\n"; }};
const chat = (key, extra) => fetch(base + "/v1/chat/completions", {{
  method: "POST",
  headers: {{"Content-Type": "application/json", "Authorization": "Bearer " + key}},
  body: JSON.stringify(Object.assign({{model: "tiny", messages: [{{role: "user", content: "hi"}}], max_tokens: 3}}, extra)),
}});
(async () => {{
  try {{
    const r = await chat("{KEY}", {{}});
    const j = await r.json();
    say("CHAT status=" + r.status + " object=" + j.object + " tokens=" + j.usage.completion_tokens);
  }} catch (e) {{ say("CHAT blocked " + e.name + ": " + e.message); }}
  try {{
    const r = await chat("{KEY}", {{stream: true}});
    const text = await r.text();
    const events = text.split("\n").filter((l) => l.startsWith("data: "));
    say("STREAM status=" + r.status + " events=" + events.length + " done=" + (events[events.length - 1] === "data: [DONE]"));
  }} catch (e) {{ say("STREAM blocked " + e.name + ": " + e.message); }}
  try {{
    const r = await chat("sk-wrong", {{}});
    const j = await r.json();
    say("WRONGKEY status=" + r.status + " code=" + j.error.code);
  }} catch (e) {{ say("WRONGKEY blocked " + e.name + ": " + e.message); }}
  say("END");
}})();
</script></body></html>"#
    )
}

/// Loads `url` in headless Chromium and returns the DOM after the page's script settled.
fn dump_dom(chromium: &PathBuf, url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            // Virtual time advances only while no fetch is pending: the DOM is dumped once the
            // script's calls are done, or after 20 s of page time.
            "--virtual-time-budget=20000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", chromium.display()));
    let status = wait_child(&mut child, Duration::from_secs(90));
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let mut out = String::new();
    let mut err = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut out).unwrap();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(status.is_some_and(|s| s.success()), "chromium failed ({status:?}) on {url}:\n{err}");
    assert!(out.contains("END"), "the page script did not finish on {url}:\n{out}\nchromium stderr:\n{err}");
    out
}

/// The text of the page's `<pre id="out">`.
fn out_text(dom: &str) -> &str {
    let start = dom.find("<pre id=\"out\">").map_or(0, |i| i + "<pre id=\"out\">".len());
    let end = dom[start..].find("</pre>").map_or(dom.len(), |i| start + i);
    dom[start..end].trim()
}

fn prompt_tokens_total(s: &Server) -> u64 {
    let m = s.get("/metrics").text();
    m.lines()
        .find(|l| l.starts_with("inferd_prompt_tokens_total{"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[test]
fn allowed_origin_calls_inferd_and_another_origin_is_blocked() {
    let Some(chromium) = chromium() else {
        if std::env::var("INFERD_REQUIRE_CHROMIUM").is_ok_and(|v| v == "1") {
            panic!("INFERD_REQUIRE_CHROMIUM=1 but no chromium on PATH (apt-get install -y chromium)");
        }
        eprintln!("SKIP: the CORS browser test needs Chromium (apt-get install -y chromium, or set CHROMIUM=/path/to/chromium)");
        return;
    };
    let Some(model) = tiny_model(MODEL) else { return };
    // Two page origins: the same page on two ports, bound before inferd starts (its config names
    // the allowed one; the page names inferd's port). Only the first is allowed.
    let allowed_l = TcpListener::bind("127.0.0.1:0").unwrap();
    let other_l = TcpListener::bind("127.0.0.1:0").unwrap();
    let (allowed, other) = (allowed_l.local_addr().unwrap().port(), other_l.local_addr().unwrap().port());
    let s = Server::start(
        &model,
        "tiny",
        &format!("api_keys = [\"{KEY}\"]\ncors_allowed_origins = [\"http://127.0.0.1:{allowed}\"]"),
        &[],
    );
    let html = page(s.port);
    serve_static(allowed_l, html.clone());
    serve_static(other_l, html);

    let t = Instant::now();
    let dom = dump_dom(&chromium, &format!("http://127.0.0.1:{allowed}/"));
    let allowed_s = t.elapsed().as_secs_f64();
    eprintln!("allowed origin's page says:\n{}", out_text(&dom));
    assert!(dom.contains("CHAT status=200 object=chat.completion tokens=3"), "{dom}");
    assert!(dom.contains("STREAM status=200") && dom.contains("done=true"), "{dom}");
    assert!(dom.contains("WRONGKEY status=401 code=invalid_api_key"), "the page reads the 401's JSON: {dom}");

    let before = prompt_tokens_total(&s);
    let t = Instant::now();
    let dom = dump_dom(&chromium, &format!("http://127.0.0.1:{other}/"));
    let other_s = t.elapsed().as_secs_f64();
    eprintln!("other origin's page says:\n{}", out_text(&dom));
    for call in ["CHAT", "STREAM", "WRONGKEY"] {
        assert!(dom.contains(&format!("{call} blocked TypeError")), "{call} from another origin must be blocked: {dom}");
    }
    assert_eq!(prompt_tokens_total(&s), before, "the blocked POSTs never reached the model (preflight refused)");
    assert!(!dom.contains("status=200"), "{dom}");
    eprintln!(
        "chromium: from http://127.0.0.1:{allowed} chat, stream and 401 read ({allowed_s:.1} s); from http://127.0.0.1:{other} all three blocked ({other_s:.1} s)"
    );
}

/// Serves `body` as text/html at `/` (404 elsewhere) on `l` until the process ends.
fn serve_static(l: TcpListener, body: String) {
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { continue };
            let mut r = BufReader::new(c.try_clone().unwrap());
            let mut line = String::new();
            let mut path = String::new();
            while r.read_line(&mut line).is_ok_and(|n| n > 0) {
                if path.is_empty() {
                    path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                }
                if line == "\r\n" {
                    break;
                }
                line.clear();
            }
            let (status, text) = if path == "/" { ("200 OK", body.as_str()) } else { ("404 Not Found", "") };
            let _ = write!(c, "HTTP/1.1 {status}\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}", text.len());
        }
    });
}
