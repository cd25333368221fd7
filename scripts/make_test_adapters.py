#!/usr/bin/env python3
"""Random but fixed PEFT LoRA adapters for the real SmolLM2-135M-Instruct, for the end-to-end
mixed-batch test (tests/e2e_lora_mixed.rs).

Writes, under OUT_DIR (default: tests/fixtures/generated/smollm2-lora/):
  qv/   r=8,  lora_alpha=16 (scale 2), target_modules [q_proj, v_proj], all 30 layers
  all/  r=16, lora_alpha=32 (scale 2), all seven modules q, k, v, o, gate, up, down, all 30 layers
each as PEFT 0.21.2 saves it: adapter_config.json (LoraConfig.to_dict(), sorted keys, indent 2)
and adapter_model.safetensors (F32, metadata {"format": "pt"}), tensor names
base_model.model.model.layers.N.{self_attn,mlp}.M.lora_{A,B}.weight, lora_A [r, in] and
lora_B [out, r] (torch Linear layout). PEFT computes y = W x + scale * B (A x).

The model's shapes are read from (and checked against) the GGUF's metadata and tensors. A ~
N(0, 1/in); B ~ N(0, b_std) with b_std chosen so that scale * B @ A has an element std of
a fraction (qv 0.2, all 0.08) of the std of the base weight it is added to (dequantized from the
GGUF, rounded to 4 significant digits): enough to change greedy answers within the first few
tokens while the text stays text (qv 0.25 or all 0.2 already turn many answers into lists of
"-" or newlines over the 30 layers).

Deterministic: fixed seed, no timestamps; re-running gives byte-identical files.
Usage: python scripts/make_test_adapters.py [--model GGUF] [OUT_DIR]
Deps: numpy, safetensors, gguf (scripts/requirements-test.txt).
"""
import argparse
import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import gguf
from gguf import quants
from safetensors.numpy import save_file

SEED = 20261127
MODEL = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = "tests/fixtures/generated/smollm2-lora"
# What SmolLM2-135M-Instruct is (llama arch); checked against the GGUF before anything is written.
EXPECT = {"arch": "llama", "hidden": 576, "layers": 30, "heads": 9, "kv_heads": 3, "head_dim": 64,
          "ffn": 1536}
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# PEFT module name -> llama.cpp GGUF tensor name within blk.N.
GGUF_NAME = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
# name -> (r, lora_alpha, target modules, relative size of the delta vs the base weight's std)
ADAPTERS = {
    "qv": (8, 16, ("q_proj", "v_proj"), 0.2),
    "all": (16, 32, ATTN + MLP, 0.08),
}


def peft_config(r: int, alpha: int, targets) -> dict:
    """adapter_config.json as PEFT 0.21.2 writes it (LoraConfig.to_dict(); the same keys as
    tests/fixtures/lora/adapter-a/adapter_config.json)."""
    return {
        "alora_invocation_tokens": None,
        "alpha_pattern": {},
        "arrow_config": None,
        "auto_mapping": None,
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "bias": "none",
        "corda_config": None,
        "ensure_weight_tying": False,
        "eva_config": None,
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": False,
        "init_lora_weights": True,
        "kasa_config": None,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": alpha,
        "lora_bias": False,
        "lora_dropout": 0.0,
        "lora_ga_config": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "monteclora_config": None,
        "peft_type": "LORA",
        "peft_version": "0.21.2",
        "qalora_group_size": 16,
        "r": r,
        "rank_pattern": {},
        "revision": None,
        "target_modules": sorted(targets),
        "target_parameters": None,
        "task_type": "CAUSAL_LM",
        "trainable_token_indices": None,
        "use_bdlora": None,
        "use_dora": False,
        "use_qalora": False,
        "use_rslora": False,
        "velora_config": None,
    }


def field(reader: gguf.GGUFReader, key: str):
    f = reader.fields.get(key)
    if f is None:
        sys.exit(f"{key} missing from the GGUF metadata")
    return f.contents()


