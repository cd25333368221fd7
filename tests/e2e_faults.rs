//! Faults on disk, through the real binary (issue 19 item 5):
//!
//! - an adapter whose files vanish, are replaced or are corrupted after it was loaded keeps
//!   serving the weights it loaded (a stream running while they vanish included), until a
//!   `load_inplace` reloads it; a reload from corrupt files is refused and the old version stays;
//! - a model downloaded from a hub (a fake one on localhost, `HF_ENDPOINT`: the real hub is not
//!   reachable here) into a hub cache that cannot be written (a path through a regular file, a
//!   read-only directory) or that runs out of space (a 256 KiB tmpfs) stops the server at start
//!   with one clear line naming the cache and the OS error, not a hang or a panic; the same
//!   download into a writable cache serves.
//!
//! The read-only and full-disk cases need a tmpfs mount when running as root (root ignores
//! permission bits); where mounting is not allowed they skip with a message.
mod e2e_common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e_common::{free_port, inferd_bin, repo_root, request, request_with, tiny_model, Server, READ_TIMEOUT};
use serde_json::{json, Value};

const ADMIN_KEY: &str = "sk-faults-admin";

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn fixture(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures/lora").join(name)
}

fn load(s: &Server, name: &str, path: &str, inplace: bool) -> (u16, String) {
    let body = serde_json::to_vec(&json!({"lora_name": name, "lora_path": path, "load_inplace": inplace})).unwrap();
    let auth = format!("Bearer {ADMIN_KEY}");
    let r = request_with(s.port, "POST", "/v1/load_lora_adapter", &[("Authorization", auth.as_str())], Some(&body), READ_TIMEOUT)
        .unwrap_or_else(|e| panic!("load: {e}\n{}", s.stderr()));
    (r.status, r.text())
}

fn greedy_body(model: &str) -> Value {
    json!({"model": model, "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0, "ignore_eos": true})
}

fn greedy(s: &Server, model: &str) -> String {
    let r = s.post("/v1/completions", &greedy_body(model));
    assert_eq!(r.status, 200, "{model}: {}", r.text());
    r.json()["choices"][0]["text"].as_str().unwrap().to_string()
}

#[test]
fn an_adapter_keeps_its_loaded_weights_when_its_files_vanish_change_or_rot() {
    let Some(model) = tiny_model("tiny-qwen2.q8_0.gguf") else { return };
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("x");
    copy_dir(&fixture("adapter-a"), &dir);
    copy_dir(&fixture("adapter-b"), &root.path().join("b"));
    let toml = format!("lora_runtime_loading = true\nlora_root = {:?}\nadmin_api_key = \"{ADMIN_KEY}\"\n", root.path().display().to_string());
    let s = Server::start(&model, "tiny", &toml, &[]);
    assert_eq!(load(&s, "x", "x", false).0, 200);
    assert_eq!(load(&s, "b", "b", false).0, 200);
    let (base, with_a, with_b) = (greedy(&s, "tiny"), greedy(&s, "x"), greedy(&s, "b"));
    assert!(with_a != base && with_b != with_a, "the adapters change the answer: {base:?} {with_a:?} {with_b:?}");

    // The files vanish while a stream with the adapter runs, and stay gone.
    let mut stream = s.stream("/v1/completions", &json!({"model": "x", "prompt": "Once upon a time", "max_tokens": 24,
                                                             "temperature": 0, "ignore_eos": true, "stream": true}));
    let first = stream.next_data().unwrap().expect("a first event");
    std::fs::remove_dir_all(&dir).unwrap();
    let mut events = vec![first];
    events.extend(stream.collect_all().unwrap());
    let streamed: String = events
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str::<Value>(e).unwrap()["choices"][0]["text"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(streamed, with_a, "the stream running while the files vanished");
    assert_eq!(greedy(&s, "x"), with_a, "after the files vanished");

    // Other files appear under the same path (adapter b's): still the loaded weights.
    copy_dir(&fixture("adapter-b"), &dir);
    assert_eq!(greedy(&s, "x"), with_a, "after the files changed");

    // The loaded files rot in place (truncated, then garbage): still the loaded weights.
    let weights = dir.join("adapter_model.safetensors");
    let len = std::fs::metadata(&weights).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&weights).unwrap().set_len(len / 3).unwrap();
    assert_eq!(greedy(&s, "x"), with_a, "after the weights file was truncated");
    let (status, text) = load(&s, "x", "x", true);
    assert_eq!(status, 400, "a reload from the truncated file: {text}");
    assert_eq!(greedy(&s, "x"), with_a, "a refused reload leaves the loaded version");
    std::fs::write(&weights, b"\x08\0\0\0\0\0\0\0{\"a\":1}").unwrap();
    assert_eq!(greedy(&s, "x"), with_a, "after the weights file was overwritten");

    // An explicit reload of valid files takes the new weights.
    copy_dir(&fixture("adapter-b"), &dir);
    assert_eq!(load(&s, "x", "x", true).0, 200);
    assert_eq!(greedy(&s, "x"), with_b, "after load_inplace of adapter b's files");
    assert_eq!(greedy(&s, "tiny"), base);
    assert!(!s.stderr().contains("panicked"), "{}", s.stderr());
    eprintln!("adapter x: loaded answer {with_a:?} kept through vanish, replace, truncate, overwrite; reload -> {with_b:?}");
}

// --- a fake hub -------------------------------------------------------------------------------

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const REPO: &str = "fakeorg/tiny-llama";

/// Serves `files` the way the Hugging Face hub does for hf-hub 0.4: the repository info
/// (`/api/models/{repo}/revision/{rev}`) and `/{repo}/resolve/{rev}/{file}` with ranges,
/// `etag` and `x-repo-commit`. One thread, one request per connection.
struct FakeHub {
    port: u16,
}

impl FakeHub {
    fn start(files: Vec<(String, Vec<u8>)>) -> FakeHub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let _ = serve_one(conn, &files);
            }
        });
        FakeHub { port }
    }
    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

