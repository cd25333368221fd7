#!/usr/bin/env python3
"""Record llama.cpp's greedy output for fixed prompts: tests/fixtures/llamacpp_reference.json.

Why: inferd's backends are checked token-for-token (and logprob-within-tolerance) against
llama.cpp, the reference GGUF implementation. This script runs llama-server on each GGUF, renders
the model's own chat template, tokenizes, and records the first N greedy tokens with top-5
logprobs, plus the exact commands, so the JSON can be regenerated and audited.

Usage: python3 bench/llamacpp_reference.py --llama-server /path/to/llama-server \
           [--out tests/fixtures/llamacpp_reference.json] [--port 18080] [GGUF ...]
"""
import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import Server, http_json, llama_server_argv  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = [
    "models/SmolLM2-135M-Instruct.Q4_1.gguf",
    "models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    "tests/fixtures/generated/tiny-qwen2.f32.gguf",
    "tests/fixtures/generated/tiny-qwen2.q8_0.gguf",
    "tests/fixtures/generated/tiny-qwen2.q4_0.gguf",
    "tests/fixtures/generated/tiny-llama.f32.gguf",
    "tests/fixtures/generated/tiny-llama.q4_1.gguf",
]
MESSAGES = [{"role": "user",
             "content": "Write a Python function that checks whether a number is prime."}]
N_PREDICT = 32
THREADS = 2


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def llama_version(binary):
    """`llama-server --version` (build number and commit)."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    return (out.stdout + out.stderr).strip().splitlines()[-2:]


def record(binary, gguf, port, logdir):
    """Runs llama-server on one GGUF and returns its reference entry."""
    argv = llama_server_argv(binary, gguf, port, THREADS, 1, 4096)
    tmpl_req = {"messages": MESSAGES}
    with Server("llama-server", argv, port, Path(logdir) / f"{Path(gguf).stem}.log") as srv:
        rendered = http_json(srv.base + "/apply-template", tmpl_req)["prompt"]
        tok_req = {"content": rendered, "add_special": True, "parse_special": True}
        prompt_ids = http_json(srv.base + "/tokenize", tok_req)["tokens"]
        comp_req = {"prompt": prompt_ids, "n_predict": N_PREDICT, "temperature": 0, "top_k": 1,
                    "cache_prompt": False, "n_probs": 5, "ignore_eos": True,
                    "return_tokens": True, "seed": 0}
        comp = http_json(srv.base + "/completion", comp_req, timeout=300)
    steps = []
    for p in comp["completion_probabilities"]:
        steps.append({"id": p["id"], "token": p["token"], "logprob": p["logprob"],
                      "top": [{"id": t["id"], "token": t["token"], "logprob": t["logprob"]}
                              for t in p["top_logprobs"]]})
    ids = [s["id"] for s in steps]
    if comp.get("tokens") and comp["tokens"] != ids:
        raise RuntimeError(f"{gguf}: tokens {comp['tokens']} != probs ids {ids}")
    gaps = [s["top"][0]["logprob"] - s["top"][1]["logprob"] for s in steps]
    min_gap = min(range(len(gaps)), key=lambda i: gaps[i])
    entry = {
        "model": str(gguf), "sha256": sha256(ROOT / gguf if not Path(gguf).is_absolute() else gguf),
        "messages": MESSAGES, "add_generation_prompt": True,
        "rendered_prompt": rendered, "prompt_ids": prompt_ids,
        "generated_ids": ids, "generated_text": comp["content"], "steps": steps,
        "min_top2_gap": {"step": min_gap, "logprob_gap": gaps[min_gap]},
        "how": {
            "server": " ".join(str(a) for a in argv),
            "apply_template": {"POST": "/apply-template", "body": tmpl_req},
            "tokenize": {"POST": "/tokenize", "body": {**tok_req, "content": "<rendered_prompt>"}},
            "completion": {"POST": "/completion",
                           "body": {**comp_req, "prompt": "<prompt_ids>"}},
        },
    }
    return entry


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-server", required=True)
    ap.add_argument("--out", default=str(ROOT / "tests/fixtures/llamacpp_reference.json"))
    ap.add_argument("--port", type=int, default=18080)
    ap.add_argument("models", nargs="*", default=DEFAULT_MODELS)
    args = ap.parse_args()
    entries = []
    with tempfile.TemporaryDirectory() as logdir:
        for i, m in enumerate(args.models):
            print(f"recording {m} ...", flush=True)
            e = record(args.llama_server, m, args.port + i, logdir)
            print(f"  prompt {len(e['prompt_ids'])} tokens -> {e['generated_ids'][:8]}... "
                  f"min top2 gap {e['min_top2_gap']}", flush=True)
            entries.append(e)
    doc = {
        "schema": "inferd-llamacpp-reference/1",
        "llama_cpp": {"source": "PyPI sdist llama_cpp_python==0.3.36, vendor/llama.cpp",
                      "version": llama_version(args.llama_server),
                      "build": "cmake Release -DGGML_NATIVE=ON (see bench/README.md)"},
        "notes": [
            "prompt_ids come from /tokenize of rendered_prompt with add_special and parse_special "
            "(no BOS: both real models and the tiny ones have add_bos_token=false).",
            "steps[i].top are llama.cpp's pre-sampling top-5 log-probabilities (softmax of the "
            "raw logits, n_probs=5, post_sampling_probs=false); steps[i].id is the greedy pick.",
            "min_top2_gap is the step with the smallest logprob gap between the two best tokens: "
            "a token-exact comparison is fragile at and after such a near-tie.",
        ],
        "models": entries,
    }
    Path(args.out).write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n",
                              encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
