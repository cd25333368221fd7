//! Loading the candle backend onto a GPU: the weights read by the CPU loaders, checked against
//! what the kernels take, uploaded; the KV cache sized from `gpu_memory_fraction`; the step's
//! buffers, adapters' slots and async scheduling's staging.
use std::collections::{HashMap, HashSet};
use std::path::Path;

use super::gpu::Gpu;
use super::lora::{self, DevLora};
use super::lora_stack::LoraStacks;
use super::weights::DevWeights;
use super::{forward, pipeline, CudaBackend, CudaOptions, LayerCache, BLOCK};
use crate::backend::gpu_sampling;
use crate::backend::paged::BlockTables;
use crate::backend::candle::attention::RopeTable;
use crate::backend::BackendError;
use crate::model::WeightsFormat;

/// Prompt rows one step is sized for beside the decode rows (the engine's default chunk on a GPU);
/// a larger step grows the buffers (and drops the captured graphs).
const PREFILL_ROWS: usize = 2048;

fn load_err(e: impl std::fmt::Display) -> BackendError {
    BackendError::Load(e.to_string())
}

impl CudaBackend {
    pub fn load(weights: &WeightsFormat, opts: &CudaOptions) -> Result<CudaBackend, BackendError> {
        let gpu = Gpu::open(opts.ordinal)?;
        let cpu = candle_core::Device::Cpu;
        let (cfg, w) = match weights {
            WeightsFormat::Gguf(path) => crate::backend::candle::weights::load_gguf(path, &cpu)?,
            WeightsFormat::Safetensors { dir } => crate::backend::candle::weights::load_safetensors(dir, &cpu)?,
            WeightsFormat::Onnx { dir } => return Err(onnx_dir(dir)),
        };
        let d = cfg.head_dim;
        if d > 128 || d % 2 != 0 {
            return Err(load_err(format!("head size {d}: the CUDA attention kernel takes even head sizes up to 128")));
        }
        let mut max_context = opts.max_context.map_or(cfg.context_length, |n| n.min(cfg.context_length));
        let (free0, total) = gpu.memory()?;
        let dw = DevWeights::upload(&w, cfg.tie_word_embeddings, opts.dtype, &gpu)?;
        drop(w);
        let rope = RopeTable::new(d, cfg.rope_theta, max_context, cfg.rope_interleaved);
        let (cos, sin) = rope.tables();
        let (cos, sin) = (gpu.upload(cos)?, gpu.upload(sin)?);
        let inter = dw.layers.first().map_or(0, |l| l.gate_up.n / 2);
        let max_slots = opts.max_slots.max(1);
        let scratch = forward::Scratch::new(&gpu, &cfg, opts.dtype, inter, max_slots + PREFILL_ROWS, max_slots, opts.lora_stack)?;
        let lora_dims = cfg.lora_dims(inter, Some(lora::MAX_RANK));
        let stacks = opts.lora_stack.map(|size| LoraStacks::new(&gpu, size, opts.dtype, lora_dims)).transpose()?;
        if let Some(st) = &stacks {
            tracing::info!(slots = st.size().slots, rank = st.size().rank, mib = st.bytes() >> 20, "LoRA stacks on the device");
        }
        // The KV cache takes what the fraction of the device's memory leaves after what this
        // model took (weights, buffers), within what is free.
        let (free, _) = gpu.memory()?;
        let kv_bytes = crate::backend::device_cache_budget(total, free0, free, opts.gpu_memory_fraction);
        let kv_dim = cfg.num_kv_heads * d;
        let block_bytes = 2 * cfg.num_layers * BLOCK * kv_dim * opts.dtype.bytes();
        // One block is the spare one that padding rows of a graph write into.
        let mut blocks = (kv_bytes / block_bytes).saturating_sub(1);
        if let Some(cap) = opts.max_kv_blocks.filter(|&c| c < blocks) {
            blocks = cap;
            max_context = max_context.min(cap * BLOCK);
        }
        let need = max_context.div_ceil(BLOCK);
        if blocks < need {
            return Err(load_err(format!(
                "cuda:{}: the KV cache gets {} MiB ({blocks} blocks of {BLOCK} positions) after {} MiB of weights, but one sequence of the \
                 context length {max_context} needs {need} blocks ({} MiB); raise gpu_memory_fraction ({}) or lower context_length",
                opts.ordinal,
                kv_bytes >> 20,
                dw.bytes() >> 20,
                (need * block_bytes) >> 20,
                opts.gpu_memory_fraction
            )));
        }
        let cache = (0..cfg.num_layers)
            .map(|_| {
                let bytes = (blocks + 1) * BLOCK * kv_dim * opts.dtype.bytes();
                Ok(LayerCache { k: gpu.zeros(bytes)?, v: gpu.zeros(bytes)? })
            })
            .collect::<Result<Vec<_>, BackendError>>()?;
        let max_blocks = max_context.div_ceil(BLOCK);
        let mut host_tables = vec![0i32; (max_slots + 1) * max_blocks];
        host_tables[max_slots * max_blocks..].fill(blocks as i32);
        let dev_tables = gpu.upload(&host_tables)?;
        let lora = DevLora::new(&gpu, max_slots, lora_dims)?;
        tracing::info!(
            device = %gpu.name(), ordinal = opts.ordinal, dtype = ?opts.dtype, weights_mib = dw.bytes() >> 20,
            kv_blocks = blocks, kv_cache_mib = (blocks * block_bytes) >> 20, max_context, "CUDA backend ready"
        );
        let fused_row = opts.fused_row && super::fused_row::fits(&dw, opts.dtype);
        if opts.fused_row && !fused_row {
            tracing::warn!("fused one-row products asked for, but this model's products do not suit them (f16 only, inputs of at most 16384, a multiple of 8)");
        }
        let mut b = CudaBackend {
            gpu,
            cfg,
            w: dw,
            cos,
            sin,
            cache,
            tables: if opts.prefix_caching { BlockTables::with_prefix_caching(BLOCK, blocks) } else { BlockTables::new(BLOCK, blocks) },
            block_bytes,
            max_context,
            scratch,
            slots: HashMap::new(),
            free_slots: (0..max_slots as u32).rev().collect(),
            max_slots,
            dev_tables,
            max_blocks,
            graphs: HashMap::new(),
            seen: HashSet::new(),
            ungraphed: HashSet::new(),
            lora,
            stacks,
            lora_steps: (0, 0),
            fused_row,
            lora_dims,
            use_graphs: opts.graphs,
            device_sampling: gpu_sampling::enabled_from_env(),
            sample_params: Vec::new(),
            params_on: false,
            pipeline: None,
        };
        if opts.pipeline {
            b.pipeline = Some(pipeline::Pipeline::new(&b.gpu, &b.scratch, max_slots)?);
        }
        Ok(b)
    }
}

fn onnx_dir(dir: &Path) -> BackendError {
    load_err(format!("{} is an ONNX model directory (genai_config.json); serve it with backend = \"onnx\"", dir.display()))
}
