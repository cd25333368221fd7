//! A Hugging Face style model directory: config.json, tokenizer.json, tokenizer_config.json,
//! generation_config.json, chat_template.jinja and *.safetensors, as `save_pretrained` writes it
//! and as a hub snapshot holds it; or an ONNX model directory as onnxruntime-genai's builder (and
//! `scripts/export_onnx.py`) writes it: genai_config.json, model.onnx, tokenizer files.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value as Json;

use super::template::ChatTemplate;
use super::{ModelAssets, ModelError, WeightsFormat};

/// Loads the assets of a Hugging Face style directory. Weights are not read, only listed.
pub fn load_hf_dir(dir: &Path) -> Result<ModelAssets, ModelError> {
    let name = dir.display().to_string();
    let invalid = |msg: String| ModelError::Invalid(name.clone(), msg);
    let genai_path = dir.join("genai_config.json");
    let onnx = genai_path.is_file();
    let config_path = dir.join("config.json");
    let config = if onnx {
        // The builder's file nests the model's settings (eos_token_id, context_length) in "model".
        read_json(&genai_path, &name)?.get("model").cloned().unwrap_or(Json::Null)
    } else if config_path.is_file() {
        read_json(&config_path, &name)?
    } else {
        return Err(invalid(
            "the directory has neither config.json (a Hugging Face model) nor genai_config.json (an ONNX model)".into(),
        ));
    };
    let tokenizer_path = dir.join("tokenizer.json");
    if !tokenizer_path.is_file() {
        return Err(invalid("the directory has no tokenizer.json".into()));
    }
    let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path)
        .map_err(|e| invalid(format!("cannot load tokenizer.json: {e}")))?;
    let tok_config = optional_json(&dir.join("tokenizer_config.json"), &name)?.unwrap_or(Json::Null);
    let gen_config = optional_json(&dir.join("generation_config.json"), &name)?.unwrap_or(Json::Null);

    if !onnx && safetensors_files(dir).is_empty() {
        return Err(invalid("the directory has no *.safetensors weights".into()));
    }

    let bos_token = token_text(tok_config.get("bos_token"));
    let eos_token = token_text(tok_config.get("eos_token"));
    let template_source = chat_template_source(dir, &tok_config, &name)?;
    let chat_template = match template_source {
        Some(src) => Some(Arc::new(
            ChatTemplate::new(&src, bos_token.clone(), eos_token.clone())
                .map_err(|e| invalid(format!("chat template: {e}")))?,
        )),
        None => None,
    };

    // generation_config.json is what transformers' generate() stops on; config.json's and the
    // tokenizer's EOS are fallbacks that older checkpoints rely on.
    let mut eos_ids = ids(gen_config.get("eos_token_id"));
    if eos_ids.is_empty() {
        eos_ids = ids(config.get("eos_token_id"));
    }
    if let Some(id) = eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t)) {
        eos_ids.push(id);
    }
    let mut seen = std::collections::HashSet::new();
    eos_ids.retain(|id| seen.insert(*id));

    let context_length = config
        .get(if onnx { "context_length" } else { "max_position_embeddings" })
        .and_then(Json::as_u64)
        .and_then(|n| usize::try_from(n).ok());
    let weights = if onnx {
        WeightsFormat::Onnx { dir: dir.to_path_buf() }
    } else {
        WeightsFormat::Safetensors { dir: dir.to_path_buf() }
    };
    Ok(ModelAssets {
        weights,
        tokenizer: Arc::new(tokenizer),
        chat_template,
        eos_token_ids: eos_ids,
        context_length,
    })
}

/// The `*.safetensors` files of a directory, sorted (shards in order).
pub fn safetensors_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    files
}

/// The chat template: `chat_template.jinja` if present (newer transformers save it there), else
/// tokenizer_config.json's `chat_template`, a string or a list of `{name, template}` from which
/// the one named "default" is taken.
fn chat_template_source(dir: &Path, tok_config: &Json, name: &str) -> Result<Option<String>, ModelError> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return std::fs::read_to_string(&jinja)
            .map(Some)
            .map_err(|e| ModelError::Invalid(name.to_string(), format!("cannot read chat_template.jinja: {e}")));
    }
    Ok(match tok_config.get("chat_template") {
        Some(Json::String(s)) => Some(s.clone()),
        Some(Json::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(Json::as_str)
            .map(str::to_string),
        _ => None,
    })
}

/// A special token as tokenizer_config.json writes it: a string or an AddedToken object.
fn token_text(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        obj @ Json::Object(_) => obj.get("content").and_then(Json::as_str).map(str::to_string),
        _ => None,
    }
}

/// An `eos_token_id` field: an integer or a list of integers.
fn ids(v: Option<&Json>) -> Vec<u32> {
    match v {
        Some(Json::Array(list)) => list.iter().filter_map(|x| x.as_u64()).filter_map(|x| u32::try_from(x).ok()).collect(),
        Some(x) => x.as_u64().and_then(|x| u32::try_from(x).ok()).into_iter().collect(),
        None => Vec::new(),
    }
}

fn read_json(path: &Path, name: &str) -> Result<Json, ModelError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ModelError::Invalid(name.to_string(), format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map_err(|e| ModelError::Invalid(name.to_string(), format!("{} is not valid JSON: {e}", path.display())))
}

fn optional_json(path: &Path, name: &str) -> Result<Option<Json>, ModelError> {
    if path.is_file() {
        read_json(path, name).map(Some)
    } else {
        Ok(None)
    }
}
