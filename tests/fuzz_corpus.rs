//! The fuzz targets in CI: every input of the committed seed corpus (`fuzz/corpus/<target>/`)
//! and of the regression inputs (`fuzz/regressions/<target>/`, inputs the fuzzer once failed on)
//! is fed through the same harness as `scripts/fuzz.sh` (fuzz/harness.rs: the real router, engine
//! and candle backend on the tiny llama), then a few seconds of deterministic mutations of the
//! corpus (JSON-aware and byte-level) per target. The coverage-guided runs are `scripts/fuzz.sh`.
//!
//! `INFERD_FUZZ_SECS` sets the mutation time per target (default 6; 0: replay only),
//! `INFERD_FUZZ_SEED` the mutations' seed (default fixed). Skips, with a message, when the tiny
//! model has not been generated (scripts/test.sh generates it).
#[path = "../fuzz/harness.rs"]
mod harness;
mod reference_common;

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use harness::Target;
use reference_common::Rng;
use serde_json::Value;

/// One target at a time: the harness's panic flag is process-wide.
static TURN: Mutex<()> = Mutex::new(());

fn inputs(dir: &str, t: Target) -> Vec<(PathBuf, Vec<u8>)> {
    let d = harness::repo_root().join("fuzz").join(dir).join(t.name());
    let mut v: Vec<_> = std::fs::read_dir(&d)
        .map(|rd| rd.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.is_file()).collect())
        .unwrap_or_default();
    v.sort();
    v.into_iter().map(|p| (p.clone(), std::fs::read(&p).expect("corpus file reads"))).collect()
}

/// Values a client might put anywhere: bounds and just beyond, wrong types, odd strings.
fn interesting(rng: &mut Rng) -> Value {
    let pick = [
        "0", "-1", "1", "2", "4", "16", "17", "20", "21", "100", "-100", "100.5", "-2", "2.0000001", "1e-9", "1e308", "-1e308",
        "9223372036854775807", "-9223372036854775808", "18446744073709551615", "18446744073709551616", "0.5", "-0.0",
        "true", "false", "null", "[]", "{}", "[[]]", "\"\"", "\"a\"", "\"auto\"", "\"none\"", "\"required\"", "\"text\"",
        "\"tiny\"", "\"tiny-tools\"", "\"\\u0000\"", "\"<|im_start|>\"", "\"<|im_end|>\"", "\"\\ud83d\\ude00\"",
        "[\"a\",\"b\",\"c\",\"d\"]", "{\"type\":\"text\",\"text\":\"x\"}", "{\"role\":\"user\",\"content\":\"x\"}",
        "{\"type\":\"function\",\"function\":{\"name\":\"f\",\"parameters\":{\"type\":\"object\"}}}", "{\"0\":100,\"511\":-100}",
    ];
    match rng.below(10) {
        0 => Value::String("x".repeat(1 + rng.below(3000))),
        1 => Value::String((0..rng.below(40)).map(|_| char::from_u32(rng.below(0x3000) as u32).unwrap_or('?')).collect()),
        2 => Value::from(rng.next() as i64 >> rng.below(64)),
        3 => Value::from((rng.next() as f64 / u64::MAX as f64) * 4.0 - 1.0),
        _ => serde_json::from_str(pick[rng.below(pick.len())]).expect("valid JSON"),
    }
}

/// Replaces, removes or duplicates one node of a JSON document.
fn mutate_json(v: &mut Value, rng: &mut Rng, depth: usize) {
    let descend = depth < 6 && rng.chance(0.6);
    match v {
        Value::Object(map) if !map.is_empty() => {
            let keys: Vec<String> = map.keys().cloned().collect();
            let k = keys[rng.below(keys.len())].clone();
            if descend {
                mutate_json(map.get_mut(&k).expect("key exists"), rng, depth + 1);
            } else {
                match rng.below(4) {
                    0 => {
                        map.remove(&k);
                    }
                    1 => {
                        let fields = ["n", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "logit_bias", "stop",
                                      "stream", "logprobs", "top_logprobs", "tools", "tool_choice", "response_format",
                                      "stream_options", "ignore_eos", "repetition_penalty", "presence_penalty", "prompt",
                                      "messages", "tokens", "content", "lora_name", "lora_path", "load_inplace", "model"];
                        map.insert(fields[rng.below(fields.len())].to_string(), interesting(rng));
                    }
                    _ => {
                        map.insert(k, interesting(rng));
                    }
                }
            }
        }
        Value::Array(items) if !items.is_empty() => {
            let i = rng.below(items.len());
            if descend {
                mutate_json(&mut items[i], rng, depth + 1);
            } else {
                match rng.below(4) {
                    0 => {
                        items.remove(i);
                    }
                    1 => {
                        let dup = items[i].clone();
                        for _ in 0..1 + rng.below(20) {
                            items.push(dup.clone());
                        }
                    }
                    _ => items[i] = interesting(rng),
                }
            }
        }
        other => *other = interesting(rng),
    }
}

