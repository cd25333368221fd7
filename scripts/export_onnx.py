#!/usr/bin/env python3
"""Export a decoder LLM to the ONNX layout inferd's ONNX Runtime backend loads.

Input:  a local Hugging Face model directory (config.json + *.safetensors / pytorch_model*.bin +
        tokenizer files), or a GGUF file (dequantised through transformers' GGUF support).
Output: the onnxruntime-genai builder layout: genai_config.json, model.onnx + model.onnx.data,
        tokenizer.json, tokenizer_config.json (with the chat template kept in "chat_template").

Usage:
  python scripts/export_onnx.py INPUT OUT_DIR [--precision fp32|int4|fp16]
                                [--execution-provider cpu|cuda] [--adapter PEFT_DIR |
                                --lora-inputs [--lora-targets M,..]] [options]
  python scripts/export_onnx.py ADAPTER_DIR OUT.onnx_adapter
  e.g.
  python scripts/export_onnx.py tests/fixtures/generated/tiny-qwen2 /tmp/tiny-onnx -p fp32
  python scripts/export_onnx.py models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf \
      models/qwen2.5-coder-0.5b-instruct-onnx-int4 -p int4 -e cpu

Precisions: fp32 (cpu or cuda), int4 (cpu or cuda; MatMulNBits, RTN, symmetric, block 32;
on cpu accuracy_level 4 = int8 activations), fp16 (cuda). For int4 the token embedding is
quantised too (builder option op_types_to_quantize=MatMul/Gather -> GatherBlockQuantized, or
one shared quantised matrix when the model ties embeddings); --no-quantize-embeddings keeps it
float. --prune-lm-head makes `logits` [batch, 1, vocab] (last input position only): on the
Qwen2.5-0.5B int4 export it made a 512-token prefill ~1.5x faster (2 threads).

LoRA:
  --adapter PEFT_DIR   bakes one PEFT LoRA adapter into the graph (builder option adapter_path):
                       constants model.layers.N.{attn.q/k/v/o_proj|mlp.gate/up/down_proj}
                       .lora_{A,B}.MatMul.weight, A [in, r], B [r, out] pre-scaled by PEFT's
                       scaling (alpha/r, alpha/sqrt(r) with use_rslora).
  --lora-inputs        one graph for the base model and any LoRA adapters: the builder is run
                       with a template adapter on every --lora-targets module (default all seven)
                       of every layer, then each LoRA MatMul takes its weight from a graph input
                       of the same name ([in, R] / [R, out], float32, R a dynamic dim named
                       lora_rank.N.MODULE) whose default is an empty [in, 0] / [0, out]
                       initializer, so with nothing fed the LoRA branch adds zeros (= the base
                       model). Feed an adapter's tensors under those names, or activate an
                       .onnx_adapter file (ONNX Runtime RunOptions add_active_adapter).
                       Between A and B sits `Mul(x A, lora_mask)`: the required input
                       lora_mask [batch, 1|seq, R] lets one run serve rows with different
                       adapters: feed the adapters' A stacked along R ([in, r1+r2+..]) and B
                       likewise, and give each row 1s on its own adapter's columns, 0s
                       elsewhere; feed [[[1]]] to apply one adapter (or none) to all rows.
                       Works with -p fp32 and with -p int4 -e cpu (the base MatMuls are
                       quantised, the LoRA MatMuls stay float32). --no-lora-mask leaves the
                       mask out (one adapter per run; what onnxruntime-genai can run, since it
                       does not feed lora_mask).
  python scripts/export_onnx.py ADAPTER_DIR OUT.onnx_adapter
                       converts a PEFT adapter dir (adapter_config.json +
                       adapter_model.safetensors) or an mlx-lm one (adapter_config.json +
                       adapters.safetensors) into ONNX Runtime's .onnx_adapter file for a
                       --lora-inputs graph (A transposed to [in, r]; the scale folded into B).

Workarounds applied (onnxruntime-genai 0.18.0 + transformers 5):
  * config.json is normalised in a staging copy: `rope_theta` is lifted out of
    `rope_parameters` (transformers 5 nests it), a null `sliding_window` with
    use_sliding_window=false becomes max_position_embeddings, `torch_dtype`/`dtype` float.
  * transformers refuses to save_pretrained a GGUF-loaded model: its state dict is copied into
    a fresh model of the same config, which is saved to a temporary HF directory.
  * the builder re-saves the tokenizer through transformers 5, which moves the chat template to
    chat_template.jinja and rewrites tokenizer.json; the source tokenizer.json and
    tokenizer_config.json are copied back verbatim, and the chat template is folded into
    tokenizer_config.json if it lived in chat_template.jinja (or, for GGUF, in the metadata).
  * the builder's --help crashes in 0.18.0: its options are passed explicitly.
  * the builder stamps the git HEAD of the directory 5 levels above its module (inferd's own
    checkout when the venv lives in it) into model.onnx; git is made to fail (GIT_DIR) so the
    wheel's commit is stamped and the output is byte-identical on re-run.
Deps: scripts/requirements-export.txt (its own venv, .venv-export; see that file).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VALID = {("fp32", "cpu"), ("int4", "cpu"), ("fp16", "cuda"), ("fp32", "cuda"), ("int4", "cuda")}
WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class ExportError(Exception):
    """A problem with the user's input; printed without a traceback."""


