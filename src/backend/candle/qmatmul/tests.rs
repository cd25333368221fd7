use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::blocks::{self, Kind};
use super::quantize::QActs;
use super::QMatrix;

const TYPES: [GgmlDType; 7] = [
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q4K,
    GgmlDType::Q6K,
];

/// Deterministic pseudo-random values in about [-1, 1].
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn qtensor(dtype: GgmlDType, n: usize, k: usize) -> QTensor {
    let w = Tensor::from_vec(values(n * k, 7), (n, k), &Device::Cpu).unwrap();
    QTensor::quantize(&w, dtype).unwrap()
}

/// x W^T with W dequantized by candle and f64 sums.
fn reference(q: &QTensor, x: &[f32], k: usize) -> Vec<f32> {
    let w = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut out = Vec::new();
    for row in x.chunks_exact(k) {
        for wr in w.chunks_exact(k) {
            out.push(row.iter().zip(wr).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum::<f64>() as f32);
        }
    }
    out
}

#[test]
fn matmul_matches_dequantized_weights_for_every_type() {
    let (n, k, m) = (40, 512, 5);
    let x = values(m * k, 3);
    for dtype in TYPES {
        let q = qtensor(dtype, n, k);
        let got = QMatrix::from_qtensor(&q).unwrap().unwrap().matmul(&x);
        let want = reference(&q, &x, k);
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        // Activations are quantized to 8 bits: errors of about 1% of the largest output.
        assert!(worst < 0.02 * scale, "{dtype:?}: worst error {worst} of {scale}");
    }
}

#[test]
fn every_row_gives_the_same_bits_alone_or_in_a_batch() {
    let (n, k, m) = (24, 256, 7);
    let x = values(m * k, 11);
    for dtype in TYPES {
        let mat = QMatrix::from_qtensor(&qtensor(dtype, n, k)).unwrap().unwrap();
        let all = mat.matmul(&x);
        for r in 0..m {
            let alone = mat.matmul(&x[r * k..(r + 1) * k]);
            assert_eq!(alone, all[r * n..(r + 1) * n], "{dtype:?} row {r}");
        }
    }
}

/// Batches of every size up to 11 rows (the per-row kernel below `GEMM_MIN_ROWS`, the GEMM's
/// register tiles and their remainders above it) and weight heights that leave partial tiles,
/// partial pool ranges and several packed sub-blocks: each row's bits equal the row alone.
#[test]
fn batch_invariance_holds_across_tile_remainders() {
    let k = 256;
    let x = values(11 * k, 17);
    for dtype in TYPES {
        for n in [5, 70, 1001] {
            let mat = QMatrix::from_qtensor(&qtensor(dtype, n, k)).unwrap().unwrap();
            let alone: Vec<Vec<f32>> = (0..11).map(|r| mat.matmul(&x[r * k..(r + 1) * k])).collect();
            for m in 2..=11 {
                let all = mat.matmul(&x[..m * k]);
                for r in 0..m {
                    assert!(alone[r] == all[r * n..(r + 1) * n], "{dtype:?} n {n}: row {r} of a batch of {m}");
                }
            }
        }
    }
}

#[test]
fn simd_and_portable_kernels_agree() {
    let (n, k, m) = (6, 256, 3);
    let x = values(m * k, 5);
    let acts = QActs::new(&x, k);
    for (dtype, kind) in [
        (GgmlDType::Q4_0, Kind::Q4_0),
        (GgmlDType::Q4_1, Kind::Q4_1),
        (GgmlDType::Q5_0, Kind::Q5_0),
        (GgmlDType::Q5_1, Kind::Q5_1),
        (GgmlDType::Q8_0, Kind::Q8_0),
    ] {
        let q = qtensor(dtype, n, k);
        let data = q.data().unwrap();
        let rb = k / 32 * kind.bytes();
        for j in 0..n {
            let w = &data[j * rb..(j + 1) * rb];
            let mut portable = [0f32; 3];
            blocks::dot_rows_scalar(kind, w, &acts, 0, &mut portable);
            let mut fast = [0f32; 3];
            super::own_kernel()(kind, w, &acts, 0, &mut fast);
            for (a, b) in portable.iter().zip(fast) {
                assert!((a - b).abs() <= 1e-4 * a.abs().max(1.0), "{kind:?} row {j}: {a} vs {b}");
            }
        }
    }
}

