"""Streaming request helpers for bench.py: one timed SSE request, and N of them concurrently.

Why: every benchmark figure (prefill, TTFT, decode rate, concurrent throughput) is derived from
the arrival times of streamed chunks plus the server-reported token usage, the same way for
llama-server and inferd.
"""
import json
import threading
import time
import urllib.request


class StreamResult:
    """Timings of one streamed completion (seconds since the request was sent)."""

    def __init__(self):
        self.t_first = None
        self.t_last = None
        self.t_done = None
        self.chunk_times = []
        self.prompt_tokens = None
        self.completion_tokens = None
        self.text = ""
        self.error = None


def stream(url, body, timeout):
    """POSTs a streaming request and records chunk arrival times and final usage."""
    res = StreamResult()
    data = json.dumps({**body, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    deadline = t0 + timeout
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            for raw in resp:
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"request exceeded {timeout}s")
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                chunk = json.loads(payload)
                now = time.perf_counter() - t0
                if chunk.get("usage"):
                    res.prompt_tokens = chunk["usage"].get("prompt_tokens")
                    res.completion_tokens = chunk["usage"].get("completion_tokens")
                for choice in chunk.get("choices") or []:
                    piece = choice.get("text")
                    if piece is None:
                        piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        res.text += piece
                        res.chunk_times.append(now)
                        if res.t_first is None:
                            res.t_first = now
                        res.t_last = now
    except Exception as e:  # noqa: BLE001 - reported in the table, never swallowed silently
        res.error = f"{type(e).__name__}: {e}"
    res.t_done = time.perf_counter() - t0
    return res


def concurrent(url, body, n, timeout, stagger=0.0):
    """Runs n streams at once (body: one dict for all, or a list of n), the i-th starting
    i * stagger seconds after the first; returns (results, wall seconds)."""
    bodies = body if isinstance(body, list) else [body] * n
    results = [None] * n
    barrier = threading.Barrier(n)

    def worker(i):
        barrier.wait()
        time.sleep(i * stagger)
        results[i] = stream(url, bodies[i], timeout)
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 10)
    return results, time.perf_counter() - t0
