//! A loaded LoRA adapter, independent of the backend: per (layer, projection) the low-rank pair
//! `A` (`[r, in]`) and `B` (`[out, r]`) and the scale, so that `y = x W^T + scale * (x A^T) B^T`.
//!
//! Every load makes a new `LoraAdapter` with its own `id`; requests hold it through an `Arc` for
//! their whole life, so reloading or unloading a name never changes a running stream. The bytes
//! of all live adapters (loaded or still held by requests) are counted for the memory budget.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// The projections an adapter may target (Llama/Qwen2 names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Module {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Module {
    pub const ALL: [Module; 7] = [Module::Q, Module::K, Module::V, Module::O, Module::Gate, Module::Up, Module::Down];

    /// The module's name in Hugging Face checkpoints (`q_proj`, ...).
    pub fn hf_name(self) -> &'static str {
        match self {
            Module::Q => "q_proj",
            Module::K => "k_proj",
            Module::V => "v_proj",
            Module::O => "o_proj",
            Module::Gate => "gate_proj",
            Module::Up => "up_proj",
            Module::Down => "down_proj",
        }
    }

    /// `self_attn` or `mlp`.
    pub fn block(self) -> &'static str {
        match self {
            Module::Q | Module::K | Module::V | Module::O => "self_attn",
            _ => "mlp",
        }
    }

    pub fn from_hf_name(name: &str) -> Option<Module> {
        Module::ALL.into_iter().find(|m| m.hf_name() == name)
    }
}

/// The order of the output rows of a base model's `q_proj` and `k_proj`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QkRows {
    /// As in Hugging Face checkpoints: each head's first half of rows, then its second half
    /// (rotary pairs (i, i + d/2)). PEFT and mlx-lm adapters are trained in this order.
    #[default]
    Hf,
    /// llama.cpp's `llama` GGUF order: its converter interleaves each head's two halves
    /// (row i of the first half goes to 2i, row i of the second half to 2i + 1) so that rotary
    /// pairs are adjacent. An adapter's `B` rows must be moved the same way.
    Interleaved { head_dim: usize },
}

impl QkRows {
    /// Moves the rows of `b` (`[out, rank]`, HF order) into this order.
    fn arrange(self, b: &[f32], rank: usize) -> Vec<f32> {
        let QkRows::Interleaved { head_dim } = self else { return b.to_vec() };
        let half = head_dim / 2;
        let mut out = vec![0f32; b.len()];
        for (head_out, head_in) in out.chunks_exact_mut(head_dim * rank).zip(b.chunks_exact(head_dim * rank)) {
            for i in 0..half {
                for (j, src_row) in [i, half + i].into_iter().enumerate() {
                    let dst_row = 2 * i + j;
                    head_out[dst_row * rank..(dst_row + 1) * rank].copy_from_slice(&head_in[src_row * rank..(src_row + 1) * rank]);
                }
            }
        }
        out
    }
}

/// The base model's projection sizes an adapter must fit, and the row order of its q and k.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BaseDims {
    pub layers: usize,
    pub hidden: usize,
    pub q_dim: usize,
    pub kv_dim: usize,
    pub intermediate: usize,
    pub qk_rows: QkRows,
    /// The largest rank the backend applies (None: any).
    pub max_rank: Option<usize>,
}

impl BaseDims {
    /// (in, out) of a projection.
    pub fn io(&self, m: Module) -> (usize, usize) {
        match m {
            Module::Q => (self.hidden, self.q_dim),
            Module::K | Module::V => (self.hidden, self.kv_dim),
            Module::O => (self.q_dim, self.hidden),
            Module::Gate | Module::Up => (self.hidden, self.intermediate),
            Module::Down => (self.intermediate, self.hidden),
        }
    }
}

