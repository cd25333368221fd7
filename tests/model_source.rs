//! Model source resolution: local GGUF files, Hugging Face directories, and hub ids resolved from a
//! prepared hub cache (the layout hf-hub writes: models--org--name/refs/<rev>, snapshots/<commit>/).
//! Uses a tiny GGUF written here, so it needs no downloaded model.
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use inferd::model::source::{parse_spec, ModelSpec};
use inferd::model::{load_assets, ModelError, SourceOptions, WeightsFormat};

/// GPT-2 byte-to-unicode for one printable ASCII byte is the byte itself.
fn byte_tokens() -> Vec<String> {
    let mut table = Vec::new();
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table.push(if printable { char::from(b) } else { let c = char::from_u32(next).unwrap(); next += 1; c }.to_string());
    }
    table
}

/// Writes a GGUF with only metadata: a byte-level BPE vocabulary (256 bytes, merges up to
/// "hello" and "Ġworld"), two ChatML control tokens and a chat template. `tokenizer: false` leaves
/// out every tokenizer key.
fn write_tiny_gguf(path: &Path, tokenizer: bool, model: &str) {
    let mut tokens = byte_tokens();
    let merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"];
    for m in merges {
        tokens.push(m.replace(' ', ""));
    }
    tokens.push("<|im_start|>".into());
    tokens.push("<|im_end|>".into());
    let n = tokens.len();
    let mut types = vec![Value::I32(1); n];
    types[n - 2] = Value::I32(3);
    types[n - 1] = Value::I32(3);
    let template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
                    {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    let arch = Value::String("llama".into());
    let ctx = Value::U32(512);
    let tok_model = Value::String(model.into());
    let pre = Value::String("smollm".into());
    let toks = Value::Array(tokens.into_iter().map(Value::String).collect());
    let types = Value::Array(types);
    let merges = Value::Array(merges.iter().map(|m| Value::String(m.to_string())).collect());
    let eos = Value::U32(n as u32 - 1);
    let bos = Value::U32(n as u32 - 2);
    let tmpl = Value::String(template.into());
    let mut meta: Vec<(&str, &Value)> = vec![("general.architecture", &arch), ("llama.context_length", &ctx)];
    if tokenizer {
        meta.extend([
            ("tokenizer.ggml.model", &tok_model),
            ("tokenizer.ggml.pre", &pre),
            ("tokenizer.ggml.tokens", &toks),
            ("tokenizer.ggml.token_type", &types),
            ("tokenizer.ggml.merges", &merges),
            ("tokenizer.ggml.eos_token_id", &eos),
            ("tokenizer.ggml.bos_token_id", &bos),
            ("tokenizer.chat_template", &tmpl),
        ]);
    }
    let mut file = std::fs::File::create(path).expect("create gguf");
    gguf_file::write(&mut file, &meta, &[]).expect("write gguf");
}

/// Lays out `files` as hf-hub's cache does for `repo` at `commit`, with `refs/<rev>` if given.
fn hub_repo(cache: &Path, repo: &str, rev: Option<&str>, commit: &str) -> PathBuf {
    let root = cache.join(format!("models--{}", repo.replace('/', "--")));
    if let Some(rev) = rev {
        std::fs::create_dir_all(root.join("refs")).unwrap();
        std::fs::write(root.join("refs").join(rev), commit).unwrap();
    }
    let snap = root.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    snap
}

fn offline(cache: &Path) -> SourceOptions {
    SourceOptions { cache_dir: Some(cache.to_path_buf()), offline: true, progress: false }
}

fn ids(assets: &inferd::model::ModelAssets, text: &str) -> Vec<u32> {
    assets.tokenizer.encode(text, true).expect("encode").get_ids().to_vec()
}

#[test]
fn local_gguf_loads_tokenizer_template_eos_and_context() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_gguf(&path, true, "gpt2");
    let assets = load_assets(path.to_str().unwrap(), &SourceOptions::default()).expect("loads");
    assert_eq!(assets.weights, WeightsFormat::Gguf(path.clone()));
    // 256 bytes + 9 merges: "hello" = 259, "Ġworld" = 264; <|im_start|> = 265, <|im_end|> = 266.
    assert_eq!(ids(&assets, "hello world"), vec![259, 264]);
    assert_eq!(ids(&assets, "<|im_start|>hello<|im_end|>"), vec![265, 259, 266]);
    assert_eq!(assets.eos_token_ids, vec![266], "declared EOS (<|im_end|>, also the template's terminator)");
    assert_eq!(assets.context_length, Some(512));
    let tmpl = assets.chat_template.expect("template");
    let out = tmpl.render(&serde_json::json!([{"role": "user", "content": "hi"}]), None, true).unwrap();
    assert_eq!(out, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
}

#[test]
fn hub_ids_resolve_offline_from_the_cache() {
    let cache = tempfile::tempdir().unwrap();
    let snap = hub_repo(cache.path(), "org/tiny", Some("main"), "0123abcd");
    write_tiny_gguf(&snap.join("tiny-q4.gguf"), true, "gpt2");
    let opts = offline(cache.path());

    for spec in ["org/tiny", "org/tiny:tiny-q4.gguf", "org/tiny@main:tiny-q4.gguf", "org/tiny@0123abcd"] {
        let assets = load_assets(spec, &opts).unwrap_or_else(|e| panic!("{spec}: {e}"));
        assert_eq!(assets.weights, WeightsFormat::Gguf(snap.join("tiny-q4.gguf")), "{spec}");
        assert_eq!(ids(&assets, "hello"), vec![259]);
    }
    // A tag ref points at the same snapshot.
    std::fs::write(cache.path().join("models--org--tiny/refs/v1"), "0123abcd\n").unwrap();
    assert!(load_assets("org/tiny@v1", &opts).is_ok());

    let err = load_assets("org/tiny:missing.gguf", &opts).err().expect("missing file");
    assert!(matches!(&err, ModelError::NotFound(s, why) if s == "org/tiny:missing.gguf" && why.contains("missing.gguf")), "{err}");
    let err = load_assets("org/absent", &opts).err().expect("repo not cached");
    assert!(matches!(&err, ModelError::NotFound(_, why) if why.contains("not in the hub cache")), "{err}");
    let err = load_assets("org/tiny@v2", &opts).err().expect("revision not cached");
    assert!(matches!(err, ModelError::NotFound(..)), "{err}");

    // Two GGUFs and no config.json: the spec must name one.
    write_tiny_gguf(&snap.join("tiny-q8.gguf"), true, "gpt2");
    let err = load_assets("org/tiny", &opts).err().expect("ambiguous");
    assert!(matches!(&err, ModelError::Invalid(_, why) if why.contains("tiny-q4.gguf") && why.contains("tiny-q8.gguf")), "{err}");
}

/// A Hugging Face directory built from the tiny GGUF's tokenizer.
fn write_hf_dir(dir: &Path, tok_config: serde_json::Value, gen_config: Option<serde_json::Value>) {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("t.gguf");
    write_tiny_gguf(&gguf, true, "gpt2");
    let assets = load_assets(gguf.to_str().unwrap(), &SourceOptions::default()).unwrap();
    assets.tokenizer.save(dir.join("tokenizer.json"), false).unwrap();
    std::fs::write(dir.join("config.json"), r#"{"model_type": "llama", "max_position_embeddings": 2048, "eos_token_id": 7}"#).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), tok_config.to_string()).unwrap();
    if let Some(g) = gen_config {
        std::fs::write(dir.join("generation_config.json"), g.to_string()).unwrap();
    }
    std::fs::write(dir.join("model.safetensors"), b"").unwrap();
}

#[test]
fn hf_directory_from_hub_cache_and_local_path() {
    let cache = tempfile::tempdir().unwrap();
    let snap = hub_repo(cache.path(), "org/hfmodel", Some("main"), "feedbeef");
    let templates = serde_json::json!([
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}{{ eos_token }}"}
    ]);
    let tok_config = serde_json::json!({"chat_template": templates, "bos_token": "<|im_start|>",
        "eos_token": {"content": "<|im_end|>", "special": true}});
    write_hf_dir(&snap, tok_config, Some(serde_json::json!({"eos_token_id": [3, 5]})));

    let assets = load_assets("org/hfmodel", &offline(cache.path())).expect("hub dir");
    assert_eq!(assets.weights, WeightsFormat::Safetensors { dir: snap.clone() });
    assert_eq!(ids(&assets, "hello world"), vec![259, 264]);
    assert_eq!(assets.eos_token_ids, vec![3, 5, 266], "generation_config ids, then tokenizer_config's eos_token");
    assert_eq!(assets.context_length, Some(2048));
    let out = assets.chat_template.expect("default template")
        .render(&serde_json::json!([{"role": "user", "content": "hi"}]), None, false).unwrap();
    assert_eq!(out, "<|im_start|>[user] hi<|im_end|>");

    // The same directory by path; chat_template.jinja wins over tokenizer_config.json, and without
    // generation_config.json the EOS comes from config.json.
    std::fs::remove_file(snap.join("generation_config.json")).unwrap();
    std::fs::write(snap.join("chat_template.jinja"), "J{{ messages | length }}").unwrap();
    let assets = load_assets(snap.to_str().unwrap(), &SourceOptions::default()).expect("local dir");
    assert_eq!(assets.eos_token_ids, vec![7, 266]);
    let out = assets.chat_template.expect("jinja file").render(&serde_json::json!([{}, {}]), None, false).unwrap();
    assert_eq!(out, "J2");
}

#[test]
fn clear_errors_for_bad_sources() {
    let dir = tempfile::tempdir().unwrap();
    let opts = SourceOptions::default();

    let missing = dir.path().join("nope.gguf");
    let err = load_assets(missing.to_str().unwrap(), &opts).err().expect("missing file");
    assert!(matches!(err, ModelError::NotFound(..)), "{err}");
    assert!(matches!(load_assets("./relative/missing", &opts), Err(ModelError::NotFound(..))));
    assert!(matches!(load_assets("not a spec", &opts), Err(ModelError::NotFound(..))));

    let empty_dir = dir.path().join("empty");
    std::fs::create_dir(&empty_dir).unwrap();
    let err = load_assets(empty_dir.to_str().unwrap(), &opts).err().expect("no config.json");
    assert!(matches!(&err, ModelError::Invalid(_, why) if why.contains("config.json")), "{err}");

    let bare = dir.path().join("bare.gguf");
    write_tiny_gguf(&bare, false, "gpt2");
    let err = load_assets(bare.to_str().unwrap(), &opts).err().expect("no tokenizer metadata");
    assert!(matches!(&err, ModelError::Invalid(_, why) if why.contains("no tokenizer metadata")), "{err}");

    let spm = dir.path().join("spm.gguf");
    write_tiny_gguf(&spm, true, "llama");
    let err = load_assets(spm.to_str().unwrap(), &opts).err().expect("unsupported tokenizer");
    assert!(matches!(&err, ModelError::Invalid(_, why) if why.contains("unsupported GGUF tokenizer model 'llama'")), "{err}");

    let not_gguf = dir.path().join("weights.bin");
    std::fs::write(&not_gguf, b"junk").unwrap();
    assert!(matches!(load_assets(not_gguf.to_str().unwrap(), &opts), Err(ModelError::Invalid(..))));
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"this is not a gguf file at all").unwrap();
    let err = load_assets(junk.to_str().unwrap(), &opts).err().expect("junk gguf");
    assert!(matches!(&err, ModelError::Invalid(_, why) if why.contains("not a readable GGUF")), "{err}");
}

