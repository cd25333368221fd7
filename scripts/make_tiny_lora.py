#!/usr/bin/env python3
"""Regenerates the LoRA test fixtures for tests/fixtures/generated/tiny-qwen2 and tiny-llama.

Writes under tests/fixtures/lora/ (deterministic: fixed seeds, no timestamps, sorted JSON):
  tiny-qwen2:
  adapter-a/           PEFT: r=4, lora_alpha=8 (scale 2), target_modules q_proj,v_proj
  adapter-b/           PEFT: r=8, lora_alpha=16, use_rslora (scale 16/sqrt(8)), all of
                       q,k,v,o,gate,up,down
  adapter-a-mlx/       adapter A in mlx-lm's format (adapters.safetensors + adapter_config.json,
                       as `mlx_lm.lora` writes them); the same effect as adapter-a
  bad-rank/            config r=4, tensors of rank 3
  bad-target/          targets q_proj and mlp.fc1 (the base has no fc1)
  bad-base/            shapes of a hidden size 32 model
  bad-corrupt/         adapter-a with adapter_model.safetensors truncated
  bad-missing/         adapter_config.json only
  reference.json       transformers + PEFT (fp32, eager) logits and greedy ids of base, A, B
  adapter-{a,b}.onnx_adapter, tiny-qwen2-onnx-lora/, tiny-qwen2-onnx-lora-nomask/,
  tiny-qwen2-int4-onnx-lora/   (unless --skip-onnx) ONNX Runtime adapter files and
                       scripts/export_onnx.py --lora-inputs graphs (fp32 with and without the
                       row mask, int4 with it)
  tiny-llama (the HF layout of tiny-llama.f32.gguf):
  llama-adapter-all/   PEFT: r=8, lora_alpha=16, use_rslora, all seven modules
  llama-adapter-qk/    PEFT: r=4, lora_alpha=8 (scale 2), q_proj,k_proj only
  llama-adapter-all-mlx/  llama-adapter-all in mlx-lm's format (no lora_parameters.keys)
  llama-reference.json transformers + PEFT on tiny-llama/: base, all, qk
  llama-q4_1-reference.json  the same on tiny-llama.q4_1.gguf's dequantised weights
  tiny-llama-onnx-lora/  (unless --skip-onnx) export_onnx.py --lora-inputs -p fp32 of tiny-llama/
Then checks (see tests/fixtures/lora/README.md for the figures): the adapters change the greedy
ids; the mlx copies give their PEFT adapter's logits applied the way mlx-lm's LoRALinear does;
tiny-llama/ is tiny-llama.f32.gguf un-permuted (bit for bit; numpy forward with ggml's rope;
llama.cpp's greedy ids); LoRA on the GGUF tensors needs lora_B's q/k rows permuted; the ONNX
graphs vs PEFT; the GGUF export path of export_onnx.py vs the HF one.

Usage: python scripts/make_tiny_lora.py [--only qwen|llama] [--skip-onnx] [--hf-dir DIR]
                                        [--llama-hf-dir DIR] [--llama-gguf FILE] [--out-dir DIR]
  (first: python scripts/make_tiny_model.py, which writes tests/fixtures/generated/)
Deps: scripts/requirements-export.txt (torch, transformers, peft; in .venv-export).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import re
import shutil
import struct
import sys
from pathlib import Path

import numpy as np

from export_onnx import module_dims as dims  # (in, out) of each target module

ROOT = Path(__file__).resolve().parent.parent
SEED = 20250611
NEW_TOKENS = 8
LORA_MASK_NAME = "lora_mask"
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ALL = ATTN + MLP
# Prompts (token ids) taken from tests/fixtures/onnx/tiny-qwen2-reference.json.
PROMPT_NAMES = ("short", "chat")
# Relative size of the LoRA delta (scale * B @ A) vs the base weight, per adapter.
DELTA_FRAC = {"a": 0.6, "b": 0.35}


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def dump_json(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


# A regenerated reference replaces the committed one only if it differs by more than this (or
# in anything but logits): transformers' float32 logits move by ~1e-5 from one CPU to another
# (1.4e-5 seen for reference.json), which would otherwise churn the files.
REFERENCE_KEEP_TOL = 5e-5


def write_reference(path: Path, ref: dict) -> None:
    """Writes ref as compact JSON, unless path already holds the same reference up to
    REFERENCE_KEEP_TOL in the logits (same everything else, greedy ids included): then the
    file is kept as it is, so re-runs on another machine leave the fixtures byte-identical."""
    if path.is_file():
        old = json.loads(path.read_text())

        def logits(r):
            return np.array([x for m in r["models"] for p in m["prompts"] for s in p["steps"]
                             for x in s["logits"]], dtype=np.float64)
        def ids(r):
            return [[(p["name"], p["prompt_ids"], p["greedy_ids"],
                      [(s["input_token"], s["argmax"]) for s in p["steps"]])
                     for p in m["prompts"]] for m in r["models"]]
        same_shape = ids(old) == ids(ref)
        rest = lambda r: {k: v for k, v in r.items() if k != "models"}  # noqa: E731
        meta = lambda r: [{k: v for k, v in m.items() if k != "prompts"}  # noqa: E731
                          for m in r["models"]]
        if same_shape and rest(old) == json.loads(json.dumps(rest(ref))) and \
                meta(old) == meta(ref) and logits(old).shape == logits(ref).shape:
            d = float(np.abs(logits(old) - logits(ref)).max())
            if d <= REFERENCE_KEEP_TOL:
                if d:
                    print(f"{path.name}: kept (regenerated logits within {d:.2g} of it)")
                return
    path.write_text(json.dumps(ref, separators=(",", ":")) + "\n")


def module_path(name: str) -> str:
    return ("self_attn." if name in ATTN else "mlp.") + name


def peft_config(r: int, alpha: float, targets, rslora: bool = False,
                base: str = "tests/fixtures/generated/tiny-qwen2") -> dict:
    """adapter_config.json as PEFT writes it for a LoraConfig (with sorted target_modules and a
    neutral base_model_name_or_path)."""
    import peft
    from peft import LoraConfig
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=sorted(targets), lora_dropout=0.0,
                     bias="none", task_type="CAUSAL_LM", use_rslora=rslora).to_dict()
    for k, v in list(cfg.items()):
        if isinstance(v, (set, frozenset)):
            cfg[k] = sorted(v)
    cfg["target_modules"] = sorted(targets)
    cfg["base_model_name_or_path"] = base
    cfg["peft_version"] = peft.__version__
    cfg["revision"] = None
    return cfg


def random_lora(rng, base_w: dict, layers: int, targets, r: int, scale: float, frac: float,
                dim_of: dict) -> dict:
    """PEFT tensors {key: array}: A [r, in] ~ N(0, 1/in), B [out, r] sized so that
    |scale * B @ A| is about `frac` times the base weight's std. Keys as PEFT saves them."""
    out = {}
    for layer in range(layers):
        for t in targets:
            fin, fout = dim_of[t]
            w_std = float(base_w[f"model.layers.{layer}.{module_path(t)}.weight"].std())
            a = rng.standard_normal((r, fin)) / math.sqrt(fin)
            # (B @ A)[i, j] has std b_std * sqrt(r / in) * ... ; pick b_std so that
            # scale * std(B @ A) = frac * w_std.
            b_std = frac * w_std / (scale * math.sqrt(r / fin))
            b = rng.standard_normal((fout, r)) * b_std
            pre = f"base_model.model.model.layers.{layer}.{module_path(t)}"
            out[f"{pre}.lora_A.weight"] = a.astype(np.float32)
            out[f"{pre}.lora_B.weight"] = b.astype(np.float32)
    return out


def write_peft(d: Path, cfg: dict, tensors: dict) -> None:
    from safetensors.numpy import save_file
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text(dump_json(cfg), encoding="utf-8")
    save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})


def write_mlx_safetensors(path: Path, tensors: dict) -> None:
    """Writes a safetensors file byte-for-byte the way mlx's save_safetensors does
    (mlx/io/safetensors.cpp): nlohmann::json header dumped compactly with sorted keys,
    "__metadata__": null when no metadata is given (mlx_lm's trainer passes none), no padding
    of the header to 8 bytes, tensor data in the order of the header's offsets."""
    names = sorted(tensors)
    header, off = {"__metadata__": None}, 0
    for n in names:
        a = np.ascontiguousarray(tensors[n], dtype=np.float32)
        header[n] = {"data_offsets": [off, off + a.nbytes], "dtype": "F32",
                     "shape": list(a.shape)}
        off += a.nbytes
    hb = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for n in names:
            f.write(np.ascontiguousarray(tensors[n], dtype=np.float32).tobytes())


def mlx_config(num_layers: int, rank: int, scale: float, keys, model: str = "tiny-qwen2") -> dict:
    """adapter_config.json as mlx_lm.lora writes it: vars(args) after CONFIG_DEFAULTS are
    filled in (mlx_lm/lora.py), sorted, json.dump(indent=4) (mlx_lm/utils.py save_config).
    keys None: a plain command-line run (no YAML, so no lora_parameters.keys: every Linear of
    the last num_layers blocks gets LoRA)."""
    lora_parameters = {"rank": rank, "dropout": 0.0, "scale": scale}
    if keys is not None:
        lora_parameters["keys"] = list(keys)
    return {
        "adapter_path": "adapters",
        "batch_size": 4,
        # lora_parameters.keys can only be set from a YAML config (--config)
        "config": "lora_config.yaml" if keys is not None else None,
        "data": "data",
        "fine_tune_type": "lora",
        "grad_accumulation_steps": 1,
        "grad_checkpoint": False,
        "clear_cache_threshold": 0,
        "iters": 1000,
        "learning_rate": 1e-05,
        "lora_parameters": lora_parameters,
        "lr_schedule": None,
        "mask_prompt": False,
        "max_seq_length": 2048,
        "model": model,
        "num_layers": num_layers,
        "optimizer": "adam",
        "optimizer_config": {"adam": {}, "adamw": {}, "muon": {}, "sgd": {}, "adafactor": {}},
        "project_name": None,
        "report_to": None,
        "resume_adapter_file": None,
        "save_every": 100,
        "seed": 0,
        "steps_per_eval": 200,
        "steps_per_report": 10,
        "test": False,
        "test_batches": 500,
        "train": True,
        "trust_remote_code": False,
        "val_batches": 25,
    }


