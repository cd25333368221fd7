#!/usr/bin/env python3
"""LoRA benchmark: 8 concurrent streams spread over 3 adapters vs 8 streams on the base model,
on one inferd server, and the cost of loading a rank-16 adapter while streams run.

Why: issue 4's targets are stated as ratios on the same server and model: total tok/s with 8
streams over 3 adapters >= 0.8x the base-only figure on both backends; loading a rank-16 adapter
takes < 1 s and does not pause running streams for more than one decode step.

Usage:
  python3 bench/lora_bench.py --inferd target/release/inferd \\
      --model models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf [--inferd-args "--backend onnx"] \\
      [--hidden 896 --layers 24 --q-dim 896 --kv-dim 128 --intermediate 4864] [--rounds 3]
The 3 (+1 for the load test) adapters are random PEFT adapters of rank 16 on all seven
projections, written to a temporary directory by make_adapter() (numpy + safetensors; defaults
are Qwen2.5-0.5B's sizes). Standard library otherwise.
"""
import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import concurrent, stream  # noqa: E402
from servers import Server, inferd_argv  # noqa: E402

MESSAGES = [{"role": "user", "content": "Write a Python function that checks whether a number is prime."}]
MODULES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def make_adapter(out, seed, a, rank=16):
    """A random PEFT adapter (small weights, so outputs stay sensible) for the given sizes."""
    rng = np.random.default_rng(seed)
    io = {"q_proj": (a.hidden, a.q_dim), "k_proj": (a.hidden, a.kv_dim), "v_proj": (a.hidden, a.kv_dim),
          "o_proj": (a.q_dim, a.hidden), "gate_proj": (a.hidden, a.intermediate),
          "up_proj": (a.hidden, a.intermediate), "down_proj": (a.intermediate, a.hidden)}
    tensors = {}
    for layer in range(a.layers):
        for m, block in MODULES.items():
            i, o = io[m]
            key = f"base_model.model.model.layers.{layer}.{block}.{m}"
            tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((rank, i)) / np.sqrt(i)).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = (rng.standard_normal((o, rank)) * 1e-3).astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": sorted(MODULES),
        "bias": "none", "use_rslora": False}))


def total_tps(base, model_ids, args):
    bodies = [{"model": m, "messages": MESSAGES, "max_tokens": args.new_tokens, "temperature": 0,
               "ignore_eos": True} for m in model_ids]
    results, wall = concurrent(base + "/v1/chat/completions", bodies, len(bodies), args.timeout, args.stagger)
    errs = [r.error for r in results if r is None or r.error]
    if errs:
        raise RuntimeError(f"streams failed: {errs[0]}")
    return sum(r.completion_tokens or len(r.chunk_times) for r in results) / wall


def load_during_stream(base, root, args):
    """Loads a rank-16 adapter while one stream runs; returns (load seconds, the stream's largest
    gap between tokens during the load, its median gap)."""
    box = {}

    def run():
        box["r"] = stream(base + "/v1/chat/completions", {"model": "base", "messages": MESSAGES,
                          "max_tokens": args.new_tokens, "temperature": 0, "ignore_eos": True}, args.timeout)
    t = threading.Thread(target=run, daemon=True)
    t0 = time.perf_counter()
    t.start()
    time.sleep(2.0)
    body = json.dumps({"lora_name": "late", "lora_path": "late", "load_inplace": True}).encode()
    req = urllib.request.Request(base + "/v1/load_lora_adapter", data=body, headers={"Content-Type": "application/json"})
    l0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=60) as resp:
        resp.read()
    l1 = time.perf_counter()
    t.join(args.timeout)
    r = box["r"]
    times = [t0 + x for x in r.chunk_times]
    gaps = [b - a for a, b in zip(times, times[1:])]
    during = [b - a for a, b in zip(times, times[1:]) if b >= l0 and a <= l1]
    return l1 - l0, max(during, default=0.0), statistics.median(gaps)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inferd", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--inferd-args", default="")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--stagger", type=float, default=0.05, help="seconds between stream starts")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--port", type=int, default=18095)
    for k, v in (("hidden", 896), ("layers", 24), ("q-dim", 896), ("kv-dim", 128), ("intermediate", 4864)):
        ap.add_argument(f"--{k}", type=int, default=v)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "adapters"
        for i, name in enumerate(["a1", "a2", "a3", "late"]):
            make_adapter(root / name, 100 + i, args)
        cfg = Path(tmp) / "config.toml"
        adapters = "".join(f'\n[[adapters]]\nname = "{n}"\npath = "{root / n}"\n' for n in ("a1", "a2", "a3"))
        cfg.write_text(f'[server]\nlora_runtime_loading = true\nopen_admin_endpoints = true\nlora_root = "{root}"\n{adapters}')
        argv = inferd_argv(args.inferd, args.model, args.port, args.threads,
                           f"--config {cfg} --model-id base --max-batch {args.streams} {args.inferd_args}")
        with Server("inferd", argv, args.port, Path(tmp) / "inferd.log", ready_path="/health") as srv:
            base_ids = ["base"] * args.streams
            mixed = [["a1", "a2", "a3"][i % 3] for i in range(args.streams)]
            total_tps(srv.base, ["base", "a1"], args)  # warm-up
            rows = []
            for r in range(args.rounds):
                b = total_tps(srv.base, base_ids, args)
                m = total_tps(srv.base, mixed, args)
                rows.append((b, m))
                print(f"round {r + 1}: base {b:.1f} tok/s, 3 adapters {m:.1f} tok/s, ratio {m / b:.2f}", file=sys.stderr)
            load_s, gap, med = load_during_stream(srv.base, root, args)
    ratios = [m / b for b, m in rows]
    print(json.dumps({
        "model": args.model, "inferd_args": args.inferd_args, "streams": args.streams, "threads": args.threads,
        "new_tokens": args.new_tokens, "base_tps": [round(b, 1) for b, _ in rows],
        "adapters_tps": [round(m, 1) for _, m in rows], "ratio_median": round(statistics.median(ratios), 3),
        "ratios": [round(x, 3) for x in ratios], "load_rank16_s": round(load_s, 3),
        "max_token_gap_during_load_s": round(gap, 3), "median_token_gap_s": round(med, 3)}, indent=1))


if __name__ == "__main__":
    main()
