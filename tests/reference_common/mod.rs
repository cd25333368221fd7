//! The reference files the tiny-model tests compare against (written by scripts/make_tiny_onnx.py
//! and scripts/make_tiny_lora.py from transformers / PEFT), parsed once here, and the two
//! comparisons every such test makes.
#![allow(dead_code)]
use std::path::PathBuf;

use serde_json::Value;

/// One prompt of a reference: its ids, the greedy continuation, and the logits of every step.
pub struct Case {
    pub name: String,
    /// The adapter the logits were computed with (None: the base model).
    pub adapter: Option<String>,
    pub prompt: Vec<u32>,
    pub greedy: Vec<u32>,
    /// steps[0]: logits after the prompt; steps[i]: after feeding greedy[i - 1].
    pub steps: Vec<Vec<f32>>,
}

/// `rel` below the build's own repository root, else below the working directory (a test
/// executable carried to another machine runs from its copy of the repository).
fn read(rel: &str) -> Value {
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel);
    let path = if built.exists() { built } else { std::env::current_dir().expect("a working directory").join(rel) };
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("reference json")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn case(p: &Value, adapter: Option<String>) -> Case {
    Case {
        name: p["name"].as_str().unwrap_or_default().to_string(),
        adapter,
        prompt: ids(&p["prompt_ids"]),
        greedy: ids(&p["greedy_ids"]),
        steps: p["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["logits"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect())
            .collect(),
    }
}

/// tests/fixtures/onnx/tiny-qwen2-reference.json: the base model, 3 prompts, 16 decode steps.
pub fn onnx_reference() -> Vec<Case> {
    read("tests/fixtures/onnx/tiny-qwen2-reference.json")["prompts"].as_array().unwrap().iter().map(|p| case(p, None)).collect()
}

/// tests/fixtures/lora/reference.json: base, adapter-a and adapter-b, 2 prompts each, 8 steps.
pub fn lora_reference() -> Vec<Case> {
    lora_reference_file("reference.json")
}

/// A reference of tests/fixtures/lora in the same schema (`llama-reference.json`: tiny llama with
/// no adapter, llama-adapter-all and llama-adapter-qk; `llama-q4_1-reference.json`: the same on the
/// Q4_1 GGUF's dequantised weights).
pub fn lora_reference_file(name: &str) -> Vec<Case> {
    let v = read(&format!("tests/fixtures/lora/{name}"));
    let mut out = Vec::new();
    for m in v["models"].as_array().unwrap() {
        let adapter = m["adapter"].as_str().map(str::to_string);
        out.extend(m["prompts"].as_array().unwrap().iter().map(|p| case(p, adapter.clone())));
    }
    out
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Index of the largest logit (first one on ties).
pub fn argmax(v: &[f32]) -> u32 {
    (0..v.len()).fold(0, |best, i| if v[i] > v[best] { i } else { best }) as u32
}

/// The device the ONNX tests open their sessions on: `INFERD_TEST_ONNX_DEVICE` (`cpu`,
/// `cuda:N`; the CUDA provider needs a `--features cuda` build and onnxruntime-gpu's library in
/// `ORT_DYLIB_PATH`), else the CPU. CI runs on the CPU; the GPU machine runs the same tests.
pub fn onnx_test_device() -> inferd::config::Device {
    match std::env::var("INFERD_TEST_ONNX_DEVICE") {
        Ok(v) if !v.is_empty() => v.parse().unwrap_or_else(|e| panic!("INFERD_TEST_ONNX_DEVICE={v}: {e}")),
        _ => inferd::config::Device::Cpu,
    }
}

/// Largest logit difference allowed between runs of the same sequence in different batch
/// shapes: none on the CPU (bit-exact), 1e-4 on CUDA (cuBLAS picks its kernels by shape; seen on
/// an H200: up to 1.1e-5, a 600-token prompt in chunks of 200 against one shot).
pub fn batch_tolerance() -> f32 {
    match onnx_test_device() {
        inferd::config::Device::Cpu => 0.0,
        _ => 1e-4,
    }
}

/// Asserts two runs' logits agree within [`batch_tolerance`], step by step.
pub fn assert_same_steps(got: &[Vec<f32>], want: &[Vec<f32>], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: number of steps");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = max_abs_diff(g, w);
        assert!(d <= batch_tolerance() && !d.is_nan(), "{what}: step {i} differs by {d}");
    }
}

/// Opens an ONNX model on [`onnx_test_device`] with `intra_op_threads` threads (one inter-op),
/// `max_batch` slots, `max_context` positions (None: the backend's default) and `fixed_shapes`
/// (None: the backend's default); panics with how to get the library when it is missing.
pub fn load_onnx(dir: &std::path::Path, intra_op_threads: usize, max_batch: usize, max_context: Option<usize>, fixed_shapes: Option<bool>) -> inferd::backend::onnx::OnnxBackend {
    let opts = inferd::backend::onnx::OnnxOptions {
        library: None,
        session: inferd::backend::onnx::SessionSpec { device: onnx_test_device(), intra_op_threads, inter_op_threads: 1 },
        max_batch,
        max_context,
        fixed_shapes,
        gpu_memory_fraction: 0.9,
    };
    inferd::backend::onnx::OnnxBackend::load(dir, &opts).unwrap_or_else(|e| panic!("{e} (run scripts/fetch_onnxruntime.sh)"))
}

/// The provider name the ONNX tests' sessions run on ("cpu", "cuda:0", ...).
pub fn onnx_test_provider() -> String {
    inferd::backend::onnx::SessionSpec { device: onnx_test_device(), intra_op_threads: 1, inter_op_threads: 1 }.provider_name()
}

/// xorshift64*: a deterministic, dependency-free stream of random values for the tests.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let (a, b) = (self.uniform().max(1e-300), self.uniform());
        ((-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()) as f32
    }

    /// Uniform in 0..n (0 when n is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.uniform() < p
    }

    pub fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.below(v.len())]
    }
}


/// `src` (a GGUF file) with every tensor dequantized to F32, written to `dst` with the same
/// metadata and tensor names: the exact-arithmetic twin of a quantized model. The CPU backend's
/// quantized kernels round activations to 8 bits as ggml does; on this twin it multiplies by the
/// dequantized weights exactly, as the GPU backend does, so the two can be held to a tight bound.
pub fn dequantized_gguf(src: &std::path::Path, dst: &std::path::Path) {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    let cpu = candle_core::Device::Cpu;
    let mut f = std::fs::File::open(src).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
    let content = gguf_file::Content::read(&mut f).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let tensors: Vec<(&str, QTensor)> = names
        .iter()
        .map(|n| {
            let q = content.tensor(&mut f, n, &cpu).expect("reads the tensor");
            (n.as_str(), QTensor::quantize(&q.dequantize(&cpu).expect("dequantizes"), GgmlDType::F32).expect("f32"))
        })
        .collect();
    let meta: Vec<(&str, &gguf_file::Value)> = content.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    let mut out = std::io::BufWriter::new(std::fs::File::create(dst).unwrap_or_else(|e| panic!("{}: {e}", dst.display())));
    gguf_file::write(&mut out, &meta, &refs).expect("writes the GGUF file");
    std::io::Write::flush(&mut out).expect("writes the GGUF file");
}