def log(msg: str) -> None:
    print(f"[export_onnx] {msg}", file=sys.stderr, flush=True)


def is_gguf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


def classify_input(path: Path) -> str:
    """Returns 'hf' or 'gguf', or raises ExportError with what is wrong."""
    if not path.exists():
        raise ExportError(f"input {path} does not exist")
    if path.is_file():
        if is_gguf(path):
            return "gguf"
        raise ExportError(f"input file {path} is not a GGUF file (no 'GGUF' magic); pass a GGUF "
                          "file or a Hugging Face model directory")
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        hint = f" (it holds {ggufs[0].name}: pass that file instead)" if ggufs else ""
        raise ExportError(f"directory {path} has no config.json, so it is not a Hugging Face model "
                          f"directory{hint}")
    if not any(path.glob(g) for g in WEIGHT_GLOBS):
        raise ExportError(f"directory {path} has config.json but no weights "
                          f"({' or '.join(WEIGHT_GLOBS)})")
    if not (path / "tokenizer.json").is_file():
        raise ExportError(f"directory {path} has no tokenizer.json (a fast tokenizer is needed by "
                          "inferd and onnxruntime-genai)")
    return "hf"


def normalise_config(cfg: dict) -> dict:
    """Config fixes for the builder and for candle/other readers (see module docstring)."""
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict) and "rope_theta" in rp and "rope_theta" not in cfg:
        cfg["rope_theta"] = rp["rope_theta"]
    if cfg.get("sliding_window") is None and not cfg.get("use_sliding_window", False):
        if "max_position_embeddings" in cfg:
            cfg["sliding_window"] = cfg["max_position_embeddings"]
    for key in ("torch_dtype", "dtype"):
        if key in cfg and cfg[key] not in ("float32", "float16", "bfloat16"):
            cfg[key] = "float32"
    return cfg


def stage_hf_dir(src: Path, stage: Path) -> None:
    """Staging copy of an HF dir: weights symlinked, config.json normalised."""
    stage.mkdir(parents=True)
    for p in src.iterdir():
        if p.is_file() and p.name != "config.json":
            (stage / p.name).symlink_to(p.resolve())
    cfg = json.loads((src / "config.json").read_text(encoding="utf-8"))
    (stage / "config.json").write_text(json.dumps(normalise_config(cfg), indent=2) + "\n")