def peft_to_mlx(tensors: dict) -> dict:
    """PEFT lora_A [r, in] / lora_B [out, r] -> mlx-lm lora_a [in, r] / lora_b [r, out]
    (transposes; the scale stays in the config)."""
    out = {}
    for k, v in tensors.items():
        pre = k.removeprefix("base_model.model.")
        if k.endswith(".lora_A.weight"):
            out[pre.replace(".lora_A.weight", ".lora_a")] = v.T
        elif k.endswith(".lora_B.weight"):
            out[pre.replace(".lora_B.weight", ".lora_b")] = v.T
    return out


def load_base(hf_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32,
                                                attn_implementation="eager").eval()


def run_steps(model, ids: list) -> list:
    """Prefill logits + NEW_TOKENS greedy decode steps (full forward per step, no cache)."""
    import torch
    ids, steps = list(ids), []
    for i in range(NEW_TOKENS + 1):
        with torch.no_grad():
            lg = model(torch.tensor([ids])).logits[0, -1].numpy().astype(np.float32)
        steps.append({"input_token": None if i == 0 else ids[-1], "argmax": int(lg.argmax()),
                      "logits": lg})
        ids.append(int(lg.argmax()))
    return steps


def mlx_forward_check(hf_dir: Path, mlx_dir: Path, prompts: dict, ref_a: dict) -> float:
    """Applies adapter-a-mlx the way mlx-lm's LoRALinear.__call__ does (forward hooks adding
    scale * (x @ lora_a) @ lora_b to each target Linear's output); returns the max |logit diff|
    vs the PEFT adapter-A reference over all steps."""
    import torch
    from safetensors.numpy import load_file
    cfg = json.loads((mlx_dir / "adapter_config.json").read_text())
    w = load_file(str(mlx_dir / "adapters.safetensors"))
    scale = cfg["lora_parameters"]["scale"]
    model = load_base(hf_dir)
    hooks = []
    for name, mod in model.named_modules():
        if f"{name}.lora_a" in w:
            la, lb = torch.from_numpy(w[f"{name}.lora_a"]), torch.from_numpy(w[f"{name}.lora_b"])
            hooks.append(mod.register_forward_hook(
                lambda m, inp, out, la=la, lb=lb: out + scale * ((inp[0] @ la) @ lb)))
    assert len(hooks) == len(w) // 2, (len(hooks), len(w))
    worst = 0.0
    for name, ids in prompts.items():
        for s, r in zip(run_steps(model, ids), ref_a[name]):
            worst = max(worst, float(np.abs(s["logits"] - r["logits"]).max()))
    return worst


def read_onnx_adapter(buf: bytes) -> tuple[list, list]:
    """Minimal reader of ONNX Runtime's .onnx_adapter (flatbuffers, schema in
    tests/fixtures/lora/README.md), written from the schema alone as a cross-check of the
    documented layout. Returns ([format_version, adapter_version, model_version],
    [(name, dims, data_type, data_offset, data_len)])."""
    import struct
    u32 = lambda p: struct.unpack_from("<I", buf, p)[0]  # noqa: E731
    if buf[4:8] != b"TORT":
        raise ValueError("no TORT file identifier")

    def table(t):  # -> field id -> absolute position of the field (None if absent)
        vt = t - struct.unpack_from("<i", buf, t)[0]
        n = (struct.unpack_from("<H", buf, vt)[0] - 4) // 2
        offs = [struct.unpack_from("<H", buf, vt + 4 + 2 * i)[0] for i in range(n)]
        return lambda i: (t + offs[i]) if i < n and offs[i] else None

    f = table(u32(0))
    ints = [struct.unpack_from("<i", buf, f(i))[0] if f(i) else 0 for i in range(3)]
    vp = f(3) + u32(f(3))
    params = []
    for k in range(u32(vp)):
        ep = vp + 4 + 4 * k
        g = table(ep + u32(ep))
        sp = g(0) + u32(g(0))
        dp = g(1) + u32(g(1))
        rp = g(3) + u32(g(3))
        params.append((buf[sp + 4:sp + 4 + u32(sp)].decode(),
                       list(struct.unpack_from(f"<{u32(dp)}q", buf, dp + 4)),
                       struct.unpack_from("<i", buf, g(2))[0] if g(2) else 0, rp + 4, u32(rp)))
    return ints, params


class OnnxRunner:
    """Batch-1 prefill + decode with a plain (non-shared) KV cache through onnxruntime."""

    def __init__(self, onnx_dir: Path, model_bytes: bytes | None = None):
        import onnxruntime as ort
        gc = json.loads((onnx_dir / "genai_config.json").read_text())
        self.dec = gc["model"]["decoder"]
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.log_severity_level = 3
        self.sess = ort.InferenceSession(model_bytes or str(onnx_dir / "model.onnx"), so,
                                         providers=["CPUExecutionProvider"])
        self.out_names = [o.name for o in self.sess.get_outputs()]
        self.inputs = {i.name for i in self.sess.get_inputs()}

    def prefill(self, ids: np.ndarray, extra: dict | None = None) -> np.ndarray:
        """Last-position logits [batch, vocab] of one prefill of ids [batch, n] (empty cache);
        extra may hold lora_mask (default [[[1]]])."""
        d, L = self.dec, self.dec["num_hidden_layers"]
        feed = {"input_ids": ids, "attention_mask": np.ones(ids.shape, np.int64)}
        for n in range(L):
            for nm in (d["inputs"]["past_key_names"], d["inputs"]["past_value_names"]):
                feed[nm % n] = np.zeros((ids.shape[0], d["num_key_value_heads"], 0,
                                         d["head_size"]), np.float32)
        if "lora_mask" in self.inputs:
            feed["lora_mask"] = np.ones((1, 1, 1), np.float32)
        feed.update(extra or {})
        res = dict(zip(self.out_names, self.sess.run(None, feed)))
        return res["logits"][:, -1]

    def steps(self, ids: list, ref_steps: list, extra: dict | None = None, run_options=None):
        """Logits at the prompt's last position, then after feeding each reference
        input_token (teacher forcing, so every step is compared on the same inputs)."""
        d, L = self.dec, self.dec["num_hidden_layers"]
        kv, hd = d["num_key_value_heads"], d["head_size"]
        past = {}
        for n in range(L):
            for nm in (d["inputs"]["past_key_names"], d["inputs"]["past_value_names"]):
                past[nm % n] = np.zeros((1, kv, 0, hd), np.float32)
        out, cur, tok = [], 0, list(ids)
        for i, st in enumerate(ref_steps):
            if i > 0:
                tok = [st["input_token"]]
            feed = {"input_ids": np.array([tok], np.int64),
                    "attention_mask": np.ones((1, cur + len(tok)), np.int64), **past}
            if "lora_mask" in self.inputs:
                feed["lora_mask"] = np.ones((1, 1, 1), np.float32)
            feed.update(extra or {})
            res = dict(zip(self.out_names, self.sess.run(None, feed, run_options)))
            cur += len(tok)
            out.append(res["logits"][0, -1])
            for n in range(L):
                for a, b in (("past_key_names", "present_key_names"),
                             ("past_value_names", "present_value_names")):
                    past[d["inputs"][a] % n] = res[d["outputs"][b] % n]
        return out


