//! LoRA adapters: loading PEFT and mlx-lm adapters (`formats`), the backend-independent weights
//! (`adapter`), the registry that resolves a request's `model` to a base model and adapter version
//! (`registry`), and the `.onnx_adapter` writer for ONNX Runtime (`onnx_adapter`).
pub mod adapter;
pub mod formats;
pub mod onnx_adapter;
pub mod registry;

pub use adapter::{BaseDims, LoraAdapter, LoraPair, Module, QkRows};
pub use formats::read_adapter;

/// `inferd convert-adapter`: reads a PEFT or mlx-lm adapter and writes its `.onnx_adapter`.
/// Returns the number of parameters written.
pub fn convert_adapter(input: &std::path::Path, output: &std::path::Path, adapter_version: i32) -> Result<usize, String> {
    let name = input.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let adapter = read_adapter(&name, input)?;
    if adapter.modules.is_empty() {
        return Err(format!("{} holds no LoRA weights", input.display()));
    }
    let params = onnx_adapter::params(&adapter);
    let bytes = onnx_adapter::write(&params, adapter_version, 1);
    std::fs::write(output, bytes).map_err(|e| format!("cannot write {}: {e}", output.display()))?;
    Ok(params.len())
}
pub use registry::{AdapterRegistry, LoraError, RegistryConfig, Served};
