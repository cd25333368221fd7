//! inferd's CPU kernels against ONNX Runtime's own on small graphs (tests/fixtures/onnx/ops,
//! written by scripts/make_op_fixtures.py).
//!
//! GroupQueryAttention (src/backend/onnx/gqa.rs) on one-node graphs and random inputs: decode
//! rows of different lengths, a right-padded first prompt, a later prompt chunk; packed and
//! separate q/k/v, both rotary layouts, the default and an explicit scale.
//!
//! MatMulNBits (src/backend/onnx/nbits.rs): int4 weights of an odd and an even number of
//! blocks, 1 to 37 activation rows; and batch invariance: a row's output is the same to the bit
//! whatever the other rows of the run.
//!
//! The server binds each past buffer as its present output (the kernels then write in place);
//! here ONNX Runtime allocates the present outputs, so both kernels also copy the past. That
//! in-place mode is covered end to end by tests/onnx_backend.rs (logits against transformers).
use std::path::{Path, PathBuf};

use inferd::backend::onnx::runtime::{environment, open_session, SessionSpec};
use inferd::backend::onnx::op_edit::{self, Kernels, Moved};
use inferd::config::Device;
use ort::session::Session;
use ort::value::Tensor;

const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD: usize = 16;
const POSITIONS: usize = 32;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx/ops").join(format!("{name}.onnx"))
}

/// The graph on ONNX Runtime's kernel and on inferd's; `moved`: the nodes the edit must move.
fn sessions(name: &str, moved: Moved) -> (Session, Session) {
    let env = environment(None).expect("ONNX Runtime (scripts/fetch_onnxruntime.sh)");
    let spec = SessionSpec { device: Device::Cpu, intra_op_threads: 2, inter_op_threads: 1 };
    let path = fixture(name);
    let bytes = std::fs::read(&path).unwrap();
    let all = Kernels { attention: true, matmul: true, lora: true };
    let (edited, n) = op_edit::reroute(&bytes, all).unwrap().expect("the node moves to inferd's kernel");
    assert_eq!(n, moved);
    let ort_kernel = open_session(env, &path, None, &spec, false).unwrap_or_else(|e| panic!("{e}"));
    let ours = open_session(env, &path, Some(&edited), &spec, true).unwrap_or_else(|e| panic!("{e}"));
    (ort_kernel, ours)
}

/// A small deterministic generator (xorshift), values in [-1, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

/// One step: `b` rows of `s` new positions, a past buffer of `past` positions, row totals
/// (seqlens_k + 1) and the mask width `total`.
struct Case {
    name: &'static str,
    b: usize,
    s: usize,
    past: usize,
    row_totals: Vec<usize>,
    total: usize,
    /// First prompt: the query positions that count in each row are those below its total.
    first_prompt: bool,
}

struct Outputs {
    output: Vec<f32>,
    present_key: Vec<f32>,
    present_value: Vec<f32>,
    present_len: usize,
}

fn run(session: &mut Session, packed: bool, c: &Case, seed: u64) -> Outputs {
    let mut rng = Rng(seed);
    let (b, s) = (c.b, c.s);
    let width = if packed { (HEADS + 2 * KV_HEADS) * HEAD } else { HEADS * HEAD };
    let t = |shape: Vec<usize>, data: Vec<f32>| Tensor::from_array((shape, data)).unwrap();
    let mut inputs = ort::inputs![
        "query" => t(vec![b, s, width], rng.vec(b * s * width)),
        "past_key" => t(vec![b, KV_HEADS, c.past, HEAD], rng.vec(b * KV_HEADS * c.past * HEAD)),
        "past_value" => t(vec![b, KV_HEADS, c.past, HEAD], rng.vec(b * KV_HEADS * c.past * HEAD)),
        "seqlens_k" => Tensor::from_array((vec![b], c.row_totals.iter().map(|&n| n as i32 - 1).collect::<Vec<i32>>())).unwrap(),
        "total_sequence_length" => Tensor::from_array((vec![1usize], vec![c.total as i32])).unwrap(),
        "cos_cache" => t(vec![POSITIONS, HEAD / 2], (0..POSITIONS * HEAD / 2).map(|i| ((i / 8) as f32 * 0.37 / (1 + i % 8) as f32).cos()).collect()),
        "sin_cache" => t(vec![POSITIONS, HEAD / 2], (0..POSITIONS * HEAD / 2).map(|i| ((i / 8) as f32 * 0.37 / (1 + i % 8) as f32).sin()).collect()),
    ];
    if !packed {
        inputs.push(("key".into(), t(vec![b, s, KV_HEADS * HEAD], rng.vec(b * s * KV_HEADS * HEAD)).into()));
        inputs.push(("value".into(), t(vec![b, s, KV_HEADS * HEAD], rng.vec(b * s * KV_HEADS * HEAD)).into()));
    }
    let out = session.run(inputs).unwrap_or_else(|e| panic!("{}: {e}", c.name));
    let get = |n: &str| out[n].try_extract_tensor::<f32>().unwrap().1.to_vec();
    let (shape, _) = out["present_key"].try_extract_tensor::<f32>().unwrap();
    Outputs { output: get("output"), present_key: get("present_key"), present_value: get("present_value"), present_len: shape[2] as usize }
}

