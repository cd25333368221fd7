#!/usr/bin/env python3
"""Benchmark inferd against llama.cpp's llama-server on the same GGUF, side by side.

Why: inferd's performance goal is stated relative to llama.cpp on the same machine, model and
thread count. Each round starts every engine on its own port, then takes each metric from each
engine back to back (identical streaming OpenAI requests), so that the two figures of a ratio
are measured seconds apart on this drifting shared machine. Prints prefill / TTFT / decode /
concurrent throughput with the ratio inferd/llama.cpp, and can append the figures to
docs/benchmarks.md.

Usage:
  python3 bench/bench.py --llama-server /work/peers/llama-build/bin/llama-server \
      --inferd target/release/inferd --model models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
  ONNX case (inferd --backend onnx vs onnxruntime-genai's own loop on the same export, and
  llama.cpp on the GGUF, in one run):
  python3 bench/bench.py --llama-server ... --inferd target/release/inferd \
      --model models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf \
      --onnx-model models/qwen2.5-coder-0.5b-instruct-onnx-int4 [--genai-python .venv-export/bin/python]
  --inferd may be a command prefix ("cargo run --release --") or a URL of a running server;
  leave it out to measure llama.cpp alone (the peer baseline).
"""
import argparse
import contextlib
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import concurrent, stream  # noqa: E402
from servers import Server, http_json, inferd_argv, llama_server_argv  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STD_MESSAGES = [{"role": "user",
                 "content": "Write a Python function that checks whether a number is prime."}]
PARAGRAPH = ("Section {i}. The benchmark prompt describes a small city library. It has {i} "
             "shelves of books about history, science, poetry and cooking; visitors borrow them "
             "for two weeks, and the librarian keeps a careful list of every loan and return. ")
METRICS = [("prefill tok/s", "prefill_tps"), ("TTFT standard prompt (ms, lower is better)", "ttft_ms"),
           ("TTFT unseen prompt lengths (ms, lower is better)", "ttft_new_ms"),
           ("decode tok/s (1 stream)", "decode_tps"),
           ("total tok/s, 4 streams", "c4_tps"), ("total tok/s, 8 streams", "c8_tps")]


def unseen_prompt(round_index, repeat):
    """Token ids of a prompt length no engine has run before in this bench (real traffic has
    prompts of every length; ONNX Runtime's CUDA provider pays 50-190 ms for the first run of a
    new input shape, docs/cuda.md). Lengths 23, 60, 97, ...; ids from the common range of any
    vocabulary this bench meets."""
    n = 23 + 37 * (round_index * 16 + repeat)
    return [1000 + (i * 7919) % 20000 for i in range(n)]


def long_prompt(base, n_tokens):
    """A text of exactly n_tokens for the model's tokenizer (llama-server's or inferd's /tokenize
    and /detokenize)."""
    text = "".join(PARAGRAPH.format(i=i) for i in range(1, 60))
    ids = http_json(base + "/tokenize", {"content": text})["tokens"][:n_tokens]
    text = http_json(base + "/detokenize", {"tokens": ids})["content"]
    count = len(http_json(base + "/tokenize", {"content": text})["tokens"])
    return text, count


class HttpEngine:
    """An OpenAI-compatible server (llama-server or inferd) measured over streaming HTTP."""

    def __init__(self, name, base, args, prompt_text, extra):
        self.name, self.args, self.prompt_text = name, args, prompt_text
        self.chat, self.comp = base + "/v1/chat/completions", base + "/v1/completions"
        # OpenAI requires `model`; name the first (only) model the server lists.
        model_id = http_json(base + "/v1/models", None)["data"][0]["id"]
        self.greedy = {"model": model_id, "temperature": 0, "ignore_eos": True, **extra}
        self.std = {"messages": STD_MESSAGES, "max_tokens": args.new_tokens, **self.greedy}
        self.notes = []
        warm = stream(self.chat, {"messages": STD_MESSAGES, "max_tokens": 8, **self.greedy}, args.timeout)
        if warm.error:
            raise RuntimeError(f"{name}: warm-up failed: {warm.error}")

    def prefill(self):
        """Prompt tokens per second of one `--prompt-tokens` completion with max_tokens 1."""
        r = stream(self.comp, {"prompt": self.prompt_text, "max_tokens": 1, **self.greedy}, self.args.timeout)
        if r.error or r.t_first is None:
            raise RuntimeError(f"{self.name}: prefill request failed: {r.error}")
        return {"prefill_tps": (r.prompt_tokens or self.args.prompt_tokens) / r.t_first}

    def ttft_ids(self, ids):
        """Time to the first token of a raw token-id prompt (max_tokens 1)."""
        r = stream(self.comp, {"prompt": ids, "max_tokens": 1, **self.greedy}, self.args.timeout)
        if r.error or r.t_first is None:
            raise RuntimeError(f"{self.name}: token-id prompt failed: {r.error}")
        return {"ttft_new_ms": r.t_first * 1000}

    def single(self):
        """TTFT and decode rate of one standard chat request."""
        r = stream(self.chat, self.std, self.args.timeout)
        if r.error or r.t_first is None:
            raise RuntimeError(f"{self.name}: decode request failed: {r.error}")
        n = r.completion_tokens or len(r.chunk_times)
        if n != self.args.new_tokens:
            self.notes.append(f"{self.name}: generated {n} tokens, expected {self.args.new_tokens}")
        return {"ttft_ms": r.t_first * 1000, "decode_tps": (n - 1) / max(r.t_last - r.t_first, 1e-9)}

    def streams(self, n):
        results, wall = concurrent(self.chat, self.std, n, self.args.timeout)
        errs = [r.error for r in results if r is None or r.error]
        if errs:
            raise RuntimeError(f"{self.name}: {n} concurrent streams failed: {errs[0]}")
        total = sum(r.completion_tokens or len(r.chunk_times) for r in results)
        return {f"c{n}_tps": total / wall}


