//! Where a model comes from and what it brings besides weights: tokenizer, chat template, EOS ids.
//!
//! `load_assets(spec)` resolves a model spec (a GGUF file, a Hugging Face style directory, or a hub
//! id fetched through `hf-hub` into a local cache) into `ModelAssets`, which the backend and the
//! HTTP layer share.
//!
//! Spec syntax (see `source::parse_spec`): an existing path to a `.gguf` file or to a directory;
//! otherwise a hub id `org/name`, `org/name@revision`, `org/name:file.gguf` or
//! `org/name@revision:file.gguf`. A hub repository with a config.json is loaded as a Hugging Face
//! directory (its snapshot directory in the cache); one without must hold exactly one `.gguf`
//! or the spec must name it. `SourceOptions::offline` resolves from the hub cache only.
use std::path::PathBuf;
use std::sync::Arc;

/// The weights a backend loads, as resolved from a model spec.
#[derive(Debug, Clone, PartialEq)]
pub enum WeightsFormat {
    /// A single GGUF file (weights, tokenizer and chat template in its metadata).
    Gguf(PathBuf),
    /// A Hugging Face style directory: config.json, tokenizer.json, tokenizer_config.json,
    /// *.safetensors (sharded or not).
    Safetensors { dir: PathBuf },
    /// An ONNX model directory in onnxruntime-genai's layout: genai_config.json, the graph it
    /// names (model.onnx + external data), tokenizer.json, tokenizer_config.json.
    Onnx { dir: PathBuf },
}

/// Everything about a model except the loaded weights.
pub struct ModelAssets {
    pub weights: WeightsFormat,
    pub tokenizer: Arc<tokenizers::Tokenizer>,
    /// None when the model ships no chat template (chat completions are then refused with a 400).
    pub chat_template: Option<Arc<template::ChatTemplate>>,
    /// Token ids that end generation (EOS plus e.g. `<|im_end|>`/`<|endoftext|>` where declared).
    pub eos_token_ids: Vec<u32>,
    /// The model's own context length, when it declares one.
    pub context_length: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model source '{0}' not found: {1}")]
    NotFound(String, String),
    #[error("invalid model '{0}': {1}")]
    Invalid(String, String),
    #[error("cannot download '{0}': {1}")]
    Download(String, String),
}

/// Options for resolving hub ids.
#[derive(Debug, Clone, Default)]
pub struct SourceOptions {
    /// Hub cache directory; None uses hf-hub's default (HF_HOME / ~/.cache/huggingface).
    pub cache_dir: Option<PathBuf>,
    /// Never touch the network: resolve hub ids from the cache only.
    pub offline: bool,
    /// Show a progress bar while downloading.
    pub progress: bool,
}

pub mod gguf_tokenizer;
pub mod hf_dir;
pub mod messages;
pub mod source;
pub mod template;

pub use messages::{flatten_content, normalize_messages};
pub use source::load_assets;
