//! Hyper-parameters of a decoder-only transformer, read from GGUF metadata or an HF config.json.
//!
//! One struct serves both formats so the forward pass never needs to know where weights came from.
use candle_core::quantized::gguf_file;
use serde_json::Value;

use crate::backend::BackendError;

/// The model families this backend runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
}

/// Everything the forward pass needs to know about the model's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    /// true: pairs (2i, 2i+1) are rotated (llama GGUF, whose Q/K rows are permuted for it);
    /// false: NeoX style, pairs (i, i + d/2) (qwen2, HF checkpoints).
    pub rope_interleaved: bool,
    /// The model's own context length.
    pub context_length: usize,
    /// Whether lm_head reuses the token embedding matrix.
    pub tie_word_embeddings: bool,
}

fn load_err(msg: impl Into<String>) -> BackendError {
    BackendError::Load(msg.into())
}

impl ModelConfig {
    /// The projection sizes LoRA adapters must fit (`intermediate`: the MLP's width), in the q/k
    /// row order of these weights; `max_rank`: the largest rank the backend applies.
    pub fn lora_dims(&self, intermediate: usize, max_rank: Option<usize>) -> crate::lora::BaseDims {
        use crate::lora::QkRows;
        crate::lora::BaseDims {
            layers: self.num_layers,
            hidden: self.hidden_size,
            q_dim: self.num_heads * self.head_dim,
            kv_dim: self.num_kv_heads * self.head_dim,
            intermediate,
            qk_rows: if self.rope_interleaved { QkRows::Interleaved { head_dim: self.head_dim } } else { QkRows::Hf },
            max_rank,
        }
    }