#[test]
fn spec_parsing() {
    let hub = |repo: &str, rev: Option<&str>, file: Option<&str>| ModelSpec::Hub {
        repo: repo.into(),
        revision: rev.map(Into::into),
        file: file.map(Into::into),
    };
    assert_eq!(parse_spec("Qwen/Qwen2.5-0.5B-Instruct").unwrap(), hub("Qwen/Qwen2.5-0.5B-Instruct", None, None));
    assert_eq!(parse_spec("org/name:file.Q4_K_M.gguf").unwrap(), hub("org/name", None, Some("file.Q4_K_M.gguf")));
    assert_eq!(parse_spec("org/name@v1.0").unwrap(), hub("org/name", Some("v1.0"), None));
    assert_eq!(parse_spec("org/name@abc:x.gguf").unwrap(), hub("org/name", Some("abc"), Some("x.gguf")));
    for bad in ["org", "org/", "/abs/missing.gguf", "a/b/c", "org/name@", "org/name:", "", "org/na me"] {
        assert!(matches!(parse_spec(bad), Err(ModelError::NotFound(..))), "{bad:?} must be refused");
    }
}

#[test]
fn online_mode_uses_cached_files_and_reports_download_errors() {
    // Nothing listens on the discard port: any request fails fast, as on this offline machine.
    std::env::set_var("HF_ENDPOINT", "http://127.0.0.1:9");
    let cache = tempfile::tempdir().unwrap();
    let snap = hub_repo(cache.path(), "org/tiny", Some("main"), "0123abcd");
    write_tiny_gguf(&snap.join("tiny-q4.gguf"), true, "gpt2");
    let opts = SourceOptions { cache_dir: Some(cache.path().to_path_buf()), offline: false, progress: false };

    // A named file already in the cache needs no request.
    let assets = load_assets("org/tiny:tiny-q4.gguf", &opts).expect("cached file");
    assert_eq!(assets.weights, WeightsFormat::Gguf(snap.join("tiny-q4.gguf")));
    // Listing a repository needs the hub: a clean Download error, no panic.
    let err = load_assets("org/tiny", &opts).err().expect("hub unreachable");
    assert!(matches!(&err, ModelError::Download(spec, _) if spec == "org/tiny"), "{err}");
    let err = load_assets("org/other:x.gguf", &opts).err().expect("hub unreachable");
    assert!(matches!(&err, ModelError::Download(_, why) if why.contains("x.gguf")), "{err}");
}