class GenaiEngine:
    """onnxruntime-genai's own generate loop on the ONNX export (bench/ort_genai_bench.py
    --serve, run with a Python that has onnxruntime-genai): same threads, prompt sizes and new
    tokens. Its 4/8-stream figures are static batches of 4/8 identical prompts (its best case)."""

    name = "onnxruntime-genai"

    def __init__(self, args, logdir):
        self.args = args
        self.cmd = [args.genai_python, str(ROOT / "bench" / "ort_genai_bench.py"), args.onnx_model,
                    "--threads", str(args.threads), "--new-tokens", str(args.new_tokens),
                    "--prefill-tokens", str(args.prompt_tokens), "--serve"]
        self.log = open(Path(logdir) / "genai.log", "ab")
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, start_new_session=True)
        self.notes = []
        if not json.loads(self.proc.stdout.readline() or "{}").get("ready"):
            self.close()
            raise RuntimeError("onnxruntime-genai worker did not start; see genai.log")

    def call(self, req):
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("onnxruntime-genai worker exited; see genai.log")
        return json.loads(line)

    def prefill(self):
        return {"prefill_tps": self.call({"op": "prefill"})["prefill_tps"]}

    def ttft_ids(self, ids):
        return {"ttft_new_ms": self.call({"op": "ttft_ids", "ids": ids})["ttft_ms"]}

    def single(self):
        r = self.call({"op": "single"})
        return {"ttft_ms": r["ttft_ms"], "decode_tps": r["decode_tps"]}

    def streams(self, n):
        return {f"c{n}_tps": self.call({"op": "batch", "b": n})["total_tps"]}

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def run_round(args, logdir, index):
    """One round: every engine is started, then each metric is taken from each engine back to
    back (single-stream runs alternate engine by engine, `--repeats` times; the engines' order
    rotates with the round), so the figures compared in a ratio are seconds apart instead of
    minutes. Idle engines use no CPU. Returns ({engine: figures}, notes, {engine: command},
    the order the engines ran in)."""
    cmds = {}
    with contextlib.ExitStack() as stack:
        servers = []  # (name, base URL, extra request fields), started before any is measured
        if args.llama_server:
            argv = llama_server_argv(args.llama_server, args.model, args.port, args.threads, 8, args.ctx)
            cmds["llama.cpp"] = " ".join(argv)
            llama = stack.enter_context(Server("llama-server", argv, args.port, Path(logdir) / "llama.log",
                                               ready_path="/health"))
            servers.append(("llama.cpp", llama.base, {"cache_prompt": False}))
        if args.inferd and args.inferd.startswith(("http://", "https://")):
            cmds["inferd"] = args.inferd
            servers.append(("inferd", args.inferd.rstrip("/"), {}))
        elif args.inferd:
            port = args.port + 1
            extra = f"{args.inferd_args} {'--backend onnx' if args.onnx_model else ''}".strip()
            argv = inferd_argv(args.inferd, args.onnx_model or args.model, port, args.threads, extra)
            cmds["inferd"] = " ".join(argv)
            # --threads sizes inferd's own pool; this caps candle's (dense weights only) the same way.
            srv = stack.enter_context(Server("inferd", argv, port, Path(logdir) / "inferd.log",
                                             ready_path=args.inferd_ready,
                                             env={"RAYON_NUM_THREADS": str(args.threads)}))
            servers.append(("inferd", srv.base, {}))
        # The first server's tokenizer sizes the long prompt (both answer /tokenize).
        prompt_text, args.prompt_tokens = long_prompt(servers[0][1], args.prompt_tokens)
        engines = [HttpEngine(name, base, args, prompt_text, extra) for name, base, extra in servers]
        if args.onnx_model:
            genai = GenaiEngine(args, logdir)
            stack.callback(genai.close)
            cmds["onnxruntime-genai"] = " ".join(genai.cmd[:3] + genai.cmd[3:-1])
            engines.insert(len(engines) - 1, genai)
        first = index % len(engines)
        order = engines[first:] + engines[:first]
        figures = {e.name: {} for e in engines}
        # Single runs alternate engine by engine; their median per engine is the round's figure.
        measures = (lambda e, k: e.prefill(), lambda e, k: e.ttft_ids(unseen_prompt(index, k)),
                    lambda e, k: e.single())
        for measure in measures:
            runs = {e.name: [] for e in engines}
            for k in range(args.repeats):
                for e in order:
                    time.sleep(1.0)  # let the previous engine's spinning threads go idle
                    runs[e.name].append(measure(e, k))
            for name, rs in runs.items():
                figures[name].update({key: statistics.median(r[key] for r in rs) for key in rs[0]})
        for n in (4, 8):
            for e in order:
                time.sleep(1.0)
                figures[e.name].update(e.streams(n))
        notes = [n for e in engines for n in e.notes]
        return figures, notes, cmds, " then ".join(e.name for e in order)