    /// Reads the hyper-parameters from GGUF metadata (`<arch>.block_count`, ...).
    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Self, BackendError> {
        let arch_name = ct
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .ok_or_else(|| load_err("GGUF has no general.architecture"))?;
        let arch = match arch_name.as_str() {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => return Err(load_err(format!("unsupported GGUF architecture '{other}'"))),
        };
        if ct.tensor_infos.contains_key("rope_freqs.weight") {
            return Err(load_err("rotary frequency factors (rope_freqs.weight, llama 3 scaling) are not supported"));
        }
        let get = |key: &str| {
            ct.metadata
                .get(&format!("{arch_name}.{key}"))
                .ok_or_else(|| load_err(format!("GGUF metadata lacks {arch_name}.{key}")))
        };
        let get_usize = |key: &str| -> Result<usize, BackendError> {
            let v = get(key)?;
            v.to_u32()
                .map(|x| x as usize)
                .or_else(|_| v.to_u64().map(|x| x as usize))
                .map_err(|e| load_err(format!("{arch_name}.{key}: {e}")))
        };
        let hidden_size = get_usize("embedding_length")?;
        let num_heads = get_usize("attention.head_count")?;
        let num_kv_heads = get_usize("attention.head_count_kv").unwrap_or(num_heads);
        let num_layers = get_usize("block_count")?;
        let context_length = get_usize("context_length")?;
        let rms_norm_eps = get("attention.layer_norm_rms_epsilon")?
            .to_f32()
            .map_err(|e| load_err(e.to_string()))? as f64;
        let rope_theta = get("rope.freq_base")
            .ok()
            .and_then(|v| v.to_f32().ok())
            .unwrap_or(10000.0);
        if num_heads == 0 || hidden_size % num_heads != 0 {
            return Err(load_err("hidden size is not a multiple of the head count"));
        }
        let head_dim = hidden_size / num_heads;
        if let Ok(rope_dim) = get_usize("rope.dimension_count") {
            if rope_dim != head_dim {
                return Err(load_err(format!(
                    "partial RoPE (rope dim {rope_dim} != head dim {head_dim}) is not supported"
                )));
            }
        }
        let vocab_size = match ct.tensor_infos.get("token_embd.weight") {
            Some(info) => info.shape.dims()[0],
            None => return Err(load_err("GGUF lacks token_embd.weight")),
        };
        let cfg = Self {
            arch,
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            rms_norm_eps,
            rope_theta,
            rope_interleaved: arch == Arch::Llama,
            context_length,
            tie_word_embeddings: !ct.tensor_infos.contains_key("output.weight"),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a Hugging Face `config.json` (qwen2 and llama). Accepts both `rope_theta` and the
    /// transformers 5 `rope_parameters: {rope_theta}` form; `sliding_window` may be null.
    /// Rotary scaling (llama 3's, YaRN, ...) is refused rather than silently ignored.
    pub fn from_hf_json(json: &Value) -> Result<Self, BackendError> {
        let model_type = json.get("model_type").and_then(Value::as_str).unwrap_or("");
        let arch = match model_type {
            "qwen2" => Arch::Qwen2,
            "llama" => Arch::Llama,
            other => {
                return Err(load_err(format!(
                    "unsupported safetensors model_type '{other}' (qwen2 and llama are served)"
                )))
            }
        };
        let scaling = json.get("rope_scaling").or_else(|| json.get("rope_parameters"));
        let rope_type = scaling.and_then(|s| s.get("rope_type").or_else(|| s.get("type"))).and_then(Value::as_str);
        if let Some(t) = rope_type.filter(|t| *t != "default") {
            return Err(load_err(format!("rotary scaling '{t}' is not supported")));
        }
        let get_usize = |key: &str| -> Result<usize, BackendError> {
            json.get(key)
                .and_then(Value::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| load_err(format!("config.json lacks integer '{key}'")))
        };
        let hidden_size = get_usize("hidden_size")?;
        let num_heads = get_usize("num_attention_heads")?;
        let num_kv_heads = get_usize("num_key_value_heads").unwrap_or(num_heads);
        if num_heads == 0 || hidden_size % num_heads != 0 {
            return Err(load_err("hidden_size is not a multiple of num_attention_heads"));
        }
        let head_dim = match json.get("head_dim").and_then(Value::as_u64) {
            Some(d) => d as usize,
            None => hidden_size / num_heads,
        };
        let rope_theta = json
            .get("rope_theta")
            .and_then(Value::as_f64)
            .or_else(|| {
                json.get("rope_parameters")
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(Value::as_f64)
            })
            .unwrap_or(10000.0) as f32;
        let cfg = Self {
            arch,
            hidden_size,
            num_layers: get_usize("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: get_usize("vocab_size")?,
            rms_norm_eps: json.get("rms_norm_eps").and_then(Value::as_f64).unwrap_or(1e-6),
            rope_theta,
            rope_interleaved: false,
            context_length: get_usize("max_position_embeddings")?,
            tie_word_embeddings: json
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), BackendError> {
        if self.num_kv_heads == 0 || self.num_heads % self.num_kv_heads != 0 {
            return Err(load_err("head count is not a multiple of the KV head count"));
        }
        if self.head_dim % 2 != 0 {
            return Err(load_err("head dim must be even for RoPE"));
        }
        if self.num_layers == 0 || self.vocab_size == 0 || self.context_length == 0 {
            return Err(load_err("model has no layers, vocabulary or context"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_config_accepts_transformers5_rope_parameters_and_null_window() {
        let json: Value = serde_json::json!({
            "model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4,
            "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 300,
            "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "sliding_window": null,
            "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
            "tie_word_embeddings": true
        });
        let cfg = ModelConfig::from_hf_json(&json).expect("valid config");
        assert_eq!(cfg.rope_theta, 1_000_000.0);
        assert_eq!(cfg.head_dim, 16);
        assert!(cfg.tie_word_embeddings);
        assert!(!cfg.rope_interleaved);
    }

    #[test]
    fn hf_llama_config_keeps_the_hf_rotary_layout_and_refuses_rope_scaling() {
        let mut json: Value = serde_json::json!({
            "model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
            "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 300,
            "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "rope_scaling": null, "tie_word_embeddings": true
        });
        let cfg = ModelConfig::from_hf_json(&json).expect("valid config");
        assert_eq!((cfg.arch, cfg.rope_interleaved, cfg.head_dim), (Arch::Llama, false, 16));
        json["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0});
        let Err(BackendError::Load(e)) = ModelConfig::from_hf_json(&json) else { panic!("llama3 scaling must be refused") };
        assert!(e.contains("llama3"), "{e}");
    }

    #[test]
    fn hf_config_rejects_unknown_model_type() {
        let json: Value = serde_json::json!({"model_type": "gpt2"});
        assert!(matches!(ModelConfig::from_hf_json(&json), Err(BackendError::Load(_))));
    }
}