#[test]
fn dequantized_rows_match_candle() {
    let (n, k) = (9, 256);
    for dtype in TYPES {
        let q = qtensor(dtype, n, k);
        let want = q.dequantize(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        let got = QMatrix::from_qtensor(&q).unwrap().unwrap().dequantize_rows(&[3, 0, 8]).unwrap();
        for (i, id) in [3usize, 0, 8].iter().enumerate() {
            assert_eq!(got[i * k..(i + 1) * k], want[*id][..], "{dtype:?} row {id}");
        }
        assert!(QMatrix::from_qtensor(&q).unwrap().unwrap().dequantize_rows(&[9]).is_err());
    }
}

#[test]
fn dense_types_are_left_to_candle() {
    let w = Tensor::zeros((4, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
    let q = QTensor::quantize(&w, GgmlDType::F32).unwrap();
    assert!(QMatrix::from_qtensor(&q).unwrap().is_none());
}

#[test]
fn own_kernels_equal_the_exact_product_of_the_quantized_values() {
    let (n, k, m) = (16, 512, 3);
    let x = values(m * k, 13);
    let acts = QActs::new(&x, k);
    let xq: Vec<f64> = (0..m * k).map(|i| f64::from(acts.qs[i]) * f64::from(acts.d[i / 32])).collect();
    for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q5_1, GgmlDType::Q8_0] {
        let q = qtensor(dtype, n, k);
        let w = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let got = QMatrix::from_qtensor(&q).unwrap().unwrap().matmul(&x);
        for r in 0..m {
            for j in 0..n {
                let want: f64 = (0..k).map(|i| xq[r * k + i] * f64::from(w[j * k + i])).sum();
                let g = f64::from(got[r * n + j]);
                // The minimum term uses ggml's f16-rounded block sums: a relative 1e-3 of it.
                assert!((g - want).abs() < 2e-3 * want.abs().max(1.0), "{dtype:?} ({r},{j}): {g} vs {want}");
            }
        }
    }
}

#[test]
fn kquant_kernels_match_candles_per_row_dot_products() {
    let (n, k, m) = (12, 512, 6);
    let x = values(m * k, 21);
    for dtype in [GgmlDType::Q4K, GgmlDType::Q6K] {
        let q = qtensor(dtype, n, k);
        let ours = QMatrix::build(&q, true).unwrap().unwrap();
        let candle = QMatrix::build(&q, false).unwrap().unwrap();
        let (a, b) = (ours.matmul(&x), candle.matmul(&x));
        let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs() / y.abs().max(1.0)).fold(0f32, f32::max);
        eprintln!("{dtype:?}: ours vs candle, worst relative difference {worst:e} ({ours:?})");
        assert!(worst < 1e-5, "{dtype:?}: ours and candle's differ by {worst}");
    }
}

/// Kernel micro-benchmark, GEMM vs per-row tiles interleaved in one process (2 threads as
/// configured by the pool): `cargo test --release --lib qmatmul::tests::gemm_ab -- --ignored
/// --nocapture`. Shapes: Qwen2.5-0.5B's gate+up (9728x896) and q (896x896).
#[test]
#[ignore]
fn gemm_ab() {
    use std::time::Instant;
    let rounds: usize = std::env::var("AB_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let shapes = [(GgmlDType::Q5_0, 9728, 896), (GgmlDType::Q4K, 896, 4864), (GgmlDType::Q6K, 896, 4864), (GgmlDType::Q8_0, 896, 896), (GgmlDType::Q5_0, 896, 896)];
    let nshapes = std::env::var("AB_SHAPES").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    for (dtype, n, k) in shapes.into_iter().take(nshapes) {
        let mut mat = QMatrix::from_qtensor(&qtensor(dtype, n, k)).unwrap().unwrap();
        let ms: Vec<usize> = std::env::var("AB_M").map_or(vec![4, 16, 64, 210], |v| v.split(',').map(|x| x.parse().unwrap()).collect());
        for &m in &ms {
            let x = values(m * k, 1);
            let iters = (2000 / m).max(2);
            let mut best = [f64::MAX; 2];
            for _ in 0..rounds {
                for (v, on) in [(0, false), (1, true)] {
                    if std::env::var("AB_ONLY").is_ok_and(|o| o != if on { "gemm" } else { "rows" }) {
                        continue;
                    }
                    mat.set_gemm(on);
                    let (t, c) = (Instant::now(), thread_cpu_ns());
                    for _ in 0..iters {
                        std::hint::black_box(mat.matmul(&x));
                    }
                    // With INFERD_THREADS=1 the caller does all the work: its CPU time is immune to
                    // other processes taking the core (wall time is not).
                    let dt = if std::env::var("AB_CPU").is_ok() { (thread_cpu_ns() - c) as f64 * 1e-9 } else { t.elapsed().as_secs_f64() };
                    best[v] = best[v].min(dt / iters as f64);
                }
            }
            let pairs = (n * k / 32 * m) as f64;
            println!(
                "{dtype:?} {n}x{k} m={m}: rows {:.3} ms ({:.2} ns/blk-row), gemm {:.3} ms ({:.2} ns/blk-row), x{:.2}",
                best[0] * 1e3, best[0] * 1e9 / pairs, best[1] * 1e3, best[1] * 1e9 / pairs, best[0] / best[1]
            );
        }
    }
}

/// This thread's time on a CPU so far (ns), from /proc/thread-self/schedstat.
fn thread_cpu_ns() -> u64 {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    s.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0)
}
