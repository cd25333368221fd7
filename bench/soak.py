#!/usr/bin/env python3
"""Soak test (issue 19 item 1): many clients for a long time against one inferd server, checking
every answer, then the server's gauges, memory and log.

    python3 bench/soak.py [--inferd target/checked/inferd] [--clients 16] [--duration 1800]

Starts inferd on SmolLM2-135M-Instruct with the two test LoRA adapters (`qv`, `all` from
`scripts/make_test_adapters.py`), then:

1. **Solo answers.** Builds a fixed catalogue of deterministic requests (chat and completions,
   base model and adapters, `n` 1-3, stop strings or none, some with penalties; most greedy,
   some sampled with a `seed`) and sends each alone, non-streaming, storing its choices.
2. **Load.** `--clients` threads, each sending one request after another until `--duration`
   seconds have passed. Each request is: malformed (5%: bad JSON, out-of-range parameters,
   unknown model, wrong types; it must get a 4xx with an OpenAI-shaped error), a stream the
   client hangs up on after a random number of events (20%), or a normal request (streaming or
   not, half each) from the catalogue (85%) or sampled without a seed (15%). Every completed
   response is checked for shape (ids, objects, one finish_reason per choice, usage sums, SSE
   ending in `[DONE]`, no error events); a catalogue response must equal its solo answer exactly
   (each choice's text and finish_reason, and the completion token count).
3. **After the load.** The running and waiting gauges (`vllm:num_requests_running/waiting`)
   must reach 0 within 1 s; the server's resident memory at the end must be within 5% of its
   value after the first minute of load (see below); no response may be a 5xx
   (also read from the server's own `inferd_http_requests_total`); the server log must not
   contain "panicked".

Memory is compared at rest: live, VmRSS swings by about +-10% with the number and length of
the sequences running at that instant (a 30-minute run measured 760-988 MiB with no trend), so
two single samples under load say little about a leak. After `--rss-baseline` seconds of load
the clients pause: once the server has no request running or waiting, and its memory trim
(every 5 s, `src/memory.rs`) has run, VmRSS is read three times a second apart and the median is
the baseline; then the load resumes. After the load the same reading is the end value. What a
leak leaves behind stays resident at rest; what live sequences hold does not. The prefix cache's
bytes (`inferd_prefix_cache_bytes`) are read at the same moments and reported beside VmRSS, not
subtracted: they count what the cache was charged, not pages resident (a 30-minute run saw the
cache +15 MiB while VmRSS at rest went -6 MiB). VmRSS is also sampled every `--rss-every` seconds
throughout and reported (window medians, slope).

Prints each criterion with its figure and exits 1 if any fails. Standard library only.
"""
import argparse
import http.client
import json
import os
import random
import re
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import Server, ServerError  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BASE = "smollm2"
ADAPTERS = ("qv", "all")

LONG = ("The library opens at nine in the morning and closes at six in the evening on weekdays. "
        "On Saturdays it opens at ten and closes at four, and on Sundays it stays closed. Books "
        "may be borrowed for three weeks and renewed twice unless another reader has reserved "
        "them. The reading room on the first floor is quiet, and the children's corner next to "
        "the entrance has picture books, puzzles and a small stage for story time. ") * 4

PROMPTS = [
    "What is the capital of France?",
    "Once upon a time, in a small village by the sea,",
    "Write a short poem about the autumn wind and the falling leaves, in four lines.",
    "The three primary colors are",
    "Explain in simple words why the sky is blue during the day and red at sunset.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Give me three tips for learning a new language.",
    "Photosynthesis is the process by which plants",
    LONG + "\nSummarise the text above in one sentence.",
    "List five animals that live in the ocean:",
]
STOPS = [None, None, ["."], ["\n"], [" the"], [",", "!"], ["\n\n", "."], ["ing"], ["1", "2"]]
MAX_TOKENS = [16, 24, 32, 48, 64]
FINISH = {"stop", "length"}


# ---------------------------------------------------------------- requests


def make_body(rng, kind):
    """A random valid request: (path, body). kind: 'greedy', 'seeded' or 'sampled'."""
    chat = rng.random() < 0.6
    prompt = rng.choice(PROMPTS)
    body = {"model": rng.choice((BASE, BASE) + ADAPTERS), "max_tokens": rng.choice(MAX_TOKENS),
            "n": rng.choice((1, 1, 2, 3))}
    if chat:
        msgs = [{"role": "user", "content": prompt}]
        if rng.random() < 0.25:
            msgs.insert(0, {"role": "system", "content": "You are a concise assistant."})
        body["messages"] = msgs
    else:
        body["prompt"] = prompt
    stop = rng.choice(STOPS)
    if stop:
        body["stop"] = stop
    if rng.random() < 0.2:
        body[rng.choice(("repetition_penalty", "presence_penalty", "frequency_penalty"))] = \
            rng.choice((0.5, 1.2))
    if kind == "greedy":
        body["temperature"] = 0
    else:
        body["temperature"] = rng.choice((0.7, 1.0))
        body["top_p"] = rng.choice((0.9, 1.0))
        if kind == "seeded":
            body["seed"] = rng.randrange(1 << 32)
    return ("/v1/chat/completions" if chat else "/v1/completions"), body


