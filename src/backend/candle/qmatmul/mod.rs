//! Quantized matrix times activation rows, on the CPU, spread over `pool::global()`.
//!
//! Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 weights run our own kernels (AVX2 where the CPU has it, a
//! portable loop otherwise): activations are quantized like ggml's Q8_0/Q8_1 and each weight
//! block is read once for up to four activation rows. The k-quants (Q2_K..Q6_K) and Q8_K use
//! candle's per-row dot products (AVX2 in candle), driven by the same pool. Each output is
//! computed the same way whatever the number of rows, so a sequence's logits do not depend on
//! what else is in the batch.
pub mod blocks;
pub mod quantize;

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
mod kquants_avx2;

use candle_core::quantized::k_quants::{self, GgmlType};
use candle_core::quantized::{GgmlDType, QTensor};

use self::blocks::Kind;
use self::quantize::{QActs, QK};
use super::pool::{self, SharedMut};

/// A quantized [n, k] weight matrix (n output features, k input features).
pub struct QMatrix {
    n: usize,
    k: usize,
    imp: Imp,
    /// Whether batches of `GEMM_MIN_ROWS` or more rows use the GEMM kernel (off only for A/B
    /// runs: `INFERD_NO_GEMM=1`, or `set_gemm`).
    gemm: bool,
}

enum Imp {
    Own { kind: Kind, data: Vec<u8> },
    /// Q4_K / Q6_K with our multi-row AVX2 kernels (x86 with AVX2 only).
    #[cfg(target_arch = "x86_64")]
    KQuant { kind: kquants_avx2::KKind, data: Vec<u8> },
    Candle(Box<dyn CandleRows>),
}

#[cfg(target_arch = "x86_64")]
const _: () = assert!(std::mem::size_of::<k_quants::BlockQ8K>() == kquants_avx2::Q8K_BYTES);

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.imp {
            Imp::Own { kind, .. } => format!("{kind:?}"),
            #[cfg(target_arch = "x86_64")]
            Imp::KQuant { kind, .. } => format!("{kind:?}"),
            Imp::Candle(c) => format!("{:?} (candle)", c.dtype()),
        };
        write!(f, "QMatrix[{}x{}, {kind}]", self.n, self.k)
    }
}

fn own_kind(d: GgmlDType) -> Option<Kind> {
    Some(match d {
        GgmlDType::Q4_0 => Kind::Q4_0,
        GgmlDType::Q4_1 => Kind::Q4_1,
        GgmlDType::Q5_0 => Kind::Q5_0,
        GgmlDType::Q5_1 => Kind::Q5_1,
        GgmlDType::Q8_0 => Kind::Q8_0,
        _ => return None,
    })
}