fn compare(packed: bool, name: &str, c: &Case) {
    let (mut ort_kernel, mut ours) = sessions(name, Moved { attention: 1, matmul: 0, lora: 0 });
    let (want, got) = (run(&mut ort_kernel, packed, c, 7), run(&mut ours, packed, c, 7));
    assert_eq!(want.present_len, got.present_len, "{}", c.name);
    let mut worst = 0f32;
    for row in 0..c.b {
        let row_total = c.row_totals[row];
        // Outputs of the positions that count (a first prompt's padding positions do not).
        for j in 0..c.s {
            if c.first_prompt && j >= row_total {
                continue;
            }
            let at = (row * c.s + j) * HEADS * HEAD;
            for i in at..at + HEADS * HEAD {
                worst = worst.max((want.output[i] - got.output[i]).abs());
            }
        }
        // Cached positions in use, with this step's new ones.
        for g in 0..KV_HEADS {
            let at = (row * KV_HEADS + g) * want.present_len * HEAD;
            for i in at..at + row_total * HEAD {
                worst = worst.max((want.present_key[i] - got.present_key[i]).abs());
                worst = worst.max((want.present_value[i] - got.present_value[i]).abs());
            }
        }
    }
    assert!(worst < 1e-5, "{} ({name}): largest difference {worst}", c.name);
    assert!(got.output.iter().all(|x| x.is_finite()), "{}: non-finite output", c.name);
}

fn cases() -> Vec<Case> {
    vec![
        Case { name: "decode, 3 rows of different lengths", b: 3, s: 1, past: 16, row_totals: vec![5, 12, 8], total: 12, first_prompt: false },
        Case { name: "decode, one row at the end of its buffer", b: 1, s: 1, past: 16, row_totals: vec![16], total: 16, first_prompt: false },
        Case { name: "first prompt, right-padded rows", b: 2, s: 6, past: 8, row_totals: vec![6, 4], total: 6, first_prompt: true },
        Case { name: "later prompt chunk", b: 1, s: 4, past: 12, row_totals: vec![9], total: 9, first_prompt: false },
    ]
}

#[test]
fn packed_qkv_matches_onnx_runtime_kernel() {
    for c in cases() {
        compare(true, "packed", &c);
    }
}

#[test]
fn separate_qkv_interleaved_rotary_and_scale_match_onnx_runtime_kernel() {
    for c in cases() {
        compare(false, "separate", &c);
    }
}


/// `MatMulNBits` of the fixture `name` (K inputs) on `rows` random activation rows.
fn matmul(session: &mut Session, k: usize, rows: &[Vec<f32>]) -> Vec<Vec<f32>> {
    let a: Vec<f32> = rows.concat();
    assert_eq!(a.len(), rows.len() * k);
    let out = session.run(ort::inputs!["a" => Tensor::from_array((vec![rows.len(), k], a)).unwrap()]).unwrap();
    let (shape, y) = out["y"].try_extract_tensor::<f32>().unwrap();
    let n = shape[1] as usize;
    y.chunks_exact(n).map(|r| r.to_vec()).collect()
}

/// Activation rows like a layer norm's output: mostly small, a few large values.
fn activations(rng: &mut Rng, rows: usize, k: usize) -> Vec<Vec<f32>> {
    (0..rows).map(|_| (0..k).map(|i| rng.next() * if i % 37 == 5 { 20.0 } else { 1.5 }).collect()).collect()
}

/// The int4 fixture `name` on ONNX Runtime's kernel and on inferd's; None (the test skips) on a
/// CPU without inferd's int4 kernel.
fn int4_sessions(name: &str) -> Option<(Session, Session)> {
    if !op_edit::matmul_kernel_available() {
        eprintln!("skipped: inferd's int4 kernel needs x86-64 with AVX2 and FMA");
        return None;
    }
    Some(sessions(name, Moved { attention: 0, matmul: 1, lora: 0 }))
}

#[test]
fn int4_matmul_matches_onnx_runtime_kernel() {
    for (name, k) in [("matmul_k96", 96), ("matmul_k896", 896)] {
        let Some((mut ort_kernel, mut ours)) = int4_sessions(name) else { return };
        let mut rng = Rng(11);
        for m in [1, 2, 3, 4, 5, 8, 37] {
            let a = activations(&mut rng, m, k);
            let (want, got) = (matmul(&mut ort_kernel, k, &a), matmul(&mut ours, k, &a));
            for (row, (w, g)) in want.iter().zip(&got).enumerate() {
                let scale = w.iter().fold(0f32, |x, v| x.max(v.abs()));
                let worst = w.iter().zip(g).fold(0f32, |x, (a, b)| x.max((a - b).abs()));
                // Both quantise the activations to int8 the same way; measured: below 5e-7 x scale.
                assert!(worst <= 1e-5 * scale, "{name}, {m} rows, row {row}: largest difference {worst} for outputs up to {scale}");
                assert!(g.iter().all(|x| x.is_finite()));
            }
        }
    }
}

