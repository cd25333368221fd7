//! Reading adapters from disk: PEFT (`adapter_config.json` + `adapter_model.safetensors`) and
//! mlx-lm (`adapter_config.json` + `adapters.safetensors`, as `mlx_lm.lora` writes them).
//!
//! PEFT stores `lora_A.weight` as `[r, in]` and `lora_B.weight` as `[out, r]` with the scale
//! `lora_alpha / r` (`lora_alpha / sqrt(r)` with `use_rslora`); mlx-lm stores `lora_a` as
//! `[in, r]` and `lora_b` as `[r, out]` with `lora_parameters.scale` applied as is.
use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::adapter::{LoraAdapter, LoraPair, Module};

/// Reads the adapter in `dir` (PEFT or mlx-lm, told apart by the weights file's name).
pub fn read_adapter(name: &str, dir: &Path) -> Result<LoraAdapter, String> {
    if !dir.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    let config_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&config_path)
        .map_err(|e| format!("cannot read {}: {e}", config_path.display()))?;
    let config: Value = serde_json::from_str(&text).map_err(|e| format!("{} is not valid JSON: {e}", config_path.display()))?;
    let (peft, mlx) = (dir.join("adapter_model.safetensors"), dir.join("adapters.safetensors"));
    if peft.is_file() {
        read_peft(name, dir, &config, &peft)
    } else if mlx.is_file() {
        read_mlx(name, dir, &config, &mlx)
    } else {
        Err(format!(
            "{} has neither adapter_model.safetensors (PEFT) nor adapters.safetensors (mlx-lm)",
            dir.display()
        ))
    }
}

fn tensors(path: &Path) -> Result<Vec<(String, Tensor)>, String> {
    let map = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut v: Vec<_> = map.into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(v)
}

/// (layer, module, is_a) from a key such as `...layers.3.self_attn.q_proj.lora_A.weight`.
fn parse_key(key: &str, a: &str, b: &str) -> Result<(usize, Module, bool), String> {
    let parts: Vec<&str> = key.split('.').collect();
    let li = parts.iter().position(|p| *p == "layers").filter(|&i| i + 1 < parts.len());
    let layer = li.and_then(|i| parts[i + 1].parse::<usize>().ok());
    let which = parts.iter().find_map(|p| if *p == a { Some(true) } else if *p == b { Some(false) } else { None });
    let (Some(layer), Some(is_a)) = (layer, which) else {
        return Err(format!("unexpected tensor '{key}' (only per-layer {a}/{b} weights are supported)"));
    };
    let module_name = parts[..parts.iter().position(|p| *p == a || *p == b).unwrap()].last().copied().unwrap_or("");
    let module = Module::from_hf_name(module_name).ok_or_else(|| {
        format!("tensor '{key}' targets '{module_name}', which is not one of q/k/v/o/gate/up/down_proj")
    })?;
    Ok((layer, module, is_a))
}

fn to_vec2(t: &Tensor, key: &str) -> Result<(usize, usize, Vec<f32>), String> {
    let (r, c) = t.dims2().map_err(|_| format!("tensor '{key}' is not a matrix: shape {:?}", t.dims()))?;
    let v = t
        .to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| format!("tensor '{key}': {e}"))?;
    Ok((r, c, v))
}

fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; v.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = v[r * cols + c];
        }
    }
    out
}

type Halves = BTreeMap<(usize, Module), (Option<(usize, usize, Vec<f32>)>, Option<(usize, usize, Vec<f32>)>)>;

fn collect(path: &Path, a: &str, b: &str) -> Result<Halves, String> {
    let mut halves: Halves = BTreeMap::new();
    for (key, t) in tensors(path)? {
        let (layer, module, is_a) = parse_key(&key, a, b)?;
        let m = to_vec2(&t, &key)?;
        let slot = halves.entry((layer, module)).or_default();
        if is_a { slot.0 = Some(m) } else { slot.1 = Some(m) }
    }
    Ok(halves)
}

