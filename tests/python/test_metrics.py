"""`GET /metrics` parses with Prometheus' own text parser (prometheus_client), and its counters,
gauges and latency histograms (inferd's names and vLLM's) move as requests flow."""
import time

import requests
from prometheus_client.parser import text_string_to_metric_families


def scrape(server):
    r = requests.get(server.root_url + "/metrics", timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m, name, **labels):
    return m[(name, tuple(sorted(labels.items())))]


def test_metrics_parse_and_move_as_requests_flow(tiny):
    mid = tiny.model_id
    before = scrape(tiny)
    c = tiny.client()
    for i in range(3):
        c.completions.create(model=mid, prompt=f"Counting {i}", max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    stream = c.chat.completions.create(model=mid, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       stream=True, extra_body={"ignore_eos": True})
    assert sum(1 for _ in stream) > 0
    after = scrape(tiny)
    grow = lambda name, **l: value(after, name, **l) - before.get((name, tuple(sorted(l.items()))), 0.0)
    assert grow("inferd_generation_tokens_total", model=mid) == 3 * 5 + 4
    assert grow("vllm:generation_tokens_total", model_name=mid) == 3 * 5 + 4
    assert grow("vllm:request_success_total", model_name=mid, finished_reason="length") == 4
    for h in ["vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds"]:
        assert grow(h + "_count", model_name=mid) == 4, h
        assert grow(h + "_bucket", model_name=mid, le="+Inf") == 4, h
        assert grow(h + "_sum", model_name=mid) > 0, h
    assert grow("vllm:time_per_output_token_seconds_count", model_name=mid) == 3 * 4 + 3
    # Buckets are cumulative and end at the count.
    buckets = sorted((float(dict(k[1])["le"]), v) for k, v in after.items()
                     if k[0] == "vllm:time_to_first_token_seconds_bucket" and dict(k[1])["model_name"] == mid)
    assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:]))
    # The gauges are republished by the worker a moment after the last event went out.
    deadline = time.time() + 2
    while True:
        now = scrape(tiny)
        idle = [value(now, g, model_name=mid) for g in ("vllm:num_requests_running", "vllm:num_requests_waiting")]
        if idle == [0, 0] or time.time() > deadline:
            break
        time.sleep(0.01)
    assert idle == [0, 0]


def test_http_responses_are_counted_by_route_and_status(tiny):
    mid = tiny.model_id
    before = scrape(tiny)
    c = tiny.client()
    c.chat.completions.create(model=mid, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    requests.post(tiny.root_url + "/v1/chat/completions", json={"model": mid}, timeout=10)  # 400: no messages
    requests.post(tiny.root_url + "/v1/chat/completions", json={"model": "nope", "messages": []}, timeout=10)  # 404
    requests.get(tiny.root_url + "/no/such/route", timeout=10)  # 404
    requests.get(tiny.root_url + f"/v1/models/{mid}", timeout=10)
    after = scrape(tiny)
    grow = lambda **l: value(after, "inferd_http_requests_total", **l) - before.get(("inferd_http_requests_total", tuple(sorted(l.items()))), 0.0)
    assert grow(route="/v1/chat/completions", status="200") == 1
    assert grow(route="/v1/chat/completions", status="400") == 1
    assert grow(route="/v1/chat/completions", status="404") == 1
    assert grow(route="other", status="404") == 1
    assert grow(route="/v1/models/{id}", status="200") == 1
    assert grow(route="/metrics", status="200") == 1  # the first scrape