#[test]
fn int4_matmul_rows_do_not_depend_on_the_rest_of_the_run() {
    for (name, k) in [("matmul_k96", 96), ("matmul_k896", 896)] {
        let Some((_, mut ours)) = int4_sessions(name) else { return };
        let a = activations(&mut Rng(5), 13, k);
        let alone: Vec<Vec<f32>> = a.iter().map(|r| matmul(&mut ours, k, std::slice::from_ref(r)).remove(0)).collect();
        for m in [2, 3, 4, 5, 7, 13] {
            let together = matmul(&mut ours, k, &a[..m]);
            for (row, y) in together.iter().enumerate() {
                assert!(y.iter().zip(&alone[row]).all(|(x, z)| x.to_bits() == z.to_bits()), "{name}: row {row} of {m} differs from the row alone");
            }
        }
        // The same rows in another order.
        let reversed: Vec<Vec<f32>> = a.iter().rev().cloned().collect();
        for (row, y) in matmul(&mut ours, k, &reversed).iter().rev().enumerate() {
            assert!(y.iter().zip(&alone[row]).all(|(x, z)| x.to_bits() == z.to_bits()), "{name}: row {row} reversed");
        }
    }
}

/// Timing of the int4 kernel against ONNX Runtime's on the graphs that `scripts/make_op_fixtures.py
/// --timing-graphs DIR` writes (Qwen2.5-0.5B's projection shapes, and a 163 MB chain of 30 MLP
/// up/down pairs that streams from memory like a decode step), 1 and 8 rows, sessions
/// alternating 30 times. Not a test: `INFERD_NBITS_BENCH_DIR=DIR [INFERD_NBITS_BENCH_ONLY=
/// mm_chain_896] cargo test --release --test onnx_ops nbits_timing -- --ignored --nocapture`.
#[test]
#[ignore]
fn nbits_timing() {
    let Ok(dir) = std::env::var("INFERD_NBITS_BENCH_DIR") else { return };
    let env = environment(None).unwrap();
    let spec = SessionSpec { device: Device::Cpu, intra_op_threads: 2, inter_op_threads: 1 };
    let only = std::env::var("INFERD_NBITS_BENCH_ONLY").ok();
    for (n, k) in [(4864, 896), (896, 4864), (1152, 896), (151936, 896), (0, 896)] {
        let name = if n == 0 { format!("mm_chain_{k}") } else { format!("mm_{n}_{k}") };
        if only.as_ref().is_some_and(|o| *o != name) {
            continue;
        }
        let path = PathBuf::from(&dir).join(format!("{name}.onnx"));
        let bytes = std::fs::read(&path).unwrap();
        let (edited, _) = op_edit::reroute(&bytes, Kernels { attention: true, matmul: true, lora: true }).unwrap().unwrap();
        let mut theirs = open_session(env, &path, None, &spec, false).unwrap();
        let mut ours = open_session(env, &path, Some(&edited), &spec, true).unwrap();
        for m in [1usize, 8] {
            let a = Tensor::from_array((vec![m, k], activations(&mut Rng(3), m, k).concat())).unwrap();
            let reps = if n > 100000 || n == 0 { 3 } else { 40 };
            let (mut t_ours, mut t_theirs) = (Vec::new(), Vec::new());
            for _ in 0..30 {
                for (s, t) in [(&mut ours, &mut t_ours), (&mut theirs, &mut t_theirs)] {
                    let start = std::time::Instant::now();
                    for _ in 0..reps {
                        s.run(ort::inputs!["A" => a.view()]).unwrap();
                    }
                    t.push(start.elapsed().as_secs_f64() / reps as f64);
                }
            }
            let mut ratios: Vec<f64> = t_theirs.iter().zip(&t_ours).map(|(t, o)| t / o).collect();
            ratios.sort_by(f64::total_cmp);
            t_ours.sort_by(f64::total_cmp);
            t_theirs.sort_by(f64::total_cmp);
            let faster = ratios.iter().filter(|&&r| r > 1.0).count();
            let median = |v: &[f64]| (v[14] + v[15]) / 2.0;
            eprintln!("{name} M {m}: inferd {:.1} us, ONNX Runtime {:.1} us (medians); speed-up per pair: median {:.3}, {faster}/30 faster", median(&t_ours) * 1e6, median(&t_theirs) * 1e6, median(&ratios));
        }
    }
}
