"""Every response body the server produces, validated against OpenAI's published OpenAPI schemas.

Raw HTTP (requests), so nothing is reshaped by an SDK on the way: each JSON body and each SSE
`data:` payload is checked against `#/components/schemas/...` of the pinned spec
(tests/fixtures/openai-openapi/, loaded by openai_schema.py). The asserts besides the schema
checks only make sure that a case produced what it is meant to cover (a usage chunk, logprobs,
n choices, a `stop` finish), never the shape itself: the shape is the schema's job.

Runs on both backends (the `tiny` fixture of conftest.py); 401, a small body limit and LoRA
adapters in `/v1/models` get servers of their own.
"""
import json
from pathlib import Path

import pytest
import requests

from conftest import ROOT, Server, _require
from openai_schema import spec

TIMEOUT = 120
IGNORE_EOS = {"ignore_eos": True}
CHAT = "CreateChatCompletionResponse"
CHUNK = "CreateChatCompletionStreamResponse"
TEXT = "CreateCompletionResponse"
TEXT_CHUNK = "text_completion.chunk"  # CreateCompletionResponse, finish_reason also null (README)
ERROR = "ErrorResponse"
TINY_QWEN2_DIR = ROOT / "tests/fixtures/generated/tiny-qwen2"
ADAPTER_A = ROOT / "tests/fixtures/lora/adapter-a"


# ---------------------------------------------------------------- helpers

def post(server, path, body, **kw):
    return requests.post(server.root_url + path, json=body, timeout=TIMEOUT, **kw)


def json_body(resp, status=200):
    assert resp.status_code == status, f"{resp.status_code}: {resp.text[:2000]}"
    assert resp.headers["content-type"].startswith("application/json"), resp.headers["content-type"]
    return resp.json()


def check(name, body, what=""):
    spec().validate(name, body, what)
    return body


def check_error(resp, status):
    body = json_body(resp, status)
    return check(ERROR, body, f"{status} error body")


def sse_payloads(resp):
    """The JSON `data:` payloads of an SSE response, up to `[DONE]` (which must come)."""
    assert resp.status_code == 200, f"{resp.status_code}: {resp.text[:2000]}"
    assert resp.headers["content-type"].startswith("text/event-stream"), resp.headers["content-type"]
    out = []
    for line in resp.iter_lines(decode_unicode=True):
        if not line or line.startswith(":"):
            continue
        assert line.startswith("data: "), line
        data = line[len("data: "):]
        if data == "[DONE]":
            return out
        out.append(json.loads(data))
    raise AssertionError(f"stream ended without [DONE] after {len(out)} payloads")


def stream(server, path, body):
    with requests.post(server.root_url + path, json={**body, "stream": True}, stream=True, timeout=TIMEOUT) as r:
        return sse_payloads(r)


def check_chunks(name, chunks, what):
    assert chunks, f"{what}: no chunks"
    for i, c in enumerate(chunks):
        assert "error" not in c, f"{what}: error event in the stream: {c}"
        check(name, c, f"{what} chunk {i}")
    return chunks


def chat_body(content="Hello", max_tokens=8, **kw):
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": max_tokens, **IGNORE_EOS, **kw}


def text_body(prompt="Once upon a time", max_tokens=8, **kw):
    return {"model": "tiny", "prompt": prompt, "temperature": 0, "max_tokens": max_tokens, **IGNORE_EOS, **kw}


# ---------------------------------------------------------------- the spec itself

def test_spec_pinned_and_validator_rejects():
    """The pinned document loads, and the validator does reject what the schemas forbid."""
    s = spec()
    assert s.version == "2.3.0"
    ok = {"error": {"message": "m", "type": "invalid_request_error", "param": None, "code": None}}
    assert s.errors(ERROR, ok) == []
    assert s.errors(ERROR, {"error": {"message": "m", "type": "t"}})  # param and code are required
    lp = {"token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": []}
    chunk = {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": None,
                          "logprobs": {"content": [lp], "refusal": None}}]}
    assert s.errors(CHUNK, chunk) == []  # finish_reason null: `nullable` read as 3.1 null
    del chunk["choices"][0]["logprobs"]["refusal"]
    assert s.errors(CHUNK, chunk)
    chunk["choices"][0]["logprobs"]["refusal"] = None
    chunk["choices"][0]["logprobs"]["content"][0]["logprob"] = "-0.5"  # through the $ref
    assert s.errors(CHUNK, chunk)