/// One projection's low-rank update.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraPair {
    pub rank: usize,
    pub in_dim: usize,
    pub out_dim: usize,
    /// `[rank, in_dim]`, row-major.
    pub a: Vec<f32>,
    /// `[out_dim, rank]`, row-major.
    pub b: Vec<f32>,
    /// As the source format defines it (PEFT: `lora_alpha / r`, computed in f64 like Python).
    pub scale: f64,
}

impl LoraPair {
    pub fn new(a: Vec<f32>, b: Vec<f32>, rank: usize, in_dim: usize, out_dim: usize, scale: f64) -> Result<LoraPair, String> {
        if rank == 0 {
            return Err("rank 0".into());
        }
        if a.len() != rank * in_dim || b.len() != out_dim * rank {
            return Err(format!(
                "A has {} values and B {} for rank {rank}, {in_dim} inputs and {out_dim} outputs",
                a.len(),
                b.len()
            ));
        }
        // The scale is applied in f32: 1e308 (lora_alpha = 1e308) is finite only as an f64.
        if !(scale as f32).is_finite() || a.iter().chain(&b).any(|x| !x.is_finite()) {
            return Err("weights or scale are not finite".into());
        }
        Ok(LoraPair { rank, in_dim, out_dim, a, b, scale })
    }

    /// `out[row] += scale * B (A x[row])` for `rows` rows of `x` (`[rows, in]`) into `out`
    /// (`[rows, out]`), in f32 with a fixed order of operations per row.
    pub fn apply(&self, x: &[f32], out: &mut [f32]) {
        let rows = x.len() / self.in_dim;
        debug_assert_eq!(x.len(), rows * self.in_dim, "input is not whole rows of {}", self.in_dim);
        debug_assert_eq!(out.len(), rows * self.out_dim, "output is not {rows} rows of {}", self.out_dim);
        let mut t = vec![0f32; self.rank];
        let scale = self.scale as f32;
        for (xr, or) in x.chunks_exact(self.in_dim).zip(out.chunks_exact_mut(self.out_dim)) {
            for (ti, ar) in t.iter_mut().zip(self.a.chunks_exact(self.in_dim)) {
                *ti = dot(ar, xr) * scale;
            }
            for (o, br) in or.iter_mut().zip(self.b.chunks_exact(self.rank)) {
                *o += dot(br, &t);
            }
        }
    }
}

/// Dot product with 8 independent partial sums (vectorisable, same order for every call).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);
static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);

/// Bytes held by every adapter still alive in the process (loaded or leased by a request).
pub fn live_bytes() -> usize {
    LIVE_BYTES.load(Ordering::Relaxed)
}

/// A loaded adapter: its weights per (layer, module).
#[derive(Debug)]
pub struct LoraAdapter {
    /// Unique per load: backends key their prepared copies by it.
    pub id: u64,
    pub name: String,
    /// Where it was read from.
    pub path: PathBuf,
    /// "peft" or "mlx".
    pub format: &'static str,
    /// The row order of its q and k `B` matrices: Hugging Face's as read, the base model's once
    /// bound to it (`bind`).
    pub qk_rows: QkRows,
    /// Largest rank of its modules.
    pub rank: usize,
    pub modules: BTreeMap<(usize, Module), LoraPair>,
    bytes: usize,
}