fn mutate_bytes(data: &mut Vec<u8>, rng: &mut Rng, dict: &[&[u8]]) {
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(data.len() + 1);
        match rng.below(6) {
            0 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] ^= 1 << rng.below(8);
            }
            1 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] = [0u8, 0xff, 0x7f, 0x80, b'"', b'{', b'\n', b'0'][rng.below(8)];
            }
            2 if at < data.len() => {
                let end = (at + 1 + rng.below(16)).min(data.len());
                data.drain(at..end);
            }
            3 => {
                let d = dict[rng.below(dict.len())];
                data.splice(at..at, d.iter().copied());
            }
            4 => data.truncate(at),
            _ => {
                let b = rng.next() as u8;
                data.insert(at.min(data.len()), b);
            }
        }
    }
}

/// A mutant of `seed` for `target`: JSON-aware where the input is JSON, byte-level otherwise.
fn mutant(t: Target, seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let dict: &[&[u8]] = &[b"\"messages\"", b"\"content\"", b"null", b"[]", b"{}", b"-1", b"1e308", b"\"\\u0000\"", b"\r\n",
                           b"Content-Length: 0\r\n", b"Transfer-Encoding: chunked\r\n", b"F16", b"BF16", b"I64", b"\"shape\":[",
                           b"\"data_offsets\":[", b"<|im_end|>"];
    let (prefix, body) = match t {
        Target::Tokenize | Target::Admin if !seed.is_empty() => (vec![if rng.chance(0.1) { rng.next() as u8 } else { seed[0] }], &seed[1..]),
        _ => (Vec::new(), seed),
    };
    let json_target = matches!(t, Target::Chat | Target::Completions | Target::Tokenize | Target::Admin);
    let mut out = if json_target && rng.chance(0.8) {
        match serde_json::from_slice::<Value>(body) {
            Ok(mut v) => {
                for _ in 0..1 + rng.below(3) {
                    mutate_json(&mut v, rng, 0);
                }
                serde_json::to_vec(&v).expect("serialises")
            }
            Err(_) => body.to_vec(),
        }
    } else if t == Target::Adapter && seed.len() > 3 && rng.chance(0.6) {
        mutate_adapter(seed, rng)
    } else {
        let mut b = body.to_vec();
        mutate_bytes(&mut b, rng, dict);
        b
    };
    if t == Target::Adapter {
        return out;
    }
    let mut v = prefix;
    v.append(&mut out);
    v
}