def onnx_part(hf: Path, out: Path, ref: dict) -> bool:
    """Exports tiny-qwen2-onnx-lora (--lora-inputs) and tiny-qwen2-onnx-lora-nomask (the same
    without the row mask), writes the .onnx_adapter files and checks the graphs against the
    plain ONNX fixture, each other and the PEFT reference."""
    import onnxruntime as ort
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import export_onnx
    onnx_dir = out / "tiny-qwen2-onnx-lora"
    rc = export_onnx.main([str(hf), str(onnx_dir), "-p", "fp32", "-e", "cpu", "--lora-inputs",
                           "--force"])
    if rc:
        raise SystemExit(rc)
    nomask_dir = out / "tiny-qwen2-onnx-lora-nomask"
    rc = export_onnx.main([str(hf), str(nomask_dir), "-p", "fp32", "-e", "cpu", "--lora-inputs",
                           "--no-lora-mask", "--force"])
    if rc:
        raise SystemExit(rc)
    for p in [*onnx_dir.iterdir(), *nomask_dir.iterdir()]:
        p.chmod(0o644)
    params = {}
    for tag in ("a", "b"):
        params[tag] = export_onnx.write_onnx_adapter(out / f"adapter-{tag}",
                                                     out / f"adapter-{tag}.onnx_adapter")
    # The schema-only reader must see exactly what was written.
    for tag in ("a", "b"):
        buf = (out / f"adapter-{tag}.onnx_adapter").read_bytes()
        ints, got = read_onnx_adapter(buf)
        same = ints == [1, 1, 1] and [g[0] for g in got] == sorted(params[tag]) and all(
            g[1] == list(params[tag][g[0]].shape) and g[2] == 1 and
            buf[g[3]:g[3] + g[4]] == params[tag][g[0]].tobytes() for g in got)
        print(f"adapter-{tag}.onnx_adapter read back from the schema: {len(got)} params, "
              f"versions {ints}, data offsets mod 8 {sorted({g[3] % 8 for g in got})}: "
              f"{'as written' if same else 'MISMATCH'}")
        if not same:
            raise SystemExit("the .onnx_adapter layout is not as documented")
    # The mlx copy of A must convert to the same .onnx_adapter bytes.
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx.write_onnx_adapter(out / "adapter-a-mlx", Path(tmp) / "a-mlx.onnx_adapter")
        mlx_same = (Path(tmp) / "a-mlx.onnx_adapter").read_bytes() == \
            (out / "adapter-a.onnx_adapter").read_bytes()
    print(f"adapter-a-mlx -> .onnx_adapter byte-identical to adapter-a's: {mlx_same}")

    lora = OnnxRunner(onnx_dir)
    nomask = OnnxRunner(nomask_dir)
    plain = OnnxRunner(ROOT / "tests/fixtures/onnx/tiny-qwen2")
    # Inputs with an initializer are "overridable initializers" to ONNX Runtime: they are not
    # in get_inputs() (C API SessionGetInputCount) but in get_overridable_initializers().
    over = {i.name: i for i in lora.sess.get_overridable_initializers()}
    lora_inputs = sorted(n for n in over if ".lora_" in n)
    in_inputs = [i.name for i in lora.sess.get_inputs() if ".lora_" in i.name]
    print(f"{onnx_dir.name}: {len(lora_inputs)} LoRA overridable initializers (listed by "
          f"get_inputs(): {len(in_inputs)}), e.g. {lora_inputs[0]} {over[lora_inputs[0]].shape} "
          f"{over[lora_inputs[0]].type}")
    ok_names = len(lora_inputs) == 28 and set(lora_inputs) >= set(params["b"])
    by = {m["adapter"]: {p["name"]: p for p in m["prompts"]} for m in ref["models"]}
    ok = mlx_same and ok_names
    worst = {}
    for name, pr in by[None].items():
        a = lora.steps(pr["prompt_ids"], pr["steps"])
        b = plain.steps(pr["prompt_ids"], pr["steps"])
        d_plain = max(float(np.abs(x - y).max()) for x, y in zip(a, b))
        d_ref = max(float(np.abs(x - np.array(s["logits"])).max()) for x, s in zip(a, pr["steps"]))
        worst["no adapter vs plain ONNX"] = max(worst.get("no adapter vs plain ONNX", 0), d_plain)
        worst["no adapter vs transformers"] = max(worst.get("no adapter vs transformers", 0), d_ref)
    for tag in ("a", "b"):
        adapter = ort.LoraAdapter()
        adapter.Load(str(out / f"adapter-{tag}.onnx_adapter"))
        ro = ort.RunOptions()
        ro.add_active_adapter(adapter)
        for name, pr in by[f"adapter-{tag}"].items():
            for how, kw in (("inputs", {"extra": params[tag]}),
                            (".onnx_adapter", {"run_options": ro})):
                got = lora.steps(pr["prompt_ids"], pr["steps"], **kw)
                d = max(float(np.abs(x - np.array(s["logits"])).max())
                        for x, s in zip(got, pr["steps"]))
                ids = [int(x.argmax()) for x in got[:NEW_TOKENS]]
                key = f"adapter-{tag} as {how} vs PEFT"
                worst[key] = max(worst.get(key, 0), d)
                ok &= ids == pr["greedy_ids"]
            same = nomask.steps(pr["prompt_ids"], pr["steps"], extra=params[tag])
            d = max(float(np.abs(x - y).max()) for x, y in zip(got, same))
            key = f"adapter-{tag} with vs without the row mask (plain)"
            worst[key] = max(worst.get(key, 0), d)
        # the same session again with no adapter: back to the base model
    for name, pr in by[None].items():
        a = lora.steps(pr["prompt_ids"], pr["steps"])
        d = max(float(np.abs(x - np.array(s["logits"])).max()) for x, s in zip(a, pr["steps"]))
        worst["no adapter again (same session) vs transformers"] = max(
            worst.get("no adapter again (same session) vs transformers", 0), d)
    # Regression: modules fed with different ranks in one run (here adapter-b's q_proj and
    # k_proj only, every other module at its empty default). Failed before export_onnx.py gave
    # the LoRA A outputs symbolic rank dims (ORT reused one buffer for A outputs of different
    # modules: "Shape mismatch attempting to re-use buffer").
    qk_only = {k: v for k, v in params["b"].items() if ".q_proj." in k or ".k_proj." in k}
    pr = by[None]["short"]
    lora.steps(pr["prompt_ids"], pr["steps"], extra=qk_only)
    print(f"{onnx_dir.name}: a run feeding only q_proj/k_proj (others empty) works")
    for k, v in worst.items():
        tol = 1e-5 if "plain" in k else 1e-4
        print(f"  max|logit diff| {k}: {v:.3g} (tol {tol:g})")
        ok &= v <= tol
    print(f"ONNX LoRA checks (incl. greedy ids equal to the PEFT reference): "
          f"{'OK' if ok else 'FAILED'}")
    ok &= int4_part(hf, out, ref, params)
    return ok


# int4 base: RTN int4 weights (block 32) and, on the CPU, int8-quantised activations
# (accuracy_level 4) against an fp32 reference. Measured: base ~0.3, adapters ~0.4 (see the
# README); the tolerance leaves room for other CPUs' kernels, far below what a wrong adapter
# does (several units, greedy ids all different).
INT4_TOL = 16.0
# The same graph against transformers + PEFT on its own (dequantised) weights: only the int8
# activations (accuracy_level 4) differ.
INT4_ACT_TOL = 1.0


def forced_steps(model, ids: list, ref_steps: list) -> list:
    """Logits (arrays) at the prompt's last position and after each ref_steps input_token
    (teacher forcing with the reference's tokens; full forward per step)."""
    import torch
    seq, out = list(ids), []
    for st in ref_steps:
        if st["input_token"] is not None:
            seq.append(st["input_token"])
        with torch.no_grad():
            out.append(model(torch.tensor([seq])).logits[0, -1].numpy().astype(np.float32))
    return out


def int4_dequantised_hf(onnx_path: Path, hf: Path, out_dir: Path) -> None:
    """An HF dir (copy of hf) whose weights are what the int4 graph computes with: every
    MatMulNBits weight (4 bits, zero point 8: w = (q - 8) * scale, low nibble first) and the
    GatherBlockQuantized embedding (signed int4, w = q * scale) dequantised to float32; norms and
    biases (float in the graph) taken from hf."""
    import onnx
    from onnx import helper, numpy_helper
    from safetensors.numpy import load_file, save_file
    m = onnx.load(str(onnx_path), load_external_data=True)
    init = {i.name: i for i in m.graph.initializer}
    w = load_file(str(hf / "model.safetensors"))
    done = set()
    for node in m.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "MatMulNBits":
            if len(node.input) > 3 and node.input[3]:
                raise SystemExit(f"{node.name}: zero points not handled")
            q = numpy_helper.to_array(init[node.input[1]])
            sc = numpy_helper.to_array(init[node.input[2]]).astype(np.float32)
            n_, nb, blob = q.shape
            vals = np.stack([q & 0xF, q >> 4], -1).reshape(n_, nb, blob * 2).astype(np.float32)
            deq = ((vals - 8) * sc.reshape(n_, nb, 1)).reshape(n_, -1)[:, :attrs["K"]]
            m_ = re.match(r"^/model/layers\.(\d+)/(attn|mlp)/(\w+_proj)/MatMul_Q4$", node.name)
            name = ("lm_head.weight" if node.name == "/lm_head/MatMul_Q4" else
                    f"model.layers.{m_.group(1)}.{module_path(m_.group(3))}.weight")
        elif node.op_type == "GatherBlockQuantized":
            q = numpy_helper.to_array(init[node.input[0]]).astype(np.float32)  # signed int4
            sc = numpy_helper.to_array(init[node.input[2]]).astype(np.float32)
            bs = attrs["block_size"]
            deq = (q.reshape(q.shape[0], -1, bs) * sc[:, :, None]).reshape(q.shape)
            name = "model.embed_tokens.weight"
        else:
            continue
        if w[name].shape != deq.shape:
            raise SystemExit(f"{node.name}: {deq.shape} vs {name} {w[name].shape}")
        w[name] = np.ascontiguousarray(deq, dtype=np.float32)
        done.add(name)
    want = {k for k, v in w.items() if v.ndim == 2}
    if done != want:
        raise SystemExit(f"int4 dequantisation: missing {sorted(want - done)}")
    out_dir.mkdir(parents=True)
    for p in hf.iterdir():
        if p.name != "model.safetensors":
            shutil.copyfile(p, out_dir / p.name)
    save_file(w, str(out_dir / "model.safetensors"), metadata={"format": "pt"})


