#!/usr/bin/env python3
"""Where a model worker's time goes during a burst of requests, from the server's own /metrics.

    python3 bench/worker_split.py http://127.0.0.1:8080 MODEL_ID[,MODEL_ID...] 1,64,256,256j

Each spec is a burst of N concurrent requests (128 new tokens, `ignore_eos`, greedy, ~100-token
prompts distinct per request): streaming, or non-streaming with a trailing `j` (the client then
reads N bodies instead of N x 128 events, so it is less likely to be the limit). For each burst it
prints the wall time, tokens a second, and the deltas of the worker's counters over the burst:
`inferd_engine_step_seconds_total` (the backend's steps; on a GPU the step is synchronous, so it
holds the device's work), `inferd_engine_sampling_seconds_total` (handling each row's token after
the step: detokenisation, stop checks, events) and `inferd_engine_idle_seconds_total` (waiting with
nothing to run; added when a wait ends, so a burst's figure includes the wait before its first
request). With the output lane on (a GPU model without async scheduling, or
`INFERD_OVERLAP_OUTPUT=1`) the token handling is partly on a helper thread during the steps:
`inferd_engine_overlapped_tokens_total` counts the tokens it handled,
`inferd_engine_dropped_tokens_total` the tokens dropped after a stop string or EOS found a step
late. With async scheduling (candle on CUDA unless `INFERD_CUDA_PIPELINE=0`) the backend's time
is its launches plus the waits for each step's tokens. Several model ids (adapters) take the requests in
turn. docs/perf-notes.md (sessions 15 to 17) has the H200 figures. Standard library only.
"""
import json
import re
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import concurrent  # noqa: E402

COUNTERS = ["inferd_engine_step_seconds_total", "inferd_engine_steps_total", "inferd_engine_sampling_seconds_total",
            "inferd_generation_tokens_total", "inferd_engine_idle_seconds_total", "inferd_engine_overlapped_tokens_total",
            "inferd_engine_dropped_tokens_total"]


def counters(base):
    text = urllib.request.urlopen(base + "/metrics").read().decode()
    return [sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)) for name in COUNTERS]


def plain_burst(base, bodies):
    def one(body):
        req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=300).read()
    threads = [threading.Thread(target=one, args=(b,)) for b in bodies]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    base, models, specs = sys.argv[1].rstrip("/"), sys.argv[2].split(","), sys.argv[3]
    for spec in specs.split(","):
        n, streaming = int(spec.rstrip("j")), not spec.endswith("j")
        bodies = [{"model": models[i % len(models)], "prompt": f"request {i}: " + "word " * 100, "max_tokens": 128, "temperature": 0,
                   "ignore_eos": True, "stream": streaming} for i in range(n)]
        before = counters(base)
        wall = concurrent(base + "/v1/completions", bodies, n, 300)[1] if streaming else plain_burst(base, bodies)
        step, steps, handling, tokens, idle, lane, dropped = (b - a for a, b in zip(before, counters(base)))
        per = 1000 / max(steps, 1)
        print(f"{n} {'streams' if streaming else 'plain requests'}: wall {wall:.2f} s, {tokens / wall:.0f} tok/s, {steps:.0f} steps; "
              f"backend step {100 * step / wall:.0f}% of wall ({step * per:.2f} ms a step), token handling {100 * handling / wall:.0f}% "
              f"({handling * per:.2f} ms a step), idle {100 * idle / wall:.0f}%, the rest {(wall - step - handling) * per:.2f} ms a step; "
              f"events of {lane:.0f} tokens made beside a step, {dropped:.0f} tokens dropped", flush=True)


if __name__ == "__main__":
    main()
