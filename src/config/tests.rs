use std::collections::HashMap;
use std::io::Write;

use super::*;

fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    move |k| map.get(k).cloned()
}

fn file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(text.as_bytes()).expect("write temp file");
    f
}

const FILE: &str = r#"
[server]
host = "0.0.0.0"
port = 9000
max_waiting = 7
api_key = "sk-test"

[[models]]
id = "a"
source = "models/a.gguf"
device = "cuda:1"
max_batch = 4
context_length = 2048

[[models]]
source = "org/model-b"
backend = "onnx"
"#;

fn args_with(f: &tempfile::NamedTempFile) -> ServeArgs {
    ServeArgs { config: Some(f.path().to_path_buf()), ..Default::default() }
}

#[test]
fn file_values_are_read() {
    let f = file(FILE);
    let c = load_with_env(&args_with(&f), &env_of(&[])).expect("config loads");
    assert_eq!(c.server.host, "0.0.0.0");
    assert_eq!(c.server.port, 9000);
    assert_eq!(c.server.max_waiting, 7);
    assert_eq!(c.server.api_keys, vec!["sk-test".to_string()]);
    assert_eq!(c.server.max_body_bytes, 4 * 1024 * 1024);
    assert_eq!(c.models.len(), 2);
    assert_eq!(c.models[0].id, "a");
    assert_eq!(c.models[0].device, Device::Cuda(1));
    assert_eq!(c.models[0].max_batch(), 4);
    assert_eq!(c.models[0].context_length, Some(2048));
    assert_eq!(c.models[0].prefill_chunk, None); // the default: 2048 on a GPU (256 on the CPU)
    assert_eq!(c.models[1].id, "org/model-b");
    assert_eq!(c.models[1].backend, BackendKind::Onnx);
    assert_eq!(c.models[1].device, Device::Cpu);
    let l = c.server.limits();
    // Each choice of `n` takes a waiting slot, so `n` is capped by max_waiting (7 here), not 16.
    assert_eq!((l.max_body_bytes, l.max_n), (4 * 1024 * 1024, 7));
    assert_eq!(l.auth.role_of(Some(b"sk-test")), crate::http::auth::Role::User);
    let e = c.models[0].engine_config(&c.server);
    assert_eq!((e.max_batch, e.max_waiting, e.prefill_chunk), (4, 7, 2048));
}

#[test]
fn env_overrides_file_and_flags_override_env() {
    let f = file(FILE);
    let env = env_of(&[("INFERD_HOST", "10.0.0.1"), ("INFERD_PORT", "7000"), ("INFERD_DEVICE", "cpu")]);
    let c = load_with_env(&args_with(&f), &env).expect("config loads");
    assert_eq!((c.server.host.as_str(), c.server.port), ("10.0.0.1", 7000));
    assert!(c.models.iter().all(|m| m.device == Device::Cpu));

    let args = ServeArgs { port: Some(7100), device: Some("cuda:2".into()), max_batch: Some(3), ..args_with(&f) };
    let c = load_with_env(&args, &env).expect("config loads");
    assert_eq!((c.server.host.as_str(), c.server.port), ("10.0.0.1", 7100));
    assert!(c.models.iter().all(|m| m.device == Device::Cuda(2) && m.max_batch() == 3));
}

#[test]
fn threads_come_from_env_then_flag_and_zero_means_all_cpus() {
    let f = file(FILE);
    let c = load_with_env(&args_with(&f), &env_of(&[])).expect("config loads");
    assert_eq!(c.server.threads, None);
    let env = env_of(&[("INFERD_THREADS", "3")]);
    assert_eq!(load_with_env(&args_with(&f), &env).expect("config loads").server.threads, Some(3));
    let args = ServeArgs { threads: Some(1), ..args_with(&f) };
    assert_eq!(load_with_env(&args, &env).expect("config loads").server.threads, Some(1));
    let args = ServeArgs { threads: Some(0), ..args_with(&f) };
    assert_eq!(load_with_env(&args, &env).expect("config loads").server.threads, None);
    let bad = env_of(&[("INFERD_THREADS", "many")]);
    assert!(load_with_env(&args_with(&f), &bad).unwrap_err().to_string().contains("INFERD_THREADS"));
}