/// Mutates the adapter config's JSON or the safetensors header's JSON (dtypes, shapes, offsets),
/// keeping the framing so the mutant reaches the checks after parsing.
fn mutate_adapter(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let len = (u16::from_le_bytes([seed[1], seed[2]]) as usize).min(seed.len() - 3);
    let (config, weights) = seed[3..].split_at(len);
    let mut config = config.to_vec();
    let mut weights = weights.to_vec();
    if rng.chance(0.4) {
        if let Ok(mut v) = serde_json::from_slice::<Value>(&config) {
            mutate_json(&mut v, rng, 0);
            config = serde_json::to_vec(&v).expect("serialises");
        }
    } else if weights.len() >= 8 {
        let hlen = u64::from_le_bytes(weights[..8].try_into().expect("8 bytes")) as usize;
        if let Some(Ok(mut h)) = weights.get(8..8usize.saturating_add(hlen)).map(serde_json::from_slice::<Value>) {
            let data = weights[8 + hlen..].to_vec();
            if let Some(map) = h.as_object_mut() {
                let keys: Vec<String> = map.keys().cloned().collect();
                if !keys.is_empty() {
                    let k = &keys[rng.below(keys.len())];
                    let e = map.get_mut(k).expect("key exists");
                    match rng.below(4) {
                        0 => e["dtype"] = Value::from(["F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "X"][rng.below(8)]),
                        1 => e["shape"] = serde_json::json!([rng.below(300), rng.below(300)]),
                        2 => e["shape"] = serde_json::json!([u64::MAX >> rng.below(64)]),
                        _ => e["data_offsets"] = serde_json::json!([rng.below(data.len() + 8), rng.below(data.len() + 8)]),
                    }
                }
            }
            let hb = serde_json::to_vec(&h).expect("serialises");
            weights = (hb.len() as u64).to_le_bytes().to_vec();
            weights.extend_from_slice(&hb);
            weights.extend_from_slice(&data);
        }
    }
    let mut out = vec![seed[0]];
    out.extend_from_slice(&(config.len().min(u16::MAX as usize) as u16).to_le_bytes());
    out.extend_from_slice(&config);
    out.extend_from_slice(&weights);
    out
}

fn exercise(t: Target) {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    if !harness::model_dir().join("config.json").is_file() {
        eprintln!("skipped: {} is missing (python scripts/make_tiny_model.py tests/fixtures/generated)", harness::model_dir().display());
        return;
    }
    let corpus = inputs("corpus", t);
    assert!(!corpus.is_empty(), "fuzz/corpus/{} is empty", t.name());
    let regressions = inputs("regressions", t);
    let start = Instant::now();
    for (path, data) in corpus.iter().chain(&regressions) {
        if let Err(e) = harness::run(t, data) {
            panic!("{}: {e}", path.display());
        }
    }
    let replayed = start.elapsed();
    let secs: f64 = std::env::var("INFERD_FUZZ_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(6.0);
    let seed: u64 = std::env::var("INFERD_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x1f2e_3d4c_5b6a_7988);
    let mut rng = Rng(seed ^ (t as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut runs = 0usize;
    while Instant::now() < deadline {
        let (path, base) = &corpus[rng.below(corpus.len())];
        let m = mutant(t, base, &mut rng);
        if let Err(e) = harness::run(t, &m) {
            let dir = std::env::temp_dir().join("inferd-fuzz-failures");
            let _ = std::fs::create_dir_all(&dir);
            let file = dir.join(format!("{}-{seed}-{runs}", t.name()));
            let _ = std::fs::write(&file, &m);
            panic!("a mutant of {} failed ({e}); input written to {}", path.display(), file.display());
        }
        runs += 1;
    }
    eprintln!(
        "{}: {} corpus + {} regression inputs in {:.2} s, then {runs} mutants in {secs} s (seed {seed})",
        t.name(),
        corpus.len(),
        regressions.len(),
        replayed.as_secs_f64()
    );
}

#[test]
fn fuzz_chat() {
    exercise(Target::Chat);
}

#[test]
fn fuzz_completions() {
    exercise(Target::Completions);
}

#[test]
fn fuzz_tokenize() {
    exercise(Target::Tokenize);
}

#[test]
fn fuzz_admin() {
    exercise(Target::Admin);
}

#[test]
fn fuzz_adapter() {
    exercise(Target::Adapter);
}

#[test]
fn fuzz_raw_http() {
    exercise(Target::RawHttp);
}

/// Inputs near the body limit, which the fuzzer's small inputs never reach. Regression: four
/// stop strings of 1 MB (a 4 MiB body) made every token search each of them on the worker
/// thread all sequences share: n = 16 x 600 tokens held the model for minutes. That a token's
/// matching no longer depends on the stops' length is `engine::stop`'s
/// `huge_stops_cost_nothing_per_token` (it counts the bytes searched); here, through the whole
/// server: such stops, which never match, leave all 16 answers exactly as without them.
#[test]
fn huge_stop_strings_that_never_match_change_no_answer() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    if !harness::model_dir().join("config.json").is_file() {
        eprintln!("skipped: {} is missing", harness::model_dir().display());
        return;
    }
    let h = harness::harness();
    let base = serde_json::json!({"model": harness::MODEL, "prompt": "hello", "max_tokens": 600, "n": 16,
                                  "ignore_eos": true, "temperature": 1.0, "seed": 1});
    let mut big = base.clone();
    big["stop"] = serde_json::json!(["x".repeat(1 << 20), "y".repeat(1 << 20), "z".repeat(1 << 20), "w".repeat(900_000)]);
    let mut answers = Vec::new();
    for body in [&base, &big] {
        let t = Instant::now();
        let (status, bytes) = h
            .exchange(harness::post("/v1/completions", body.to_string(), Some(harness::USER_KEY)))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(status, 200);
        let v: Value = serde_json::from_slice(&bytes).expect("a JSON body");
        let choices = v["choices"].as_array().expect("choices");
        assert_eq!(choices.len(), 16);
        let texts: Vec<(String, String)> = choices.iter().map(|c| (c["text"].as_str().unwrap_or_default().to_owned(), c["finish_reason"].as_str().unwrap_or_default().to_owned())).collect();
        assert!(texts.iter().all(|(_, f)| f == "length"), "every choice runs to max_tokens");
        assert_eq!(v["usage"]["completion_tokens"], 16 * 600);
        eprintln!("16 x 600 tokens {}: {:?}", if body.get("stop").is_some() { "with 4 stops of ~1 MB" } else { "without stops" }, t.elapsed());
        answers.push(texts);
    }
    h.settle().unwrap();
    assert_eq!(answers[0], answers[1], "stops that never match changed an answer");
}
