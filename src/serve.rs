//! `inferd serve`: load every configured model (assets, backend, engine worker), then serve HTTP.
//!
//! This is the one place that knows every layer: config -> model assets -> backend -> engine ->
//! HTTP state. Each model gets its own worker thread owning its backend.
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::backend::candle::CandleBackend;
use crate::backend::onnx::{OnnxBackend, OnnxOptions, SessionSpec};
use crate::backend::Backend;
use crate::config::{BackendKind, Config, Device, ModelConfig};
use crate::engine::{self, EngineHandle, EnginePool, Event, GenRequest, SubmitError};
use crate::http::state::{unix_now, AppState, Generator, ModelEntry};
use crate::lora::{AdapterRegistry, RegistryConfig};
use crate::model::{self, SourceOptions};

impl Generator for EngineHandle {
    fn submit(&self, req: GenRequest) -> Result<mpsc::Receiver<Event>, SubmitError> {
        EngineHandle::submit(self, req)
    }
    fn max_context(&self) -> usize {
        EngineHandle::max_context(self)
    }
    fn is_alive(&self) -> bool {
        EngineHandle::is_alive(self)
    }
    fn vocab_size(&self) -> Option<usize> {
        Some(EngineHandle::vocab_size(self))
    }
    fn stats(&self) -> Option<crate::engine::EngineStats> {
        Some(EngineHandle::stats(self))
    }
}

impl Generator for EnginePool {
    fn submit(&self, req: GenRequest) -> Result<mpsc::Receiver<Event>, SubmitError> {
        EnginePool::submit(self, req)
    }
    fn max_context(&self) -> usize {
        EnginePool::max_context(self)
    }
    fn is_alive(&self) -> bool {
        EnginePool::is_alive(self)
    }
    fn vocab_size(&self) -> Option<usize> {
        Some(EnginePool::vocab_size(self))
    }
    fn stats(&self) -> Option<crate::engine::EngineStats> {
        Some(EnginePool::stats(self))
    }
}

/// Why the server could not start. Each variant's message is one sentence for the operator.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("model '{id}': {source}")]
    Model { id: String, source: model::ModelError },
    #[error("model '{id}': {source}")]
    Backend { id: String, source: crate::backend::BackendError },
    #[error("model '{id}': {message}")]
    Unsupported { id: String, message: String },
    #[error("LoRA adapter '{name}': {message}")]
    Adapter { name: String, message: String },
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
}

/// Loads one model and starts its engine worker; also returns the sizes LoRA adapters for it must
/// fit (None when its backend cannot apply adapters).
pub fn load_model(
    m: &ModelConfig,
    server: &crate::config::ServerConfig,
) -> Result<(ModelEntry, Option<crate::lora::BaseDims>), StartError> {
    let opts = SourceOptions { cache_dir: None, offline: false, progress: true };
    let assets = model::load_assets(&m.source, &opts).map_err(|source| StartError::Model { id: m.id.clone(), source })?;
    let mut workers = Vec::with_capacity(m.devices.len());
    let mut lora_dims = None;
    for &device in &m.devices {
        let backend = open_backend(m, device, &assets, server)?;
        let mut engine_cfg = m.engine_config(server);
        // A backend with a fixed number of sequence slots (the onnx backend's KV cache, sized
        // by the device's memory on a GPU) runs at most that many.
        if let Some(n) = backend.max_sequences() {
            engine_cfg.max_batch = engine_cfg.max_batch.min(n);
        }
        tracing::info!(
            model = %m.id, source = %m.source, backend = ?m.backend, device = ?device,
            max_context = backend.max_context(), max_batch = engine_cfg.max_batch, "model loaded"
        );
        lora_dims = backend.lora_dims();
        workers.push(engine::spawn(backend, Arc::clone(&assets.tokenizer), assets.eos_token_ids.clone(), engine_cfg));
    }
    let generator: Arc<dyn Generator> = if workers.len() == 1 {
        Arc::new(workers.pop().expect("one worker"))
    } else {
        tracing::info!(model = %m.id, workers = workers.len(), "requests go to the least loaded worker");
        Arc::new(EnginePool::new(workers))
    };
    let structured = Arc::new(crate::structured::Structured::new(
        Arc::clone(&assets.tokenizer),
        generator.vocab_size().unwrap_or(0),
        assets.eos_token_ids.first().copied(),
    ));
    let entry = ModelEntry {
        id: m.id.clone(),
        generator,
        tokenizer: assets.tokenizer,
        tool_format: m.tool_call_parser.resolve(assets.chat_template.as_deref().map(|t| t.source())),
        structured,
        chat_template: assets.chat_template,
        created: unix_now(),
        owned_by: "inferd".into(),
    };
    Ok((entry, lora_dims))
}