#[test]
fn http_threads_come_from_the_file_then_env_then_flag() {
    let f = file(FILE);
    let c = load_with_env(&args_with(&f), &env_of(&[])).expect("config loads");
    assert_eq!(c.server.http_threads, None, "unset: the default applies");
    assert!(crate::config::default_http_threads() >= 1);
    let f = file(&FILE.replacen("[server]\n", "[server]\nhttp_threads = 3\n", 1));
    assert_eq!(load_with_env(&args_with(&f), &env_of(&[])).expect("config loads").server.http_threads, Some(3));
    let env = env_of(&[("INFERD_HTTP_THREADS", "2")]);
    assert_eq!(load_with_env(&args_with(&f), &env).expect("config loads").server.http_threads, Some(2));
    let args = ServeArgs { http_threads: Some(1), ..args_with(&f) };
    assert_eq!(load_with_env(&args, &env).expect("config loads").server.http_threads, Some(1));
    let args = ServeArgs { http_threads: Some(0), ..args_with(&f) };
    assert_eq!(load_with_env(&args, &env).expect("config loads").server.http_threads, None, "0 means the default");
    let bad = env_of(&[("INFERD_HTTP_THREADS", "lots")]);
    assert!(load_with_env(&args_with(&f), &bad).unwrap_err().to_string().contains("INFERD_HTTP_THREADS"));
}

#[test]
fn model_flag_replaces_the_list_and_beats_env_model() {
    let f = file(FILE);
    let env = env_of(&[("INFERD_MODEL", "org/from-env")]);
    let c = load_with_env(&args_with(&f), &env).expect("config loads");
    assert_eq!(c.models.len(), 1);
    assert_eq!(c.models[0].id, "org/from-env");

    let args = ServeArgs { model: Some("/nonexistent/dir/Foo.Q4.gguf".into()), ..args_with(&f) };
    let c = load_with_env(&args, &env).expect("config loads");
    assert_eq!(c.models.len(), 1);
    assert_eq!((c.models[0].id.as_str(), c.models[0].source.as_str()), ("Foo.Q4", "/nonexistent/dir/Foo.Q4.gguf"));

    let args = ServeArgs { model: Some("x.gguf".into()), model_id: Some("mine".into()), context_length: Some(512), ..args_with(&f) };
    let c = load_with_env(&args, &env).expect("config loads");
    assert_eq!((c.models[0].id.as_str(), c.models[0].context_length), ("mine", Some(512)));
}

#[test]
fn defaults_without_file_bind_localhost_8080() {
    let args = ServeArgs { model: Some("org/m".into()), ..Default::default() };
    let env = env_of(&[("INFERD_CONFIG", "/definitely/missing.toml")]);
    let err = load_with_env(&args, &env).expect_err("explicit missing file is an error");
    assert!(err.to_string().contains("cannot read config file /definitely/missing.toml"), "{err}");

    let dir = tempfile::tempdir().expect("temp dir");
    let empty = dir.path().join("empty.toml");
    std::fs::write(&empty, "").expect("write");
    let args = ServeArgs { config: Some(empty), model: Some("org/m".into()), ..Default::default() };
    let c = load_with_env(&args, &env_of(&[])).expect("config loads");
    assert_eq!((c.server.host.as_str(), c.server.port), ("127.0.0.1", 8080));
    assert_eq!(c.models[0].backend, BackendKind::Candle);
    assert!(c.server.api_keys.is_empty());
}