def read_model(path: Path):
    """The model's dims from the GGUF metadata (checked against EXPECT and the tensor shapes) and
    the std of every targetable base weight, {(layer, module): std}."""
    reader = gguf.GGUFReader(str(path))
    arch = field(reader, "general.architecture")
    dims = {
        "arch": arch,
        "hidden": int(field(reader, f"{arch}.embedding_length")),
        "layers": int(field(reader, f"{arch}.block_count")),
        "heads": int(field(reader, f"{arch}.attention.head_count")),
        "kv_heads": int(field(reader, f"{arch}.attention.head_count_kv")),
        "ffn": int(field(reader, f"{arch}.feed_forward_length")),
    }
    dims["head_dim"] = dims["hidden"] // dims["heads"]
    if dims != EXPECT:
        sys.exit(f"{path}: not SmolLM2-135M's shapes: {dims} != {EXPECT}")
    h, kv, ffn = dims["hidden"], dims["kv_heads"] * dims["head_dim"], dims["ffn"]
    shape = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
             "gate_proj": (h, ffn), "up_proj": (h, ffn), "down_proj": (ffn, h)}  # (in, out)
    tensors = {t.name: t for t in reader.tensors}
    stds = {}
    for layer in range(dims["layers"]):
        for m, g in GGUF_NAME.items():
            t = tensors[f"blk.{layer}.{g}.weight"]
            w = quants.dequantize(t.data, t.tensor_type)  # torch layout [out, in]
            fin, fout = shape[m]
            if w.shape != (fout, fin):
                sys.exit(f"blk.{layer}.{g}.weight is {w.shape}, expected [out {fout}, in {fin}]")
            stds[(layer, m)] = float(f"{float(w.astype(np.float64).std()):.4g}")
    return dims, shape, stds


def random_lora(rng, layers: int, shape: dict, stds: dict, r: int, scale: float, targets, frac: float):
    out = {}
    for layer in range(layers):
        for m in targets:
            fin, fout = shape[m]
            a = rng.standard_normal((r, fin)) / math.sqrt(fin)
            # std((B @ A)[i, j]) = b_std * sqrt(r / in); want scale * that = frac * w_std.
            b_std = frac * stds[(layer, m)] / (scale * math.sqrt(r / fin))
            b = rng.standard_normal((fout, r)) * b_std
            pre = f"base_model.model.model.layers.{layer}.{'self_attn' if m in ATTN else 'mlp'}.{m}"
            out[f"{pre}.lora_A.weight"] = a.astype(np.float32)
            out[f"{pre}.lora_B.weight"] = b.astype(np.float32)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default=OUT, help=f"output directory (default {OUT})")
    ap.add_argument("--model", default=MODEL, help=f"the SmolLM2 GGUF (default {MODEL})")
    args = ap.parse_args()
    model = Path(args.model)
    if not model.is_file():
        sys.exit(f"{model} is missing; fetch it with scripts/fetch_models.sh")
    dims, shape, stds = read_model(model)
    rng = np.random.default_rng(SEED)
    for name, (r, alpha, targets, frac) in ADAPTERS.items():
        tensors = random_lora(rng, dims["layers"], shape, stds, r, alpha / r, targets, frac)
        d = Path(args.out) / name
        d.mkdir(parents=True, exist_ok=True)
        text = json.dumps(peft_config(r, alpha, targets), indent=2, sort_keys=True) + "\n"
        (d / "adapter_config.json").write_text(text, encoding="utf-8")
        st = d / "adapter_model.safetensors"
        save_file(tensors, str(st), metadata={"format": "pt"})
        sha = hashlib.sha256(st.read_bytes()).hexdigest()
        print(f"{d}: r={r} alpha={alpha} {len(tensors)} tensors, {st.stat().st_size} bytes, sha256 {sha[:16]}")


if __name__ == "__main__":
    main()