def int4_part(hf: Path, out: Path, ref: dict, params: dict) -> bool:
    """Exports tiny-qwen2-int4-onnx-lora (-p int4 -e cpu --lora-inputs: int4 base, float32
    LoRA inputs, row mask) and checks it: nothing fed vs the plain int4 fixture
    (tests/fixtures/onnx/tiny-qwen2-int4) and vs transformers, adapter-a / adapter-b fed as
    inputs and as .onnx_adapter vs PEFT (int4 tolerance), and a 3-row batch (base, A, B rows
    through the row mask, adapters stacked along the rank) vs each row alone."""
    import onnxruntime as ort
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import export_onnx
    d = out / "tiny-qwen2-int4-onnx-lora"
    onnx_export(export_onnx, hf, d, "-p", "int4", "-e", "cpu", "--lora-inputs")
    import onnx
    m = onnx.load(str(d / "model.onnx"), load_external_data=False)
    ops = {}
    for n in m.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    print(f"{d.name}: {ops.get('MatMulNBits', 0)} MatMulNBits, "
          f"{ops.get('GatherBlockQuantized', 0)} GatherBlockQuantized, {ops.get('MatMul', 0)} "
          f"float MatMul (the LoRA branches), {len([i for i in m.graph.input if '.lora_' in i.name])} "
          f"LoRA inputs + {LORA_MASK_NAME}")
    int4 = OnnxRunner(d)
    plain = OnnxRunner(ROOT / "tests/fixtures/onnx/tiny-qwen2-int4")
    by = {mm["adapter"]: {p["name"]: p for p in mm["prompts"]} for mm in ref["models"]}
    worst, ok, greedy = {}, True, {}

    def note(key, v, tol):
        worst[key] = (max(worst.get(key, (0.0, tol))[0], v), tol)

    for pr in by[None].values():
        got = int4.steps(pr["prompt_ids"], pr["steps"])
        note("int4 LoRA graph, nothing fed, vs the plain int4 export (tiny-qwen2-int4)",
             max_step_diff(got, plain.steps(pr["prompt_ids"], pr["steps"])), 1e-5)
        note("int4 LoRA graph, nothing fed, vs transformers (fp32)",
             max_step_diff(got, pr["steps"]), INT4_TOL)
        greedy.setdefault("base", []).append(
            sum(int(x.argmax()) == s["argmax"] for x, s in zip(got, pr["steps"])))
    for tag in ("a", "b"):
        adapter = ort.LoraAdapter()
        adapter.Load(str(out / f"adapter-{tag}.onnx_adapter"))
        ro = ort.RunOptions()
        ro.add_active_adapter(adapter)
        for pr in by[f"adapter-{tag}"].values():
            got = int4.steps(pr["prompt_ids"], pr["steps"], extra=params[tag])
            note(f"int4 + adapter-{tag} as inputs vs PEFT (fp32)", max_step_diff(got, pr["steps"]),
                 INT4_TOL)
            via = int4.steps(pr["prompt_ids"], pr["steps"], run_options=ro)
            note(f"int4 + adapter-{tag} as .onnx_adapter vs as inputs", max_step_diff(via, got), 0.0)
            greedy.setdefault(tag, []).append(
                sum(int(x.argmax()) == s["argmax"] for x, s in zip(got, pr["steps"])))
    # Mixed batch: rows base / A / B of one prompt in one run, A and B stacked along the rank
    # (zeros where an adapter lacks a module), each row's mask 1 on its own adapter's columns.
    pr = by[None]["short"]
    ids = np.array([pr["prompt_ids"]] * 3, np.int64)
    ra, rb = 4, 8
    stacked = {}
    for name in sorted(set(params["a"]) | set(params["b"])):
        a, b = params["a"].get(name), params["b"].get(name)
        is_a = ".lora_A." in name
        ref_shape = (b if b is not None else a).shape
        if is_a:
            za = a if a is not None else np.zeros((ref_shape[0], ra), np.float32)
            zb = b if b is not None else np.zeros((ref_shape[0], rb), np.float32)
            stacked[name] = np.concatenate([za, zb], 1)
        else:
            za = a if a is not None else np.zeros((ra, ref_shape[1]), np.float32)
            zb = b if b is not None else np.zeros((rb, ref_shape[1]), np.float32)
            stacked[name] = np.concatenate([za, zb], 0)
    mask = np.zeros((3, 1, ra + rb), np.float32)
    mask[1, 0, :ra], mask[2, 0, ra:] = 1, 1
    batch = int4.prefill(ids, {**stacked, LORA_MASK_NAME: mask})
    alone = [int4.prefill(ids[:1], extra) for extra in ({}, params["a"], params["b"])]
    mixed = max(float(np.abs(batch[i] - alone[i][0]).max()) for i in range(3))
    print(f"int4 LoRA graph, 3-row prefill (base, A, B rows; stacked adapters, row mask) vs each "
          f"row alone: max|logit diff| {mixed:.3g} "
          f"({'bit-identical' if mixed == 0 else 'ONNX Runtime kernels, not bit-identical'})")
    # The LoRA branch of the int4 graph, exactly: transformers + PEFT on the weights the int4
    # graph holds (dequantised), vs the graph with its MatMulNBits switched to float32
    # activations (accuracy_level 0, in memory) and as exported (int8 activations).
    import onnx
    deq_dir = out / ".int4-dequantised-tmp"
    shutil.rmtree(deq_dir, ignore_errors=True)
    try:
        int4_dequantised_hf(d / "model.onnx", hf, deq_dir)
        acc0 = onnx.load(str(d / "model.onnx"), load_external_data=True)
        for node in acc0.graph.node:
            for a in node.attribute:
                if node.op_type == "MatMulNBits" and a.name == "accuracy_level":
                    a.i = 0
        exact = OnnxRunner(d, model_bytes=acc0.SerializeToString())
        for tag in (None, "a", "b"):
            label = f"adapter-{tag}" if tag else None
            model = load_base(deq_dir)
            if tag:
                from peft import PeftModel
                model = PeftModel.from_pretrained(model, str(out / label)).eval()
            what = f"int4 + {label} as inputs" if tag else "int4 LoRA graph, nothing fed"
            for pr in by[label].values():
                want = forced_steps(model, pr["prompt_ids"], pr["steps"])
                extra = params[tag] if tag else None
                note(f"{what}, accuracy_level 0, vs transformers{' + PEFT' if tag else ''} on "
                     f"the int4 weights", max_step_diff(exact.steps(pr["prompt_ids"], pr["steps"],
                                                                    extra=extra), want), 1e-4)
                note(f"{what}, as exported (accuracy_level 4), vs transformers"
                     f"{' + PEFT' if tag else ''} on the int4 weights",
                     max_step_diff(int4.steps(pr["prompt_ids"], pr["steps"], extra=extra), want),
                     INT4_ACT_TOL)
    finally:
        shutil.rmtree(deq_dir, ignore_errors=True)
    for k, (v, tol) in worst.items():
        print(f"  max|logit diff| {k}: {v:.3g} (tol {tol:g})")
        ok &= v <= tol
    n = NEW_TOKENS + 1
    print("  argmax equal to the fp32 reference's, of 9 steps per prompt (short, chat): " +
          ", ".join(f"{k} {v}" for k, v in greedy.items()) + f" (of {n} each)")
    print(f"int4 ONNX LoRA checks: {'OK' if ok else 'FAILED'}")
    return ok


# --- tiny-llama ---------------------------------------------------------------------------------
LLAMA_SEED = SEED + 100
# Relative size of each llama adapter's delta (as DELTA_FRAC): "all" like adapter-b, "qk" like
# adapter-a (q/k only, so large enough that a wrong row order is obvious).
LLAMA_DELTA_FRAC = {"all": 0.35, "qk": 0.6}
# Tokens llama.cpp treats as end of generation (eos <|im_end|>, and <|endoftext|> by its text):
# llama-server's ignore_eos sets their logits to -inf, so its greedy pick skips them.
LLAMA_EOG = (509, 511)
GGUF_TO_HF = {"attn_norm.weight": "input_layernorm.weight",
              "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
              "attn_v.weight": "self_attn.v_proj.weight",
              "attn_output.weight": "self_attn.o_proj.weight",
              "ffn_norm.weight": "post_attention_layernorm.weight",
              "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
              "ffn_down.weight": "mlp.down_proj.weight"}


def gguf_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute: HF rotate-half row order -> GGUF's
    interleaved order, per head: w.reshape(n, 2, d/2, ...).swapaxes(1, 2). attn_q uses
    n_head, attn_k n_head_kv. Works on a weight [out, in] and on a LoRA B [out, r] alike."""
    d = w.shape[0] // n_head
    return np.ascontiguousarray(
        w.reshape(n_head, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def read_gguf_f32(path: Path) -> dict:
    """The tensors of a GGUF under HF names, as stored (q/k rows in GGUF order), quantised
    ones dequantised to float32 by gguf-py (bit-compatible with ggml's dequantisation)."""
    import gguf
    from gguf import quants
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        shape = [int(x) for x in reversed(t.shape)]
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            a = np.array(t.data, dtype=np.float32).reshape(shape)
        else:
            a = np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
            assert list(a.shape) == shape, (t.name, a.shape, shape)
        if t.name == "token_embd.weight":
            out["model.embed_tokens.weight"] = a
        elif t.name == "output_norm.weight":
            out["model.norm.weight"] = a
        else:
            _, layer, rest = t.name.split(".", 2)
            out[f"model.layers.{layer}.{GGUF_TO_HF[rest]}"] = a
    return out


def q8_1_round_trip(x: np.ndarray) -> np.ndarray:
    """What ggml's (and candle's) quantised matmuls do to the activations of a Q4_1 weight:
    quantize_row_q8_1 per block of 32 (d = amax / 127, q = round(x / d), d stored as f16),
    so the dot product sees f16(d) * q. (The Q4_1 min term uses the block sum s = f16(d * sum
    q) instead of f16(d) * sum q: a difference of f16 rounding, left out.)"""
    x32 = np.asarray(x, dtype=np.float32)
    b = x32.reshape(*x32.shape[:-1], -1, 32)
    d = np.abs(b).max(-1, keepdims=True) / np.float32(127)
    inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0).astype(np.float32)
    v = b * inv
    q = np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))  # roundf: half away from zero
    return (q * d.astype(np.float16).astype(np.float32)).reshape(x32.shape).astype(np.float64)