#[test]
fn clear_errors() {
    let f = file(FILE);
    let bad = |args: ServeArgs, env: &[(&str, &str)]| load_with_env(&args, &env_of(env)).expect_err("must fail").to_string();
    assert_eq!(bad(ServeArgs { backend: Some("tensorrt".into()), ..args_with(&f) }, &[]), "unknown backend 'tensorrt': expected 'candle' or 'onnx'");
    assert_eq!(bad(ServeArgs { device: Some("gpu0".into()), ..args_with(&f) }, &[]), "invalid device 'gpu0': expected 'cpu', 'cuda:N' or 'coreml'");
    assert!(bad(args_with(&f), &[("INFERD_PORT", "http")]).starts_with("invalid value 'http' for INFERD_PORT"));
    assert!(bad(args_with(&f), &[("INFERD_BACKEND", "x")]).contains("unknown backend 'x'"));
    let g = file("[server]\nprot = 1\n");
    assert!(bad(args_with(&g), &[]).contains("unknown field `prot`"));
    let h = file("[server]\nport = 1\n");
    assert_eq!(bad(args_with(&h), &[]), ConfigError::NoModels.to_string());
    let dup = file("[[models]]\nid='a'\nsource='x'\n[[models]]\nid='a'\nsource='y'\n");
    assert_eq!(bad(args_with(&dup), &[]), "duplicate model id 'a'");
    assert!(bad(ServeArgs { model_id: Some("z".into()), ..args_with(&f) }, &[]).contains("--model-id needs --model"));
}

#[test]
fn device_and_id_parsing() {
    assert_eq!("CUDA:3".parse::<Device>().ok(), Some(Device::Cuda(3)));
    assert_eq!("cuda".parse::<Device>().ok(), Some(Device::Cuda(0)));
    assert!("cuda:x".parse::<Device>().is_err());
    assert_eq!(model_id_from_spec("Qwen/Qwen2.5-0.5B-Instruct"), "Qwen/Qwen2.5-0.5B-Instruct");
    assert_eq!(model_id_from_spec("models/SmolLM2-135M-Instruct.Q4_1.gguf"), "SmolLM2-135M-Instruct.Q4_1");
    assert_eq!(model_id_from_spec("src/"), "src");
}

#[test]
fn repo_config_toml_serves_smollm2() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
    let args = ServeArgs { config: Some(path), ..Default::default() };
    let c = load_with_env(&args, &env_of(&[])).expect("repo config.toml loads");
    assert_eq!(c.models.len(), 1);
    assert_eq!(c.models[0].id, "smollm2-135m-instruct");
    // Relative to the config file's folder once the model has been fetched there, else as written.
    let fetched = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let expected = if fetched.exists() {
        fetched.to_string_lossy().into_owned()
    } else {
        "models/SmolLM2-135M-Instruct.Q4_1.gguf".to_string()
    };
    assert_eq!(c.models[0].source, expected);
    assert_eq!((c.server.host.as_str(), c.server.port), ("127.0.0.1", 8080));
}

#[test]
fn relative_sources_resolve_against_the_config_files_folder() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("m.gguf"), b"x").expect("write model");
    std::fs::write(
        dir.path().join("c.toml"),
        "[[models]]\nid = \"a\"\nsource = \"m.gguf\"\n[[models]]\nid = \"b\"\nsource = \"absent.gguf\"\n",
    )
    .expect("write config");
    let args = ServeArgs { config: Some(dir.path().join("c.toml")), ..Default::default() };
    let c = load_with_env(&args, &env_of(&[])).expect("config loads");
    assert_eq!(c.models[0].source, dir.path().join("m.gguf").to_string_lossy());
    // A path that does not exist next to the config stays as written (relative to the cwd).
    assert_eq!(c.models[1].source, "absent.gguf");
}