def onnx_table(llama_runs, genai_runs, onnx_runs):
    """inferd --backend onnx against onnxruntime-genai (same files) and, when it ran, llama.cpp
    (the GGUF)."""
    ll = bool(llama_runs)
    rows = ["| metric |" + (" llama.cpp |" if ll else "") + " onnxruntime-genai | inferd onnx | inferd / genai | "
            + ("inferd / llama.cpp | " if ll else "") + "per-round inferd / genai |",
            "|---|" + ("---:|" if ll else "") + "---:|---:|---:|" + ("---:|" if ll else "") + "---|"]
    for label, key in METRICS:
        med = lambda runs: statistics.median(r[key] for r in runs)  # noqa: E731
        vs_g = [o[key] / g[key] for g, o in zip(genai_runs, onnx_runs)]
        vs_l = [o[key] / l[key] for l, o in zip(llama_runs, onnx_runs)]
        rows.append(f"| {label} | " + (f"{med(llama_runs):.1f} | " if ll else "")
                    + f"{med(genai_runs):.1f} | {med(onnx_runs):.1f} | {statistics.median(vs_g):.2f} | "
                    + (f"{statistics.median(vs_l):.2f} | " if ll else "")
                    + ", ".join(f"{x:.2f}" for x in vs_g) + " |")
    return "\n".join(rows)


def machine():
    """CPU model name and core count from lscpu."""
    info = {}
    out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    for line in out.splitlines():
        k, _, v = line.partition(":")
        info[k.strip()] = v.strip()
    gpus = ""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        gpus = f", GPU {', '.join(out.splitlines())}" if out else ""
    except (OSError, subprocess.SubprocessError):
        pass
    return f"{info.get('Model name', '?')}, {info.get('CPU(s)', '?')} CPUs{gpus}"


def loadavg():
    """1-minute load average: on a shared machine, figures taken under load are not comparable."""
    try:
        return open("/proc/loadavg").read().split()[0]
    except OSError:
        return "?"


def git_commit():
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                       cwd=ROOT, timeout=10)
    return r.stdout.strip() or "?"