# ---------------------------------------------------------------- /v1/models

def test_models(tiny):
    listing = check("ListModelsResponse", json_body(requests.get(tiny.base_url + "/models", timeout=TIMEOUT)))
    assert [m["id"] for m in listing["data"]] == ["tiny"]
    for m in listing["data"]:
        check("Model", json_body(requests.get(f"{tiny.base_url}/models/{m['id']}", timeout=TIMEOUT)))
    check_error(requests.get(tiny.base_url + "/models/no-such-model", timeout=TIMEOUT), 404)


# ---------------------------------------------------------------- chat, whole objects

def test_chat_plain_and_length(tiny):
    r = check(CHAT, json_body(post(tiny, "/v1/chat/completions", chat_body(max_tokens=6))))
    assert r["choices"][0]["finish_reason"] == "length"
    r = check(CHAT, json_body(post(tiny, "/v1/chat/completions",
                                   {**chat_body(), "max_tokens": None, "max_completion_tokens": 3})))
    assert r["usage"]["completion_tokens"] == 3


def test_chat_logprobs(tiny):
    for top in (0, 3, 20):
        r = check(CHAT, json_body(post(tiny, "/v1/chat/completions",
                                       chat_body(max_tokens=5, logprobs=True, top_logprobs=top))),
                  f"top_logprobs={top}")
        content = r["choices"][0]["logprobs"]["content"]
        assert len(content) == 5 and all(len(t["top_logprobs"]) == top for t in content)
    r = check(CHAT, json_body(post(tiny, "/v1/chat/completions", chat_body(logprobs=False))))
    assert r["choices"][0]["logprobs"] is None


def test_chat_n(tiny):
    r = check(CHAT, json_body(post(tiny, "/v1/chat/completions",
                                   chat_body("Pick", n=3, temperature=1.0, seed=7, logprobs=True, top_logprobs=2))))
    assert len(r["choices"]) == 3


def test_chat_stop(tiny):
    full = json_body(post(tiny, "/v1/chat/completions", chat_body("Write code", max_tokens=32)))
    text = full["choices"][0]["message"]["content"]
    start = next(i for i in range(4, len(text) - 3) if all(ch.isascii() and ch.isalnum() for ch in text[i:i + 3]))
    r = check(CHAT, json_body(post(tiny, "/v1/chat/completions",
                                   chat_body("Write code", max_tokens=32, stop=[text[start:start + 3]]))))
    assert r["choices"][0]["finish_reason"] == "stop"
    stream_chunks = check_chunks(CHUNK, stream(tiny, "/v1/chat/completions",
                                               chat_body("Write code", max_tokens=32, stop=text[start:start + 3])),
                                 "stop stream")
    assert [c["choices"][0]["finish_reason"] for c in stream_chunks if c["choices"][0]["finish_reason"]] == ["stop"]


def test_chat_tools_passed_to_template(tiny):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                               "parameters": {"type": "object", "properties": {}}}}]
    check(CHAT, json_body(post(tiny, "/v1/chat/completions", chat_body(tools=tools, tool_choice="auto"))))


# ---------------------------------------------------------------- chat, streamed

@pytest.mark.parametrize("extra", [
    {},
    {"stream_options": {"include_usage": True}},
    {"stream_options": {"include_usage": False}},
    {"logprobs": True, "top_logprobs": 3},
    {"logprobs": True, "top_logprobs": 2, "n": 2, "seed": 3, "temperature": 1.0,
     "stream_options": {"include_usage": True}},
], ids=["plain", "usage", "no-usage", "logprobs", "n2-logprobs-usage"])
def test_chat_stream(tiny, extra):
    chunks = check_chunks(CHUNK, stream(tiny, "/v1/chat/completions", chat_body(max_tokens=6, **extra)), str(extra))
    assert len({c["id"] for c in chunks}) == 1
    if extra.get("stream_options", {}).get("include_usage"):
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6 * extra.get("n", 1)
    if extra.get("logprobs"):
        assert any(ch.get("logprobs") for c in chunks for ch in c["choices"])
    finished = sorted(ch["index"] for c in chunks for ch in c["choices"] if ch["finish_reason"])
    assert finished == list(range(extra.get("n", 1)))


# ---------------------------------------------------------------- text completions