#[test]
fn onnx_execution_targets_and_threads() {
    let f = file(
        "[server]\nonnxruntime_library = \"lib/libonnxruntime.so\"\n\n\
         [[models]]\nid = \"a\"\nsource = \"m\"\nbackend = \"onnx\"\nexecution_target = \"cuda\"\ndevice_id = 1\n\
         intra_op_threads = 3\ninter_op_threads = 2\n\n\
         [[models]]\nid = \"b\"\nsource = \"m\"\nbackend = \"onnx\"\nexecution_target = \"coreml\"\n\n\
         [[models]]\nid = \"c\"\nsource = \"m\"\nbackend = \"onnx\"\n",
    );
    let c = load_with_env(&args_with(&f), &env_of(&[])).expect("config loads");
    let lib = c.server.onnxruntime_library.as_ref().expect("library path");
    assert!(lib.is_absolute() && lib.ends_with("lib/libonnxruntime.so"), "relative to the config file: {lib:?}");
    let (a, b, d) = (&c.models[0], &c.models[1], &c.models[2]);
    assert_eq!((a.backend, a.device, a.intra_op_threads, a.inter_op_threads), (BackendKind::Onnx, Device::Cuda(1), Some(3), 2));
    assert_eq!(b.device, Device::CoreMl);
    assert_eq!((d.device, d.intra_op_threads, d.inter_op_threads), (Device::Cpu, None, 1));

    let bad = |toml: &str| {
        let f = file(&format!("[[models]]\nid = \"a\"\nsource = \"m\"\n{toml}"));
        load_with_env(&args_with(&f), &env_of(&[])).expect_err("must fail").to_string()
    };
    assert!(bad("execution_target = \"tpu\"").contains("invalid value 'tpu' for execution_target"));
    assert!(bad("device = \"cpu\"\nexecution_target = \"cuda\"").contains("disagree"));
    assert!(bad("device_id = 2").contains("device_id needs execution_target"));
    assert!(bad("execution_target = \"cpu\"\ndevice_id = 1").contains("has only device 0"));
    assert_eq!("coreml".parse::<Device>().unwrap(), Device::CoreMl);
}

#[test]
fn prefill_chunk_and_max_batch_default_by_device() {
    let f = file(FILE);
    let c = load_with_env(&args_with(&f), &env_of(&[])).expect("config loads");
    let server = c.server;
    let mut m = super::model_from_spec("models/x.gguf", None);
    assert_eq!((m.engine_config(&server).prefill_chunk, m.max_batch()), (256, 16));
    m.device = Device::Cuda(0);
    assert_eq!((m.engine_config(&server).prefill_chunk, m.max_batch()), (2048, 256), "candle on a GPU");
    assert_eq!(m.engine_config(&server).max_waiting, 256, "a burst of max_batch requests is never refused");
    m.backend = BackendKind::Onnx;
    assert_eq!((m.engine_config(&server).prefill_chunk, m.max_batch()), (2048, 256), "onnx on a GPU: as many slots as the device's memory holds, up to 256");
    m.prefill_chunk = Some(512);
    m.max_batch = Some(64);
    assert_eq!((m.engine_config(&server).prefill_chunk, m.max_batch()), (512, 64));
}

#[test]
fn async_scheduling_and_the_output_lane_default_by_backend_and_device() {
    // Read from the environment (A/B switches): checked only where neither is set.
    if std::env::var_os("INFERD_CUDA_PIPELINE").is_some() || std::env::var_os("INFERD_OVERLAP_OUTPUT").is_some() {
        return;
    }
    let mut m = super::model_from_spec("models/x.gguf", None);
    assert_eq!((m.cuda_pipeline(), m.overlap_output()), (false, false), "the CPU: neither");
    m.device = Device::Cuda(0);
    assert_eq!((m.cuda_pipeline(), m.overlap_output()), (true, false), "candle on a GPU: async scheduling, no lane");
    m.backend = BackendKind::Onnx;
    assert_eq!((m.cuda_pipeline(), m.overlap_output()), (false, true), "onnx on a GPU: the lane");
}

