#!/usr/bin/env python3
"""A/B of two inferd configurations on one model: two servers, requests alternating.

Why: this machine's speed drifts by 10-30% from minute to minute, more than most changes are
worth. Both servers stay up (the idle one uses no CPU) and take turns, the order flipping every
pair, so each pair's two figures are seconds apart; the median of the per-pair ratios is the
figure to quote, with the pairs beside it.

Usage:
  python3 bench/ab.py --inferd target/release/inferd \
      --model models/qwen2.5-coder-0.5b-instruct-onnx-int4 --args "--backend onnx" \
      --a "" --b "INFERD_HTTP_THREADS=2" [--pairs 12] [--streams 1]
--a/--b: space-separated VAR=value settings for that server's environment, then optionally
"--" and extra `inferd serve` arguments ("INFERD_X=1 -- --max-batch 8").
Metric: total decode tok/s of --streams concurrent standard chat requests (128 new tokens,
greedy, EOS ignored), from the chunks' arrival times; the median time to the first token is
printed beside it. --context N replaces the standard prompt by a text of about N tokens (the
library paragraphs of bench.py) followed by a request to summarise it.
"""
import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import STD_MESSAGES, long_prompt  # noqa: E402
from load import concurrent  # noqa: E402
from servers import Server, http_json, inferd_argv  # noqa: E402


def split_setting(spec):
    """'A=1 B=2 -- --flag x' -> ({'A': '1', 'B': '2'}, '--flag x')."""
    words = shlex.split(spec)
    env, extra = {}, []
    if "--" in words:
        i = words.index("--")
        words, extra = words[:i], words[i + 1:]
    for w in words:
        k, sep, v = w.partition("=")
        if not sep:
            raise SystemExit(f"not VAR=value: {w!r}")
        env[k] = v
    return env, " ".join(shlex.quote(e) for e in extra)


def decode_tps(base, model, streams, new_tokens, timeout, messages=STD_MESSAGES):
    """(total decode tok/s, seconds to the last stream's first token)."""
    body = {"model": model, "messages": messages, "max_tokens": new_tokens, "temperature": 0,
            "ignore_eos": True}
    results, _ = concurrent(base + "/v1/chat/completions", body, streams, timeout)
    errs = [r.error for r in results if r is None or r.error]
    if errs:
        raise RuntimeError(errs[0])
    # Decode rate: tokens after the first, over the span from the first first-token to the last token.
    t0 = min(r.t_first for r in results)
    t1 = max(r.t_last for r in results)
    tokens = sum(len(r.chunk_times) - 1 for r in results)
    return tokens / max(t1 - t0, 1e-9), max(r.t_first for r in results)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inferd", required=True, help="inferd binary or command prefix")
    ap.add_argument("--model", required=True)
    ap.add_argument("--args", default="", help="`inferd serve` arguments for both servers")
    ap.add_argument("--a", default="", help="settings of server A (see the usage)")
    ap.add_argument("--b", default="", help="settings of server B")
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--context", type=int, default=0, help="prompt of about this many tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--port", type=int, default=8471)
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()
    logdir = Path(tempfile.mkdtemp(prefix="inferd-ab-"))
    servers = []
    try:
        for i, (name, spec) in enumerate((("A", args.a), ("B", args.b))):
            env, extra = split_setting(spec)
            argv = inferd_argv(args.inferd, args.model, args.port + i, args.threads, f"{args.args} {extra}")
            srv = Server(f"inferd {name}", argv, args.port + i, logdir / f"{name}.log", env=env).start()
            servers.append(srv)
        model = http_json(servers[0].base + "/v1/models")["data"][0]["id"]
        messages = STD_MESSAGES
        if args.context:
            text, n = long_prompt(servers[0].base, args.context)
            messages = [{"role": "user", "content": text + "\nSummarise the text above."}]
            print(f"prompt: {n} tokens of text", flush=True)
        for s in servers:  # warm-up
            decode_tps(s.base, model, args.streams, 16, args.timeout, messages)
        figures = {"A": [], "B": []}
        ttft = {"A": [], "B": []}
        for p in range(args.pairs):
            order = ("A", "B") if p % 2 == 0 else ("B", "A")
            for name in order:
                time.sleep(1.0)  # let the other server's spinning threads go idle
                srv = servers[0] if name == "A" else servers[1]
                tps, first = decode_tps(srv.base, model, args.streams, args.new_tokens, args.timeout, messages)
                figures[name].append(tps)
                ttft[name].append(first)
            print(f"pair {p:2d}: A {figures['A'][-1]:7.2f}  B {figures['B'][-1]:7.2f}  B/A {figures['B'][-1] / figures['A'][-1]:.3f}"
                  f"  (first token A {ttft['A'][-1] * 1000:.0f} ms, B {ttft['B'][-1] * 1000:.0f} ms)", flush=True)
    finally:
        for s in servers:
            s.close()
    ratios = [b / a for a, b in zip(figures["A"], figures["B"])]
    print(f"A = {args.a!r}, B = {args.b!r}; {args.streams} stream(s), decode tok/s (total)")
    print(f"median A {statistics.median(figures['A']):.2f}, B {statistics.median(figures['B']):.2f}; "
          f"B/A median of {len(ratios)} pairs {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}); {sum(r > 1 for r in ratios)} pairs with B faster")
    print(f"first token: median A {statistics.median(ttft['A']) * 1000:.0f} ms, B {statistics.median(ttft['B']) * 1000:.0f} ms")
    print(f"logs: {logdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