def table(llama_runs, inferd_runs):
    """Medians per server; the ratio is the median of per-round ratios (each round runs both
    servers back to back, so a ratio compares figures taken under the same machine load)."""
    rows = ["| metric | llama.cpp | inferd | inferd / llama.cpp | per-round ratios |",
            "|---|---:|---:|---:|---|"]
    for label, key in METRICS:
        a = statistics.median(r[key] for r in llama_runs)
        if not inferd_runs:
            rows.append(f"| {label} | {a:.1f} | | | |")
            continue
        b = statistics.median(r[key] for r in inferd_runs)
        ratios = [i[key] / l[key] for l, i in zip(llama_runs, inferd_runs)]
        each = ", ".join(f"{x:.2f}" for x in ratios)
        rows.append(f"| {label} | {a:.1f} | {b:.1f} | {statistics.median(ratios):.2f} | {each} |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-server", help="path to llama-server (left out: no llama.cpp column; "
                    "then --inferd and --onnx-model are needed, e.g. on a GPU machine)")
    ap.add_argument("--inferd", help="inferd binary/command prefix, or URL of a running server")
    ap.add_argument("--inferd-args", default="", help="extra args for `inferd serve`")
    ap.add_argument("--inferd-ready", default="/health", help="readiness path on inferd")
    ap.add_argument("--model", help="GGUF path (for llama.cpp, and inferd's candle backend)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=2048, help="context per slot")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="runs of the single-stream tests")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds; in each, every metric is taken from every engine back to back")
    ap.add_argument("--timeout", type=float, default=300.0, help="per-request timeout (s)")
    ap.add_argument("--port", type=int, default=18090)
    ap.add_argument("--write-docs", action="store_true", help="append to docs/benchmarks.md")
    ap.add_argument("--onnx-model", help="ONNX export of the same model (scripts/export_onnx.py): "
                    "measure inferd --backend onnx and onnxruntime-genai on it instead of inferd on the GGUF")
    ap.add_argument("--genai-python", default=str(ROOT / ".venv-export" / "bin" / "python"),
                    help="Python with onnxruntime-genai (scripts/requirements-export.txt)")
    args = ap.parse_args()
    if args.onnx_model and not args.inferd:
        ap.error("--onnx-model needs --inferd")
    if not args.llama_server and not args.onnx_model:
        ap.error("--llama-server is needed unless --onnx-model compares inferd with onnxruntime-genai")
    if not args.model and not args.onnx_model or args.llama_server and not args.model:
        ap.error("--model (the GGUF) is needed")
    load_before = loadavg()
    with tempfile.TemporaryDirectory() as logdir:
        try:
            llama_runs, inferd_runs, genai_runs, notes, orders = [], [], [], [], []
            for i in range(max(1, args.rounds)):
                figures, n, cmds, order = run_round(args, logdir, i)
                if "llama.cpp" in figures:
                    llama_runs.append(figures["llama.cpp"])
                if "onnxruntime-genai" in figures:
                    genai_runs.append(figures["onnxruntime-genai"])
                if "inferd" in figures:
                    inferd_runs.append(figures["inferd"])
                notes += n
                orders.append(order)
                print(f"round {i + 1}: {json.dumps(figures)}", file=sys.stderr, flush=True)
        except Exception:
            for log in sorted(Path(logdir).glob("*.log")):
                print(f"--- tail of {log.name} ---\n" + log.read_text(errors="replace")[-3000:],
                      file=sys.stderr)
            raise
    count = args.prompt_tokens
    llama_cmd, inferd_cmd, genai_cmd = cmds.get("llama.cpp"), cmds.get("inferd"), cmds.get("onnxruntime-genai")
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    md = onnx_table(llama_runs, genai_runs, inferd_runs) if genai_runs else table(llama_runs, inferd_runs)
    title = (f"{Path(args.onnx_model).name}: inferd onnx vs onnxruntime-genai"
             + (f" and llama.cpp ({Path(args.model).name})" if llama_runs else "")
             if genai_runs else f"{Path(args.model).name}: {'inferd vs llama.cpp' if inferd_runs else 'llama.cpp peer baseline'}")
    head = (f"### {title}\n\n"
            f"- date: {when}; machine: {machine()}; inferd commit: {git_commit()}\n"
            f"- threads {args.threads}; prompt {count} tokens (prefill), {args.new_tokens} new "
            f"tokens, greedy, ignore_eos; {len(genai_runs or llama_runs)} rounds, each metric taken from every "
            f"engine back to back (order per round: {'; '.join(orders)}), "
            f"median of {args.repeats} single-stream runs per metric, alternating engines; "
            f"1-min load average {load_before} before, {loadavg()} after\n"
            + (f"- llama.cpp: `{llama_cmd}`\n" if llama_cmd else "")
            + (f"- inferd: `{inferd_cmd}`" if inferd_cmd else "")
            + (f"\n- onnxruntime-genai: `{genai_cmd}` (4/8 streams = static batches)" if genai_cmd else ""))
    if notes:
        head += "\n- notes: " + "; ".join(sorted(set(notes)))
    print(head + "\n\n" + md)
    if args.write_docs:
        doc = ROOT / "docs" / "benchmarks.md"
        doc.parent.mkdir(exist_ok=True)
        prev = doc.read_text() if doc.exists() else "# Benchmarks\n"
        doc.write_text(prev.rstrip("\n") + "\n\n" + head + "\n\n" + md + "\n")
        print(f"appended to {doc}")


if __name__ == "__main__":
    main()