#[test]
fn devices_give_one_worker_each_and_exclude_device() {
    let f = file("[[models]]\nsource = \"m.gguf\"\ndevices = [\"cuda:0\", \"cuda:1\"]\n");
    let c = load_with_env(&args_with(&f), &env_of(&[])).expect("config loads");
    assert_eq!(c.models[0].devices, vec![Device::Cuda(0), Device::Cuda(1)]);
    assert_eq!(c.models[0].device, Device::Cuda(0));
    let f = file("[[models]]\nsource = \"m.gguf\"\ndevice = \"cpu\"\ndevices = [\"cpu\"]\n");
    let e = load_with_env(&args_with(&f), &env_of(&[])).unwrap_err().to_string();
    assert!(e.contains("either device or"), "{e}");
    let f = file("[[models]]\nsource = \"m.gguf\"\n");
    let c = load_with_env(&args_with(&f), &env_of(&[])).expect("config loads");
    assert_eq!(c.models[0].devices, vec![Device::Cpu], "one worker by default");
    let args = ServeArgs { device: Some("cuda:3".into()), ..args_with(&f) };
    assert_eq!(load_with_env(&args, &env_of(&[])).unwrap().models[0].devices, vec![Device::Cuda(3)], "--device sets the one worker's device");
}

#[test]
fn api_keys_admin_key_cors_and_connection_settings() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("keys.txt"), "# team keys\nsk-file-1\n\n  sk-file-2  \n").expect("write keys");
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        r#"
[server]
api_key = "sk-one"
api_keys = ["sk-two", ""]
api_key_file = "keys.txt"
admin_api_key = "sk-admin"
metrics_require_key = true
cors_allowed_origins = ["https://App.example.com", "http://127.0.0.1:5173"]
header_read_timeout_secs = 5
keep_alive_timeout_secs = 30
body_read_timeout_secs = 20
request_timeout_secs = 600
max_connections = 100
http2_max_concurrent_streams = 8
"#,
    )
    .expect("write config");
    let args = ServeArgs { config: Some(cfg.clone()), model: Some("org/m".into()), ..Default::default() };
    let c = load_with_env(&args, &env_of(&[("INFERD_API_KEY", "sk-env")])).expect("config loads");
    let s = &c.server;
    assert_eq!(s.api_keys, ["sk-one", "sk-two", "sk-file-1", "sk-file-2", "sk-env"]);
    assert_eq!(s.admin_api_key.as_deref(), Some("sk-admin"));
    assert_eq!(s.cors_allowed_origins, ["https://app.example.com", "http://127.0.0.1:5173"]);
    let l = s.limits();
    use crate::http::auth::Role;
    assert_eq!(l.auth.role_of(Some(b"sk-file-2")), Role::User);
    assert_eq!(l.auth.role_of(Some(b"sk-admin")), Role::Admin);
    assert!(l.auth.metrics_require_key && !l.auth.open_admin_endpoints);
    assert_eq!(l.connections.header_read_timeout, std::time::Duration::from_secs(5));
    assert_eq!(l.connections.keep_alive_timeout, std::time::Duration::from_secs(30));
    assert_eq!((l.connections.max_connections, l.connections.http2_max_concurrent_streams), (100, 8));
    assert_eq!(l.body_read_timeout, std::time::Duration::from_secs(20));
    assert_eq!(l.request_timeout, Some(std::time::Duration::from_secs(600)));
    // The key never shows in a Debug print of the limits.
    assert!(!format!("{l:?}").contains("sk-"), "{l:?}");
    // INFERD_ADMIN_API_KEY replaces the file's admin key.
    let c = load_with_env(&args, &env_of(&[("INFERD_ADMIN_API_KEY", "sk-env-admin")])).expect("config loads");
    assert_eq!(c.server.admin_api_key.as_deref(), Some("sk-env-admin"));

    // Defaults.
    let empty = dir.path().join("empty.toml");
    std::fs::write(&empty, "").expect("write");
    let args = ServeArgs { config: Some(empty), model: Some("org/m".into()), ..Default::default() };
    let c = load_with_env(&args, &env_of(&[])).expect("config loads");
    let l = c.server.limits();
    assert!(!l.auth.has_user_keys() && !l.auth.has_admin_key() && !l.auth.open_admin_endpoints && !l.auth.metrics_require_key);
    assert!(l.cors_allowed_origins.is_empty());
    assert_eq!(l.connections, crate::http::conn::ConnectionLimits::default());
    assert_eq!(l.connections.header_read_timeout.as_secs(), 10);
    assert_eq!(l.connections.keep_alive_timeout.as_secs(), 75);
    assert_eq!((l.connections.max_connections, l.connections.http2_max_concurrent_streams), (4096, 100));
    assert_eq!((l.body_read_timeout.as_secs(), l.request_timeout), (60, None));
}