def catalogue(seed, n_greedy, n_seeded):
    """The fixed deterministic requests, distinct by (path, body)."""
    rng = random.Random(seed)
    seen, out = set(), []
    for kind, count in (("greedy", n_greedy), ("seeded", n_seeded)):
        made = 0
        while made < count:
            path, body = make_body(rng, kind)
            key = path + json.dumps(body, sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            out.append({"kind": kind, "path": path, "body": body, "solo": None})
            made += 1
    return out


def malformed(rng):
    """A bad request: (label, path, raw body bytes, extra check or None)."""
    path = rng.choice(("/v1/chat/completions", "/v1/completions"))
    chat = path.endswith("chat/completions")
    good = ({"model": BASE, "messages": [{"role": "user", "content": "Hi"}]} if chat
            else {"model": BASE, "prompt": "Hi"})
    cases = [
        ("truncated JSON", json.dumps(good)[:-3].encode(), None),
        ("not JSON", b"hello, server", None),
        ("JSON array", b"[1, 2, 3]", None),
        ("unknown model", json.dumps({**good, "model": "no-such-model"}).encode(), "model_not_found"),
        ("n=0", json.dumps({**good, "n": 0}).encode(), None),
        ("n=17", json.dumps({**good, "n": 17}).encode(), None),
        ("temperature=2.5", json.dumps({**good, "temperature": 2.5}).encode(), None),
        ("temperature=-1", json.dumps({**good, "temperature": -1}).encode(), None),
        ("max_tokens=0", json.dumps({**good, "max_tokens": 0}).encode(), None),
        ("max_tokens=-5", json.dumps({**good, "max_tokens": -5}).encode(), None),
        ("top_p=1.5", json.dumps({**good, "top_p": 1.5}).encode(), None),
        ("5 stop strings", json.dumps({**good, "stop": list("abcde")}).encode(), None),
        ("logit_bias=500", json.dumps({**good, "logit_bias": {"42": 500}}).encode(), None),
        ("max_tokens over context", json.dumps({**good, "max_tokens": 1_000_000}).encode(), None),
        ("stream + bad temperature", json.dumps({**good, "stream": True, "temperature": 9}).encode(), None),
        ("n as string", json.dumps({**good, "n": "two"}).encode(), None),
    ]
    if chat:
        cases += [
            ("messages as string", json.dumps({**good, "messages": "Hi"}).encode(), None),
            ("unknown role", json.dumps({**good, "messages": [{"role": "wizard", "content": "Hi"}]}).encode(), None),
            ("no messages", json.dumps({"model": BASE}).encode(), None),
            ("top_logprobs=50", json.dumps({**good, "logprobs": True, "top_logprobs": 50}).encode(), None),
        ]
    else:
        cases += [
            ("no prompt", json.dumps({"model": BASE}).encode(), None),
            ("prompt as object", json.dumps({**good, "prompt": {"a": 1}}).encode(), None),
            ("logprobs=9", json.dumps({**good, "logprobs": 9}).encode(), None),
        ]
    label, raw, code = rng.choice(cases)
    return label, path, raw, code


# ---------------------------------------------------------------- checks


def check_error_body(raw, code=None):
    """Problems with an OpenAI-shaped error body."""
    try:
        v = json.loads(raw)
    except ValueError:
        return [f"error body is not JSON: {raw[:200]!r}"]
    err = v.get("error") if isinstance(v, dict) else None
    if not isinstance(err, dict):
        return [f"no error object: {raw[:200]!r}"]
    probs = []
    if not isinstance(err.get("message"), str) or not err["message"]:
        probs.append("error.message missing")
    if not isinstance(err.get("type"), str):
        probs.append("error.type missing")
    for k in ("param", "code"):
        if k not in err:
            probs.append(f"error.{k} missing")
    if code and err.get("code") != code:
        probs.append(f"error.code {err.get('code')!r}, expected {code!r}")
    return probs


def check_usage(u, n, max_tokens):
    if not isinstance(u, dict):
        return [f"usage missing: {u!r}"]
    p, c, t = u.get("prompt_tokens"), u.get("completion_tokens"), u.get("total_tokens")
    if not all(isinstance(x, int) for x in (p, c, t)):
        return [f"usage not integers: {u}"]
    probs = []
    if p <= 0 or c < 0 or t != p + c:
        probs.append(f"usage does not add up: {u}")
    if c > n * max_tokens:
        probs.append(f"completion_tokens {c} > n*max_tokens {n * max_tokens}")
    return probs


def check_full(path, body, v):
    """Shape of a non-streaming completion; returns (problems, answer)."""
    chat = path.endswith("chat/completions")
    n, probs = body.get("n", 1), []
    if not isinstance(v, dict):
        return [f"not an object: {v!r}"[:200]], None
    if not isinstance(v.get("id"), str) or not v["id"]:
        probs.append("id missing")
    if v.get("object") != ("chat.completion" if chat else "text_completion"):
        probs.append(f"object {v.get('object')!r}")
    if v.get("model") != body["model"]:
        probs.append(f"model {v.get('model')!r}")
    if not isinstance(v.get("created"), int):
        probs.append("created missing")
    choices = v.get("choices")
    if not isinstance(choices, list) or len(choices) != n:
        return probs + [f"{len(choices) if isinstance(choices, list) else choices!r} choices, expected {n}"], None
    texts, finishes = [], []
    for i, ch in enumerate(choices):
        if ch.get("index") != i:
            probs.append(f"choice {i} has index {ch.get('index')!r}")
        if chat:
            msg = ch.get("message") or {}
            if msg.get("role") != "assistant":
                probs.append(f"choice {i} role {msg.get('role')!r}")
            text = msg.get("content")
        else:
            text = ch.get("text")
        if not isinstance(text, str):
            probs.append(f"choice {i} has no text")
        if ch.get("finish_reason") not in FINISH:
            probs.append(f"choice {i} finish_reason {ch.get('finish_reason')!r}")
        texts.append(text)
        finishes.append(ch.get("finish_reason"))
    usage = v.get("usage")
    probs += check_usage(usage, n, body["max_tokens"])
    ctok = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return probs, {"texts": texts, "finish": finishes, "completion_tokens": ctok}


class StreamCheck:
    """Incremental checks of one SSE stream's events."""

    def __init__(self, path, body):
        self.chat = path.endswith("chat/completions")
        self.body, self.n = body, body.get("n", 1)
        self.id = None
        self.texts = [""] * self.n
        self.finish = [None] * self.n
        self.usage = None
        self.events = 0
        self.done = False
        self.probs = []

    def line(self, line):
        if not line or line.startswith(":"):
            return
        if not line.startswith("data:"):
            self.probs.append(f"unexpected SSE line {line[:100]!r}")
            return
        payload = line[5:].strip()
        if self.done:
            self.probs.append(f"data after [DONE]: {payload[:100]!r}")
            return
        if payload == "[DONE]":
            self.done = True
            return
        self.events += 1
        try:
            ev = json.loads(payload)
        except ValueError:
            self.probs.append(f"event is not JSON: {payload[:100]!r}")
            return
        if "error" in ev:
            self.probs.append(f"error event: {payload[:300]}")
            return
        if self.usage is not None:
            self.probs.append("event after the usage chunk")
        self.id = self.id or ev.get("id")
        if ev.get("id") != self.id or not self.id:
            self.probs.append(f"id changes: {ev.get('id')!r} vs {self.id!r}")
        if ev.get("object") != ("chat.completion.chunk" if self.chat else "text_completion"):
            self.probs.append(f"object {ev.get('object')!r}")
        if ev.get("model") != self.body["model"]:
            self.probs.append(f"model {ev.get('model')!r}")
        if ev.get("usage"):
            self.usage = ev["usage"]
            if ev.get("choices"):
                self.probs.append("usage chunk with choices")
        for ch in ev.get("choices") or []:
            i = ch.get("index")
            if not isinstance(i, int) or not 0 <= i < self.n:
                self.probs.append(f"choice index {i!r}")
                continue
            piece = (ch.get("delta") or {}).get("content") if self.chat else ch.get("text")
            if piece is not None and not isinstance(piece, str):
                self.probs.append(f"content not a string: {piece!r}")
                piece = None
            if self.finish[i] is not None and (piece or ch.get("finish_reason")):
                self.probs.append(f"choice {i} continues after its finish_reason")
            if piece:
                self.texts[i] += piece
            fr = ch.get("finish_reason")
            if fr is not None:
                if fr not in FINISH:
                    self.probs.append(f"choice {i} finish_reason {fr!r}")
                self.finish[i] = fr

    def end(self):
        """Checks of a stream read to its end; returns (problems, answer)."""
        probs = list(self.probs)
        if not self.done:
            probs.append("stream ended without [DONE]")
        for i, fr in enumerate(self.finish):
            if fr is None:
                probs.append(f"choice {i} has no finish_reason")
        probs += check_usage(self.usage, self.n, self.body["max_tokens"])
        ctok = self.usage.get("completion_tokens") if isinstance(self.usage, dict) else None
        return probs, {"texts": self.texts, "finish": self.finish, "completion_tokens": ctok}


def differs(solo, got):
    """How a response differs from its solo answer ('' if equal)."""
    for k in ("texts", "finish", "completion_tokens"):
        if solo[k] != got[k]:
            return f"{k}: solo {solo[k]!r} vs load {got[k]!r}"
    return ""


# ---------------------------------------------------------------- client side


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.c = {}
        self.failures = []  # (criterion, message)
        self.statuses = {}
        self.malformed_labels = {}

    def add(self, key, k=1):
        with self.lock:
            self.c[key] = self.c.get(key, 0) + k

    def fail(self, crit, msg):
        with self.lock:
            self.failures.append((crit, msg))
            if len([f for f in self.failures if f[0] == crit]) <= 5:
                print(f"  FAIL [{crit}] {msg}", flush=True)

    def status(self, s):
        self.add(f"status_{s}")
        with self.lock:
            self.statuses[s] = self.statuses.get(s, 0) + 1


def connect(port, timeout):
    return http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)


