#!/usr/bin/env python3
"""Trains a LoRA adapter (PEFT format) for a chat model inferd serves, on CPU or GPU.

Input:  a base model, as a Hugging Face directory or a GGUF file (dequantised to fp32 through
        transformers, as scripts/export_onnx.py does), and a JSONL file of chat examples, one
        {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}
        per line (the same "chat" format mlx-lm's `mlx_lm.lora` reads).
Output: OUT_DIR/adapter_config.json + OUT_DIR/adapter_model.safetensors (PEFT), which inferd
        loads as a LoRA adapter, plus OUT_DIR/train_log.json (loss per step, settings, timing).

The loss covers the assistant turns only (the prompt part, i.e. the chat template rendering of
the messages before the last assistant turn plus the generation prompt, is masked out), so the
model learns to answer, not to repeat questions. Deterministic for a given seed, thread count and
torch build (fixed seeds, fixed example order per epoch from the seed).

Usage:
  python scripts/train_lora.py BASE DATA.jsonl OUT_DIR [--steps 36] [--lr 1e-3] [--seed 0]
      [--rank 16] [--alpha 32] [--targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]
      [--batch-size 4] [--max-len 160] [--threads 2] [--device cpu|cuda]
  python scripts/train_lora.py BASE --compare OUT_DIR --prompt "prompt 1" --prompt "prompt 2" ...
      [--onnx-dir ONNX_LORA_DIR --onnx-adapter ADAPTER.onnx_adapter]
      (greedy answers of the base model and of base + adapter, side by side; no training;
      optionally also from an export_onnx.py --lora-inputs graph through onnxruntime)
  e.g.
  nice -n 10 python scripts/train_lora.py /tmp/qwen-hf scripts/lora_data/pirate/train.jsonl \
      models/lora/pirate --steps 36
Deps: scripts/requirements-export.txt (torch, transformers, peft; the .venv-export venv).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def log(msg: str) -> None:
    print(f"[train_lora] {msg}", file=sys.stderr, flush=True)


def resolve_base(base: Path, tmp: Path) -> Path:
    """Returns an HF directory for `base` (a GGUF is dequantised into tmp/hf first)."""
    import export_onnx
    kind = export_onnx.classify_input(base)
    if kind == "hf":
        return base
    stage = tmp / "hf"
    export_onnx.stage_gguf(base, stage)
    return stage


def load_examples(path: Path) -> list:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        d = json.loads(line)
        msgs = d.get("messages")
        if not msgs or msgs[-1].get("role") != "assistant":
            raise SystemExit(f"{path}:{n}: expected {{\"messages\": [..., {{\"role\": "
                             "\"assistant\", ...}]}")
        rows.append(msgs)
    return rows


def encode(tok, msgs: list, max_len: int) -> tuple[list, list]:
    """Token ids of the whole conversation and labels (-100 on the prompt part)."""
    prompt = tok.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(msgs, tokenize=False)
    if not full.startswith(prompt):
        raise SystemExit("chat template: the rendering with the answer does not extend the "
                         "rendering of the prompt; cannot mask the prompt")
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    ids = tok(full, add_special_tokens=False)["input_ids"]
    if ids[:len(p_ids)] != p_ids:
        raise SystemExit("tokenisation of prompt and prompt+answer disagree at the boundary")
    labels = [-100] * len(p_ids) + ids[len(p_ids):]
    return ids[:max_len], labels[:max_len]


def batches(examples: list, batch_size: int, steps: int, seed: int):
    """Yields `steps` batches; each epoch visits every example once in a seeded order."""
    rng = random.Random(seed)
    order: list = []
    for _ in range(steps):
        if len(order) < batch_size:
            perm = list(range(len(examples)))
            rng.shuffle(perm)
            order += perm
        yield [examples[i] for i in order[:batch_size]]
        del order[:batch_size]


def collate(batch: list, pad_id: int, torch, device):
    n = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    lab = torch.full((len(batch), n), -100, dtype=torch.long)
    att = torch.zeros((len(batch), n), dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, :len(x)] = torch.tensor(x)
        lab[i, :len(y)] = torch.tensor(y)
        att[i, :len(x)] = 1
    return ids.to(device), lab.to(device), att.to(device)


def sort_adapter_config(out: Path, base_name: str) -> None:
    """PEFT writes target_modules from a set (order varies run to run): sort it, and record the
    base model as given on the command line."""
    p = out / "adapter_config.json"
    cfg = json.loads(p.read_text())
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    cfg["base_model_name_or_path"] = base_name
    p.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def greedy(model, tok, prompt: str, max_new: int, torch) -> str:
    text = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                   add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = ids.to(next(model.parameters()).device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                             do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def onnx_greedy(onnx_dir: Path, tok, prompt: str, max_new: int, adapter_file: Path | None,
                threads: int) -> tuple[str, float]:
    """Greedy answer from a --lora-inputs ONNX export with onnxruntime (plain KV cache,
    batch 1), with the .onnx_adapter activated through RunOptions when given. Returns the text
    and the mean seconds per decode step."""
    import numpy as np
    import onnxruntime as ort
    gc = json.loads((onnx_dir / "genai_config.json").read_text())
    d = gc["model"]["decoder"]
    eos = gc["model"]["eos_token_id"]
    eos = set(eos if isinstance(eos, list) else [eos])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_dir / "model.onnx"), so,
                                providers=["CPUExecutionProvider"])
    ro = ort.RunOptions()
    if adapter_file is not None:
        ad = ort.LoraAdapter()
        ad.Load(str(adapter_file))
        ro.add_active_adapter(ad)
    names = [o.name for o in sess.get_outputs()]
    text = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                   add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    L, kv, hd = d["num_hidden_layers"], d["num_key_value_heads"], d["head_size"]
    past = {d["inputs"][k] % n: np.zeros((1, kv, 0, hd), np.float32)
            for n in range(L) for k in ("past_key_names", "past_value_names")}
    out, cur, feed_ids, t_dec = [], 0, ids, []
    for _ in range(max_new):
        t0 = time.time()
        res = dict(zip(names, sess.run(None, {
            "input_ids": np.array([feed_ids], np.int64),
            "attention_mask": np.ones((1, cur + len(feed_ids)), np.int64), **past}, ro)))
        if cur:
            t_dec.append(time.time() - t0)
        cur += len(feed_ids)
        nxt = int(res["logits"][0, -1].argmax())
        if nxt in eos:
            break
        out.append(nxt)
        feed_ids = [nxt]
        for n in range(L):
            past[d["inputs"]["past_key_names"] % n] = res[d["outputs"]["present_key_names"] % n]
            past[d["inputs"]["past_value_names"] % n] = res[d["outputs"]["present_value_names"] % n]
    return tok.decode(out, skip_special_tokens=True), (sum(t_dec) / max(1, len(t_dec)))


def compare(hf: Path, adapter: Path, prompts: list, max_new: int, device: str,
            onnx_dir: Path | None = None, onnx_adapter: Path | None = None,
            threads: int = 2) -> list:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(hf))
    base = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).to(device).eval()
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    rows = []
    for p in prompts:
        with model.disable_adapter():
            b = greedy(model, tok, p, max_new, torch)
        a = greedy(model, tok, p, max_new, torch)
        row = {"prompt": p, "base": b, "adapter": a}
        if onnx_dir is not None:
            row["onnx_base"], row["onnx_base_s_per_step"] = onnx_greedy(
                onnx_dir, tok, p, max_new, None, threads)
            if onnx_adapter is not None:
                row["onnx_adapter"], row["onnx_adapter_s_per_step"] = onnx_greedy(
                    onnx_dir, tok, p, max_new, onnx_adapter, threads)
        rows.append(row)
        print(json.dumps(rows[-1], ensure_ascii=False), flush=True)
    return rows


def train(args, hf: Path) -> None:
    import numpy as np
    import peft
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(str(hf))
    examples = [encode(tok, m, args.max_len) for m in load_examples(args.data)]
    lens = [len(x) for x, _ in examples]
    log(f"{len(examples)} examples, tokens per example {min(lens)}..{max(lens)} "
        f"(mean {sum(lens) / len(lens):.0f})")
    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32,
                                                 attn_implementation="eager").to(args.device)
    model.config.use_cache = False
    targets = [t for t in args.targets.split(",") if t]
    cfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, bias="none",
                     target_modules=targets, task_type="CAUSAL_LM", use_rslora=args.rslora)
    model = get_peft_model(model, cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"LoRA r={args.rank} alpha={args.alpha} on {targets}: {trainable / 1e6:.2f} M trainable")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warm = max(1, args.steps // 10)
    # linear warm-up over the first 10% of steps, then linear decay to 10% of lr
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm
        else 1.0 - 0.9 * (s - warm) / max(1, args.steps - warm))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model.train()
    losses, t0 = [], time.time()
    for step, batch in enumerate(batches(examples, args.batch_size, args.steps, args.seed), 1):
        ids, lab, att = collate(batch, pad, torch, args.device)
        # Logits only from the first answer position of the batch on: the lm_head (vocab x
        # hidden) over the prompt tokens is a large, useless share of the cost on CPU.
        n = ids.shape[1]
        start = min(int((row != -100).nonzero()[0]) for row in lab)
        keep = torch.arange(start - 1, n - 1, device=ids.device)
        logits = model(input_ids=ids, attention_mask=att, logits_to_keep=keep).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), lab[:, start:].reshape(-1),
            ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(float(loss.detach()), 4))
        el = time.time() - t0
        log(f"step {step}/{args.steps} loss {losses[-1]:.4f} lr {sched.get_last_lr()[0]:.2e} "
            f"({el / step:.1f} s/step, {el:.0f} s)")
    elapsed = time.time() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(args.out))
    sort_adapter_config(args.out, str(args.base))
    (args.out / "train_log.json").write_text(json.dumps({
        "base": str(args.base), "data": str(args.data), "examples": len(examples),
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
        "rank": args.rank, "alpha": args.alpha, "rslora": args.rslora, "targets": targets,
        "max_len": args.max_len, "threads": torch.get_num_threads(), "device": args.device,
        "seconds": round(elapsed, 1), "losses": losses,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__}}, indent=2) + "\n")
    log(f"trained {args.steps} steps in {elapsed:.0f} s; wrote {args.out}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", type=Path, help="HF model directory or .gguf file")
    ap.add_argument("data", nargs="?", help="JSONL of {\"messages\": [...]}")
    ap.add_argument("out", nargs="?", help="adapter output directory")
    ap.add_argument("--steps", type=int, default=36)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--rslora", action="store_true", help="scale alpha/sqrt(r) instead of alpha/r")
    ap.add_argument("--targets", default=DEFAULT_TARGETS, help="comma-separated module names")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=160, help="truncate examples to this many tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compare", type=Path, metavar="ADAPTER_DIR",
                    help="no training: print greedy answers of base and base+adapter for each "
                         "--prompt")
    ap.add_argument("--prompt", action="append", default=[], help="a user message (repeatable)")
    ap.add_argument("--onnx-dir", type=Path,
                    help="with --compare: also generate with this --lora-inputs ONNX export "
                         "(onnxruntime), without adapter and with --onnx-adapter")
    ap.add_argument("--onnx-adapter", type=Path, help="the adapter as an .onnx_adapter file")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--compare-out", type=Path, help="also write the comparison as JSON here")
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="inferd-lora-"))
    try:
        hf = resolve_base(args.base, tmp)
        if args.compare:
            if not args.prompt or args.data or args.out:
                ap.error("--compare ADAPTER_DIR takes --prompt TEXT (one or more), no DATA/OUT")
            rows = compare(hf, args.compare, args.prompt, args.max_new_tokens, args.device,
                           args.onnx_dir, args.onnx_adapter, args.threads)
            if args.compare_out:
                args.compare_out.write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
            return 0
        if args.data is None or args.out is None:
            ap.error("DATA and OUT_DIR are required for training")
        args.data, args.out = Path(args.data), Path(args.out)
        train(args, hf)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