fn serve_one(mut conn: TcpStream, files: &[(String, Vec<u8>)]) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut r = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut range = None;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
            let (a, b) = v.trim().split_once('-').unwrap_or(("0", ""));
            range = Some((a.parse::<usize>().unwrap_or(0), b.parse::<usize>().ok()));
        }
    }
    let info = format!("/api/models/{REPO}/revision/main");
    let prefix = format!("/{REPO}/resolve/main/");
    let (status, headers, body) = if path == info {
        let siblings: Vec<Value> = files.iter().map(|(n, _)| json!({"rfilename": n})).collect();
        let v = json!({"id": REPO, "modelId": REPO, "sha": COMMIT, "siblings": siblings});
        ("200 OK", "Content-Type: application/json\r\n".to_string(), v.to_string().into_bytes())
    } else if let Some((name, data)) = path.strip_prefix(&prefix).and_then(|n| files.iter().find(|(f, _)| f == n)) {
        let (a, b) = range.unwrap_or((0, None));
        let b = b.unwrap_or(data.len().saturating_sub(1)).min(data.len().saturating_sub(1));
        let etag = format!("{:016x}{}", data.len(), name.len());
        let h = format!("ETag: \"{etag}\"\r\nX-Repo-Commit: {COMMIT}\r\nContent-Range: bytes {a}-{b}/{}\r\n", data.len());
        ("206 Partial Content", h, data[a.min(data.len())..(b + 1).min(data.len())].to_vec())
    } else {
        ("404 Not Found", String::new(), b"{\"error\":\"not found\"}".to_vec())
    };
    let head = format!("HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    conn.write_all(head.as_bytes())?;
    conn.write_all(&body)?;
    conn.flush()
}

fn hub_files() -> Option<Vec<(String, Vec<u8>)>> {
    let dir = tiny_model("tiny-llama")?;
    let names = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"];
    Some(names.iter().map(|n| (n.to_string(), std::fs::read(dir.join(n)).unwrap())).collect())
}