#[cfg(target_arch = "x86_64")]
fn own_kquant(d: GgmlDType) -> Option<kquants_avx2::KKind> {
    if !avx2::available() {
        return None;
    }
    match d {
        GgmlDType::Q4K => Some(kquants_avx2::KKind::Q4K),
        GgmlDType::Q6K => Some(kquants_avx2::KKind::Q6K),
        _ => None,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn own_kquant(_: GgmlDType) -> Option<std::convert::Infallible> {
    None
}

/// From this many activation rows on, the own kinds run `avx2::gemm` (weights unpacked once per
/// sub-block for all rows) and Q4_K `kquants_avx2::gemm`; fewer rows run the per-row tile
/// kernels. Both give the same bits. Single-thread CPU-time micro-benchmark (Q5_0 9728x896):
/// the GEMM was 0.96x of the per-row kernel at 4 rows, 1.05x at 8, 1.15x at 12, 1.24x at 16;
/// Q4_K (896x4864) 1.32x already at 4 rows.
const GEMM_MIN_ROWS: usize = 8;
const KQUANT_GEMM_MIN_ROWS: usize = 4;

/// Pool ranges of output rows: about 16 per thread, at least 8 rows each.
const RANGES_PER_THREAD: usize = 16;
const MIN_RANGE: usize = 8;

/// The tiled loop of our kernels over weight rows `js`: rows in sub-blocks of about 16 KiB,
/// which stay in cache while every tile of up to 4 activation rows passes over them.
/// `dot(j, r0, out)` fills `out` (1 to 4 values) with weight row j against activation rows
/// `r0..`; the values land in `dst[(r0 + t) * n + j]`.
fn tiles(js: std::ops::Range<usize>, m: usize, n: usize, row_bytes: usize, dst: SharedMut<f32>, dot: impl Fn(usize, usize, &mut [f32])) {
    let sub = (16 * 1024 / row_bytes).clamp(4, 64);
    let mut tmp = [0f32; 4];
    for s0 in js.clone().step_by(sub) {
        for r0 in (0..m).step_by(4) {
            let cnt = (m - r0).min(4);
            for j in s0..(s0 + sub).min(js.end) {
                dot(j, r0, &mut tmp[..cnt]);
                for (t, v) in tmp[..cnt].iter().enumerate() {
                    // SAFETY: (r0 + t, j) is inside the [m, n] output and j belongs to this pool
                    // range alone; the output outlives the pool job.
                    unsafe { *dst.ptr().add((r0 + t) * n + j) = *v };
                }
            }
        }
    }
}

impl QMatrix {
    /// From a 2-D GGUF tensor of a block type; None for dense types (F32, F16, BF16).
    /// `INFERD_CANDLE_KQUANTS=1` sends Q4_K/Q6_K to candle's kernels instead of ours (A/B runs).
    pub fn from_qtensor(q: &QTensor) -> candle_core::Result<Option<QMatrix>> {
        Self::build(q, std::env::var_os("INFERD_CANDLE_KQUANTS").is_none())
    }

    /// `from_qtensor`, choosing whether Q4_K/Q6_K use our kernels (where the CPU allows).
    pub fn build(q: &QTensor, own_kquants: bool) -> candle_core::Result<Option<QMatrix>> {
        let (n, k) = q.shape().dims2()?;
        let data = q.data()?;
        let imp = if let Some(kind) = own_kind(q.dtype()) {
            if k % QK != 0 {
                candle_core::bail!("{:?} weight width {k} is not a multiple of {QK}", q.dtype());
            }
            Imp::Own { kind, data: data.into_owned() }
        } else if let Some(kind) = own_kquant(q.dtype()).filter(|_| own_kquants) {
            #[cfg(target_arch = "x86_64")]
            {
                if k % 256 != 0 {
                    candle_core::bail!("{:?} weight width {k} is not a multiple of 256", q.dtype());
                }
                Imp::KQuant { kind, data: data.into_owned() }
            }
            #[cfg(not(target_arch = "x86_64"))]
            match kind {}
        } else {
            let c: Box<dyn CandleRows> = match q.dtype() {
                GgmlDType::Q2K => Box::new(CandleBlocks::<k_quants::BlockQ2K>::new(&data, n, k)?),
                GgmlDType::Q3K => Box::new(CandleBlocks::<k_quants::BlockQ3K>::new(&data, n, k)?),
                GgmlDType::Q4K => Box::new(CandleBlocks::<k_quants::BlockQ4K>::new(&data, n, k)?),
                GgmlDType::Q5K => Box::new(CandleBlocks::<k_quants::BlockQ5K>::new(&data, n, k)?),
                GgmlDType::Q6K => Box::new(CandleBlocks::<k_quants::BlockQ6K>::new(&data, n, k)?),
                GgmlDType::Q8K => Box::new(CandleBlocks::<k_quants::BlockQ8K>::new(&data, n, k)?),
                GgmlDType::Q8_1 => Box::new(CandleBlocks::<k_quants::BlockQ8_1>::new(&data, n, k)?),
                _ => return Ok(None),
            };
            Imp::Candle(c)
        };
        let want = match &imp {
            Imp::Own { kind, data } => Some((data.len(), n * (k / QK) * kind.bytes())),
            #[cfg(target_arch = "x86_64")]
            Imp::KQuant { kind, data } => Some((data.len(), n * (k / 256) * kind.bytes())),
            Imp::Candle(_) => None,
        };
        if let Some((got, want)) = want.filter(|(g, w)| g != w) {
            candle_core::bail!("{:?} weight of {n}x{k} has {got} bytes, expected {want}", q.dtype());
        }
        let gemm = std::env::var_os("INFERD_NO_GEMM").is_none();
        Ok(Some(QMatrix { n, k, imp, gemm }))
    }

    /// Switches the GEMM kernel for large batches on or off (A/B measurements; same bits).
    pub fn set_gemm(&mut self, on: bool) {
        self.gemm = on;
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.k
    }

    /// `x W^T` for `x` a row-major [m, k] matrix; returns [m, n] row-major.
    pub fn matmul(&self, x: &[f32]) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        assert_eq!(x.len() % k, 0, "activation width does not match the weight");
        let m = x.len() / k;
        let mut out = vec![0f32; m * n];
        if m == 0 {
            return out;
        }
        let pool = pool::global();
        let dst = SharedMut(out.as_mut_ptr());
        match &self.imp {
            Imp::Own { kind, data } => {
                let acts = QActs::new(x, k);
                let row_bytes = k / QK * kind.bytes();
                #[cfg(target_arch = "x86_64")]
                if self.gemm && m >= GEMM_MIN_ROWS && avx2::available() {
                    pool.run_ranges(n, RANGES_PER_THREAD, MIN_RANGE, &|js| {
                        // SAFETY: AVX2 is present, `data` holds n whole rows (checked when built)
                        // and columns `js` of the [m, n] output belong to this range alone.
                        unsafe { avx2::gemm(*kind, data, js, &acts, n, dst.ptr()) }
                    });
                    return out;
                }
                #[cfg(target_arch = "x86_64")]
                if m == 1 && avx2::available() {
                    pool.run_ranges(n, RANGES_PER_THREAD, MIN_RANGE, &|js| {
                        // SAFETY: AVX2 is present, `data` holds n whole rows and outputs `js`
                        // (row 0 of the [1, n] output) belong to this range alone.
                        unsafe { avx2::dot_range(*kind, data, js, &acts, dst.ptr()) }
                    });
                    return out;
                }
                let kernel = own_kernel();
                pool.run_ranges(n, RANGES_PER_THREAD, MIN_RANGE, &|js| {
                    tiles(js, m, n, row_bytes, dst, |j, r0, out| {
                        kernel(*kind, &data[j * row_bytes..(j + 1) * row_bytes], &acts, r0, out)
                    })
                });
            }
            #[cfg(target_arch = "x86_64")]
            Imp::KQuant { kind, data } => {
                use self::kquants_avx2::{dot_rows, Q8K_BYTES};
                let nsb = k / 256;
                let mut acts = vec![k_quants::BlockQ8K::zeros(); m * nsb];
                for (row, a) in x.chunks_exact(k).zip(acts.chunks_exact_mut(nsb)) {
                    k_quants::BlockQ8K::from_float(row, a);
                }
                let acts = &acts;
                let row_bytes = nsb * kind.bytes();
                if self.gemm && m >= KQUANT_GEMM_MIN_ROWS && kquants_avx2::has_gemm(*kind) {
                    pool.run_ranges(n, RANGES_PER_THREAD, MIN_RANGE, &|js| {
                        // SAFETY: AVX2 was detected when this matrix was built; `data` holds n
                        // whole rows, `acts` m rows of nsb blocks, and columns `js` of the output
                        // belong to this range alone.
                        unsafe { kquants_avx2::gemm(*kind, data, js, nsb, acts.as_ptr() as *const u8, m, n, dst.ptr()) }
                    });
                    return out;
                }
                if m == 1 {
                    pool.run_ranges(n, RANGES_PER_THREAD, MIN_RANGE, &|js| {
                        // SAFETY: AVX2 was detected when this matrix was built; `data` holds n
                        // whole rows, `acts` one row of nsb blocks, outputs `js` are this range's.
                        unsafe { kquants_avx2::dot_range(*kind, data, js, nsb, acts.as_ptr() as *const u8, dst.ptr()) }
                    });
                    return out;
                }
                pool.run_ranges(n, RANGES_PER_THREAD, MIN_RANGE, &|js| {
                    let base = acts.as_ptr() as *const u8;
                    tiles(js, m, n, row_bytes, dst, |j, r0, out| {
                        // SAFETY: activation rows r0..r0 + out.len() exist, each of nsb blocks
                        // (pointers past them are clamped to the last and never read).
                        let ptrs: [*const u8; 4] = std::array::from_fn(|t| unsafe {
                            base.add((r0 + t.min(out.len() - 1)) * nsb * Q8K_BYTES)
                        });
                        // SAFETY: AVX2 was detected when this matrix was built; the slice is one
                        // whole weight row and `ptrs` point at whole activation rows.
                        unsafe { dot_rows(*kind, &data[j * row_bytes..(j + 1) * row_bytes], nsb, &ptrs, out) };
                    })
                });
            }
            Imp::Candle(c) => c.matmul(x, m, n, dst),
        }
        out
    }

    /// Dequantizes rows `ids` (an embedding lookup); returns [ids.len(), k] row-major.
    pub fn dequantize_rows(&self, ids: &[u32]) -> candle_core::Result<Vec<f32>> {
        let k = self.k;
        let mut out = vec![0f32; ids.len() * k];
        for (&id, o) in ids.iter().zip(out.chunks_exact_mut(k)) {
            let id = id as usize;
            if id >= self.n {
                candle_core::bail!("row {id} is outside a matrix of {} rows", self.n);
            }
            match &self.imp {
                Imp::Own { kind, data } => {
                    let rb = k / QK * kind.bytes();
                    blocks::dequantize_row(*kind, &data[id * rb..(id + 1) * rb], o);
                }
                #[cfg(target_arch = "x86_64")]
                Imp::KQuant { kind, data } => {
                    let rb = k / 256 * kind.bytes();
                    let row = &data[id * rb..(id + 1) * rb];
                    match kind {
                        kquants_avx2::KKind::Q4K => CandleBlocks::<k_quants::BlockQ4K>::new(row, 1, k)?.dequantize_row(0, o),
                        kquants_avx2::KKind::Q6K => CandleBlocks::<k_quants::BlockQ6K>::new(row, 1, k)?.dequantize_row(0, o),
                    }
                }
                Imp::Candle(c) => c.dequantize_row(id, o),
            }
        }
        Ok(out)
    }
}

type Kernel = fn(Kind, &[u8], &QActs, usize, &mut [f32]);

/// The fastest kernel this CPU runs (the choice is the same for every call in a process).
fn own_kernel() -> Kernel {
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        // SAFETY: AVX2 and FMA are present; callers pass whole rows of blocks and valid rows.
        return |kind, w, acts, row0, out| unsafe { avx2::dot_rows(kind, w, acts, row0, out) };
    }
    blocks::dot_rows_scalar
}