def gguf_chat_template(path: Path) -> str | None:
    import gguf
    r = gguf.GGUFReader(str(path))
    f = r.fields.get("tokenizer.chat_template")
    if f is None:
        return None
    return bytes(f.parts[f.data[0]]).decode("utf-8")


def stage_gguf(src: Path, stage: Path) -> None:
    """Dequantises a GGUF through transformers and saves it as an fp32 HF dir in `stage`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    t0 = time.time()
    log(f"loading GGUF {src.name} through transformers (dequantising to fp32)...")
    kw = dict(gguf_file=src.name)
    try:
        config = AutoConfig.from_pretrained(str(src.parent), **kw)
        model = AutoModelForCausalLM.from_pretrained(str(src.parent), dtype=torch.float32, **kw)
        tok = AutoTokenizer.from_pretrained(str(src.parent), **kw)
    except ImportError:
        raise
    except Exception as e:  # transformers raises plain ValueError/KeyError for unsupported archs
        raise ExportError(f"transformers could not load {src} ({type(e).__name__}: {e}); "
                          "supported GGUF architectures are those of transformers' "
                          "GGUF_SUPPORTED_ARCHITECTURES") from e
    # transformers refuses save_pretrained on a GGUF-loaded model: copy into a fresh one.
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    # A tied lm_head has no own entry; anything else missing is an error.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ExportError(f"GGUF state dict does not fit the {config.model_type} model: "
                          f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    del model
    fresh.save_pretrained(str(stage))
    tok.save_pretrained(str(stage))
    cfg_path = stage / "config.json"
    cfg = normalise_config(json.loads(cfg_path.read_text()))
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    # Keep the chat template inside tokenizer_config.json (GGUF metadata wins if present).
    tc_path = stage / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tmpl = gguf_chat_template(src)
    if tmpl is None and (stage / "chat_template.jinja").is_file():
        tmpl = (stage / "chat_template.jinja").read_text()
    if tmpl is not None:
        tc["chat_template"] = tmpl
    tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")
    (stage / "chat_template.jinja").unlink(missing_ok=True)
    log(f"GGUF staged as HF dir in {time.time() - t0:.0f} s "
        f"({config.model_type}, {config.num_hidden_layers} layers, vocab {config.vocab_size}, "
        f"tied embeddings: {config.tie_word_embeddings})")


def run_builder(stage: Path, out: Path, precision: str, ep: str, cache: Path, extra: dict) -> None:
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(stage.resolve()),
           "-o", str(out.resolve()), "-p", precision, "-e", ep, "-c", str(cache.resolve())]
    if extra:
        cmd += ["--extra_options"] + [f"{k}={v}" for k, v in extra.items()]
    log("running: " + " ".join(cmd))
    t0 = time.time()
    # The builder stamps `git rev-parse HEAD`, run five directories above its own module, into
    # model.onnx's producer_version, falling back to the wheel's commit when git fails. With the
    # venv inside a checkout (.venv-export in inferd) that is inferd's HEAD, which would make the
    # output depend on the repository state: make git fail so the wheel's commit is used.
    env = dict(os.environ, GIT_DIR=str(cache.parent / "no-git"))
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          cwd=str(cache.parent), env=env)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-25:])
        raise ExportError(f"onnxruntime-genai builder failed (exit {proc.returncode}):\n{tail}")
    log(f"builder done in {time.time() - t0:.0f} s")


def fix_tokenizer_files(stage: Path, out: Path) -> None:
    """Copies the staged (source) tokenizer files over the builder's re-saved ones and makes
    sure tokenizer_config.json carries the chat template."""
    for name in TOKENIZER_FILES:
        src = stage / name
        if src.exists():
            shutil.copyfile(src.resolve(), out / name)
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8"))
    if "chat_template" not in tc:
        for cand in (stage / "chat_template.jinja", out / "chat_template.jinja"):
            if cand.is_file():
                tc["chat_template"] = cand.read_text(encoding="utf-8")
                tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n",
                                   encoding="utf-8")
                break
    if "chat_template" not in tc:
        log("warning: no chat template found in the input; tokenizer_config.json has none")
    # The template now lives in tokenizer_config.json only (one source of truth).
    (out / "chat_template.jinja").unlink(missing_ok=True)


LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_NODE_RE = r"^/model/layers\.(\d+)/(attn|mlp)/(\w+_proj)/lora_([AB])/MatMul/output_0$"
LORA_MASK = "lora_mask"
MASK_VALUE = "/model/lora_mask/Identity/output_0"


def lora_onnx_name(layer: int, module: str, which: str) -> str:
    """Graph name of a LoRA weight: which is 'A' ([in, r]) or 'B' ([r, out], scaled)."""
    part = "attn" if module in LORA_MODULES[:4] else "mlp"
    return f"model.layers.{layer}.{part}.{module}.lora_{which}.MatMul.weight"


def module_dims(cfg: dict) -> dict:
    """(in, out) of each LoRA-able linear of a Llama/Qwen2-style config."""
    h, ffn = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, ffn), "up_proj": (h, ffn), "down_proj": (ffn, h)}


def write_template_adapter(cfg: dict, targets: list, out: Path) -> None:
    """A PEFT adapter (r=1, alpha=1) on `targets` in every layer, with small non-zero random
    weights (its values are thrown away; only the graph structure the builder makes is kept)."""
    import numpy as np
    from safetensors.numpy import save_file
    dims = module_dims(cfg)
    rng = np.random.default_rng(0)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for t in targets:
            fin, fout = dims[t]
            pre = f"base_model.model.model.layers.{layer}.{'self_attn' if t in LORA_MODULES[:4] else 'mlp'}.{t}"
            tensors[f"{pre}.lora_A.weight"] = (rng.standard_normal((1, fin)) * 0.01).astype(np.float32)
            tensors[f"{pre}.lora_B.weight"] = (rng.standard_normal((fout, 1)) * 0.01).astype(np.float32)
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 1, "lora_alpha": 1,
        "lora_dropout": 0.0, "bias": "none", "target_modules": sorted(targets),
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "base_model_name_or_path": None, "inference_mode": True}, indent=2) + "\n")


def lora_constants_to_inputs(out: Path, expect_layers: int, targets: list, mask: bool = True) -> list:
    """Turns the builder's LoRA MatMuls in out/model.onnx into MatMuls of graph inputs with
    empty defaults, and puts the row mask between each A and B (see the module docstring);
    rewrites model.onnx + model.onnx.data. Returns the names of the new inputs.

    fp32 graphs hold the template adapter as float initializers; int4 graphs as MatMulNBits
    nodes (the builder quantises them like any weight): both become plain float MatMuls."""
    import re
    import onnx
    from onnx import TensorProto, helper
    model = onnx.load(str(out / "model.onnx"), load_external_data=True)
    g = model.graph
    pat = re.compile(LORA_NODE_RE)
    found, new_inputs, nodes = {}, [], []
    dropped = set()
    inits = {i.name: i for i in g.initializer}
    dims = {}
    for node in g.node:
        m = pat.match(node.output[0]) if node.output else None
        if not m:
            nodes.append(node)
            continue
        layer, part, module, which = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        name = f"model.layers.{layer}.{part}.{module}.lora_{which}.MatMul.weight"
        if node.op_type == "MatMul":
            w = inits[node.input[1]]
            if w.data_type != TensorProto.FLOAT:
                raise ExportError(f"LoRA weight {w.name} is {TensorProto.DataType.Name(w.data_type)}"
                                  "; --lora-inputs needs float32 activations (fp32, or int4 on cpu)")
            fin_or_r, r_or_out = w.dims
        elif node.op_type == "MatMulNBits":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            fin_or_r, r_or_out = attrs["K"], attrs["N"]
        else:
            raise ExportError(f"LoRA node {node.name} is a {node.op_type}; expected MatMul or MatMulNBits")
        dropped.update(node.input[1:])
        src = node.input[0]
        if which == "B" and mask:  # B multiplies the masked output of A
            src = f"/model/layers.{layer}/{part}/{module}/lora/MaskMul/output_0"
            nodes.append(helper.make_node(
                "Mul", [node.input[0], MASK_VALUE], [src],
                name=f"/model/layers.{layer}/{part}/{module}/lora/MaskMul"))
        nodes.append(helper.make_node("MatMul", [src, name], list(node.output),
                                      name=node.name.removesuffix("_Q4")))
        rank_dim = f"lora_rank.{layer}.{module}"
        if which == "A":
            empty, shape = [fin_or_r, 0], [fin_or_r, rank_dim]
        else:
            empty, shape = [0, r_or_out], [rank_dim, r_or_out]
        dims[name] = (empty, shape)
        found[(layer, module, which)] = name
    want = {(l, t, w) for l in range(expect_layers) for t in targets for w in "AB"}
    if set(found) != want:
        missing = sorted(want - set(found))[:5]
        raise ExportError(f"the builder's graph lacks LoRA weights for {missing} (found "
                          f"{len(found)} of {len(want)}): is the model a Llama/Qwen2-style one?")
    # The builder's value_info still gives each LoRA A output the template's rank as a fixed
    # dim ([batch, seq, 1]). ONNX Runtime's memory planner trusts it: it shares one buffer
    # between A outputs of different modules, so a run whose modules have different ranks
    # (e.g. an adapter on q_proj and k_proj only, the other modules left at their empty
    # default) failed with "Shape mismatch attempting to re-use buffer. {1,16,0} != {1,16,4}".
    # Give those outputs their real, symbolic rank dim.
    rank_of = {f"/model/layers.{l}/{'attn' if t in LORA_MODULES[:4] else 'mlp'}/{t}/lora_A/MatMul/output_0":
               f"lora_rank.{l}.{t}" for (l, t, w) in found if w == "A"}
    for vi in g.value_info:
        if vi.name in rank_of:
            dim = vi.type.tensor_type.shape.dim[-1]
            dim.Clear()
            dim.dim_param = rank_of[vi.name]
    del g.node[:]
    if mask:
        # The mask is a required input (no default) read through an Identity: on ONNX Runtime's
        # CUDA provider (onnxruntime-gpu 1.31.1) an overridable-initializer mask was taken as
        # the constant default, with or without graph optimisations, so a fed all-zero mask
        # acted as 1; as a plain input it works on CPU and CUDA.
        nodes.insert(0, helper.make_node("Identity", [LORA_MASK], [MASK_VALUE], name="/model/lora_mask/Identity"))
    g.node.extend(nodes)
    kept = [i for i in g.initializer if i.name not in dropped]
    del g.initializer[:]
    g.initializer.extend(kept)
    for name, (empty, shape) in sorted(dims.items()):
        g.initializer.append(helper.make_tensor(name, TensorProto.FLOAT, empty, []))
        new_inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
    # The row mask: [batch, 1 or seq, R], 1 where a row's adapter owns that column of the
    # stacked A/B, else 0. A run that feeds one adapter to every row feeds [[[1]]], which
    # broadcasts; a base-only run [[[1]]] too (or [b, 1, 0]).
    if mask:
        new_inputs.append(helper.make_tensor_value_info(
            LORA_MASK, TensorProto.FLOAT, ["lora_mask_batch", "lora_mask_seq", "lora_mask_rank"]))
    g.input.extend(new_inputs)
    (out / "model.onnx.data").unlink(missing_ok=True)
    onnx.save_model(model, str(out / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
    (out / "model.onnx.data").chmod(0o644)  # onnx creates it 0600
    log(f"--lora-inputs: {len(new_inputs) - mask} LoRA graph inputs with empty defaults "
        f"({expect_layers} layers x {len(targets)} modules x A/B)"
        + (f" and the row mask {LORA_MASK}" if mask else ", no row mask"))
    return [v.name for v in new_inputs]


def read_adapter_dir(adapter: Path) -> tuple[dict, float, str]:
    """Reads a PEFT or mlx-lm LoRA dir. Returns ({(layer, module): (A [in, r], B [r, out])},
    scale, kind); the scale is NOT applied."""
    import math
    import re
    from safetensors.numpy import load_file
    cfg_path = adapter / "adapter_config.json"
    if not cfg_path.is_file():
        raise ExportError(f"{adapter} has no adapter_config.json")
    cfg = json.loads(cfg_path.read_text())
    pairs: dict = {}

    def load(path: Path) -> dict:
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error type for bad files
            raise ExportError(f"cannot read {path}: {e}") from e

    if (adapter / "adapter_model.safetensors").is_file():
        kind = "peft"
        r, alpha = cfg["r"], cfg["lora_alpha"]
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        if cfg.get("rank_pattern") or cfg.get("alpha_pattern") or cfg.get("use_dora"):
            raise ExportError("rank_pattern/alpha_pattern/DoRA adapters are not supported")
        pat = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
        rank = r
        for k, v in load(adapter / "adapter_model.safetensors").items():
            m = pat.match(k)
            if not m or m.group(3) not in LORA_MODULES:
                raise ExportError(f"unexpected tensor {k} in {adapter}")
            key = (int(m.group(1)), m.group(3))
            a, b = pairs.get(key, (None, None))
            pairs[key] = (v.T, b) if m.group(4) == "A" else (a, v.T)  # A [in,r], B [r,out]
    elif (adapter / "adapters.safetensors").is_file():
        kind = "mlx"
        scale = float(cfg["lora_parameters"]["scale"])
        rank = int(cfg["lora_parameters"]["rank"])
        if cfg.get("fine_tune_type", "lora") != "lora":
            raise ExportError(f"mlx fine_tune_type {cfg.get('fine_tune_type')} is not LoRA")
        pat = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([ab])$")
        for k, v in load(adapter / "adapters.safetensors").items():
            m = pat.match(k)
            if not m or m.group(3) not in LORA_MODULES:
                raise ExportError(f"unexpected tensor {k} in {adapter}")
            key = (int(m.group(1)), m.group(3))
            a, b = pairs.get(key, (None, None))
            pairs[key] = (v, b) if m.group(4) == "a" else (a, v)  # already [in,r], [r,out]
    else:
        raise ExportError(f"{adapter} has neither adapter_model.safetensors (PEFT) nor "
                          "adapters.safetensors (mlx-lm)")
    for key, (a, b) in pairs.items():
        if a is None or b is None or a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise ExportError(f"inconsistent LoRA pair for layer {key[0]} {key[1]}")
        if a.shape[1] != rank:
            raise ExportError(f"layer {key[0]} {key[1]}: tensors have rank {a.shape[1]}, the "
                              f"config says {rank}")
    return pairs, scale, kind


def write_onnx_adapter(adapter: Path, out_file: Path) -> dict:
    """Writes an ONNX Runtime .onnx_adapter (flatbuffers, onnxruntime.AdapterFormat) for a
    --lora-inputs graph: params named lora_onnx_name(...), A [in, r], B [r, out] * scale,
    float32, in sorted name order; adapter_version 1, model_version 1."""
    import numpy as np
    import onnxruntime as ort
    pairs, scale, kind = read_adapter_dir(adapter)
    params = {}
    for (layer, module), (a, b) in pairs.items():
        params[lora_onnx_name(layer, module, "A")] = np.ascontiguousarray(a, dtype=np.float32)
        params[lora_onnx_name(layer, module, "B")] = np.ascontiguousarray(
            (b.astype(np.float64) * scale).astype(np.float32))
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(params[k]) for k in sorted(params)})
    fmt.export_adapter(str(out_file))
    log(f"wrote {out_file} ({kind} adapter, {len(pairs)} modules, scale {scale:g} folded into B)")
    return params


def verify(out: Path, threads: int) -> None:
    """Loads model.onnx with onnxruntime and runs a 4-token prefill + 1 decode step."""
    import numpy as np
    import onnxruntime as ort
    gc = json.loads((out / "genai_config.json").read_text())
    dec = gc["model"]["decoder"]
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(out / dec["filename"]), so, providers=["CPUExecutionProvider"])
    elem = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    past_t = next(i.type for i in sess.get_inputs() if i.name.startswith("past_key_values"))
    dtype = elem[past_t]
    kv, hd, L = dec["num_key_value_heads"], dec["head_size"], dec["num_hidden_layers"]
    feed = {"input_ids": np.array([[1, 2, 3, 4]], np.int64),
            "attention_mask": np.ones((1, 4), np.int64)}
    for n in range(L):
        for nm in (dec["inputs"]["past_key_names"], dec["inputs"]["past_value_names"]):
            feed[nm % n] = np.zeros((1, kv, 0, hd), dtype)
    if any(i.name == LORA_MASK for i in sess.get_inputs()):
        feed[LORA_MASK] = np.ones((1, 1, 1), np.float32)
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
    lg = outs["logits"]
    # [1, 4, V], or [1, 1, V] with prune_lm_head=true (last position only)
    if lg.shape[::2] != (1, gc["model"]["vocab_size"]) or lg.shape[1] not in (1, 4) \
            or not np.isfinite(lg).all():
        raise ExportError(f"verification failed: logits shape {lg.shape}, finite {np.isfinite(lg).all()}")
    log(f"verified with onnxruntime {ort.__version__}: logits {lg.shape}, argmax last "
        f"{int(lg[0, -1].argmax())}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", type=Path, help="HF model directory or .gguf file")
    ap.add_argument("output", type=Path, help="output directory (created; must be empty or absent)")
    ap.add_argument("-p", "--precision", choices=["fp32", "int4", "fp16"], default="fp32")
    ap.add_argument("-e", "--execution-provider", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--no-quantize-embeddings", action="store_true",
                    help="int4: keep the token embedding float (default: quantise it too)")
    ap.add_argument("--block-size", type=int, default=32, choices=[16, 32, 64, 128, 256],
                    help="int4 block size (default 32)")
    ap.add_argument("--accuracy-level", type=int, choices=[1, 2, 3, 4],
                    help="int4 MatMulNBits accuracy_level (builder default: 4 on cpu = int8 "
                         "activations, 0 elsewhere)")
    ap.add_argument("--prune-lm-head", action="store_true",
                    help="logits for the last input position only ([b, 1, vocab]): faster "
                         "prefill, less memory (builder option prune_lm_head=true)")
    ap.add_argument("--extra-option", action="append", default=[], metavar="KEY=VALUE",
                    help="passed to the builder's --extra_options (repeatable)")
    ap.add_argument("--adapter", type=Path, metavar="PEFT_DIR",
                    help="bake this PEFT LoRA adapter into the graph (builder adapter_path)")
    ap.add_argument("--lora-inputs", action="store_true",
                    help="LoRA weights of every --lora-targets module as optional graph inputs "
                         "with empty defaults (base model when none are fed), plus the row mask "
                         "lora_mask; fp32, or int4 on cpu")
    ap.add_argument("--no-lora-mask", action="store_true",
                    help="--lora-inputs without the row mask lora_mask (one adapter per run)")
    ap.add_argument("--lora-targets", default=",".join(LORA_MODULES),
                    help="modules for --lora-inputs (default: all seven)")
    ap.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    ap.add_argument("--keep-temp", action="store_true", help="keep the staging directory")
    ap.add_argument("--no-verify", action="store_true", help="skip the onnxruntime load check")
    ap.add_argument("--threads", type=int, default=2, help="threads for the verification run")
    args = ap.parse_args(argv)

    try:
        if args.input.is_dir() and (args.input / "adapter_config.json").is_file() \
                and args.output.suffix == ".onnx_adapter":
            write_onnx_adapter(args.input, args.output)
            return 0
        prec, ep = args.precision, args.execution_provider
        if args.adapter and args.lora_inputs:
            raise ExportError("--adapter and --lora-inputs exclude each other")
        if args.lora_inputs and (prec, ep) not in (("fp32", "cpu"), ("fp32", "cuda"), ("int4", "cpu")):
            raise ExportError("--lora-inputs needs float32 activations: -p fp32, or -p int4 -e cpu")
        lora_targets = [t for t in args.lora_targets.split(",") if t]
        if any(t not in LORA_MODULES for t in lora_targets):
            raise ExportError(f"--lora-targets: unknown module in {lora_targets}; "
                              f"known: {', '.join(LORA_MODULES)}")
        if (prec, ep) not in VALID:
            ok = ", ".join(f"{p}/{e}" for p, e in sorted(VALID))
            raise ExportError(f"precision {prec} is not supported on {ep}; valid: {ok}")
        kind = classify_input(args.input)
        out = args.output
        if out.exists() and any(out.iterdir()):
            if not args.force:
                raise ExportError(f"output directory {out} is not empty (use --force to replace)")
            if not (out / "genai_config.json").is_file():
                raise ExportError(f"output directory {out} is not empty and holds no "
                                  "genai_config.json: refusing to delete it even with --force")
            shutil.rmtree(out)
        extra = {}
        if prec == "int4":
            extra["block_size"] = args.block_size
            if args.accuracy_level:
                extra["accuracy_level"] = args.accuracy_level
            if not args.no_quantize_embeddings:
                extra["op_types_to_quantize"] = "MatMul/Gather"
        if args.prune_lm_head:
            extra["prune_lm_head"] = "true"
        for kv in args.extra_option:
            if "=" not in kv:
                raise ExportError(f"--extra-option {kv!r} is not KEY=VALUE")
            k, v = kv.split("=", 1)
            extra[k] = v
        tmp = Path(tempfile.mkdtemp(prefix="inferd-export-"))
        try:
            stage = tmp / "hf"
            if kind == "gguf":
                stage_gguf(args.input, stage)
            else:
                stage_hf_dir(args.input, stage)
            out.mkdir(parents=True, exist_ok=True)
            if args.adapter:
                if not (args.adapter / "adapter_config.json").is_file():
                    raise ExportError(f"--adapter {args.adapter}: no adapter_config.json")
                extra["adapter_path"] = str(args.adapter.resolve())
            if args.lora_inputs:
                cfg = json.loads((stage / "config.json").read_text())
                write_template_adapter(cfg, lora_targets, tmp / "lora-template")
                extra["adapter_path"] = str((tmp / "lora-template").resolve())
            run_builder(stage, out, prec, ep, tmp / "cache", extra)
            if args.lora_inputs:
                lora_constants_to_inputs(out, cfg["num_hidden_layers"], lora_targets,
                                         mask=not args.no_lora_mask)
            fix_tokenizer_files(stage, out)
            if not args.no_verify and ep == "cpu":
                verify(out, args.threads)
        finally:
            if args.keep_temp:
                log(f"staging dir kept: {tmp}")
            else:
                shutil.rmtree(tmp, ignore_errors=True)
        size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
        log(f"wrote {out} ({size / 2**20:.1f} MiB): " + ", ".join(sorted(p.name for p in out.iterdir())))
        return 0
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"error: missing Python package ({e}); install scripts/requirements-export.txt "
              "into its own venv (see that file)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