def post(port, path, raw, timeout):
    conn = connect(port, timeout)
    conn.request("POST", path, body=raw, headers={"Content-Type": "application/json"})
    return conn, conn.getresponse()


def full_request(port, path, body, timeout):
    """A non-streaming request: (status, parsed JSON or raw bytes)."""
    conn, resp = post(port, path, json.dumps(body).encode(), timeout)
    try:
        raw = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(raw)
    except ValueError:
        return resp.status, raw


def stream_request(port, path, body, timeout, hang_after=None):
    """A streaming request. Returns (status, StreamCheck or error bytes, hung_up)."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    conn, resp = post(port, path, json.dumps(body).encode(), timeout)
    try:
        if resp.status != 200:
            return resp.status, resp.read(), False
        sc = StreamCheck(path, body)
        ctype = resp.getheader("Content-Type", "")
        if not ctype.startswith("text/event-stream"):
            sc.probs.append(f"Content-Type {ctype!r}")
        if hang_after == 0:
            return 200, sc, True
        for raw in resp:
            sc.line(raw.decode("utf-8", "replace").rstrip("\r\n"))
            if hang_after is not None and sc.events >= hang_after and not sc.done:
                return 200, sc, True  # the finally closes the socket mid-stream
        return 200, sc, False
    finally:
        conn.close()


def one_request(args, rng, cat, stats):
    """Sends one request of the mix and checks it."""
    r = rng.random()
    if r < args.malformed:
        label, path, raw, code = malformed(rng)
        stats.add("malformed_sent")
        with stats.lock:
            stats.malformed_labels[label] = stats.malformed_labels.get(label, 0) + 1
        conn, resp = post(args.port, path, raw, args.timeout)
        try:
            data = resp.read()
        finally:
            conn.close()
        stats.status(resp.status)
        if resp.status >= 500:
            stats.fail("no 5xx", f"malformed ({label}) got {resp.status}: {data[:200]!r}")
        elif not 400 <= resp.status < 500:
            stats.fail("malformed -> 4xx OpenAI error", f"{label}: status {resp.status}: {data[:200]!r}")
        else:
            probs = check_error_body(data, code)
            if probs:
                stats.fail("malformed -> 4xx OpenAI error", f"{label}: {probs}")
            else:
                stats.add("malformed_ok")
        return

    hang = r < args.malformed + args.hangup
    if rng.random() < args.sampled and not hang:
        entry = None
        path, body = make_body(rng, "sampled")
    else:
        entry = rng.choice(cat)
        path, body = entry["path"], entry["body"]
    streaming = hang or rng.random() < 0.5
    kind = entry["kind"] if entry else "sampled"
    if hang:
        # A random point: from right after the headers to near the end of the answer.
        hang_after = rng.randint(0, body["n"] * (body["max_tokens"] + 2))
        stats.add("hangup_attempts")
        status, sc, hung = stream_request(args.port, path, body, args.timeout, hang_after)
        stats.status(status)
        if status >= 500:
            stats.fail("no 5xx", f"stream got {status}: {sc[:200]!r}")
            return
        if status != 200:
            stats.fail("valid requests answered", f"stream got {status}: {sc[:200]!r}")
            return
        if hung:
            stats.add("disconnects")
            stats.add("disconnect_events", sc.events)
            if sc.probs:
                stats.fail("responses well-formed", f"before hang-up: {sc.probs[:3]}")
            return
        # The answer ended before the chosen point: a completed stream like any other.
        probs, ans = sc.end()
    elif streaming:
        status, sc, _ = stream_request(args.port, path, body, args.timeout)
        stats.status(status)
        if status != 200:
            crit = "no 5xx" if status >= 500 else "valid requests answered"
            stats.fail(crit, f"{kind} stream got {status}: {sc[:200]!r}")
            return
        probs, ans = sc.end()
    else:
        status, v = full_request(args.port, path, body, args.timeout)
        stats.status(status)
        if status != 200:
            crit = "no 5xx" if status >= 500 else "valid requests answered"
            stats.fail(crit, f"{kind} got {status}: {str(v)[:200]}")
            return
        probs, ans = check_full(path, body, v)
    stats.add("completed")
    stats.add(f"completed_{'stream' if streaming else 'full'}")
    stats.add(f"completed_{kind}")
    if ans and isinstance(ans.get("completion_tokens"), int):
        stats.add("tokens", ans["completion_tokens"])
    if probs:
        stats.add("malformed_responses")
        stats.fail("responses well-formed", f"{kind} {'stream' if streaming else 'full'} {path} "
                   f"{json.dumps(body)[:200]}: {probs[:3]}")
        return
    if entry is not None:
        stats.add(f"compared_{kind}")
        d = differs(entry["solo"], ans)
        if d:
            stats.add(f"mismatch_{kind}")
            crit = "greedy = solo" if kind == "greedy" else "seeded = solo"
            stats.fail(crit, f"{'stream' if streaming else 'full'} {path} {json.dumps(body)[:300]}: {d}")


def client(args, idx, cat, stats, deadline, gate):
    rng = random.Random(args.seed * 1000 + idx)
    time.sleep(rng.random() * 0.5)
    while time.time() < deadline:
        gate.wait()  # cleared while memory is read at rest
        if time.time() >= deadline:
            break
        stats.add("in_flight")
        try:
            one_request(args, rng, cat, stats)
        except (OSError, http.client.HTTPException) as e:
            stats.add("transport_errors")
            stats.fail("valid requests answered", f"client {idx}: {type(e).__name__}: {e}")
            time.sleep(0.5)
        finally:
            stats.add("in_flight", -1)
        stats.add("requests")


def rss_at_rest(port, pid, settle, stats=None):
    """VmRSS (KiB) once no client request is open and the server runs nothing: the median of three
    readings a second apart, after `settle` seconds (longer than the server's 5 s memory trim)."""
    t0 = time.time()
    while True:
        m = metrics(port)
        idle = (metric_sum(m, "vllm:num_requests_running"), metric_sum(m, "vllm:num_requests_waiting")) == (0, 0)
        if idle and (stats is None or stats.c.get("in_flight", 0) == 0):
            break
        if time.time() - t0 > 600:
            raise ServerError("the server did not go idle within 600 s")
        time.sleep(0.1)
    time.sleep(settle)
    reads = []
    for _ in range(3):
        reads.append((rss_kib(pid), metric_sum(metrics(port), "inferd_prefix_cache_bytes") / 1024))
        time.sleep(1.0)
    rss, cache = sorted(reads)[1]
    return {"rss_kib": rss, "prefix_cache_kib": cache, "seconds": round(time.time() - t0, 1)}


# ---------------------------------------------------------------- server side


def metrics(port):
    """Prometheus text of /metrics as {name{labels}: value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.rpartition(" ")
            try:
                out[k] = float(v)
            except ValueError:
                pass
    return out


def metric_sum(m, name, **labels):
    total = 0.0
    for k, v in m.items():
        base, _, rest = k.partition("{")
        if base != name:
            continue
        if all(f'{lk}="{lv}"' in rest for lk, lv in labels.items()):
            total += v
    return total


def http_5xx(m):
    return sum(v for k, v in m.items()
               if k.startswith("inferd_http_requests_total") and re.search(r'status="5\d\d"', k))


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def write_config(path, args):
    adapters = Path(args.adapters)
    lines = ["[server]", 'host = "127.0.0.1"', f"port = {args.port}",
             f"threads = {args.threads}", "",
             "[[models]]", f'id = "{BASE}"', f"source = {json.dumps(str(Path(args.model).resolve()))}",
             f"max_batch = {args.max_batch}"]
    if args.prefix_cache_mb is not None:
        lines.append(f"prefix_cache_mb = {args.prefix_cache_mb}")
    for name in ADAPTERS:
        lines += ["", "[[adapters]]", f'name = "{name}"',
                  f"path = {json.dumps(str((adapters / name).resolve()))}", f'base = "{BASE}"']
    Path(path).write_text("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inferd", default=str(REPO / "target/checked/inferd"))
    ap.add_argument("--model", default=str(REPO / "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--adapters", default=str(REPO / "tests/fixtures/generated/smollm2-lora"),
                    help="directory with the PEFT adapters qv/ and all/")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=1800.0, help="seconds of load")
    ap.add_argument("--port", type=int, default=18190)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--prefix-cache-mb", type=int, default=None, help="default: the server's own")
    ap.add_argument("--greedy", type=int, default=40, help="greedy requests in the catalogue")
    ap.add_argument("--seeded", type=int, default=8, help="seeded sampled requests in the catalogue")
    ap.add_argument("--malformed", type=float, default=0.05, help="share of malformed requests")
    ap.add_argument("--hangup", type=float, default=0.20, help="share of streams hung up on")
    ap.add_argument("--sampled", type=float, default=0.15,
                    help="share of the other requests sampled without a seed (unchecked text)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    ap.add_argument("--rss-every", type=float, default=10.0)
    ap.add_argument("--rss-baseline", type=float, default=60.0,
                    help="seconds into the load when the clients pause and memory is read at rest")
    ap.add_argument("--rss-settle", type=float, default=7.0,
                    help="seconds at rest before reading memory (the server trims every 5 s)")
    ap.add_argument("--rss-tolerance", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=None, help="directory for the server log, config and summary")
    args = ap.parse_args()

    out = Path(args.out or f"/tmp/inferd-soak-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    for name in ADAPTERS:
        if not (Path(args.adapters) / name / "adapter_model.safetensors").is_file():
            sys.exit(f"{args.adapters}/{name} is missing: run `.venv/bin/python scripts/make_test_adapters.py`")
    cfg = out / "soak.toml"
    write_config(cfg, args)
    log = out / "server.log"
    print(f"soak: {args.clients} clients, {args.duration:.0f} s, server {args.inferd}, "
          f"output in {out}", flush=True)

    srv = Server("inferd", [args.inferd, "serve", "--config", str(cfg)], args.port, str(log),
                 ready_path="/ready")
    stats = Stats()
    summary = {"args": vars(args)}
    try:
        srv.start(timeout=300)
        pid = srv.proc.pid
        with urllib.request.urlopen(f"http://127.0.0.1:{args.port}/v1/models", timeout=10) as r:
            ids = sorted(m["id"] for m in json.load(r)["data"])
        if ids != sorted((BASE,) + ADAPTERS):
            raise ServerError(f"models served: {ids}")

        # 1. Solo answers.
        cat = catalogue(args.seed, args.greedy, args.seeded)
        t0 = time.time()
        for e in cat:
            status, v = full_request(args.port, e["path"], e["body"], args.timeout)
            if status != 200:
                raise ServerError(f"solo {e['path']} {e['body']}: {status} {str(v)[:300]}")
            probs, ans = check_full(e["path"], e["body"], v)
            if probs:
                raise ServerError(f"solo {e['path']} {e['body']}: {probs}")
            if e["kind"] == "greedy" and len(set(ans["texts"])) > 1:
                print(f"  note: greedy n={e['body']['n']} choices differ: {ans['texts']}", flush=True)
            e["solo"] = ans
        n_stop = sum(f == "stop" for e in cat for f in e["solo"]["finish"])
        n_ch = sum(len(e["solo"]["finish"]) for e in cat)
        print(f"solo answers: {len(cat)} requests ({args.greedy} greedy, {args.seeded} seeded) in "
              f"{time.time() - t0:.1f} s; {n_stop} of {n_ch} choices end by a stop string or EOS",
              flush=True)
        (out / "solo.json").write_text(json.dumps(cat, indent=1))

        # 2. Load, with RSS sampled from its start.
        m0 = metrics(args.port)
        rss = []  # (seconds into the load, KiB)
        stop_sampling = threading.Event()
        gate = threading.Event()
        gate.set()
        rest = {}  # "baseline" / "end": (KiB, seconds it took to go idle and read)
        t_load = time.time()
        deadline = t_load + args.duration

        def baseline():
            if stop_sampling.wait(args.rss_baseline):
                return
            gate.clear()
            t_pause = time.time()
            try:
                rest["baseline"] = rss_at_rest(args.port, pid, args.rss_settle, stats)
            finally:
                gate.set()
            b = rest["baseline"]
            print(f"[{t_pause - t_load:6.0f} s] memory at rest (baseline): VmRSS {b['rss_kib'] / 1024:.1f} MiB, "
                  f"prefix cache {b['prefix_cache_kib'] / 1024:.1f} MiB; load paused {time.time() - t_pause:.1f} s", flush=True)

        def sampler():
            k = 0
            while not stop_sampling.is_set():
                rss.append((round(time.time() - t_load, 1), rss_kib(pid)))
                k += 1
                stop_sampling.wait(max(0.0, t_load + k * args.rss_every - time.time()))

        def progress():
            while not stop_sampling.wait(60):
                c = dict(stats.c)
                try:
                    m = metrics(args.port)
                    gauges = (metric_sum(m, "vllm:num_requests_running"), metric_sum(m, "vllm:num_requests_waiting"))
                except OSError as e:
                    gauges = str(e)
                print(f"[{time.time() - t_load:6.0f} s] requests {c.get('requests', 0)}, completed "
                      f"{c.get('completed', 0)}, disconnects {c.get('disconnects', 0)}, malformed "
                      f"{c.get('malformed_sent', 0)}, tokens {c.get('tokens', 0)}, failures "
                      f"{len(stats.failures)}, RSS {rss[-1][1] / 1024:.1f} MiB, running/waiting {gauges}",
                      flush=True)

        threads = [threading.Thread(target=sampler, daemon=True), threading.Thread(target=progress, daemon=True),
                   threading.Thread(target=baseline, daemon=True)]
        threads += [threading.Thread(target=client, args=(args, i, cat, stats, deadline, gate), daemon=True)
                    for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads[3:]:
            t.join()
        t_end = time.time()
        print(f"load ended after {t_end - t_load:.0f} s (last requests finished "
              f"{t_end - deadline:.1f} s after the deadline)", flush=True)

        # 3. Gauges back to 0 within 1 s of the last response.
        polls = []
        while True:
            m = metrics(args.port)
            g = (metric_sum(m, "vllm:num_requests_running"), metric_sum(m, "vllm:num_requests_waiting"))
            polls.append((round(time.time() - t_end, 3), g))
            if g == (0, 0) or time.time() - t_end > 1.0:
                break
            time.sleep(0.05)
        gauges_ok = polls[-1][1] == (0, 0) and polls[-1][0] <= 1.0
        stop_sampling.set()
        threads[0].join()
        threads[2].join()
        rest["end"] = rss_at_rest(args.port, pid, args.rss_settle)
        rss.append((round(time.time() - t_load, 1), rss_kib(pid)))
        m1 = metrics(args.port)
    finally:
        srv.close()
    exit_code = srv.proc.returncode if srv.proc else None

    # Figures.
    c = stats.c
    log_text = log.read_text(errors="replace")
    panics = [line for line in log_text.splitlines() if "panicked" in line]
    in_load = [(t, v) for t, v in rss[:-1] if t <= args.duration + 0.5]
    base_rest, end_rest = rest.get("baseline"), rest["end"]
    drift = (end_rest["rss_kib"] - base_rest["rss_kib"]) / base_rest["rss_kib"] if base_rest else float("nan")
    # Under load, for the record: medians of five-minute windows from the baseline on, and the
    # least-squares slope.
    windows = []
    t = args.rss_baseline
    while t < args.duration:
        w = sorted(v for s_, v in in_load if t <= s_ < t + 300)
        if w:
            windows.append(w[len(w) // 2])
        t += 300
    pts = [(s_, v) for s_, v in in_load if s_ >= args.rss_baseline]
    slope = 0.0
    if len(pts) > 1:
        mt = sum(s_ for s_, _ in pts) / len(pts)
        mv = sum(v for _, v in pts) / len(pts)
        den = sum((s_ - mt) ** 2 for s_, _ in pts)
        slope = sum((s_ - mt) * (v - mv) for s_, v in pts) / den * 3600 / 1024 if den else 0.0
    gen_tokens = metric_sum(m1, "vllm:generation_tokens_total") - metric_sum(m0, "vllm:generation_tokens_total")
    server_5xx = http_5xx(m1)
    aborts = metric_sum(m1, "vllm:request_success_total", finished_reason="abort") - \
        metric_sum(m0, "vllm:request_success_total", finished_reason="abort")
    fails = {}
    for crit, _ in stats.failures:
        fails[crit] = fails.get(crit, 0) + 1

    print("\nRSS (s into the load: MiB):")
    print("  " + ", ".join(f"{t:.0f}: {v / 1024:.1f}" for t, v in rss))
    if in_load:
        print(f"RSS under load: {min(v for _, v in in_load) / 1024:.0f}-{max(v for _, v in in_load) / 1024:.0f} MiB; "
              f"five-minute medians from {args.rss_baseline:.0f} s: {', '.join(f'{v / 1024:.0f}' for v in windows)} MiB; "
              f"slope {slope:+.0f} MiB/h")
    print(f"\nrequests sent {c.get('requests', 0)} in {t_end - t_load:.0f} s: completed {c.get('completed', 0)} "
          f"({c.get('completed_stream', 0)} streams, {c.get('completed_full', 0)} non-streaming; "
          f"{c.get('completed_greedy', 0)} greedy, {c.get('completed_seeded', 0)} seeded, "
          f"{c.get('completed_sampled', 0)} sampled), disconnects {c.get('disconnects', 0)} "
          f"(of {c.get('hangup_attempts', 0)} streams picked to hang up; the others ended first), "
          f"malformed sent {c.get('malformed_sent', 0)}")
    print(f"tokens generated: {c.get('tokens', 0)} in completed responses (usage); server counted "
          f"{gen_tokens:.0f} (vllm:generation_tokens_total over the load, hung-up streams included); "
          f"aborted requests on the server {aborts:.0f}")
    print(f"HTTP statuses seen by clients: {dict(sorted(stats.statuses.items()))}")
    print(f"malformed kinds: {dict(sorted(stats.malformed_labels.items()))}")
    print(f"server exit code after SIGTERM: {exit_code}")

    crits = [
        ("responses well-formed", fails.get("responses well-formed", 0) == 0,
         f"{c.get('completed', 0) - c.get('malformed_responses', 0)} of {c.get('completed', 0)} completed responses well-formed"),
        ("valid requests answered", fails.get("valid requests answered", 0) == 0,
         f"{fails.get('valid requests answered', 0)} valid requests not answered with 200 "
         f"({c.get('transport_errors', 0)} transport errors or timeouts)"),
        ("greedy = solo", fails.get("greedy = solo", 0) == 0 and c.get("compared_greedy", 0) > 0,
         f"{c.get('compared_greedy', 0) - c.get('mismatch_greedy', 0)} of {c.get('compared_greedy', 0)} greedy responses equal their solo answer"),
        ("seeded = solo", fails.get("seeded = solo", 0) == 0,
         f"{c.get('compared_seeded', 0) - c.get('mismatch_seeded', 0)} of {c.get('compared_seeded', 0)} seeded sampled responses equal their solo answer"),
        ("malformed -> 4xx OpenAI error", fails.get("malformed -> 4xx OpenAI error", 0) == 0,
         f"{c.get('malformed_ok', 0)} of {c.get('malformed_sent', 0)} malformed requests got a 4xx with an OpenAI-shaped error"),
        ("gauges 0 within 1 s", gauges_ok,
         f"running/waiting {polls[0][1]} at {polls[0][0]} s after the last response, {polls[-1][1]} at {polls[-1][0]} s ({len(polls)} polls)"),
        ("RSS within 5%", base_rest is not None and abs(drift) <= args.rss_tolerance,
         (f"VmRSS at rest {base_rest['rss_kib'] / 1024:.1f} MiB after {args.rss_baseline:.0f} s of load -> "
          f"{end_rest['rss_kib'] / 1024:.1f} MiB after the load ({drift * 100:+.2f}%); prefix cache "
          f"{base_rest['prefix_cache_kib'] / 1024:.1f} -> {end_rest['prefix_cache_kib'] / 1024:.1f} MiB")
         if base_rest else "no baseline: the load ended first"),
        ("no 5xx", fails.get("no 5xx", 0) == 0 and server_5xx == 0,
         f"{sum(v for s, v in stats.statuses.items() if s >= 500)} seen by clients, {server_5xx:.0f} in the server's inferd_http_requests_total"),
        ("no panic in the log", not panics, f"{len(panics)} lines with 'panicked' in {log}"),
    ]
    print()
    for name, ok, fig in crits:
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {fig}")
    summary.update({
        "counts": c, "statuses": stats.statuses, "malformed_kinds": stats.malformed_labels,
        "rss_kib": rss, "rss_at_rest": rest, "rss_drift": drift, "rss_window_medians_kib": windows,
        "rss_slope_mib_per_h": slope,
        "gauge_polls": polls, "server_generation_tokens": gen_tokens, "server_aborts": aborts,
        "server_5xx": server_5xx, "panics": panics[:10], "failures": stats.failures[:200],
        "criteria": [{"name": n, "pass": ok, "figure": f} for n, ok, f in crits],
        "load_seconds": t_end - t_load,
    })
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    ok = all(ok for _, ok, _ in crits)
    print(f"\nsoak {'PASSED' if ok else 'FAILED'}; details in {out}/summary.json", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
