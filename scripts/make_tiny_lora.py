#!/usr/bin/env python3
"""Regenerates the LoRA test fixtures for tests/fixtures/generated/tiny-qwen2.

Writes under tests/fixtures/lora/ (deterministic: fixed seeds, no timestamps, sorted JSON):
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
Then checks: A and B change the greedy ids vs base; the mlx copy of A gives A's logits when
applied the way mlx-lm's LoRALinear does (y = W x + b + scale * (x @ lora_a) @ lora_b).

Usage: python scripts/make_tiny_lora.py [--hf-dir DIR] [--out-dir DIR]
  (first: python scripts/make_tiny_model.py, which writes tests/fixtures/generated/tiny-qwen2)
Deps: scripts/requirements-export.txt (torch, transformers, peft; in .venv-export).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import shutil
import struct
import sys
from pathlib import Path

import numpy as np

from export_onnx import module_dims as dims  # (in, out) of each target module

ROOT = Path(__file__).resolve().parent.parent
SEED = 20250611
NEW_TOKENS = 8
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


def module_path(name: str) -> str:
    return ("self_attn." if name in ATTN else "mlp.") + name


def peft_config(r: int, alpha: float, targets, rslora: bool = False) -> dict:
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
    cfg["base_model_name_or_path"] = "tests/fixtures/generated/tiny-qwen2"
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


def mlx_config(num_layers: int, rank: int, scale: float, keys) -> dict:
    """adapter_config.json as mlx_lm.lora writes it: vars(args) after CONFIG_DEFAULTS are
    filled in (mlx_lm/lora.py), sorted, json.dump(indent=4) (mlx_lm/utils.py save_config)."""
    return {
        "adapter_path": "adapters",
        "batch_size": 4,
        # lora_parameters.keys can only be set from a YAML config (--config)
        "config": "lora_config.yaml",
        "data": "data",
        "fine_tune_type": "lora",
        "grad_accumulation_steps": 1,
        "grad_checkpoint": False,
        "clear_cache_threshold": 0,
        "iters": 1000,
        "learning_rate": 1e-05,
        "lora_parameters": {"rank": rank, "dropout": 0.0, "scale": scale, "keys": list(keys)},
        "lr_schedule": None,
        "mask_prompt": False,
        "max_seq_length": 2048,
        "model": "tiny-qwen2",
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

    def __init__(self, onnx_dir: Path):
        import onnxruntime as ort
        gc = json.loads((onnx_dir / "genai_config.json").read_text())
        self.dec = gc["model"]["decoder"]
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.log_severity_level = 3
        self.sess = ort.InferenceSession(str(onnx_dir / "model.onnx"), so,
                                         providers=["CPUExecutionProvider"])
        self.out_names = [o.name for o in self.sess.get_outputs()]
        self.inputs = {i.name for i in self.sess.get_inputs()}

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
    for k, v in worst.items():
        tol = 1e-5 if "plain" in k else 1e-4
        print(f"  max|logit diff| {k}: {v:.3g} (tol {tol:g})")
        ok &= v <= tol
    print(f"ONNX LoRA checks (incl. greedy ids equal to the PEFT reference): "
          f"{'OK' if ok else 'FAILED'}")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf-dir", type=Path, default=ROOT / "tests/fixtures/generated/tiny-qwen2")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "tests/fixtures/lora")
    ap.add_argument("--skip-onnx", action="store_true",
                    help="skip the ONNX graph, the .onnx_adapter files and their checks")
    args = ap.parse_args()
    import peft
    import torch
    import transformers
    from peft import PeftModel
    from safetensors.numpy import load_file
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
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
    (out / "reference.json").write_text(json.dumps(ref, separators=(",", ":")) + "\n")

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
    total = 0
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.parent.name != "tiny-qwen2-onnx-lora" and p.suffix != ".onnx_adapter":
            total += p.stat().st_size
            print(f"{sha256(p)}  {p.relative_to(out)}  ({p.stat().st_size} bytes)")
    print(f"adapters + reference: {total / 2**20:.2f} MiB")
    if not ok:
        raise SystemExit("CHECK FAILED: an adapter does not change the greedy ids, or the mlx "
                         "copy of adapter A does not match")
    return 0


if __name__ == "__main__":
    sys.exit(main())
