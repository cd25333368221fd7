//! The transformer forward pass over a batch of sequences.
//!
//! All rows of a step (every sequence's new tokens, concatenated) go through the embeddings,
//! norms, projections, MLP and lm_head together as one [rows, hidden] activation; only RoPE
//! (per token position) and attention (per sequence cache) look at which sequence a row is from.
use candle_core::{Device, Result, Tensor};

use super::attention::{attend, HeadShape, RopeTable, RowRef};
use super::config::ModelConfig;
use super::kv_cache::SeqCache;
use super::lora::RowAdapters;
use crate::lora::{LoraAdapter, Module};
use super::profile::Clock;
use super::weights::ModelWeights;

/// One sequence's part of a step, with its cache taken out of the backend's map.
pub struct SeqWork<'a> {
    pub cache: &'a mut SeqCache,
    pub tokens: &'a [u32],
    pub want_logits: bool,
    pub adapter: Option<&'a LoraAdapter>,
}

/// Weights plus the precomputed tables needed to run them.
pub struct Transformer {
    pub cfg: ModelConfig,
    weights: ModelWeights,
    rope: RopeTable,
    device: Device,
}

impl Transformer {
    /// Builds the model; RoPE tables cover `max_context` positions.
    pub fn new(cfg: ModelConfig, weights: ModelWeights, max_context: usize, device: Device) -> Self {
        let rope = RopeTable::new(cfg.head_dim, cfg.rope_theta, max_context, cfg.rope_interleaved);
        Self { cfg, weights, rope, device }
    }

    /// Width of the MLP's hidden layer (the gate projection's outputs).
    pub fn intermediate_size(&self) -> usize {
        self.weights.layers.first().map_or(0, |l| l.gate_up.widths()[0])
    }

    /// Width of one position's keys (or values) in the cache.
    pub fn kv_dim(&self) -> usize {
        self.cfg.num_kv_heads * self.cfg.head_dim
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(x, w, self.cfg.rms_norm_eps as f32)
    }

