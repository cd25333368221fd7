#!/usr/bin/env python3
"""Peer benchmark: onnxruntime-genai's own generate loop on an exported model directory.

Why: inferd's ONNX backend runs the same graphs (scripts/export_onnx.py output) through ONNX
Runtime; onnxruntime-genai's C++ loop on the same directory, threads and prompts is the natural
baseline. Metrics mirror bench/bench.py's table (prefill, TTFT, single-stream decode, total
throughput at several batch sizes), measured in-process (no HTTP).

Usage (needs onnxruntime-genai, e.g. the export venv):
  .venv-export/bin/python bench/ort_genai_bench.py models/qwen2.5-coder-0.5b-instruct-onnx-int4 \
      [--prompt TEXT] [--threads 2] [--new-tokens 128] [--batch-sizes 1,4,8] \
      [--prefill-tokens 512] [--repeats 3] [--json-out FILE]
Prints one JSON object on stdout (progress on stderr).

With --serve it loads the model once and answers one JSON line per request line on stdin
({"op": "prefill"}, {"op": "single"}, {"op": "batch", "b": 8} or {"op": "ttft_ids", "ids": [..]}:
the time to the first token of a raw id prompt), so bench/bench.py can measure
each metric right after (or before) inferd's, under the same machine conditions.

Metrics (greedy, EOS ignored via min_length = max_length = prompt + new tokens, and
search.max_length set per run so the shared KV buffer is sized to the request):
  prefill_tps   raw prompt of exactly --prefill-tokens ids (no template): ids / (time from
                append_tokens() to the first generated token); median of --repeats
  ttft_ms       --prompt rendered with the model's chat template (tokenizer_config.json, through
                onnxruntime-genai's apply_chat_template), from tokenization + Generator creation
                to the first generated token; median of --repeats
  decode_tps    same request, --new-tokens tokens: (tokens - 1) / (last token time - first token
                time); median of --repeats
  batches[b]    b copies of the templated prompt as one static batch: total_tps = b * new tokens /
                wall time (Generator creation to last token); decode_tps = b * (new - 1) / decode time
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import onnxruntime_genai as og

STD_PROMPT = "Write a Python function that checks whether a number is prime."
PARAGRAPH = ("Section {i}. The benchmark prompt describes a small city library. It has {i} "
             "shelves of books about history, science, poetry and cooking; visitors borrow them "
             "for two weeks, and the librarian keeps a careful list of every loan and return. ")


def log(msg):
    print(f"[ort_genai_bench] {msg}", file=sys.stderr, flush=True)


def load(model_dir, threads):
    cfg = og.Config(model_dir)
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(cfg)
    return model, og.Tokenizer(model)


def run(model, ids_batch, new_tokens):
    """Generates exactly new_tokens per row; returns (t_start, t_after_append, token_times,
    sequences). ids_batch: list of equal-length id lists."""
    plen = len(ids_batch[0])
    t0 = time.perf_counter()
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, batch_size=len(ids_batch),
                              max_length=plen + new_tokens, min_length=plen + new_tokens)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array(ids_batch, dtype=np.int32))
    t1 = time.perf_counter()
    times = []
    while not gen.is_done():
        gen.generate_next_token()
        times.append(time.perf_counter())
    if len(times) != new_tokens:
        raise RuntimeError(f"generated {len(times)} tokens, expected {new_tokens}")
    seqs = [list(gen.get_sequence(i))[plen:] for i in range(len(ids_batch))]
    return t0, t1, times, seqs


def measure_prefill(model, long_ids):
    t0, _, times, _ = run(model, [long_ids], 1)
    return len(long_ids) / (times[0] - t0)


def measure_single(model, chat_ids, new_tokens):
    """(TTFT ms from tokenization on, decode tok/s, generated ids) of one templated request."""
    ts = time.perf_counter()
    ids = chat_ids()
    _, _, times, seqs = run(model, [ids], new_tokens)
    return (times[0] - ts) * 1000, (len(times) - 1) / (times[-1] - times[0]), seqs[0]


def measure_batch(model, ids, b, new_tokens):
    t0, _, times, seqs = run(model, [ids] * b, new_tokens)
    wall = times[-1] - t0
    return {
        "total_tps": round(b * new_tokens / wall, 2),
        "decode_tps": round(b * (new_tokens - 1) / (times[-1] - times[0]), 2),
        "ttft_ms": round((times[0] - t0) * 1000, 1),
        "wall_s": round(wall, 3),
        "rows_identical": all(s == seqs[0] for s in seqs),
    }


def serve(model, chat_ids, long_ids, new_tokens):
    """--serve: one JSON reply line per JSON request line on stdin, until EOF."""
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "prefill":
            out = {"prefill_tps": measure_prefill(model, long_ids)}
        elif req["op"] == "ttft_ids":
            t0, _, times, _ = run(model, [req["ids"]], 1)
            out = {"ttft_ms": (times[0] - t0) * 1000}
        elif req["op"] == "single":
            ttft, decode, _ = measure_single(model, chat_ids, new_tokens)
            out = {"ttft_ms": ttft, "decode_tps": decode}
        elif req["op"] == "batch":
            out = measure_batch(model, chat_ids(), int(req["b"]), new_tokens)
        else:
            out = {"error": f"unknown op {req['op']!r}"}
        print(json.dumps(out), flush=True)
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--prompt", default=STD_PROMPT, help="user message (chat template applied)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch-sizes", default="1,4,8")
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json-out")
    ap.add_argument("--serve", action="store_true",
                    help="answer JSON requests on stdin (one per line) instead of a full run")
    args = ap.parse_args()
    batches = [int(b) for b in args.batch_sizes.split(",") if b]

    t = time.perf_counter()
    model, tok = load(args.model_dir, args.threads)
    load_s = time.perf_counter() - t
    log(f"loaded {args.model_dir} in {load_s:.2f} s ({args.threads} threads)")

    def chat_ids():
        msgs = json.dumps([{"role": "user", "content": args.prompt}])
        text = tok.apply_chat_template(msgs, add_generation_prompt=True)
        return [int(x) for x in tok.encode(text)]

    std_ids = chat_ids()
    raw = "".join(PARAGRAPH.format(i=i) for i in range(1, 200))
    long_ids = [int(x) for x in tok.encode(raw)][:args.prefill_tokens]
    if len(long_ids) < args.prefill_tokens:
        raise SystemExit(f"filler text gives only {len(long_ids)} tokens")

    log("warm-up")
    run(model, [std_ids], 8)
    if args.serve:
        return serve(model, chat_ids, long_ids, args.new_tokens)

    prefill, ttft, decode, sample = [], [], [], None
    for r in range(args.repeats):
        prefill.append(measure_prefill(model, long_ids))
        t, d, sample = measure_single(model, chat_ids, args.new_tokens)
        ttft.append(t)
        decode.append(d)
        log(f"repeat {r + 1}: prefill {prefill[-1]:.1f} tok/s, TTFT {ttft[-1]:.1f} ms, "
            f"decode {decode[-1]:.2f} tok/s")

    res_b = {}
    for b in batches:
        res_b[str(b)] = measure_batch(model, std_ids, b, args.new_tokens)
        log(f"batch {b}: {res_b[str(b)]}")

    out = {
        "engine": "onnxruntime-genai",
        "onnxruntime_genai": og.__version__,
        "model_dir": os.path.abspath(args.model_dir),
        "threads": args.threads,
        "new_tokens": args.new_tokens,
        "prompt_tokens": len(std_ids),
        "prefill_tokens": len(long_ids),
        "repeats": args.repeats,
        "load_s": round(load_s, 3),
        "prefill_tps": round(statistics.median(prefill), 2),
        "ttft_ms": round(statistics.median(ttft), 1),
        "decode_tps": round(statistics.median(decode), 2),
        "all": {"prefill_tps": [round(x, 2) for x in prefill],
                "ttft_ms": [round(x, 1) for x in ttft],
                "decode_tps": [round(x, 2) for x in decode]},
        "batches": res_b,
        "sample_text": tok.decode(np.array(sample, dtype=np.int32)),
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
    }
    text = json.dumps(out, indent=2, ensure_ascii=False)
    print(text)
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
