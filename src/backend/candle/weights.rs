//! Loading a model's weights from a GGUF file or a Hugging Face safetensors directory into one
//! format-independent set of tensors.
use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};

use super::config::ModelConfig;
use super::linear::{Linear, MultiLinear, RawWeight};
use crate::backend::BackendError;

/// One transformer block's weights.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    pub attn_norm: Tensor,
    /// q, k and v projections (fused into one matmul when their types allow).
    pub qkv: MultiLinear,
    pub wo: Linear,
    pub ffn_norm: Tensor,
    /// gate and up projections of the MLP.
    pub gate_up: MultiLinear,
    pub w_down: Linear,
}

/// All weights of a model, whatever file they came from.
#[derive(Debug, Clone)]
pub struct ModelWeights {
    /// Token embeddings [vocab, hidden], kept quantized for GGUF (rows are dequantized on lookup;
    /// a tied lm_head shares them).
    pub embed: Linear,
    pub layers: Vec<LayerWeights>,
    pub final_norm: Tensor,
    pub lm_head: Linear,
}

fn load_err(e: impl std::fmt::Display) -> BackendError {
    BackendError::Load(e.to_string())
}

/// Reads a GGUF file: its hyper-parameters and weights (quantized matrices stay quantized).
pub fn load_gguf(path: &Path, device: &Device) -> Result<(ModelConfig, ModelWeights), BackendError> {
    let mut file = std::fs::File::open(path)
        .map_err(|e| load_err(format!("cannot open {}: {e}", path.display())))?;
    let ct = gguf_file::Content::read(&mut file)
        .map_err(|e| load_err(format!("{} is not a readable GGUF file: {e}", path.display())))?;
    let cfg = ModelConfig::from_gguf(&ct)?;
    let mut tensor = |name: &str| {
        ct.tensor(&mut file, name, device)
            .map_err(|e| load_err(format!("tensor {name}: {e}")))
    };
    let dense = |q: candle_core::quantized::QTensor| q.dequantize(device).map_err(load_err);

    let embed = Linear::from_qtensor(tensor("token_embd.weight")?, None).map_err(load_err)?;
    let lm_head = if cfg.tie_word_embeddings {
        embed.clone()
    } else {
        Linear::from_qtensor(tensor("output.weight")?, None).map_err(load_err)?
    };
    let final_norm = dense(tensor("output_norm.weight")?)?;
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let p = format!("blk.{i}");
        let mut raw = |name: &str| -> Result<RawWeight, BackendError> {
            let w = tensor(&format!("{p}.{name}.weight"))?;
            let bias_name = format!("{p}.{name}.bias");
            let bias = if ct.tensor_infos.contains_key(&bias_name) {
                Some(dense(tensor(&bias_name)?)?)
            } else {
                None
            };
            Ok(RawWeight::Quantized(w, bias))
        };
        let qkv = vec![raw("attn_q")?, raw("attn_k")?, raw("attn_v")?];
        let gate_up = vec![raw("ffn_gate")?, raw("ffn_up")?];
        let wo = raw("attn_output")?.into_linear().map_err(load_err)?;
        let w_down = raw("ffn_down")?.into_linear().map_err(load_err)?;
        layers.push(LayerWeights {
            qkv: MultiLinear::new(qkv).map_err(load_err)?,
            wo,
            gate_up: MultiLinear::new(gate_up).map_err(load_err)?,
            w_down,
            attn_norm: dense(tensor(&format!("{p}.attn_norm.weight"))?)?,
            ffn_norm: dense(tensor(&format!("{p}.ffn_norm.weight"))?)?,
        });
    }
    Ok((cfg, ModelWeights { embed, layers, final_norm, lm_head }))
}

/// Reads a Hugging Face directory: config.json plus one or more *.safetensors files.
pub fn load_safetensors(
    dir: &Path,
    device: &Device,
) -> Result<(ModelConfig, ModelWeights), BackendError> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path)
        .map_err(|e| load_err(format!("cannot read {}: {e}", cfg_path.display())))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| load_err(format!("invalid {}: {e}", cfg_path.display())))?;
    let cfg = ModelConfig::from_hf_json(&json)?;

    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| load_err(format!("cannot list {}: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(load_err(format!("no *.safetensors in {}", dir.display())));
    }
    let mut all: HashMap<String, Tensor> = HashMap::new();
    for f in &files {
        let part = candle_core::safetensors::load(f, device)
            .map_err(|e| load_err(format!("{}: {e}", f.display())))?;
        all.extend(part);
    }
    let take = |all: &mut HashMap<String, Tensor>, name: &str| -> Result<Tensor, BackendError> {
        let t = all
            .remove(name)
            .ok_or_else(|| load_err(format!("safetensors lack tensor {name}")))?;
        t.to_dtype(DType::F32).map_err(load_err)
    };
    let embed_dense = take(&mut all, "model.embed_tokens.weight")?.contiguous().map_err(load_err)?;
    let embed = Linear::from_dense(embed_dense.clone(), None).map_err(load_err)?;
    let final_norm = take(&mut all, "model.norm.weight")?;
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let p = format!("model.layers.{i}");
        // qwen2 has q/k/v biases; llama has none unless `attention_bias` / `mlp_bias` say so:
        // a bias is used when the checkpoint has one.
        let mut raw = |name: &str| -> Result<RawWeight, BackendError> {
            let w = take(&mut all, &format!("{p}.{name}.weight"))?;
            let bias_name = format!("{p}.{name}.bias");
            let b = if all.contains_key(&bias_name) { Some(take(&mut all, &bias_name)?) } else { None };
            Ok(RawWeight::Dense(w, b))
        };
        let qkv = vec![raw("self_attn.q_proj")?, raw("self_attn.k_proj")?, raw("self_attn.v_proj")?];
        let gate_up = vec![raw("mlp.gate_proj")?, raw("mlp.up_proj")?];
        let wo = raw("self_attn.o_proj")?.into_linear().map_err(load_err)?;
        let w_down = raw("mlp.down_proj")?.into_linear().map_err(load_err)?;
        layers.push(LayerWeights {
            qkv: MultiLinear::new(qkv).map_err(load_err)?,
            wo,
            gate_up: MultiLinear::new(gate_up).map_err(load_err)?,
            w_down,
            attn_norm: take(&mut all, &format!("{p}.input_layernorm.weight"))?,
            ffn_norm: take(&mut all, &format!("{p}.post_attention_layernorm.weight"))?,
        });
    }
    let lm_head = match (cfg.tie_word_embeddings, take(&mut all, "lm_head.weight")) {
        (false, Ok(w)) => Linear::from_dense(w, None).map_err(load_err)?,
        _ => embed.clone(),
    };
    Ok((cfg, ModelWeights { embed, layers, final_norm, lm_head }))
}