@pytest.mark.parametrize("extra", [
    {},
    {"logprobs": 0},
    {"logprobs": 3},
    {"n": 2, "seed": 5, "temperature": 1.0, "logprobs": 2},
    {"prompt": [1, 2, 3, 4, 5]},
    {"prompt": ["One prompt in a list"]},
    {"best_of": 1, "suffix": ""},
], ids=["plain", "logprobs0", "logprobs3", "n2-logprobs", "token-ids", "prompt-list", "best_of-suffix"])
def test_completions(tiny, extra):
    r = check(TEXT, json_body(post(tiny, "/v1/completions", text_body(**extra))), str(extra))
    assert len(r["choices"]) == extra.get("n", 1)
    if "logprobs" in extra:
        assert r["choices"][0]["logprobs"]["tokens"]


def test_completions_stop(tiny):
    full = json_body(post(tiny, "/v1/completions", text_body(max_tokens=32)))["choices"][0]["text"]
    start = next(i for i in range(4, len(full) - 3) if all(ch.isascii() and ch.isalnum() for ch in full[i:i + 3]))
    r = check(TEXT, json_body(post(tiny, "/v1/completions", text_body(max_tokens=32, stop=full[start:start + 3]))))
    assert r["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("extra", [
    {},
    {"stream_options": {"include_usage": True}},
    {"logprobs": 3},
    {"n": 2, "seed": 5, "temperature": 1.0, "logprobs": 1, "stream_options": {"include_usage": True}},
], ids=["plain", "usage", "logprobs", "n2-logprobs-usage"])
def test_completions_stream(tiny, extra):
    chunks = check_chunks(TEXT_CHUNK, stream(tiny, "/v1/completions", text_body(max_tokens=6, **extra)), str(extra))
    if extra.get("stream_options", {}).get("include_usage"):
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6 * extra.get("n", 1)
    if "logprobs" in extra:
        assert any(ch.get("logprobs") for c in chunks for ch in c["choices"])
    # The final chunk of each choice is a whole CreateCompletionResponse, finish_reason and all.
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert sorted(c["choices"][0]["index"] for c in finals) == list(range(extra.get("n", 1)))
    for c in finals:
        check(TEXT, c, "final text chunk")


# ---------------------------------------------------------------- errors

def test_error_bodies(tiny):
    chat = "/v1/chat/completions"
    cases = [
        (chat, chat_body(temperature=3), 400),                                    # out of range
        (chat, chat_body(max_tokens="many"), 400),                                # wrong type
        (chat, {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400),  # unknown role
        (chat, {"model": "tiny"}, 400),                                           # missing messages
        (chat, {"messages": [{"role": "user", "content": "x"}]}, 400),            # missing model
        (chat, chat_body(top_logprobs=3), 400),                                   # top_logprobs without logprobs
        (chat, chat_body(stream_options={"include_usage": True}), 400),           # stream_options without stream
        (chat, chat_body(n=0), 400),
        (chat, chat_body(max_tokens=10 ** 9), 400),                               # over the context
        (chat, {**chat_body(), "model": "gpt-9"}, 404),                           # unknown model
        ("/v1/completions", text_body(echo=True), 400),                           # echo: not supported
        ("/v1/completions", text_body(logprobs=9), 400),
        ("/v1/completions", text_body(prompt=["a", "b"]), 400),                   # batched prompts
        ("/v1/completions", {**text_body(), "model": "gpt-9"}, 404),
        ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "y"}, None),   # run-time loading is off
        ("/v1/unload_lora_adapter", {"lora_name": "nope"}, None),
        ("/tokenize", {"model": "gpt-9", "prompt": "x"}, 404),
    ]
    for path, body, status in cases:
        r = post(tiny, path, body)
        assert r.status_code >= 400, f"{path} {body}: {r.status_code} {r.text[:300]}"
        if status is not None:
            assert r.status_code == status, f"{path} {body}: {r.status_code} {r.text[:300]}"
        check_error(r, r.status_code)
    # Bodies that are not JSON objects.
    for raw in (b"{not json", b"[1, 2]", b"", b"\xff\xfe"):
        r = requests.post(tiny.base_url + "/chat/completions", data=raw, timeout=TIMEOUT,
                          headers={"Content-Type": "application/json"})
        check_error(r, 400)
    # Routing: unknown path, wrong method.
    check_error(requests.get(tiny.root_url + "/v1/nothing-here", timeout=TIMEOUT), 404)
    check_error(requests.get(tiny.base_url + "/chat/completions", timeout=TIMEOUT), 405)
    # Over the default 4 MiB body limit: declared length, and chunked without one.
    big = {"model": "tiny", "messages": [{"role": "user", "content": "x" * (4 * 1024 * 1024 + 10)}]}
    check_error(post(tiny, "/v1/chat/completions", big), 413)
    data = json.dumps(big).encode()
    chunked = (data[i:i + 65536] for i in range(0, len(data), 65536))
    check_error(requests.post(tiny.base_url + "/chat/completions", data=chunked, timeout=TIMEOUT,
                              headers={"Content-Type": "application/json"}), 413)