/// A block type from candle's `k_quants`, multiplied with candle's own dot products.
trait CandleRows: Send + Sync {
    fn dtype(&self) -> GgmlDType;
    fn matmul(&self, x: &[f32], m: usize, n: usize, dst: SharedMut<f32>);
    fn dequantize_row(&self, row: usize, out: &mut [f32]);
}

struct CandleBlocks<T: GgmlType> {
    blocks: Vec<T>,
    k: usize,
}

impl<T: GgmlType> CandleBlocks<T> {
    fn new(bytes: &[u8], n: usize, k: usize) -> candle_core::Result<Self> {
        if k % T::BLCK_SIZE != 0 || k % T::VecDotType::BLCK_SIZE != 0 {
            candle_core::bail!("{:?} weight width {k} is not a multiple of its block", T::DTYPE);
        }
        let count = n * k / T::BLCK_SIZE;
        if bytes.len() != count * std::mem::size_of::<T>() {
            candle_core::bail!("{:?} weight has {} bytes, expected {}", T::DTYPE, bytes.len(), count * std::mem::size_of::<T>());
        }
        let mut blocks = vec![T::zeros(); count];
        // SAFETY: candle's block types are `repr(C)` plain data with ggml's byte layout, and the
        // lengths match (checked above).
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), blocks.as_mut_ptr() as *mut u8, bytes.len())
        };
        Ok(Self { blocks, k })
    }
}

