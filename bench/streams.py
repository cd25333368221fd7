#!/usr/bin/env python3
"""Throughput at many concurrent streams, for GPU servers: single-stream decode, time to first
token, prefill, and total output tok/s at 1, 8, 64 and 256 streams, for each server given, in one
run (each metric taken from every server back to back), with ratios to the first server.

    python3 bench/streams.py --model /tmp/qwen.gguf \
        --server "llama.cpp=llama-server -m {model} -ngl 99 -fa on -np 256 -c 131072 --port {port}" \
        --server "inferd=target/release/inferd serve --model {model} --device cuda:0 --port {port}"

Every request: streaming, `ignore_eos`, temperature 0, `--new-tokens` tokens (128), prompts of
`--prompt-tokens` words (100), distinct per stream (so no server can reuse another stream's
prompt cache). The words are `itemNNN`, several tokens each: the table's "prompt tokens" row is
what the server's `usage` counted (about 410 for 100 words with SmolLM2's tokenizer).
`--request-models NAME=ID,ID,...` sends server NAME's streams to those model ids in turn (stream k
to the k-th modulo their number): LoRA adapters by name beside the base model, to measure what
adapter rows cost against the same server's base rows.
Standard library only (runs on the GPU machine's Python); prints one table. Where `nvidia-smi`
exists, a row "peak GPU MiB" gives each server process's largest device memory seen over the run
(sampled every 0.5 s): what it took from the card, KV reservation included, not what it used.
"""
import argparse
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import concurrent, stream  # noqa: E402
from servers import Server  # noqa: E402


def prompt(i, words):
    """A distinct prompt of about `words` words (about as many tokens) for stream i."""
    base = f"Request {i}: a report on shelf {i * 7919 % 10007} of the library, "
    return base + " ".join(f"item{(i * 31 + j * 17) % 997}" for j in range(words))


def body(i, args, model_id):
    return {"model": model_id, "prompt": prompt(i, args.prompt_tokens), "max_tokens": args.new_tokens,
            "temperature": 0, "ignore_eos": True, "cache_prompt": False}


def one(url, b, timeout):
    r = stream(url, b, timeout)
    if r.error:
        raise RuntimeError(r.error)
    return r


def measure(srv, args, n, salt):
    """(metric -> value) for n concurrent streams."""
    url = srv.base + "/v1/completions"
    ids = srv.model_ids
    if n == 1:
        ttft, decode, prefill, prompt_tokens = [], [], [], []
        for rep in range(args.repeats):
            r = one(url, body(salt + rep, args, ids[rep % len(ids)]), args.timeout)
            ttft.append(r.t_first * 1e3)
            gen = (r.completion_tokens or args.new_tokens) - 1
            decode.append(gen / (r.t_last - r.t_first) if r.t_last > r.t_first else float("nan"))
            prefill.append((r.prompt_tokens or 0) / r.t_first)
            prompt_tokens.append(r.prompt_tokens or float("nan"))
        return {"prompt tokens": statistics.median(prompt_tokens), "TTFT ms": statistics.median(ttft),
                "decode tok/s (1 stream)": statistics.median(decode), "prefill tok/s": statistics.median(prefill)}
    results, wall = concurrent(url, [body(salt + k, args, ids[k % len(ids)]) for k in range(n)], n, args.timeout)
    errors = [r.error if r else "no result" for r in results if r is None or r.error]
    if errors:
        # Recorded, not fatal: the other servers' figures still come out.
        print(f"  {srv.name}: {len(errors)} of {n} streams failed: {errors[0]}", file=sys.stderr, flush=True)
        return {f"total tok/s, {n} streams": float("nan")}
    total = sum(r.completion_tokens or 0 for r in results)
    return {f"total tok/s, {n} streams": total / wall}


class GpuMemory(threading.Thread):
    """Samples `nvidia-smi`'s per-process device memory until stopped; peak[pid] in MiB."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.done = {}, threading.Event()

    def run(self):
        while not self.done.wait(0.5):
            try:
                out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10).stdout
            except (OSError, subprocess.SubprocessError):
                continue
            for line in out.splitlines():
                parts = [p.strip() for p in line.split(",")]
                if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
                    pid, mib = int(parts[0]), int(parts[1])
                    self.peak[pid] = max(self.peak.get(pid, 0), mib)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--server", action="append", required=True, help="NAME=COMMAND with {model} and {port}")
    ap.add_argument("--streams", default="1,8,64,256")
    ap.add_argument("--prompt-tokens", type=int, default=100, help="words a prompt (several tokens each)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--port", type=int, default=18190)
    ap.add_argument("--log-dir", default="/tmp")
    ap.add_argument("--request-models", action="append", default=[], help="NAME=ID,ID,...: model ids (adapters) for server NAME's streams, in turn")
    args = ap.parse_args()
    request_models = {k: v.split(",") for k, _, v in (spec.partition("=") for spec in args.request_models)}
    servers = []
    for k, spec in enumerate(args.server):
        name, _, cmd = spec.partition("=")
        argv = [a.format(model=args.model, port=args.port + k) for a in shlex.split(cmd)]
        s = Server(name, argv, args.port + k, f"{args.log_dir}/streams-{name}.log")
        servers.append(s)
    rows = {}
    gpu = GpuMemory() if shutil.which("nvidia-smi") else None
    if gpu:
        gpu.start()
    try:
        for s in servers:
            s.start(timeout=600)
            s.model_ids = request_models.get(s.name) or [__import__("servers").http_json(s.base + "/v1/models")["data"][0]["id"]]
            for k, mid in enumerate(s.model_ids):
                one(s.base + "/v1/completions", body(99999 + k, args, mid), args.timeout)  # warm-up
        for n in [int(x) for x in args.streams.split(",")]:
            for s in servers:
                t = time.time()
                try:
                    got = measure(s, args, n, salt=n * 1000)
                except Exception as e:  # one server's failure must not lose the others' figures
                    print(f"  {s.name}: {n} stream(s) failed: {e}", file=sys.stderr, flush=True)
                    continue
                for metric, v in got.items():
                    rows.setdefault(metric, {})[s.name] = v
                    print(f"  {s.name}: {metric} = {v:.1f} ({time.time() - t:.1f}s)", file=sys.stderr, flush=True)
        if gpu:
            gpu.done.set()
            gpu.join()
            for s in servers:
                if s.proc is not None and s.proc.pid in gpu.peak:
                    rows.setdefault("peak GPU MiB", {})[s.name] = float(gpu.peak[s.proc.pid])
    finally:
        for s in servers:
            s.close()
    names = [s.name for s in servers]
    head = f"| metric | " + " | ".join(names) + "".join(f" | {n} / {names[0]}" for n in names[1:]) + " |"
    print(head)
    print("|" + "---|" * (1 + 2 * len(names) - 1))
    for metric, vals in rows.items():
        cells = [f"{vals.get(n, float('nan')):.1f}" for n in names]
        ratios = [f"{vals[n] / vals[names[0]]:.2f}" if n in vals and names[0] in vals else "-" for n in names[1:]]
        print(f"| {metric} | " + " | ".join(cells + ratios) + " |")


if __name__ == "__main__":
    main()