def np_llama_logits(w: dict, cfg: dict, ids: list, interleaved: bool,
                    deltas: dict | None = None, act_q8: bool = False) -> np.ndarray:
    """Last-position logits of a plain float64 numpy Llama forward (tied embeddings, no biases,
    full attention over ids). interleaved=True: ggml's rope on pairs (2i, 2i+1), for weights in
    GGUF layout; False: rotate-half (HF). deltas: {weight name: scale * B @ A} in the same
    layout as w, applied as a separate branch x @ delta.T. act_q8: the base matmuls see their
    input through q8_1_round_trip (the LoRA branch and the embedding lookup do not), to
    estimate how far a Q4_1 GGUF run in ggml/candle lands from a float reference."""
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // nh
    eps, theta = cfg["rms_norm_eps"], cfg.get("rope_theta", 10000.0)
    deltas = deltas or {}
    w = {k: v.astype(np.float64) for k, v in w.items()}

    def lin(x, name):
        y = (q8_1_round_trip(x) if act_q8 else x) @ w[name].T
        return y + x @ deltas[name].T if name in deltas else y
    n = len(ids)
    inv = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = np.outer(np.arange(n), inv)
    cos, sin = np.cos(ang), np.sin(ang)

    def rms(x, g):
        return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * g

    def rope(x):  # [heads, n, hd]
        if interleaved:
            e, o = x[..., 0::2], x[..., 1::2]
            y = np.empty_like(x)
            y[..., 0::2], y[..., 1::2] = e * cos - o * sin, e * sin + o * cos
            return y
        a, b = x[..., :hd // 2], x[..., hd // 2:]
        return np.concatenate([a * cos - b * sin, a * sin + b * cos], -1)

    x = w["model.embed_tokens.weight"][ids]
    mask = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = lin(h, p + "self_attn.q_proj.weight").reshape(n, nh, hd).transpose(1, 0, 2)
        k = lin(h, p + "self_attn.k_proj.weight").reshape(n, nkv, hd).transpose(1, 0, 2)
        v = lin(h, p + "self_attn.v_proj.weight").reshape(n, nkv, hd).transpose(1, 0, 2)
        q, k = rope(q), rope(k)
        k, v = np.repeat(k, nh // nkv, 0), np.repeat(v, nh // nkv, 0)
        sc = q @ k.transpose(0, 2, 1) / math.sqrt(hd) + mask
        sc = np.exp(sc - sc.max(-1, keepdims=True))
        a = (sc / sc.sum(-1, keepdims=True)) @ v
        x = x + lin(a.transpose(1, 0, 2).reshape(n, -1), p + "self_attn.o_proj.weight")
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        g, u = lin(h, p + "mlp.gate_proj.weight"), lin(h, p + "mlp.up_proj.weight")
        x = x + lin(g / (1 + np.exp(-g)) * u, p + "mlp.down_proj.weight")
    return lin(rms(x[-1:], w["model.norm.weight"]), "model.embed_tokens.weight")[0]


def lora_deltas(tensors: dict, scale: float, gguf_layout: bool, cfg: dict,
                permute_b: bool = True) -> dict:
    """{base weight name: scale * B @ A} of a PEFT adapter's tensors. gguf_layout: the delta
    for weights stored the GGUF way, i.e. B's rows of q_proj / k_proj put through llama.cpp's
    permute (what a GGUF loader must do); permute_b=False leaves them unpermuted (the mistake
    of issue 15, for comparison)."""
    out = {}
    for k, a in tensors.items():
        if not k.endswith(".lora_A.weight"):
            continue
        b = tensors[k.replace(".lora_A.", ".lora_B.")].astype(np.float64)
        name = k.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        if gguf_layout and permute_b and name.endswith("q_proj.weight"):
            b = gguf_permute(b, cfg["num_attention_heads"])
        elif gguf_layout and permute_b and name.endswith("k_proj.weight"):
            b = gguf_permute(b, cfg["num_key_value_heads"])
        out[name] = scale * (b @ a.astype(np.float64))
    return out


def check_llama_hf(hf: Path, gguf_path: Path, cfg: dict, prompts: dict) -> bool:
    """tiny-llama/ (HF layout) vs tiny-llama.f32.gguf: the weights are the GGUF's with q/k rows
    un-permuted (exact), a numpy forward of the GGUF tensors with ggml's interleaved rope gives
    transformers' logits on the HF dir, and transformers reproduces llama.cpp's greedy ids and
    top-5 log-probabilities recorded in tests/fixtures/llamacpp_reference.json."""
    import torch
    from safetensors.numpy import load_file
    hw, gw = load_file(str(hf / "model.safetensors")), read_gguf_f32(gguf_path)
    ok = sorted(hw) == sorted(gw) and "lm_head.weight" not in hw
    same_bits, permuted = True, 0
    for k, v in hw.items():
        heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}
        h = next((n for m, n in heads.items() if f".{m}." in k), None)
        same_bits &= (v if h is None else gguf_permute(v, h)).tobytes() == gw[k].tobytes()
        permuted += h is not None and not np.array_equal(v, gw[k])
    print(f"tiny-llama/model.safetensors vs tiny-llama.f32.gguf: {len(hw)} tensors, q/k = "
          f"permute(HF rows) and the rest identical, bit for bit: {same_bits} "
          f"({permuted} q/k tensors differ from the GGUF's as stored)")
    ok &= same_bits and permuted == 2 * cfg["num_hidden_layers"]
    model = load_base(hf)
    worst = {"numpy GGUF tensors, interleaved rope, vs transformers on tiny-llama/": 0.0,
             "numpy GGUF tensors, rotate-half rope (wrong), vs transformers": 0.0}
    for ids in prompts.values():
        seq = list(ids)
        for s in run_steps(model, ids):
            if s["input_token"] is not None:
                seq.append(s["input_token"])
            for key, inter in zip(worst, (True, False)):
                d = float(np.abs(np_llama_logits(gw, cfg, seq, inter) - s["logits"]).max())
                worst[key] = max(worst[key], d)
    for k, v in worst.items():
        print(f"  max|logit diff| {k}: {v:.3g}")
    ok &= list(worst.values())[0] < 1e-4 and list(worst.values())[1] > 0.1
    ref = json.loads((ROOT / "tests/fixtures/llamacpp_reference.json").read_text())
    e = next(m for m in ref["models"] if m["model"].endswith("tiny-llama.f32.gguf"))
    seq, got, lp_worst = list(e["prompt_ids"]), [], 0.0
    for st in e["steps"]:
        with torch.no_grad():
            lg = model(torch.tensor([seq])).logits[0, -1].double()
        lp = torch.log_softmax(lg, -1).numpy()
        for t in st["top"] or []:
            lp_worst = max(lp_worst, abs(float(lp[t["id"]]) - t["logprob"]))
        lg[list(LLAMA_EOG)] = -math.inf  # llama-server's ignore_eos
        got.append(int(lg.argmax()))
        seq.append(got[-1])
    same = got == e["generated_ids"]
    print(f"transformers on tiny-llama/ vs llama.cpp on tiny-llama.f32.gguf "
          f"({len(e['prompt_ids'])}-id prompt): {len(got)} greedy ids (EOG skipped as with "
          f"ignore_eos) {'identical' if same else 'DIFFER'}; max|logprob diff| over the recorded "
          f"top-5: {lp_worst:.3g}")
    return ok and same and lp_worst < 1e-4


def llama_prompts(hf: Path) -> dict:
    """'short': the same ids as the qwen fixtures' 'short' (same tokenizer); 'chat': the
    tiny-llama chat template (SmolLM2's) applied to "What is 2 + 2?", encoded with tokenizer.json."""
    import jinja2
    from tokenizers import Tokenizer
    onnx_ref = json.loads((ROOT / "tests/fixtures/onnx/tiny-qwen2-reference.json").read_text())
    short = next(p["prompt_ids"] for p in onnx_ref["prompts"] if p["name"] == "short")
    tc = json.loads((hf / "tokenizer_config.json").read_text(encoding="utf-8"))
    text = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(
        tc["chat_template"]).render(messages=[{"role": "user", "content": "What is 2 + 2?"}],
                                    add_generation_prompt=True)
    chat = Tokenizer.from_file(str(hf / "tokenizer.json")).encode(
        text, add_special_tokens=False).ids
    return {"short": short, "chat": chat}


def reference_entry(label, prompts: dict, steps: dict, scale=None, adapter_file=None) -> dict:
    entry = {"adapter": label, "prompts": []}
    if label:
        entry["scale"] = scale
        entry["adapter_sha256"] = sha256(adapter_file)
    for n, ids in prompts.items():
        st = steps[n]
        entry["prompts"].append({
            "name": n, "prompt_ids": ids,
            "greedy_ids": [s["argmax"] for s in st[:NEW_TOKENS]],
            "steps": [{"input_token": s["input_token"], "argmax": s["argmax"],
                       "logits": [round(float(x), 6) for x in s["logits"]]} for s in st]})
    return entry


def max_step_diff(a: list, b: list) -> float:
    """max |logit diff| over two lists of steps (dicts with "logits", or arrays)."""
    get = lambda s: np.asarray(s["logits"] if isinstance(s, dict) else s, dtype=np.float64)  # noqa: E731
    return max(float(np.abs(get(x) - get(y)).max()) for x, y in zip(a, b))


def llama_part(args) -> bool:
    """The tiny-llama adapters, llama-reference.json and their checks, then (unless
    --skip-onnx) the tiny-llama ONNX LoRA graph and the GGUF export path checks."""
    import peft
    import torch
    import transformers
    from peft import PeftModel
    from safetensors.numpy import load_file
    hf, gguf_path, out = args.llama_hf_dir, args.llama_gguf, args.out_dir
    if not (hf / "model.safetensors").is_file() or not gguf_path.is_file():
        raise SystemExit(f"{hf} or {gguf_path} missing: run python scripts/make_tiny_model.py")
    cfg = json.loads((hf / "config.json").read_text())
    layers, dim_of = cfg["num_hidden_layers"], dims(cfg)
    base_w = load_file(str(hf / "model.safetensors"))
    prompts = llama_prompts(hf)
    print(f"tiny-llama prompts: short {len(prompts['short'])} ids, chat {len(prompts['chat'])} ids")
    ok = check_llama_hf(hf, gguf_path, cfg, prompts)

    # --- adapters ----------------------------------------------------------------------------
    rel = str(hf.resolve().relative_to(ROOT)) if hf.resolve().is_relative_to(ROOT) else str(hf)
    rng = np.random.default_rng(LLAMA_SEED)
    all_scale = 16 / math.sqrt(8)
    all_t = random_lora(rng, base_w, layers, ALL, 8, all_scale, LLAMA_DELTA_FRAC["all"], dim_of)
    write_peft(out / "llama-adapter-all", peft_config(8, 16, ALL, rslora=True, base=rel), all_t)
    qk_t = random_lora(rng, base_w, layers, ("q_proj", "k_proj"), 4, 8 / 4,
                       LLAMA_DELTA_FRAC["qk"], dim_of)
    write_peft(out / "llama-adapter-qk", peft_config(4, 8, ("q_proj", "k_proj"), base=rel), qk_t)
    mlx = out / "llama-adapter-all-mlx"
    mlx.mkdir(exist_ok=True)
    write_mlx_safetensors(mlx / "adapters.safetensors", peft_to_mlx(all_t))
    (mlx / "adapter_config.json").write_text(json.dumps(
        dict(sorted(mlx_config(layers, 8, all_scale, None, model="tiny-llama").items())),
        indent=4), encoding="utf-8")
    adapters = {"llama-adapter-all": all_t, "llama-adapter-qk": qk_t}

    # --- reference ---------------------------------------------------------------------------
    results, scales = {None: {n: run_steps(load_base(hf), ids) for n, ids in prompts.items()}}, {}
    for name in adapters:
        model = PeftModel.from_pretrained(load_base(hf), str(out / name)).eval()
        scales[name] = next(float(m.scaling["default"]) for m in model.modules()
                            if isinstance(getattr(m, "scaling", None), dict)
                            and "default" in m.scaling)
        results[name] = {n: run_steps(model, ids) for n, ids in prompts.items()}
    ref = {
        "schema": "inferd-lora-reference/1",
        "description": (
            "transformers + PEFT fp32 eager reference for tests/fixtures/generated/tiny-llama "
            "(the HF layout of tiny-llama.f32.gguf: same weights, q/k rows un-permuted) with no "
            "adapter (adapter null), llama-adapter-all and llama-adapter-qk. For each prompt: "
            "steps[0] = logits at the prompt's last position (prefill of prompt_ids); steps[i] "
            "(i = 1..8) = logits after feeding steps[i].input_token = greedy_ids[i-1]. "
            "greedy_ids[i] = steps[i].argmax (EOS ignored). logits: all 512, rounded to 1e-6. "
            "scale = PEFT's scaling (alpha/r, or alpha/sqrt(r) with use_rslora). "
            "llama-adapter-all-mlx must give llama-adapter-all's numbers. A GGUF loader must put "
            "lora_B's rows of q_proj and k_proj through llama.cpp's permute (n_head resp. "
            "n_head_kv) to match."),
        "new_tokens": NEW_TOKENS,
        "prompts": {"short": "the ids of tests/fixtures/onnx/tiny-qwen2-reference.json's 'short' "
                             "(same tokenizer)",
                    "chat": "tiny-llama's chat template (SmolLM2's) on [{role: user, content: "
                            "'What is 2 + 2?'}] with add_generation_prompt, tokenizer.json ids"},
        "generated_by": {
            "command": "python scripts/make_tiny_lora.py (after python scripts/make_tiny_model.py)",
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "numpy": np.__version__,
            "model": "AutoModelForCausalLM.from_pretrained(tiny-llama, dtype=float32, "
                     "attn_implementation='eager') [+ PeftModel.from_pretrained(adapter dir)], "
                     "full forward per step, 1 thread",
            "hf_model_sha256": sha256(hf / "model.safetensors"),
            "gguf_sha256": {p.name: sha256(p) for p in sorted(gguf_path.parent.glob(
                "tiny-llama.*.gguf"))},
        },
        "models": [reference_entry(None, prompts, results[None])] + [
            reference_entry(n, prompts, results[n], scales[n], out / n / "adapter_model.safetensors")
            for n in adapters],
    }
    write_reference(out / "llama-reference.json", ref)

    # --- checks ------------------------------------------------------------------------------
    gw = read_gguf_f32(gguf_path)
    for name, tensors in adapters.items():
        for n, ids in prompts.items():
            g0 = [s["argmax"] for s in results[None][n][:NEW_TOKENS]]
            g1 = [s["argmax"] for s in results[name][n][:NEW_TOKENS]]
            lmax = max(float(np.abs(s["logits"]).max()) for s in results[name][n])
            d0 = float(np.abs(results[name][n][0]["logits"] - results[None][n][0]["logits"]).max())
            print(f"{name} {n:5s}: greedy {g1} vs base {g0} "
                  f"({sum(x == y for x, y in zip(g0, g1))}/{NEW_TOKENS} equal); max|logit| "
                  f"{lmax:.2f}, max|logit - base| at step 0 {d0:.2f}")
            ok &= g1 != g0
        # The recipe for a GGUF loader, in numpy on the GGUF's own tensors (interleaved rope):
        # permuting lora_B's q/k rows gives PEFT's logits; leaving them gives issue 15's bug.
        for how, perm in (("lora_B q/k rows permuted", True), ("lora_B unpermuted (wrong)", False)):
            dl = lora_deltas(tensors, scales[name], True, cfg, permute_b=perm)
            worst = 0.0
            for n, ids in prompts.items():
                seq = list(ids)
                for s in results[name][n]:
                    if s["input_token"] is not None:
                        seq.append(s["input_token"])
                    lg = np_llama_logits(gw, cfg, seq, True, dl)
                    worst = max(worst, float(np.abs(lg - s["logits"]).max()))
            print(f"  numpy on tiny-llama.f32.gguf's tensors + {name}, {how}, vs PEFT: "
                  f"max|logit diff| {worst:.3g}")
            ok &= worst < 1e-4 if perm else worst > 0.1
    mlx_diff = mlx_forward_check(hf, mlx, prompts, {n: results["llama-adapter-all"][n]
                                                    for n in prompts})
    print(f"llama-adapter-all-mlx applied as mlx-lm does vs PEFT llama-adapter-all: "
          f"max|logit diff| {mlx_diff:.3g}")
    ok &= mlx_diff < 1e-4
    q41 = gguf_path.with_name("tiny-llama.q4_1.gguf")
    if q41.is_file():
        ok &= llama_q4_1_part(q41, out, cfg, prompts, adapters, scales, ref)
    if not args.skip_onnx:
        ok &= llama_onnx_part(hf, gguf_path, out, ref)
    return ok


def llama_q4_1_part(q41: Path, out: Path, cfg: dict, prompts: dict, adapters: dict,
                    scales: dict, ref_f32: dict) -> bool:
    """llama-q4_1-reference.json: transformers + PEFT on tiny-llama.q4_1.gguf as transformers'
    GGUF loader dequantises it (the Q4_1 weights exactly, q/k un-permuted), same prompts and
    schema as llama-reference.json. Checks: the loaded weights are gguf-py's dequantisation
    with the permute undone, bit for bit; a numpy forward of the dequantised GGUF tensors
    (interleaved rope, permuted lora_B) gives the reference; and, as an estimate of what a
    ggml/candle Q4_1 run will show, the same with Q8_1-rounded activations."""
    import peft
    import torch
    import transformers
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    def load():
        return AutoModelForCausalLM.from_pretrained(
            str(q41.parent), gguf_file=q41.name, dtype=torch.float32,
            attn_implementation="eager").eval()
    gw = read_gguf_f32(q41)
    sd = {k: v.numpy() for k, v in load().state_dict().items()}
    heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}
    exact = all(np.array_equal(
        gguf_permute(sd[k], next(n for m, n in heads.items() if f".{m}." in k))
        if any(f".{m}." in k for m in heads) else sd[k], v) for k, v in gw.items())
    print(f"transformers' GGUF loader on tiny-llama.q4_1.gguf = gguf-py's dequantisation with "
          f"q/k un-permuted, bit for bit: {exact}")
    ok = exact
    results = {None: {n: run_steps(load(), ids) for n, ids in prompts.items()}}
    for name in adapters:
        model = PeftModel.from_pretrained(load(), str(out / name)).eval()
        results[name] = {n: run_steps(model, ids) for n, ids in prompts.items()}
    ref = {
        "schema": "inferd-lora-reference/1",
        "description": (
            "as llama-reference.json, for tests/fixtures/generated/tiny-llama.q4_1.gguf: "
            "transformers + PEFT fp32 eager on the Q4_1 weights dequantised (exactly; q/k rows "
            "un-permuted by transformers' GGUF loader), no adapter, llama-adapter-all and "
            "llama-adapter-qk. Greedy ids are this model's own. A ggml/candle Q4_1 run also "
            "rounds the activations of each quantised matmul to Q8_1, so compare with a "
            "tolerance (see tests/fixtures/lora/README.md), not 1e-4."),
        "new_tokens": NEW_TOKENS,
        "prompts": ref_f32["prompts"],
        "generated_by": dict(
            ref_f32["generated_by"],
            model="AutoModelForCausalLM.from_pretrained(tests/fixtures/generated, gguf_file="
                  "'tiny-llama.q4_1.gguf', dtype=float32, attn_implementation='eager') "
                  "[+ PeftModel.from_pretrained(adapter dir)], full forward per step, 1 thread",
            torch=torch.__version__, transformers=transformers.__version__,
            peft=peft.__version__),
        "models": [reference_entry(None, prompts, results[None])] + [
            reference_entry(n, prompts, results[n], scales[n], out / n / "adapter_model.safetensors")
            for n in adapters],
    }
    write_reference(out / "llama-q4_1-reference.json", ref)
    f32 = {m["adapter"]: {p["name"]: p for p in m["prompts"]} for m in ref_f32["models"]}
    for label in [None, *adapters]:
        # q4_1 vs f32 on the same inputs (teacher-forced with the f32 reference's tokens)
        model = load() if label is None else PeftModel.from_pretrained(load(), str(out / label))
        d = max(max_step_diff(forced_steps(model.eval(), pr["prompt_ids"], pr["steps"]),
                              pr["steps"]) for pr in f32[label].values())
        print(f"{label or 'base'}: Q4_1 reference vs f32 reference (same inputs): "
              f"max|logit diff| {d:.3g}")
    for label in [None, *adapters]:
        rows = []
        for how, perm, q8 in (("lora_B q/k permuted", True, False),
                              ("lora_B q/k permuted, Q8_1 activations", True, True),
                              ("lora_B unpermuted (wrong), Q8_1 activations", False, True)):
            if label is None and not perm:
                continue
            dl = lora_deltas(adapters[label], scales[label], True, cfg, perm) if label else {}
            worst = 0.0
            for n, ids in prompts.items():
                seq = list(ids)
                for st in results[label][n]:
                    if st["input_token"] is not None:
                        seq.append(st["input_token"])
                    lg = np_llama_logits(gw, cfg, seq, True, dl, act_q8=q8)
                    worst = max(worst, float(np.abs(lg - st["logits"]).max()))
            rows.append(f"{how if label else how.replace('lora_B q/k permuted', 'base')}: "
                        f"{worst:.3g}")
            if not q8:
                ok &= worst < 1e-4
            elif perm:
                ok &= worst < 1.0
            else:
                ok &= worst > 1.0
        print(f"  numpy on tiny-llama.q4_1.gguf's tensors (interleaved rope) + {label or 'no adapter'}"
              f" vs llama-q4_1-reference, max|logit diff|: " + "; ".join(rows))
    return ok