#[test]
fn key_and_connection_setting_errors() {
    let dir = tempfile::tempdir().expect("temp dir");
    let load = |server: &str| {
        let cfg = dir.path().join("c.toml");
        std::fs::write(&cfg, format!("[server]\n{server}\n")).expect("write");
        let args = ServeArgs { config: Some(cfg), model: Some("org/m".into()), ..Default::default() };
        load_with_env(&args, &env_of(&[])).map(|_| ()).map_err(|e| e.to_string())
    };
    let err = load("api_keys = [\"same\"]\nadmin_api_key = \"same\"").unwrap_err();
    assert!(err.contains("must differ"), "{err}");
    assert!(!err.contains("\"same\""), "errors never print a key: {err}");
    let err = load("admin_api_key = \"a\"\nopen_admin_endpoints = true").unwrap_err();
    assert!(err.contains("open_admin_endpoints"), "{err}");
    let err = load("api_keys = [\"two words\"]").unwrap_err();
    assert!(err.contains("user API key #1") && !err.contains("two words"), "{err}");
    let err = load("api_key_file = \"nope.txt\"").unwrap_err();
    assert!(err.contains("nope.txt"), "{err}");
    std::fs::write(dir.path().join("blank.txt"), "# nothing\n\n").expect("write");
    let err = load("api_key_file = \"blank.txt\"").unwrap_err();
    assert!(err.contains("no key"), "{err}");
    let err = load("cors_allowed_origins = [\"https://app.example.com/\"]").unwrap_err();
    assert!(err.contains("cors_allowed_origins") && err.contains("trailing slash"), "{err}");
    for zero in ["header_read_timeout_secs", "keep_alive_timeout_secs", "body_read_timeout_secs", "max_connections", "http2_max_concurrent_streams"] {
        let err = load(&format!("{zero} = 0")).unwrap_err();
        assert!(err.contains(zero), "{err}");
    }
    // request_timeout_secs = 0 is "no deadline", like leaving it out.
    assert!(load("request_timeout_secs = 0").is_ok());
    assert!(load("open_admin_endpoints = true").is_ok());
}

#[test]
fn tool_call_parser_is_read_and_checked() {
    use crate::tools::ToolFormat;
    let f = file("[[models]]\nsource = \"a.gguf\"\ntool_call_parser = \"llama3_json\"\n[[models]]\nsource = \"b.gguf\"\n[[models]]\nsource = \"c.gguf\"\ntool_call_parser = \"none\"\n");
    let c = load_with_env(&args_with(&f), &env_of(&[])).expect("config loads");
    assert_eq!(c.models[0].tool_call_parser, ToolCallParser::Format(ToolFormat::Llama3Json));
    assert_eq!(c.models[1].tool_call_parser, ToolCallParser::Auto);
    assert_eq!(c.models[1].tool_call_parser.resolve(Some("{{ '[TOOL_CALLS]' }}")), Some(ToolFormat::Mistral));
    assert_eq!(c.models[1].tool_call_parser.resolve(None), None, "no template: no chat, nothing to parse");
    assert_eq!(c.models[2].tool_call_parser.resolve(Some("<tool_call>")), None);
    let bad = file("[[models]]\nsource = \"a.gguf\"\ntool_call_parser = \"xml\"\n");
    let e = load_with_env(&args_with(&bad), &env_of(&[])).expect_err("unknown parser");
    assert!(e.to_string().contains("tool_call_parser"), "{e}");
}
