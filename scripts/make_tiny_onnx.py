#!/usr/bin/env python3
"""Regenerates the tiny ONNX fixture and its transformers reference.

Writes:
  tests/fixtures/onnx/tiny-qwen2/             scripts/export_onnx.py of tests/fixtures/generated/tiny-qwen2
                                              (fp32, cpu; genai_config.json, model.onnx(.data),
                                              tokenizer.json, tokenizer_config.json)
  tests/fixtures/onnx/tiny-qwen2-pruned/      the same export with --prune-lm-head (logits of the
                                              last position only; same weights file)
  tests/fixtures/onnx/tiny-qwen2-reference.json  transformers (fp32, eager) greedy continuations
                                              with full logits, for fixed prompt token ids
Then checks the ONNX model against the reference with onnxruntime, driving it the way inferd's
backend does (one shared KV buffer, past/present bound to the same memory, batch-1 prefill +
decode), and prints the max |logit diff| (must be <= 1e-4) and whether the greedy ids match.

Usage: python scripts/make_tiny_onnx.py [--hf-dir DIR] [--out-dir DIR] [--check-only]
  (first: python scripts/make_tiny_model.py, which writes tests/fixtures/generated/tiny-qwen2)
Deps: scripts/requirements-export.txt (in .venv-export).
"""
import argparse
import hashlib
import json
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