def onnx_export(export_onnx, src: Path, dst: Path, *opts) -> None:
    rc = export_onnx.main([str(src), str(dst), "--force", *opts])
    if rc:
        raise SystemExit(rc)
    for p in dst.iterdir():
        p.chmod(0o644)


def llama_onnx_part(hf: Path, gguf_path: Path, out: Path, ref: dict) -> bool:
    """Exports tiny-llama-onnx-lora (fp32, --lora-inputs, row mask) from the HF dir and checks it
    against transformers + PEFT; then checks the GGUF export path of scripts/export_onnx.py
    (transformers' GGUF loader must undo llama.cpp's q/k permutation): the staged weights, a
    plain fp32 export, a --lora-inputs export fed the adapters and --adapter exports, all from
    tiny-llama.f32.gguf, against the same reference."""
    import tempfile
    import onnxruntime as ort
    from safetensors.numpy import load_file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import export_onnx
    onnx_dir = out / "tiny-llama-onnx-lora"
    onnx_export(export_onnx, hf, onnx_dir, "-p", "fp32", "-e", "cpu", "--lora-inputs")
    by = {m["adapter"]: {p["name"]: p for p in m["prompts"]} for m in ref["models"]}
    names = [m["adapter"] for m in ref["models"] if m["adapter"]]
    worst, ok = {}, True

    def note(key, got, pr, tol):
        d = max_step_diff(got, pr["steps"])
        worst[key] = (max(worst.get(key, (0, tol))[0], d), tol)
        return [int(x.argmax()) for x in got[:NEW_TOKENS]] == pr["greedy_ids"]

    with tempfile.TemporaryDirectory(prefix="inferd-llama-lora-") as tmp:
        tmp = Path(tmp)
        params = {n: export_onnx.write_onnx_adapter(out / n, tmp / f"{n}.onnx_adapter")
                  for n in names}
        export_onnx.write_onnx_adapter(out / "llama-adapter-all-mlx", tmp / "mlx.onnx_adapter")
        mlx_same = (tmp / "mlx.onnx_adapter").read_bytes() == \
            (tmp / "llama-adapter-all.onnx_adapter").read_bytes()
        print(f"llama-adapter-all-mlx -> .onnx_adapter byte-identical to llama-adapter-all's: "
              f"{mlx_same}")
        ok &= mlx_same
        lora = OnnxRunner(onnx_dir)
        for pr in by[None].values():
            ok &= note("tiny-llama-onnx-lora, nothing fed, vs transformers", lora.steps(
                pr["prompt_ids"], pr["steps"]), pr, 1e-4)
        for n in names:
            adapter = ort.LoraAdapter()
            adapter.Load(str(tmp / f"{n}.onnx_adapter"))
            ro = ort.RunOptions()
            ro.add_active_adapter(adapter)
            for pr in by[n].values():
                ok &= note(f"tiny-llama-onnx-lora + {n} as inputs vs PEFT", lora.steps(
                    pr["prompt_ids"], pr["steps"], extra=params[n]), pr, 1e-4)
                ok &= note(f"tiny-llama-onnx-lora + {n} as .onnx_adapter vs PEFT", lora.steps(
                    pr["prompt_ids"], pr["steps"], run_options=ro), pr, 1e-4)

        # --- the GGUF export path ---------------------------------------------------------
        stage = tmp / "stage"
        export_onnx.stage_gguf(gguf_path, stage)
        sw, hw = load_file(str(next(stage.glob("*.safetensors")))), load_file(
            str(hf / "model.safetensors"))
        sw.pop("lm_head.weight", None)  # tied: a copy of the embedding if saved at all
        wd = max(float(np.abs(sw[k] - hw[k]).max()) for k in hw) if set(sw) == set(hw) else None
        print(f"export_onnx.py's GGUF staging (transformers' GGUF loader) of "
              f"tiny-llama.f32.gguf vs tiny-llama/model.safetensors: tensors "
              f"{'the same set' if wd is not None else f'DIFFER {sorted(set(sw) ^ set(hw))}'}, "
              f"max|weight diff| {wd}")
        ok &= wd == 0.0
        g_plain = tmp / "gguf-fp32"
        onnx_export(export_onnx, gguf_path, g_plain, "-p", "fp32", "-e", "cpu")
        plain = OnnxRunner(g_plain)
        for pr in by[None].values():
            got = plain.steps(pr["prompt_ids"], pr["steps"])
            ok &= note("GGUF -> fp32 export vs transformers on tiny-llama/", got, pr, 1e-4)
            d = max_step_diff(got, lora.steps(pr["prompt_ids"], pr["steps"]))
            worst["GGUF -> fp32 export vs tiny-llama-onnx-lora (HF dir export), nothing fed"] = (
                max(worst.get("GGUF -> fp32 export vs tiny-llama-onnx-lora (HF dir export), "
                              "nothing fed", (0, 0))[0], d), 1e-5)
        g_lora = tmp / "gguf-lora"
        onnx_export(export_onnx, gguf_path, g_lora, "-p", "fp32", "-e", "cpu", "--lora-inputs")
        glora = OnnxRunner(g_lora)
        for n in names:
            for pr in by[n].values():
                ok &= note(f"GGUF -> --lora-inputs export + {n} as inputs vs PEFT", glora.steps(
                    pr["prompt_ids"], pr["steps"], extra=params[n]), pr, 1e-4)
            g_baked = tmp / f"gguf-baked-{n}"
            onnx_export(export_onnx, gguf_path, g_baked, "-p", "fp32", "-e", "cpu",
                        "--adapter", str(out / n))
            baked = OnnxRunner(g_baked)
            for pr in by[n].values():
                ok &= note(f"GGUF -> --adapter {n} (baked) export vs PEFT", baked.steps(
                    pr["prompt_ids"], pr["steps"]), pr, 1e-4)
    for k, (v, tol) in worst.items():
        print(f"  max|logit diff| {k}: {v:.3g} (tol {tol:g})")
        ok &= v <= tol
    print(f"tiny-llama ONNX checks (incl. greedy ids equal to the reference): "
          f"{'OK' if ok else 'FAILED'}")
    return ok


