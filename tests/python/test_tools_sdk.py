"""Tool calling through the official OpenAI SDK on Qwen2.5-Coder-0.5B (its own chat template, the
Hermes parser): greedy requests whose answers are known to be calls, whole and streamed, and the
round trip with a `tool` message. Parallel calls, broken calls and the streaming shapes in detail
are covered with scripted answers in src/http/tests/tools.rs and src/tools/tests.rs."""
import json

import pytest

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name"}},
            "required": ["city"],
        },
    },
}
QUESTION = [{"role": "user", "content": "What's the weather like in Paris today?"}]


@pytest.fixture(scope="module")
def qc(qwen_coder):
    return qwen_coder.client()


def test_tool_call_whole(qc):
    r = qc.chat.completions.create(model="qwen-coder", messages=QUESTION, tools=[WEATHER], temperature=0, max_tokens=100)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_tool_call_streamed_equals_whole(qc):
    kw = dict(model="qwen-coder", messages=QUESTION, tools=[WEATHER], temperature=0, max_tokens=100)
    whole = qc.chat.completions.create(**kw).choices[0].message.tool_calls
    calls, finish, content = {}, None, ""
    for chunk in qc.chat.completions.create(stream=True, **kw):
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or []:
            c = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
            if tc.id:
                c["id"], c["name"] = tc.id, tc.function.name
            c["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and content == ""
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [(t.function.name, t.function.arguments) for t in whole]
    assert all(c["id"].startswith("call_") for c in calls.values())


def test_tool_result_round_trip(qc):
    first = qc.chat.completions.create(model="qwen-coder", messages=QUESTION, tools=[WEATHER], temperature=0, max_tokens=100)
    call = first.choices[0].message.tool_calls[0]
    messages = QUESTION + [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 18, "sky": "sunny"})},
    ]
    second = qc.chat.completions.create(model="qwen-coder", messages=messages, tools=[WEATHER], temperature=0, max_tokens=60)
    # The template rendered the call and its result into the prompt; the model answers.
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + 15
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    text = second.choices[0].message.content or ""
    calls = second.choices[0].message.tool_calls or []
    assert text or calls


def test_tool_choice_none_leaves_text(qc):
    r = qc.chat.completions.create(model="qwen-coder", messages=QUESTION, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=40)
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason in ("stop", "length")


def test_tool_call_shapes_validate_against_openais_schema(qwen_coder):
    # The same helpers as test_openai_schema.py: responses and every chunk against the pinned spec.
    from test_openai_schema import CHAT, CHUNK, check, check_chunks, json_body, post, stream

    body = {"model": "qwen-coder", "messages": QUESTION, "tools": [WEATHER], "temperature": 0, "max_tokens": 100}
    whole = check(CHAT, json_body(post(qwen_coder, "/v1/chat/completions", body)), "tool call")
    assert whole["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    chunks = check_chunks(CHUNK, stream(qwen_coder, "/v1/chat/completions", body), "streamed tool call")
    assert any(c["choices"] and c["choices"][0]["delta"].get("tool_calls") for c in chunks)