@pytest.fixture(scope="module")
def locked():
    """A server with an API key and a small body limit (candle, tiny Llama)."""
    _require(ROOT / "tests/fixtures/generated/tiny-llama.f32.gguf", "tiny model")
    s = Server(ROOT / "tests/fixtures/generated/tiny-llama.f32.gguf", "tiny",
               config_text='[server]\napi_key = "sk-schema-test"\nmax_body_bytes = 2048\n')
    yield s
    s.stop()


def test_error_bodies_api_key_and_limit(locked):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sk-schema-test"}):
        check_error(post(locked, "/v1/chat/completions", chat_body(), headers=headers), 401)
        check_error(requests.get(locked.base_url + "/models", headers=headers, timeout=TIMEOUT), 401)
    auth = {"Authorization": "Bearer sk-schema-test"}
    check(CHAT, json_body(post(locked, "/v1/chat/completions", chat_body(max_tokens=2), headers=auth)))
    check("ListModelsResponse", json_body(requests.get(locked.base_url + "/models", headers=auth, timeout=TIMEOUT)))
    check_error(post(locked, "/v1/chat/completions", chat_body("x" * 4096), headers=auth), 413)


@pytest.fixture(scope="module")
def with_adapter():
    """Tiny Qwen2 (safetensors, candle) with a PEFT adapter served from start-up."""
    _require(TINY_QWEN2_DIR / "config.json", "tiny Qwen2 directory (run scripts/make_tiny_model.py)")
    _require(ADAPTER_A / "adapter_config.json", "LoRA fixture adapter-a")
    config = f'[server]\n\n[[adapters]]\nname = "pirate"\npath = "{ADAPTER_A}"\nbase = "tiny"\n'
    s = Server(TINY_QWEN2_DIR, "tiny", config_text=config)
    yield s
    s.stop()


def test_models_with_adapter(with_adapter):
    listing = check("ListModelsResponse", json_body(requests.get(with_adapter.base_url + "/models", timeout=TIMEOUT)))
    assert [m["id"] for m in listing["data"]] == ["tiny", "pirate"]
    check("Model", json_body(requests.get(with_adapter.base_url + "/models/pirate", timeout=TIMEOUT)))
    r = check(CHAT, json_body(post(with_adapter, "/v1/chat/completions", {**chat_body(), "model": "pirate"})))
    assert r["model"] == "pirate"
    check_chunks(CHUNK, stream(with_adapter, "/v1/chat/completions", {**chat_body(logprobs=True), "model": "pirate"}),
                 "adapter stream")


def test_smollm2_real_model(smollm2):
    """The real model: an end-of-sequence `stop`, multi-byte tokens in logprobs, both endpoints."""
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Say hello in French and Japanese."}],
            "temperature": 0, "max_tokens": 48, "logprobs": True, "top_logprobs": 5}
    r = check(CHAT, json_body(post(smollm2, "/v1/chat/completions", body)))
    assert r["choices"][0]["logprobs"]["content"]
    check_chunks(CHUNK, stream(smollm2, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}}),
                 "smollm2 chat stream")
    r = check(CHAT, json_body(post(smollm2, "/v1/chat/completions", {**body, "max_tokens": 200, "logprobs": False, "top_logprobs": None})))
    assert r["choices"][0]["finish_reason"] == "stop", "SmolLM2 ends this answer by itself"
    text = {"model": "smollm2", "prompt": "Bonjour, ça va? 日本語", "temperature": 0, "max_tokens": 16, "logprobs": 5}
    check(TEXT, json_body(post(smollm2, "/v1/completions", text)))
    check_chunks(TEXT_CHUNK, stream(smollm2, "/v1/completions", text), "smollm2 text stream")
