#!/usr/bin/env python3
"""Prefix caching: time to first token of each turn of a growing chat conversation, on servers
that reuse earlier turns' KV cache and on one that does not, in one run.

Each turn sends the whole history (system prompt, earlier user messages and the server's own
greedy answers) plus a new ~60-token user message, and asks for 32 tokens; TTFT is the time to
the first streamed content chunk. Servers take turns within each turn, so drift hits all alike.

    python3 bench/prefix.py --model models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --inferd target/release/inferd --llama-server /path/to/llama-server [--turns 10]

Servers: inferd with its prefix cache (default), inferd with `prefix_cache_mb = 0`, and
llama.cpp's server with `cache_prompt: true` (its slot keeps the last prompt's KV) when
`--llama-server` is given. Standard library only.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import stream  # noqa: E402
from servers import Server  # noqa: E402

SYSTEM = ("You are a patient assistant for a small public library. You answer questions about "
          "opening hours, loans, returns, the reading room and the children's corner, and you "
          "keep every answer short, friendly and precise. ") * 3


def user(turn):
    return (f"Question {turn}: I would like to know more about shelf {turn * 7 % 31}, the books it "
            f"holds on history and science, how long I may keep them, and whether item {turn * 13} "
            "can be reserved for next week. Please also tell me about the reading room.")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--inferd", required=True)
    ap.add_argument("--llama-server")
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="conversations per server")
    ap.add_argument("--port", type=int, default=18400)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    cfg = tmp / "nocache.toml"
    cfg.write_text(f'[server]\nthreads = {args.threads}\n\n[[models]]\nid = "m"\nsource = "{Path(args.model).resolve()}"\nprefix_cache_mb = 0\n')
    servers = [
        Server("inferd", [args.inferd, "serve", "--model", args.model, "--model-id", "m", "--port", str(args.port),
                          "--threads", str(args.threads)], args.port, tmp / "inferd.log"),
        Server("inferd-no-cache", [args.inferd, "serve", "--config", str(cfg), "--port", str(args.port + 1)],
               args.port + 1, tmp / "inferd-nocache.log"),
    ]
    if args.llama_server:
        servers.append(Server("llama.cpp", [args.llama_server, "-m", args.model, "--port", str(args.port + 2), "-t",
                                            str(args.threads), "-c", "8192", "-np", "1"], args.port + 2, tmp / "llama.log"))
    ttft = {s.name: [[] for _ in range(args.turns)] for s in servers}
    try:
        for s in servers:
            s.start(timeout=300)
        for rep in range(args.repeats):
            history = {s.name: [{"role": "system", "content": SYSTEM}] for s in servers}
            for turn in range(args.turns):
                for s in servers:
                    msgs = history[s.name] + [{"role": "user", "content": user(turn + 100 * rep)}]
                    body = {"model": "m", "messages": msgs, "max_tokens": 32, "temperature": 0, "ignore_eos": True,
                            "cache_prompt": True}
                    r = stream(s.base + "/v1/chat/completions", body, 300)
                    if r.error:
                        raise RuntimeError(f"{s.name} turn {turn}: {r.error}")
                    ttft[s.name][turn].append(r.t_first * 1e3)
                    msgs.append({"role": "assistant", "content": r.text})
                    history[s.name] = msgs
            print(f"  conversation {rep + 1} of {args.repeats} done", file=sys.stderr, flush=True)
    finally:
        for s in servers:
            s.close()
    names = [s.name for s in servers]
    print("| turn | " + " | ".join(f"{n} TTFT ms" for n in names) + " | " + " | ".join(f"{n} / inferd" for n in names[1:]) + " |")
    print("|---" * (1 + 2 * len(names) - 1) + "|")
    for t in range(args.turns):
        med = {n: statistics.median(ttft[n][t]) for n in names}
        print(f"| {t + 1} | " + " | ".join(f"{med[n]:.1f}" for n in names) + " | " + " | ".join(f"{med[n] / med['inferd']:.2f}" for n in names[1:]) + " |")


if __name__ == "__main__":
    main()