    /// Runs one step. The caller has checked that every cache can hold its new tokens; on error
    /// the caches may hold partial rows and must be truncated back by the caller.
    pub fn forward(&self, work: &mut [SeqWork<'_>]) -> Result<Vec<Option<Vec<f32>>>> {
        let mut clk = Clock::start();
        let cfg = &self.cfg;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let shape = HeadShape { num_heads: nh, num_kv_heads: nkv, head_dim: hd };
        let (q_dim, kv_dim) = (nh * hd, nkv * hd);

        let mut ids = Vec::new();
        let mut rows = Vec::new();
        let mut spans = Vec::with_capacity(work.len());
        for (s, w) in work.iter().enumerate() {
            spans.push(rows.len()..rows.len() + w.tokens.len());
            ids.extend_from_slice(w.tokens);
            rows.extend((0..w.tokens.len()).map(|i| RowRef { seq: s, pos: w.cache.len + i }));
        }
        let n_rows = ids.len();
        let lora = RowAdapters::new(
            work.iter().zip(&spans).filter_map(|(w, s)| w.adapter.map(|a| (s.clone(), a))).collect(),
            n_rows,
        );
        let flat = |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>());
        let mut x = self.weights.embed.embedding(&ids)?;
        let mut attn_out = vec![0f32; n_rows * q_dim];
        clk.mark(0);

        for (li, layer) in self.weights.layers.iter().enumerate() {
            let h = self.rms_norm(&x, &layer.attn_norm)?;
            clk.mark(1);
            let mut qkv = layer.qkv.forward_parts(&h)?.into_iter();
            let (Some(mut q), Some(mut k), Some(mut v)) = (qkv.next(), qkv.next(), qkv.next()) else {
                candle_core::bail!("qkv projection must have three parts");
            };
            if [Module::Q, Module::K, Module::V].iter().any(|&m| lora.targets(li, m)) {
                let hv = flat(&h)?;
                lora.apply(li, Module::Q, &hv, &mut q);
                lora.apply(li, Module::K, &hv, &mut k);
                lora.apply(li, Module::V, &hv, &mut v);
            }
            clk.mark(2);
            for (r, row) in rows.iter().enumerate() {
                self.rope.apply(&mut q[r * q_dim..(r + 1) * q_dim], row.pos);
                self.rope.apply(&mut k[r * kv_dim..(r + 1) * kv_dim], row.pos);
            }
            for (w, span) in work.iter_mut().zip(&spans) {
                let kv = &mut w.cache.layers[li];
                kv.k.extend_from_slice(&k[span.start * kv_dim..span.end * kv_dim]);
                kv.v.extend_from_slice(&v[span.start * kv_dim..span.end * kv_dim]);
            }
            let caches: Vec<(&[f32], &[f32])> = work
                .iter()
                .map(|w| (w.cache.layers[li].k.as_slice(), w.cache.layers[li].v.as_slice()))
                .collect();
            clk.mark(3);
            attend(&q, &rows, &caches, shape, &mut attn_out);
            clk.mark(4);
            let attn = Tensor::from_slice(&attn_out, (n_rows, q_dim), &self.device)?;
            let mut o = layer.wo.forward(&attn)?;
            if lora.targets(li, Module::O) {
                let mut ov = flat(&o)?;
                lora.apply(li, Module::O, &attn_out, &mut ov);
                o = Tensor::from_vec(ov, o.shape(), &self.device)?;
            }
            x = (x + o)?;
            clk.mark(5);

            let h = self.rms_norm(&x, &layer.ffn_norm)?;
            clk.mark(6);
            let mut gu = layer.gate_up.forward_parts(&h)?.into_iter();
            let (Some(mut gate), Some(mut up)) = (gu.next(), gu.next()) else {
                candle_core::bail!("gate/up projection must have two parts");
            };
            if lora.targets(li, Module::Gate) || lora.targets(li, Module::Up) {
                let hv = flat(&h)?;
                lora.apply(li, Module::Gate, &hv, &mut gate);
                lora.apply(li, Module::Up, &hv, &mut up);
            }
            clk.mark(7);
            for (g, u) in gate.iter_mut().zip(&up) {
                *g = *g / (1.0 + (-*g).exp()) * u;
            }
            let inter = gate.len() / n_rows;
            debug_assert_eq!(gate.len(), n_rows * inter, "the MLP activation is not {n_rows} rows");
            let down_lora = lora.targets(li, Module::Down).then(|| gate.clone());
            let act = Tensor::from_vec(gate, (n_rows, inter), &self.device)?;
            clk.mark(8);
            let mut d = layer.w_down.forward(&act)?;
            if let Some(a) = down_lora {
                let mut dv = flat(&d)?;
                lora.apply(li, Module::Down, &a, &mut dv);
                d = Tensor::from_vec(dv, d.shape(), &self.device)?;
            }
            x = (x + d)?;
            clk.mark(9);
        }
        for w in work.iter_mut() {
            w.cache.len += w.tokens.len();
        }

        let last_rows: Vec<u32> = work
            .iter()
            .zip(&spans)
            .filter(|(w, _)| w.want_logits)
            .map(|(_, span)| (span.end - 1) as u32)
            .collect();
        let mut logits = if last_rows.is_empty() {
            Vec::new()
        } else {
            let n = last_rows.len();
            let idx = Tensor::from_vec(last_rows, n, &self.device)?;
            let h = self.rms_norm(&x.index_select(&idx, 0)?, &self.weights.final_norm)?;
            clk.mark(10);
            let l = self.weights.lm_head.forward(&h)?.to_vec2::<f32>()?;
            clk.mark(11);
            l
        }
        .into_iter();
        Ok(work
            .iter()
            .map(|w| if w.want_logits { logits.next() } else { None })
            .collect())
    }
}