def qwen_part(args) -> bool:
    """The tiny-qwen2 adapters, reference.json, their checks and (unless --skip-onnx) the
    tiny-qwen2 ONNX LoRA graphs."""
    import peft
    import torch
    import transformers
    from peft import PeftModel
    from safetensors.numpy import load_file
    hf, out = args.hf_dir, args.out_dir
    if not (hf / "model.safetensors").is_file():
        raise SystemExit(f"{hf} missing: run python scripts/make_tiny_model.py first")
    cfg = json.loads((hf / "config.json").read_text())
    layers = cfg["num_hidden_layers"]
    dim_of = dims(cfg)
    base_w = load_file(str(hf / "model.safetensors"))
    rng = np.random.default_rng(SEED)
    out.mkdir(parents=True, exist_ok=True)

    # --- good adapters -----------------------------------------------------------------------
    a_t = random_lora(rng, base_w, layers, ("q_proj", "v_proj"), 4, 8 / 4, DELTA_FRAC["a"], dim_of)
    write_peft(out / "adapter-a", peft_config(4, 8, ("q_proj", "v_proj")), a_t)
    b_scale = 16 / math.sqrt(8)
    b_t = random_lora(rng, base_w, layers, ALL, 8, b_scale, DELTA_FRAC["b"], dim_of)
    write_peft(out / "adapter-b", peft_config(8, 16, ALL, rslora=True), b_t)
    mlx = out / "adapter-a-mlx"
    mlx.mkdir(exist_ok=True)
    write_mlx_safetensors(mlx / "adapters.safetensors", peft_to_mlx(a_t))
    (mlx / "adapter_config.json").write_text(json.dumps(
        dict(sorted(mlx_config(layers, 4, 8 / 4, ["self_attn.q_proj", "self_attn.v_proj"]).items())),
        indent=4), encoding="utf-8")

    # --- bad adapters ------------------------------------------------------------------------
    bad_rank = random_lora(np.random.default_rng(SEED + 1), base_w, layers, ("q_proj", "v_proj"),
                           3, 2.0, 0.5, dim_of)
    write_peft(out / "bad-rank", peft_config(4, 8, ("q_proj", "v_proj")), bad_rank)
    rng_t = np.random.default_rng(SEED + 2)
    bad_target = random_lora(rng_t, base_w, layers, ("q_proj",), 4, 2.0, 0.5, dim_of)
    for layer in range(layers):  # an fc1 the way PEFT would name it, shapes hidden -> ffn
        pre = f"base_model.model.model.layers.{layer}.mlp.fc1"
        bad_target[f"{pre}.lora_A.weight"] = (rng_t.standard_normal((4, 64)) / 8).astype(np.float32)
        bad_target[f"{pre}.lora_B.weight"] = (rng_t.standard_normal((128, 4)) * 0.1).astype(np.float32)
    write_peft(out / "bad-target", peft_config(4, 8, ("fc1", "q_proj")), bad_target)
    small = dict(cfg, hidden_size=32, intermediate_size=64, head_dim=8)
    small_w = {f"model.layers.{l}.{module_path(t)}.weight": np.full((2, 2), 0.2)
               for l in range(layers) for t in ALL}
    bad_base = random_lora(np.random.default_rng(SEED + 3), small_w, layers, ("q_proj", "v_proj"),
                           4, 2.0, 0.5, dims(small))
    write_peft(out / "bad-base", peft_config(4, 8, ("q_proj", "v_proj")), bad_base)
    corrupt = out / "bad-corrupt"
    corrupt.mkdir(exist_ok=True)
    shutil.copyfile(out / "adapter-a/adapter_config.json", corrupt / "adapter_config.json")
    blob = (out / "adapter-a/adapter_model.safetensors").read_bytes()
    (corrupt / "adapter_model.safetensors").write_bytes(blob[:len(blob) // 2])
    missing = out / "bad-missing"
    missing.mkdir(exist_ok=True)
    shutil.copyfile(out / "adapter-a/adapter_config.json", missing / "adapter_config.json")

    # --- reference ---------------------------------------------------------------------------
    onnx_ref = json.loads((ROOT / "tests/fixtures/onnx/tiny-qwen2-reference.json").read_text())
    prompts = {p["name"]: p["prompt_ids"] for p in onnx_ref["prompts"] if p["name"] in PROMPT_NAMES}
    results = {}
    base = load_base(hf)
    results["base"] = {n: run_steps(base, ids) for n, ids in prompts.items()}
    for tag in ("a", "b"):
        model = PeftModel.from_pretrained(load_base(hf), str(out / f"adapter-{tag}")).eval()
        results[tag] = {n: run_steps(model, ids) for n, ids in prompts.items()}
    # PEFT's own view of the scale, recorded for the Rust side.
    scales = {}
    for tag in ("a", "b"):
        model = PeftModel.from_pretrained(load_base(hf), str(out / f"adapter-{tag}"))
        scales[tag] = next(float(m.scaling["default"]) for m in model.modules()
                           if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling)

    models = []
    for tag, label in (("base", None), ("a", "adapter-a"), ("b", "adapter-b")):
        entry = {"adapter": label, "prompts": []}
        if label:
            entry["scale"] = scales[tag]
            entry["adapter_sha256"] = sha256(out / label / "adapter_model.safetensors")
        for n, ids in prompts.items():
            steps = results[tag][n]
            entry["prompts"].append({
                "name": n, "prompt_ids": ids,
                "greedy_ids": [s["argmax"] for s in steps[:NEW_TOKENS]],
                "steps": [{"input_token": s["input_token"], "argmax": s["argmax"],
                           "logits": [round(float(x), 6) for x in s["logits"]]} for s in steps]})
        models.append(entry)
    ref = {
        "schema": "inferd-lora-reference/1",
        "description": (
            "transformers + PEFT fp32 eager reference for tests/fixtures/generated/tiny-qwen2 with "
            "no adapter (adapter null), adapter-a and adapter-b. For each prompt: steps[0] = "
            "logits at the prompt's last position (prefill of prompt_ids); steps[i] (i = 1..8) = "
            "logits after feeding steps[i].input_token = greedy_ids[i-1]. greedy_ids[i] = "
            "steps[i].argmax (EOS ignored). logits: all 512, rounded to 1e-6. scale = PEFT's "
            "scaling (alpha/r, or alpha/sqrt(r) with use_rslora). adapter-a-mlx must give "
            "adapter-a's numbers."),
        "new_tokens": NEW_TOKENS,
        "generated_by": {
            "command": "python scripts/make_tiny_lora.py (after python scripts/make_tiny_model.py)",
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "numpy": np.__version__,
            "model": "AutoModelForCausalLM.from_pretrained(tiny-qwen2, dtype=float32, "
                     "attn_implementation='eager') [+ PeftModel.from_pretrained(adapter dir)], "
                     "full forward per step, 1 thread",
            "hf_model_sha256": sha256(hf / "model.safetensors"),
        },
        "models": models,
    }
    write_reference(out / "reference.json", ref)

    # --- checks ------------------------------------------------------------------------------
    ok = True
    for tag in ("a", "b"):
        for n in prompts:
            g0 = [s["argmax"] for s in results["base"][n][:NEW_TOKENS]]
            g1 = [s["argmax"] for s in results[tag][n][:NEW_TOKENS]]
            same = sum(x == y for x, y in zip(g0, g1))
            lmax = max(float(np.abs(s["logits"]).max()) for s in results[tag][n])
            d = max(float(np.abs(s["logits"] - b["logits"]).max())
                    for s, b in zip(results[tag][n], results["base"][n]))
            print(f"adapter-{tag} {n:5s}: greedy {g1} vs base {g0} ({same}/{NEW_TOKENS} equal); "
                  f"max|logit| {lmax:.2f}, max|logit - base| (same inputs only at step 0) {d:.2f}")
            ok &= g1 != g0
    if not args.skip_onnx:
        ok &= onnx_part(hf, out, ref)
    mlx_diff = mlx_forward_check(hf, mlx, prompts, {n: results["a"][n] for n in prompts})
    print(f"adapter-a-mlx applied as mlx-lm does vs PEFT adapter-a: max|logit diff| {mlx_diff:.3g}")
    ok &= mlx_diff < 1e-4
    return ok


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf-dir", type=Path, default=ROOT / "tests/fixtures/generated/tiny-qwen2")
    ap.add_argument("--llama-hf-dir", type=Path,
                    default=ROOT / "tests/fixtures/generated/tiny-llama")
    ap.add_argument("--llama-gguf", type=Path,
                    default=ROOT / "tests/fixtures/generated/tiny-llama.f32.gguf")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "tests/fixtures/lora")
    ap.add_argument("--skip-onnx", action="store_true",
                    help="skip the ONNX graphs, the .onnx_adapter files and their checks")
    ap.add_argument("--only", choices=["qwen", "llama"],
                    help="only the tiny-qwen2 or only the tiny-llama fixtures and checks")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    ok = True
    if args.only in (None, "qwen"):
        ok &= qwen_part(args)
    if args.only in (None, "llama"):
        ok &= llama_part(args)
    out, total = args.out_dir, 0
    for p in sorted(out.rglob("*")):
        if p.is_file() and "onnx" not in p.parent.name and p.suffix != ".onnx_adapter":
            total += p.stat().st_size
            print(f"{sha256(p)}  {p.relative_to(out)}  ({p.stat().st_size} bytes)")
    print(f"adapters + references: {total / 2**20:.2f} MiB")
    for p in sorted(out.iterdir()):
        if p.is_dir() and "onnx" in p.name:
            size = sum(f.stat().st_size for f in p.iterdir())
            print(f"{p.name}/: {size} bytes")
    if not ok:
        raise SystemExit("CHECK FAILED (see above): an adapter does not change the greedy ids, "
                         "an mlx copy does not match its PEFT adapter, or a logit check is over "
                         "its tolerance")
    return 0


if __name__ == "__main__":
    sys.exit(main())