NEW_TOKENS = 16
TOP_K = 20
TOL = 1e-4
# Prompts as text; their token ids (from the fixture's tokenizer.json) are what is recorded.
PROMPTS = {
    "short": "Hello! How can I help you today?",
    "code": "def fib(n: int) -> int:\n    a, b = 0, 1\n",
    "chat": None,  # chat template rendering of one user message, see chat_prompt()
}
CHAT_MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}]


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def chat_prompt(hf_dir: Path) -> str:
    import jinja2
    tc = json.loads((hf_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(tc["chat_template"]).render(messages=CHAT_MESSAGES,
                                                       add_generation_prompt=True)


def prompt_ids(hf_dir: Path) -> dict:
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    out = {}
    for name, text in PROMPTS.items():
        text = chat_prompt(hf_dir) if text is None else text
        out[name] = {"text": text, "ids": tok.encode(text, add_special_tokens=False).ids}
    return out


def reference(hf_dir: Path) -> dict:
    """Greedy continuation with transformers (fp32, eager, full forward per step, no cache)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    prompts = []
    for name, p in prompt_ids(hf_dir).items():
        ids = list(p["ids"])
        steps = []
        for i in range(NEW_TOKENS + 1):
            with torch.no_grad():
                lg = model(torch.tensor([ids])).logits[0, -1].numpy().astype(np.float32)
            top = np.argsort(-lg, kind="stable")[:TOP_K]
            steps.append({
                "input_token": None if i == 0 else ids[-1],
                "argmax": int(lg.argmax()),
                "top20": [[int(t), float(lg[t])] for t in top],
                "logits": [round(float(x), 6) for x in lg],
            })
            ids.append(int(lg.argmax()))
        prompts.append({"name": name, "text": p["text"], "prompt_ids": p["ids"],
                        "greedy_ids": [s["argmax"] for s in steps[:NEW_TOKENS]],
                        "steps": steps})
    return {
        "description": (
            "transformers fp32 eager reference for tests/fixtures/onnx/tiny-qwen2 (the same weights "
            "as tests/fixtures/generated/tiny-qwen2). For each prompt: steps[0] = logits at the "
            "prompt's last position (a prefill of prompt_ids); steps[i] (i = 1..16) = logits after "
            "feeding steps[i].input_token = greedy_ids[i-1] (a decode step). greedy_ids[i] = "
            "steps[i].argmax for i < 16 (EOS is ignored). logits = all vocab logits rounded to 1e-6; "
            "top20 = [id, logit] by descending logit. Compare ONNX logits within 1e-4."),
        "new_tokens": NEW_TOKENS,
        "generated_by": {
            "command": "python scripts/make_tiny_onnx.py (after python scripts/make_tiny_model.py)",
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "numpy": np.__version__,
            "model": "AutoModelForCausalLM.from_pretrained(tiny-qwen2, dtype=float32, "
                     "attn_implementation='eager'), full forward per step, 1 thread",
            "hf_model_sha256": sha256(hf_dir / "model.safetensors"),
        },
        "prompts": prompts,
    }


def check(onnx_dir: Path, ref: dict, threads: int = 1) -> float:
    """Runs every reference prompt through the ONNX model with a shared KV buffer (slot 1 of a
    2-slot pool, past/present bound to the same memory); returns the max |logit diff|."""
    import onnxruntime as ort
    from onnx_share_buffer_check import Model
    m = Model(onnx_dir, threads)
    worst, all_ids_equal = 0.0, True
    for p in ref["prompts"]:
        pool = m.pool(2, 256)
        ids = p["prompt_ids"]
        lg = m.run_shared(pool, 1, 1, [ids], np.ones((1, len(ids))))[0, -1]
        cur = len(ids)
        got_ids = []
        diffs = []
        for i, step in enumerate(p["steps"]):
            if i > 0:
                lg = m.run_shared(pool, 1, 1, [[step["input_token"]]], np.ones((1, cur + 1)))[0, 0]
                cur += 1
            diffs.append(float(np.abs(lg.astype(np.float64) - np.array(step["logits"])).max()))
            got_ids.append(int(lg.argmax()))
        same = got_ids[:ref["new_tokens"]] == p["greedy_ids"]
        all_ids_equal &= same
        worst = max(worst, max(diffs))
        print(f"  {p['name']:6s} prompt {len(ids):3d} ids: max|diff| {max(diffs):.3g}, "
              f"greedy ids {'identical' if same else 'DIFFER'}")
    print(f"onnxruntime {ort.__version__}: max |logit diff| over all prompts/steps = {worst:.3g} "
          f"(tol {TOL:g}); greedy ids identical: {all_ids_equal}")
    if worst > TOL or not all_ids_equal:
        raise SystemExit("ONNX fixture does NOT match the reference")
    return worst


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf-dir", type=Path, default=ROOT / "tests/fixtures/generated/tiny-qwen2")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "tests/fixtures/onnx")
    ap.add_argument("--check-only", action="store_true",
                    help="only compare the existing ONNX fixture with the existing reference")
    args = ap.parse_args()
    onnx_dir = args.out_dir / "tiny-qwen2"
    ref_path = args.out_dir / "tiny-qwen2-reference.json"
    if not args.hf_dir.is_dir():
        raise SystemExit(f"{args.hf_dir} missing: run python scripts/make_tiny_model.py first")
    if not args.check_only:
        import export_onnx
        rc = export_onnx.main([str(args.hf_dir), str(onnx_dir), "-p", "fp32", "-e", "cpu",
                               "--force"])
        if rc:
            return rc
        rc = export_onnx.main([str(args.hf_dir), str(args.out_dir / "tiny-qwen2-pruned"), "-p", "fp32",
                               "-e", "cpu", "--prune-lm-head", "--force"])
        if rc:
            return rc
        ref = reference(args.hf_dir)
        ref["generated_by"]["onnx_fixture_sha256"] = {
            p.name: sha256(p) for p in sorted(onnx_dir.iterdir()) if p.is_file()}
        ref_path.write_text(json.dumps(ref, separators=(",", ":")) + "\n", encoding="utf-8")
        print(f"wrote {ref_path} ({ref_path.stat().st_size} bytes)")
    ref = json.loads(ref_path.read_text(encoding="utf-8"))
    check(onnx_dir, ref)
    total = sum(p.stat().st_size for p in args.out_dir.rglob("*") if p.is_file())
    print(f"{args.out_dir}: {total / 2**20:.2f} MiB in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