/// The backend of one worker of model `m` on `device`.
fn open_backend(m: &ModelConfig, device: Device, assets: &model::ModelAssets, server: &crate::config::ServerConfig) -> Result<Box<dyn Backend>, StartError> {
    let backend: Box<dyn Backend> = match (m.backend, device) {
        (BackendKind::Candle, Device::Cpu) => {
            let device = candle_core::Device::Cpu;
            let ctx = m.context_length.or(assets.context_length);
            let mut b = CandleBackend::load(&assets.weights, &device, ctx).map_err(|source| StartError::Backend { id: m.id.clone(), source })?;
            if let Some(mb) = m.kv_cache_mb {
                b.set_kv_cache_bytes(Some(mb << 20)).map_err(|source| StartError::Backend { id: m.id.clone(), source })?;
            }
            if let Some(mb) = m.prefix_cache_mb {
                b.set_prefix_cache_bytes(mb << 20);
            }
            Box::new(b)
        }
        #[cfg(feature = "cuda")]
        (BackendKind::Candle, Device::Cuda(ordinal)) => {
            let opts = crate::backend::cuda::CudaOptions {
                ordinal,
                max_context: m.context_length.or(assets.context_length),
                gpu_memory_fraction: m.gpu_memory_fraction,
                dtype: crate::backend::cuda::gpu::Dtype::from_env(),
                max_kv_blocks: None,
                max_slots: m.max_batch(),
                graphs: crate::backend::cuda::graphs_from_env(),
                prefix_caching: m.prefix_cache_mb != Some(0),
                pipeline: m.cuda_pipeline(),
                lora_stack: crate::backend::cuda::lora_stack::StackSize::from_env(),
                fused_row: crate::backend::cuda::fused_row_from_env(),
            };
            Box::new(crate::backend::cuda::CudaBackend::load(&assets.weights, &opts).map_err(|source| StartError::Backend { id: m.id.clone(), source })?)
        }
        #[cfg(not(feature = "cuda"))]
        (BackendKind::Candle, Device::Cuda(_)) => {
            return Err(StartError::Unsupported {
                id: m.id.clone(),
                message: "this build has no CUDA support: build with --features cuda (scripts/build_cuda.sh), or use device = \"cpu\"".into(),
            })
        }
        (BackendKind::Candle, Device::CoreMl) => {
            return Err(StartError::Unsupported {
                id: m.id.clone(),
                message: "the candle backend runs on the CPU and CUDA; CoreML goes through backend = \"onnx\"".into(),
            })
        }
        (BackendKind::Onnx, _) if m.kv_cache_mb.is_some() => {
            return Err(StartError::Unsupported {
                id: m.id.clone(),
                message: "kv_cache_mb applies to the candle backend; the onnx backend sizes its cache by max_batch and context_length".into(),
            })
        }
        (BackendKind::Onnx, device) => {
            let crate::model::WeightsFormat::Onnx { dir } = &assets.weights else {
                return Err(StartError::Unsupported {
                    id: m.id.clone(),
                    message: format!(
                        "the onnx backend loads a directory with genai_config.json and model.onnx, not {}; \
                         convert the model with scripts/export_onnx.py",
                        m.source
                    ),
                });
            };
            let threads = m.intra_op_threads.or(server.threads).unwrap_or_else(crate::backend::candle::pool::default_threads);
            let opts = OnnxOptions {
                library: server.onnxruntime_library.clone(),
                session: SessionSpec { device, intra_op_threads: threads, inter_op_threads: m.inter_op_threads },
                max_batch: m.max_batch(),
                max_context: m.context_length,
                // INFERD_ONNX_FIXED_SHAPES=0|1 overrides the provider's default (A/B runs).
                fixed_shapes: std::env::var("INFERD_ONNX_FIXED_SHAPES").ok().map(|v| v != "0"),
                gpu_memory_fraction: m.gpu_memory_fraction,
            };
            let mut b = OnnxBackend::load(dir, &opts).map_err(|source| StartError::Backend { id: m.id.clone(), source })?;
            if let Some(mb) = m.prefix_cache_mb {
                b.set_prefix_cache_bytes(mb << 20);
            }
            Box::new(b)
        }
    };
    Ok(backend)
}

/// Loads every model, then serves until Ctrl-C / SIGTERM.
pub async fn run(cfg: Config) -> Result<(), StartError> {
    let threads = cfg.server.threads.unwrap_or_else(crate::backend::candle::pool::default_threads);
    crate::backend::candle::pool::configure(threads);
    tracing::info!(threads = crate::backend::candle::pool::global().threads(), "CPU thread pool ready");
    let mut entries = Vec::with_capacity(cfg.models.len());
    let mut bases = std::collections::HashMap::new();
    for m in &cfg.models {
        let (m, server) = (m.clone(), cfg.server.clone());
        let (entry, dims) = tokio::task::spawn_blocking(move || load_model(&m, &server))
            .await
            .expect("the model loading task never panics")?;
        bases.insert(entry.id.clone(), dims);
        entries.push(entry);
    }
    let registry = AdapterRegistry::new(
        RegistryConfig { runtime_root: cfg.server.lora_root.clone(), budget_bytes: cfg.server.lora_budget_mb << 20 },
        bases,
    );
    // Configured adapters are read off the async runtime, like the models.
    let adapters = cfg.adapters.clone();
    let registry = tokio::task::spawn_blocking(move || {
        for a in &adapters {
            registry
                .load(&a.name, &a.path, a.base.as_deref(), false)
                .map_err(|e| StartError::Adapter { name: a.name.clone(), message: e.message })?;
        }
        Ok::<_, StartError>(registry)
    })
    .await
    .expect("the adapter loading task never panics")?;
    let state = AppState::new(entries, cfg.server.limits()).with_adapters(Arc::new(registry));
    let addr = format!("{}:{}", cfg.server.host, cfg.server.port);
    crate::http::serve(state, &cfg.server.host, cfg.server.port, crate::http::shutdown_signal())
        .await
        .map_err(|source| StartError::Bind { addr, source })
}