impl LoraAdapter {
    pub fn new(name: &str, path: PathBuf, format: &'static str, modules: BTreeMap<(usize, Module), LoraPair>) -> LoraAdapter {
        let bytes = modules.values().map(|p| 4 * (p.a.len() + p.b.len())).sum();
        LIVE_BYTES.fetch_add(bytes, Ordering::Relaxed);
        LoraAdapter {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            name: name.to_string(),
            path,
            format,
            qk_rows: QkRows::Hf,
            rank: modules.values().map(|p| p.rank).max().unwrap_or(0),
            modules,
            bytes,
        }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn get(&self, layer: usize, m: Module) -> Option<&LoraPair> {
        self.modules.get(&(layer, m))
    }

    /// Checks the adapter against `base` and puts its weights in the base's row order: what
    /// every adapter goes through before a backend applies it (the registry binds each load).
    pub fn bind(mut self, base: &BaseDims) -> Result<LoraAdapter, String> {
        self.check_sizes(base)?;
        if self.qk_rows != base.qk_rows {
            if self.qk_rows != QkRows::Hf {
                return Err("the adapter is already bound to a base model with another q/k row order".into());
            }
            for (&(_, m), p) in self.modules.iter_mut() {
                if matches!(m, Module::Q | Module::K) {
                    p.b = base.qk_rows.arrange(&p.b, p.rank);
                }
            }
            self.qk_rows = base.qk_rows;
        }
        Ok(self)
    }

    /// Checks that a bound adapter fits `base`: its sizes and its q/k row order (see `bind`).
    pub fn check_fits(&self, base: &BaseDims) -> Result<(), String> {
        self.check_sizes(base)?;
        if self.qk_rows != base.qk_rows {
            return Err(format!(
                "its q/k rows are in {:?} order but the base model's are in {:?} order (bind the adapter to the base first)",
                self.qk_rows, base.qk_rows
            ));
        }
        Ok(())
    }

    /// Checks every module against the base model's sizes: a clear sentence on mismatch.
    fn check_sizes(&self, base: &BaseDims) -> Result<(), String> {
        if self.modules.is_empty() {
            return Err("the adapter has no LoRA weights".into());
        }
        if let QkRows::Interleaved { head_dim } = base.qk_rows {
            if head_dim == 0 || head_dim % 2 != 0 || base.q_dim % head_dim != 0 || base.kv_dim % head_dim != 0 {
                return Err(format!("the base model's head size {head_dim} does not divide its q/k widths into even heads"));
            }
        }
        if let Some(max) = base.max_rank.filter(|&max| self.rank > max) {
            return Err(format!("its rank {} is above the largest this backend applies ({max})", self.rank));
        }
        for (&(layer, m), p) in &self.modules {
            if layer >= base.layers {
                return Err(format!("it targets layer {layer} but the base model has {} layers", base.layers));
            }
            let (i, o) = base.io(m);
            if (p.in_dim, p.out_dim) != (i, o) {
                return Err(format!(
                    "layer {layer} {}: the adapter maps {} -> {} features but the base model's projection maps {i} -> {o} \
                     (an adapter trained for a different base model?)",
                    m.hf_name(),
                    p.in_dim,
                    p.out_dim
                ));
            }
        }
        Ok(())
    }
}

impl Drop for LoraAdapter {
    fn drop(&mut self) {
        LIVE_BYTES.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_adds_the_scaled_low_rank_product() {
        // A = [[1, 0], [0, 1]] (rank 2, in 2), B = [[1, 2], [3, 4], [5, 6]] (out 3), scale 0.5.
        let p = LoraPair::new(vec![1., 0., 0., 1.], vec![1., 2., 3., 4., 5., 6.], 2, 2, 3, 0.5).unwrap();
        let x = [2.0, 4.0, 1.0, 0.0];
        let mut out = vec![1.0; 6];
        p.apply(&x, &mut out);
        // row 0: t = 0.5 * [2, 4] = [1, 2]; B t = [5, 11, 17]
        assert_eq!(out, vec![6., 12., 18., 1.5, 2.5, 3.5]);
    }

    #[test]
    fn shapes_and_bytes_are_checked_and_counted() {
        assert!(LoraPair::new(vec![0.; 3], vec![0.; 6], 2, 2, 3, 1.0).is_err());
        assert!(LoraPair::new(vec![f32::NAN; 4], vec![0.; 6], 2, 2, 3, 1.0).is_err());
        // Found by the adapter fuzz target's seeds: a scale finite in f64 but not in f32 loaded,
        // and every token's logits were NaN.
        assert!(LoraPair::new(vec![0.; 4], vec![0.; 6], 2, 2, 3, 1e308).is_err());
        assert!(LoraPair::new(vec![0.; 4], vec![0.; 6], 2, 2, 3, -1e39).is_err());
        let base = BaseDims { layers: 2, hidden: 2, q_dim: 3, kv_dim: 2, intermediate: 4, qk_rows: QkRows::Hf, max_rank: None };
        let mut m = BTreeMap::new();
        m.insert((0, Module::Q), LoraPair::new(vec![0.; 4], vec![0.; 6], 2, 2, 3, 1.0).unwrap());
        let before = live_bytes();
        let a = LoraAdapter::new("a", PathBuf::from("x"), "peft", m.clone());
        assert_eq!(live_bytes() - before, 40);
        assert!(a.check_fits(&base).is_ok());
        drop(a);
        m.insert((2, Module::Q), m[&(0, Module::Q)].clone());
        let e = LoraAdapter::new("b", PathBuf::from("x"), "peft", m).check_fits(&base).unwrap_err();
        assert!(e.contains("layer 2") && e.contains("2 layers"), "{e}");
        let mut m = BTreeMap::new();
        m.insert((0, Module::K), LoraPair::new(vec![0.; 4], vec![0.; 6], 2, 2, 3, 1.0).unwrap());
        let e = LoraAdapter::new("c", PathBuf::from("x"), "peft", m).check_fits(&base).unwrap_err();
        assert!(e.contains("k_proj") && e.contains("different base model"), "{e}");
        let mut m = BTreeMap::new();
        m.insert((0, Module::Q), LoraPair::new(vec![0.; 4], vec![0.; 6], 2, 2, 3, 1.0).unwrap());
        let d = LoraAdapter::new("d", PathBuf::from("x"), "peft", m);
        assert!(d.check_fits(&BaseDims { max_rank: Some(2), ..base }).is_ok());
        let e = d.check_fits(&BaseDims { max_rank: Some(1), ..base }).unwrap_err();
        assert!(e.contains("rank 2") && e.contains("(1)"), "{e}");
    }

    #[test]
    fn binding_to_a_llama_gguf_base_interleaves_each_heads_q_and_k_rows_like_llama_cpp() {
        // Two heads of 4 rows, rank 1: B rows 0..8 hold their own index.
        let base = BaseDims { layers: 1, hidden: 2, q_dim: 8, kv_dim: 4, intermediate: 2, qk_rows: QkRows::Interleaved { head_dim: 4 }, max_rank: None };
        let rows: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let mut m = BTreeMap::new();
        m.insert((0, Module::Q), LoraPair::new(vec![1., 1.], rows.clone(), 1, 2, 8, 1.0).unwrap());
        m.insert((0, Module::K), LoraPair::new(vec![1., 1.], rows[..4].to_vec(), 1, 2, 4, 1.0).unwrap());
        m.insert((0, Module::V), LoraPair::new(vec![1., 1.], rows[..4].to_vec(), 1, 2, 4, 1.0).unwrap());
        let a = LoraAdapter::new("a", PathBuf::from("x"), "peft", m);
        let e = a.check_fits(&base).unwrap_err();
        assert!(e.contains("bind"), "{e}");
        let a = a.bind(&base).unwrap();
        // llama.cpp: w.reshape(n_head, 2, d / 2, ..).swapaxes(1, 2): (h, i, j) <- (h, j, i).
        assert_eq!(a.get(0, Module::Q).unwrap().b, vec![0., 2., 1., 3., 4., 6., 5., 7.]);
        assert_eq!(a.get(0, Module::K).unwrap().b, vec![0., 2., 1., 3.]);
        assert_eq!(a.get(0, Module::V).unwrap().b, vec![0., 1., 2., 3.], "v keeps its order");
        assert!(a.check_fits(&base).is_ok());
        let hf = BaseDims { qk_rows: QkRows::Hf, ..base };
        assert!(a.bind(&hf).is_err(), "a bound adapter cannot be re-bound to another order");
    }
}