/// A child process killed when dropped (a failed assertion leaves no server behind).
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `inferd serve --model fakeorg/tiny-llama` with `HF_HOME` at `hf_home`; returns the exit
/// status and stderr when it exits within `wait`, or None and the port when it serves.
fn serve_from_hub(hub: &FakeHub, hf_home: &Path, wait: Duration) -> (Option<std::process::ExitStatus>, String, u16, Killed) {
    let cfg = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(cfg.path(), "[server]\n").unwrap();
    let port = free_port();
    let err_path = cfg.path().with_extension("stderr");
    let child = Command::new(inferd_bin())
        .args(["serve", "--config", cfg.path().to_str().unwrap(), "--port", &port.to_string(), "--model", REPO, "--model-id", "tiny"])
        .env("HF_HOME", hf_home)
        .env("HF_ENDPOINT", hub.endpoint())
        .env_remove("HF_HUB_OFFLINE")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let mut child = Killed(child);
    let t = Instant::now();
    while t.elapsed() < wait {
        if let Some(status) = child.0.try_wait().unwrap() {
            let mut err = String::new();
            std::fs::File::open(&err_path).unwrap().read_to_string(&mut err).unwrap();
            return (Some(status), err, port, child);
        }
        if request(port, "GET", "/health", None, Duration::from_secs(1)).is_ok_and(|r| r.status == 200) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let err = std::fs::read_to_string(&err_path).unwrap_or_default();
    (None, err, port, child)
}

/// The last line of the server's stderr (the error `main` prints), checked to be one clear line.
fn start_error(status: Option<std::process::ExitStatus>, stderr: &str, what: &str) -> String {
    let status = status.unwrap_or_else(|| panic!("{what}: the server did not exit:\n{stderr}"));
    assert!(!status.success(), "{what}: exit {status}");
    assert!(!stderr.contains("panicked"), "{what}: a panic:\n{stderr}");
    let line = stderr.lines().rev().find(|l| l.starts_with("inferd: ")).unwrap_or_else(|| panic!("{what}: no error line:\n{stderr}"));
    line.to_string()
}

/// A tmpfs mounted at a fresh directory, unmounted on drop; None (with a message) when mounting
/// is not allowed.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(opts: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount").args(["-t", "tmpfs", "-o", opts, "tmpfs"]).arg(dir.path()).stderr(Stdio::null()).status();
        if ok.is_ok_and(|s| s.success()) {
            Some(Tmpfs { dir })
        } else {
            eprintln!("SKIP part: cannot mount a tmpfs ({opts}) here");
            None
        }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn a_hub_download_into_an_unwritable_or_full_cache_is_a_clear_start_error() {
    let Some(files) = hub_files() else { return };
    let hub = FakeHub::start(files);

    // A writable cache: the download works and the model serves (the fake hub is a fair hub).
    let home = tempfile::tempdir().unwrap();
    let (status, err, port, child) = serve_from_hub(&hub, home.path(), Duration::from_secs(60));
    assert!(status.is_none(), "the download into a writable cache failed ({status:?}):\n{err}");
    let r = request(port, "POST", "/v1/completions", Some(br#"{"model":"tiny","prompt":"hi","max_tokens":3}"#), READ_TIMEOUT).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    drop(child);
    let snapshot = home.path().join("hub/models--fakeorg--tiny-llama/snapshots").join(COMMIT);
    assert!(snapshot.join("model.safetensors").is_file(), "downloaded into {}", snapshot.display());

    // A cache path that runs through a regular file (ENOTDIR, whoever runs the test).
    let file = tempfile::NamedTempFile::new().unwrap();
    let (status, err, _, _c) = serve_from_hub(&hub, &file.path().join("hf"), Duration::from_secs(60));
    let line = start_error(status, &err, "cache under a file");
    eprintln!("cache under a regular file: {line}");
    assert!(line.contains("Not a directory"), "{line}");
    assert!(line.contains(&file.path().join("hf").display().to_string()), "the line names the cache: {line}");

    // A read-only cache directory.
    let ro = if is_root() {
        Tmpfs::mount("ro,size=1m").map(|t| (t.path().to_path_buf(), Some(t)))
    } else {
        let d = tempfile::tempdir().unwrap().keep();
        std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o555)).unwrap();
        Some((d, None))
    };
    if let Some((dir, _mount)) = ro {
        let (status, err, _, _c) = serve_from_hub(&hub, &dir, Duration::from_secs(60));
        let line = start_error(status, &err, "read-only cache");
        eprintln!("read-only cache: {line}");
        assert!(line.contains("Read-only file system") || line.contains("Permission denied"), "{line}");
        assert!(line.contains(&dir.display().to_string()), "the line names the cache: {line}");
    }

    // A full disk: 256 KiB of tmpfs, less than the 429 KB weights file.
    if let Some(t) = Tmpfs::mount("size=256k") {
        let (status, err, _, _c) = serve_from_hub(&hub, t.path(), Duration::from_secs(60));
        let line = start_error(status, &err, "full disk");
        eprintln!("full disk: {line}");
        assert!(line.contains("No space left on device"), "{line}");
        assert!(line.contains(&t.path().display().to_string()), "the line names the cache: {line}");
    }
}
