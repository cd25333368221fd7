"""The official OpenAI Python SDK against the real `inferd` binary (fixtures in conftest.py).

Tiny random model: exact shapes and invariants (stream == non-stream, seeds, stop, logprobs).
SmolLM2 (when present): a sensible answer.
"""
import concurrent.futures as cf
import math
import time

import openai
import pytest

IGNORE_EOS = {"ignore_eos": True}


def greedy_chat(client, content="Hello", max_tokens=16, **kw):
    return client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": content}], temperature=0,
        max_tokens=max_tokens, extra_body=IGNORE_EOS, **kw)


def test_models_list(client):
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert ids == ["tiny"]
    assert models.data[0].object == "model"
    assert client.models.retrieve("tiny").id == "tiny"


def test_chat_plain(client):
    r = greedy_chat(client, max_tokens=12)
    assert r.id.startswith("chatcmpl-")
    assert r.object == "chat.completion"
    assert r.model == "tiny"
    assert len(r.choices) == 1
    c = r.choices[0]
    assert c.message.role == "assistant"
    assert isinstance(c.message.content, str) and c.message.content
    assert c.finish_reason == "length"
    assert r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    assert r.usage.prompt_tokens > 0


def test_chat_stream_with_usage_equals_non_stream(client):
    whole = greedy_chat(client, "Tell me something", max_tokens=20)
    stream = greedy_chat(client, "Tell me something", max_tokens=20, stream=True,
                         stream_options={"include_usage": True})
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 20
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_plain_and_stream(client):
    kw = dict(model="tiny", prompt="Once upon a time", temperature=0, max_tokens=16, extra_body=IGNORE_EOS)
    r = client.completions.create(**kw)
    assert r.object == "text_completion"
    assert r.id.startswith("cmpl-")
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 16
    assert r.choices[0].text
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    # Token-id prompts are accepted too, with the prompt counted exactly.
    r2 = client.completions.create(model="tiny", prompt=[1, 2, 3, 4, 5], temperature=0, max_tokens=4,
                                   extra_body=IGNORE_EOS)
    assert r2.usage.prompt_tokens == 5


def test_stop(client):
    full = greedy_chat(client, "Write code", max_tokens=32).choices[0].message.content
    start = next(i for i in range(4, len(full) - 3) if all(ch.isascii() and ch.isalnum() for ch in full[i:i + 3]))
    stop = full[start:start + 3]
    r = greedy_chat(client, "Write code", max_tokens=32, stop=[stop])
    assert r.choices[0].message.content == full[:full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_max_tokens(client):
    for n in (1, 5):
        r = greedy_chat(client, max_tokens=n)
        assert r.usage.completion_tokens == n
        assert r.choices[0].finish_reason == "length"


def test_n2(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Pick"}], n=2,
                                       seed=11, temperature=1.0, max_tokens=16, extra_body=IGNORE_EOS)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].message.content != r.choices[1].message.content
    assert r.usage.completion_tokens == 32


def test_seed_determinism(client):
    def run(seed):
        return client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Random"}], seed=seed, temperature=1.0,
            max_tokens=24, extra_body=IGNORE_EOS).choices[0].message.content
    a, b, c = run(5), run(5), run(6)
    assert a == b
    assert a != c


def test_logprobs_top3(client):
    r = greedy_chat(client, "Logprobs", max_tokens=8, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 8
    for tok in content:
        assert tok.logprob <= 0 and math.isfinite(tok.logprob)
        assert len(tok.top_logprobs) == 3
        lps = [t.logprob for t in tok.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        assert all(lp <= 0 for lp in lps)
        # Greedy: the chosen token is the most likely one.
        assert tok.logprob == pytest.approx(lps[0], abs=1e-5)
        assert isinstance(tok.bytes, list)
    # Text completions: parallel arrays with `logprobs=3` alternatives.
    c = client.completions.create(model="tiny", prompt="Hi", temperature=0, max_tokens=6, logprobs=3,
                                  extra_body=IGNORE_EOS)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert all(x <= 0 for x in lp.token_logprobs)
    assert all(len(t) == 3 for t in lp.top_logprobs)  # partial-UTF-8 tokens are "bytes:\\xNN", no collisions
    assert lp.text_offset == sorted(lp.text_offset)


def test_errors_raise_sdk_exceptions(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], temperature=3)
    assert e.value.status_code == 400
    assert e.value.body["param"] == "temperature"
    assert "temperature" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "x"}])
    assert e.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 404
    assert e.value.code == "model_not_found"
    assert "gpt-9" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=0)


def test_16_concurrent_streams(client):
    def one(i):
        s = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"Stream {i}"}], temperature=0, max_tokens=24,
            stream=True, stream_options={"include_usage": True}, extra_body=IGNORE_EOS)
        chunks = list(s)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return text, chunks[-1].usage.completion_tokens
    with cf.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16), timeout=300))
    assert len(results) == 16
    for i, (text, n) in enumerate(results):
        assert n == 24
        assert text == greedy_chat(client, f"Stream {i}", max_tokens=24).choices[0].message.content


def test_client_closing_stream_midway(client):
    for _ in range(3):
        with client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "Long"}], max_tokens=1500, stream=True,
                extra_body=IGNORE_EOS) as s:
            for i, _chunk in enumerate(s):
                if i == 3:
                    break
    t = time.monotonic()
    r = greedy_chat(client, max_tokens=4)
    assert r.usage.completion_tokens == 4
    assert time.monotonic() - t < 30


def test_smollm2_capital_of_france(smollm2):
    client = smollm2.client()
    r = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=16)
    text = r.choices[0].message.content
    # SmolLM2-135M is tiny: llama.cpp itself answers "L'Étoile, la Marseillaise, ..." here, so only
    # a non-empty, printable answer is asserted (the exact greedy check is tests/e2e_smollm2.rs).
    assert isinstance(text, str) and text.strip()
    assert any(ch.isalpha() for ch in text)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == 37  # llama.cpp's count for the same rendered chat prompt