impl<T: GgmlType> CandleRows for CandleBlocks<T> {
    fn dtype(&self) -> GgmlDType {
        T::DTYPE
    }

    fn matmul(&self, x: &[f32], m: usize, n: usize, dst: SharedMut<f32>) {
        let k = self.k;
        let (bpr, bpa) = (k / T::BLCK_SIZE, k / T::VecDotType::BLCK_SIZE);
        let mut acts = vec![T::VecDotType::zeros(); m * bpa];
        for (row, a) in x.chunks_exact(k).zip(acts.chunks_exact_mut(bpa)) {
            T::VecDotType::from_float(row, a);
        }
        let acts = &acts;
        pool::global().run_ranges(n, RANGES_PER_THREAD, MIN_RANGE, &|js| {
            for j in js {
                let w = &self.blocks[j * bpr..(j + 1) * bpr];
                for r in 0..m {
                    let v = T::vec_dot(k, w, &acts[r * bpa..(r + 1) * bpa]);
                    // SAFETY: as in `QMatrix::matmul`: column j belongs to this chunk alone.
                    unsafe { *dst.ptr().add(r * n + j) = v };
                }
            }
        });
    }

    fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        let bpr = self.k / T::BLCK_SIZE;
        T::to_float(&self.blocks[row * bpr..(row + 1) * bpr], out);
    }
}

#[cfg(test)]
mod tests;
