//! LoRA adapters: loading PEFT and mlx-lm adapters (`formats`), the backend-independent weights
//! (`adapter`), the registry that resolves a request's `model` to a base model and adapter version
//! (`registry`), and the `.onnx_adapter` writer for ONNX Runtime (`onnx_adapter`).
pub mod adapter;
pub mod formats;
pub mod registry;

pub use adapter::{BaseDims, LoraAdapter, LoraPair, Module};
pub use formats::read_adapter;
pub use registry::{AdapterRegistry, LoraError, RegistryConfig, Served};
