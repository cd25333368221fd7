//! `genai_config.json`, as onnxruntime-genai's model builder writes it: where the graph is, the
//! names of its inputs and outputs, the KV cache geometry, EOS ids and the context length.
//!
//! Only what the backend needs is read; everything is taken from the file rather than assumed,
//! so a model exported with other names (or with a `position_ids` input) loads the same way.
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq)]
pub struct GenaiConfig {
    /// The model type the builder wrote ("qwen2", "llama", ...), for logs.
    pub model_type: String,
    /// The ONNX graph, resolved against the model directory.
    pub graph: PathBuf,
    pub context_length: usize,
    pub vocab_size: usize,
    pub eos_token_ids: Vec<u32>,
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_size: usize,
    /// 0 when the file does not say.
    pub hidden_size: usize,
    pub num_heads: usize,
    pub names: IoNames,
}

/// Input and output names of the decoder graph.
#[derive(Debug, Clone, PartialEq)]
pub struct IoNames {
    pub input_ids: String,
    pub attention_mask: String,
    /// Present only for graphs that take explicit positions (the builder's GQA graphs do not).
    pub position_ids: Option<String>,
    pub logits: String,
    /// Per layer: (past key, past value) inputs and (present key, present value) outputs.
    pub past: Vec<(String, String)>,
    pub present: Vec<(String, String)>,
}

#[derive(Deserialize)]
struct File {
    model: FileModel,
}

#[derive(Deserialize)]
struct FileModel {
    #[serde(rename = "type", default)]
    model_type: String,
    context_length: usize,
    vocab_size: usize,
    eos_token_id: OneOrMany,
    decoder: FileDecoder,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

#[derive(Deserialize)]
struct FileDecoder {
    filename: String,
    head_size: usize,
    num_hidden_layers: usize,
    num_key_value_heads: usize,
    #[serde(default)]
    hidden_size: usize,
    #[serde(default)]
    num_attention_heads: usize,
    inputs: FileInputs,
    outputs: FileOutputs,
}

#[derive(Deserialize)]
struct FileInputs {
    input_ids: String,
    attention_mask: String,
    #[serde(default)]
    position_ids: Option<String>,
    past_key_names: String,
    past_value_names: String,
}

#[derive(Deserialize)]
struct FileOutputs {
    logits: String,
    present_key_names: String,
    present_value_names: String,
}

impl GenaiConfig {
    /// Reads `dir/genai_config.json`. Errors are one sentence naming the file and the problem.
    pub fn load(dir: &Path) -> Result<GenaiConfig, String> {
        let path = dir.join("genai_config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse(&text, dir).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str, dir: &Path) -> Result<GenaiConfig, String> {
        let f: File = serde_json::from_str(text).map_err(|e| format!("not a valid genai_config.json ({e})"))?;
        let m = f.model;
        let d = m.decoder;
        if d.num_hidden_layers == 0 || d.num_key_value_heads == 0 || d.head_size == 0 {
            return Err("num_hidden_layers, num_key_value_heads and head_size must be positive".into());
        }
        if m.context_length == 0 || m.vocab_size == 0 {
            return Err("context_length and vocab_size must be positive".into());
        }
        let layer_names = |pattern: &str| -> Result<Vec<String>, String> {
            if pattern.matches("%d").count() != 1 {
                return Err(format!("KV name pattern '{pattern}' must contain exactly one %d"));
            }
            Ok((0..d.num_hidden_layers).map(|i| pattern.replace("%d", &i.to_string())).collect())
        };
        let zip = |a: Vec<String>, b: Vec<String>| a.into_iter().zip(b).collect::<Vec<_>>();
        let past = zip(layer_names(&d.inputs.past_key_names)?, layer_names(&d.inputs.past_value_names)?);
        let present = zip(layer_names(&d.outputs.present_key_names)?, layer_names(&d.outputs.present_value_names)?);
        let graph = dir.join(&d.filename);
        let eos_token_ids = match m.eos_token_id {
            OneOrMany::One(id) => vec![id],
            OneOrMany::Many(ids) => ids,
        };
        Ok(GenaiConfig {
            model_type: m.model_type,
            graph,
            context_length: m.context_length,
            vocab_size: m.vocab_size,
            eos_token_ids,
            num_layers: d.num_hidden_layers,
            num_kv_heads: d.num_key_value_heads,
            head_size: d.head_size,
            hidden_size: d.hidden_size,
            num_heads: d.num_attention_heads,
            names: IoNames {
                input_ids: d.inputs.input_ids,
                attention_mask: d.inputs.attention_mask,
                position_ids: d.inputs.position_ids,
                logits: d.outputs.logits,
                past,
                present,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{
      "model": {
        "bos_token_id": 151643, "context_length": 32768, "eos_token_id": [151645, 151643],
        "pad_token_id": 151643, "type": "qwen2", "vocab_size": 151936,
        "decoder": {
          "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
          "filename": "model.onnx", "head_size": 64, "hidden_size": 896,
          "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                     "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
          "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                      "present_value_names": "present.%d.value"},
          "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2
        }
      },
      "search": {"max_length": 32768, "past_present_share_buffer": true}
    }"#;

    #[test]
    fn reads_the_builders_layout() {
        let c = GenaiConfig::parse(SAMPLE, Path::new("/m")).unwrap();
        assert_eq!(c.graph, PathBuf::from("/m/model.onnx"));
        assert_eq!((c.num_layers, c.num_kv_heads, c.head_size), (24, 2, 64));
        assert_eq!((c.context_length, c.vocab_size), (32768, 151936));
        assert_eq!(c.eos_token_ids, vec![151645, 151643]);
        assert_eq!(c.names.past[23], ("past_key_values.23.key".into(), "past_key_values.23.value".into()));
        assert_eq!(c.names.present[0], ("present.0.key".into(), "present.0.value".into()));
        assert_eq!(c.names.position_ids, None);
        assert_eq!(c.model_type, "qwen2");
    }

    #[test]
    fn a_single_eos_id_and_bad_patterns() {
        let one = SAMPLE.replace("[151645, 151643]", "151645");
        assert_eq!(GenaiConfig::parse(&one, Path::new(".")).unwrap().eos_token_ids, vec![151645]);
        let bad = SAMPLE.replace("present.%d.key", "present.key");
        let err = GenaiConfig::parse(&bad, Path::new(".")).unwrap_err();
        assert!(err.contains("present.key") && err.contains("%d"), "{err}");
        let err = GenaiConfig::parse("{}", Path::new(".")).unwrap_err();
        assert!(err.contains("not a valid genai_config.json"), "{err}");
    }
}