fn read_peft(name: &str, dir: &Path, config: &Value, weights: &Path) -> Result<LoraAdapter, String> {
    if let Some(t) = config.get("peft_type").and_then(Value::as_str) {
        if t != "LORA" {
            return Err(format!("peft_type is {t}; only LORA adapters are supported"));
        }
    }
    let r = config.get("r").and_then(Value::as_u64).ok_or("adapter_config.json has no integer 'r'")? as usize;
    let alpha = config.get("lora_alpha").and_then(Value::as_f64).ok_or("adapter_config.json has no 'lora_alpha'")?;
    let rslora = config.get("use_rslora").and_then(Value::as_bool).unwrap_or(false);
    let non_empty = |k: &str| config.get(k).is_some_and(|v| v.as_object().is_some_and(|o| !o.is_empty()) || v.as_array().is_some_and(|a| !a.is_empty()));
    if non_empty("alpha_pattern") {
        return Err("alpha_pattern is not supported".into());
    }
    if non_empty("modules_to_save") {
        return Err("modules_to_save (fully trained extra modules) is not supported".into());
    }
    if config.get("bias").and_then(Value::as_str).is_some_and(|b| b != "none") {
        return Err("LoRA bias terms (bias != \"none\") are not supported".into());
    }
    if config.get("use_dora").and_then(Value::as_bool).unwrap_or(false) {
        return Err("DoRA adapters are not supported".into());
    }
    if let Some(targets) = config.get("target_modules").and_then(Value::as_array) {
        for t in targets.iter().filter_map(Value::as_str) {
            let leaf = t.rsplit('.').next().unwrap_or(t);
            if Module::from_hf_name(leaf).is_none() {
                return Err(format!("target module '{t}' is not a projection of the base model (q/k/v/o/gate/up/down_proj)"));
            }
        }
    }
    let rank_pattern = non_empty("rank_pattern");
    let mut modules = BTreeMap::new();
    for ((layer, module), halves) in collect(weights, "lora_A", "lora_B")? {
        let what = format!("layer {layer} {}", module.hf_name());
        let (Some((ra, in_dim, a)), Some((out_dim, rb, b))) = halves else {
            return Err(format!("{what}: lora_A or lora_B is missing"));
        };
        if ra != rb {
            return Err(format!("{what}: lora_A has rank {ra} but lora_B has rank {rb}"));
        }
        if !rank_pattern && ra != r {
            return Err(format!("{what}: rank {ra}, but adapter_config.json says r = {r}"));
        }
        let scale = if rslora { alpha / (ra as f64).sqrt() } else { alpha / ra as f64 };
        let pair = LoraPair::new(a, b, ra, in_dim, out_dim, scale).map_err(|e| format!("{what}: {e}"))?;
        modules.insert((layer, module), pair);
    }
    Ok(LoraAdapter::new(name, dir.to_path_buf(), "peft", modules))
}

fn read_mlx(name: &str, dir: &Path, config: &Value, weights: &Path) -> Result<LoraAdapter, String> {
    if let Some(t) = config.get("fine_tune_type").and_then(Value::as_str) {
        if t != "lora" {
            return Err(format!("fine_tune_type is {t}; only lora adapters are supported"));
        }
    }
    let params = config.get("lora_parameters").ok_or("adapter_config.json has no 'lora_parameters'")?;
    let r = params.get("rank").and_then(Value::as_u64).ok_or("lora_parameters has no integer 'rank'")? as usize;
    let scale = params.get("scale").and_then(Value::as_f64).ok_or("lora_parameters has no 'scale'")?;
    let mut modules = BTreeMap::new();
    for ((layer, module), halves) in collect(weights, "lora_a", "lora_b")? {
        let what = format!("layer {layer} {}", module.hf_name());
        let (Some((in_dim, ra, a)), Some((rb, out_dim, b))) = halves else {
            return Err(format!("{what}: lora_a or lora_b is missing"));
        };
        if ra != rb || ra != r {
            return Err(format!("{what}: ranks {ra} and {rb}, but lora_parameters.rank is {r}"));
        }
        // mlx-lm: y += scale * (x @ lora_a) @ lora_b, lora_a [in, r], lora_b [r, out].
        let pair = LoraPair::new(transpose(&a, in_dim, ra), transpose(&b, ra, out_dim), ra, in_dim, out_dim, scale)
            .map_err(|e| format!("{what}: {e}"))?;
        modules.insert((layer, module), pair);
    }
    Ok(LoraAdapter::new(name, dir.to_path_buf(), "mlx", modules))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_layer_module_and_half() {
        let k = "base_model.model.model.layers.12.self_attn.q_proj.lora_A.weight";
        assert_eq!(parse_key(k, "lora_A", "lora_B").unwrap(), (12, Module::Q, true));
        let k = "model.layers.0.mlp.down_proj.lora_b";
        assert_eq!(parse_key(k, "lora_a", "lora_b").unwrap(), (0, Module::Down, false));
        let e = parse_key("base_model.model.model.layers.0.mlp.fc1.lora_A.weight", "lora_A", "lora_B").unwrap_err();
        assert!(e.contains("'fc1'"), "{e}");
        assert!(parse_key("base_model.model.lm_head.lora_A.weight", "lora_A", "lora_B").is_err());
    }

    #[test]
    fn transpose_swaps_axes() {
        assert_eq!(transpose(&[1., 2., 3., 4., 5., 6.], 2, 3), vec![1., 4., 2., 5., 3., 6.]);
    }
}
