//! The `inferd` command line: subcommands and the flags of `inferd serve`.
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Command line of the `inferd` binary.
#[derive(Debug, Parser)]
#[command(name = "inferd", version, about = "OpenAI-compatible LLM inference server")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// `inferd` subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the OpenAI-compatible HTTP API.
    Serve(ServeArgs),
    /// Convert a PEFT or mlx-lm LoRA adapter into ONNX Runtime's `.onnx_adapter` format, for
    /// ONNX models exported with `scripts/export_onnx.py --lora-inputs`.
    ConvertAdapter(ConvertArgs),
}

/// Flags of `inferd convert-adapter`.
#[derive(Debug, Clone, Args)]
pub struct ConvertArgs {
    /// Adapter directory (PEFT: adapter_config.json + adapter_model.safetensors; mlx-lm:
    /// adapter_config.json + adapters.safetensors).
    pub input: PathBuf,
    /// Output file (conventionally `*.onnx_adapter`).
    pub output: PathBuf,
    /// `adapter_version` written into the file.
    #[arg(long, default_value_t = 1)]
    pub adapter_version: i32,
}

/// Flags of `inferd serve`; each overrides the environment and the config file.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// Config file (default: ./config.toml when present; env INFERD_CONFIG).
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Serve this one model instead of the config's list: a GGUF file, a Hugging Face style
    /// directory or a hub id (env INFERD_MODEL).
    #[arg(long, value_name = "SPEC")]
    pub model: Option<String>,
    /// Id the model is served under (default: file stem, directory name or hub id).
    #[arg(long, value_name = "ID")]
    pub model_id: Option<String>,
    /// `candle` or `onnx` (env INFERD_BACKEND).
    #[arg(long)]
    pub backend: Option<String>,
    /// `cpu` or `cuda:N` (env INFERD_DEVICE).
    #[arg(long)]
    pub device: Option<String>,
    /// Address to bind (env INFERD_HOST; default 127.0.0.1).
    #[arg(long)]
    pub host: Option<String>,
    /// Port to bind (env INFERD_PORT; default 8080).
    #[arg(long)]
    pub port: Option<u16>,
    /// Most sequences decoded together per model.
    #[arg(long)]
    pub max_batch: Option<usize>,
    /// Context length override (default: the model's own).
    #[arg(long)]
    pub context_length: Option<usize>,
    /// Fraction of the GPU's memory a model may fill, its KV cache included (default 0.9).
    #[arg(long)]
    pub gpu_memory_fraction: Option<f64>,
    /// CPU threads of the forward pass, shared by all CPU models (env INFERD_THREADS; default:
    /// every CPU this process may use).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Threads serving HTTP (env INFERD_HTTP_THREADS; default: one per 8 CPUs, at least one).
    #[arg(long)]
    pub http_threads: Option<usize>,
}
