"""Structured outputs through the real server: `response_format` json_object / json_schema and
`tool_choice` "required" / a named function, enforced by constrained decoding (src/structured).

On the tiny random-weight models (both backends) nothing but the grammar makes an answer JSON, so
every answer that stops by itself must parse and validate; the schemas bound their strings and
arrays so that random models finish. On Qwen2.5-Coder the OpenAI SDK's own structured-output
helpers (`chat.completions.parse` with a pydantic model, a forced function) run unchanged."""
import json

import jsonschema
import openai
import pydantic
import pytest

SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "age": {"type": "integer", "minimum": 0, "maximum": 130},
            "email": {"anyOf": [{"type": "string", "maxLength": 20}, {"type": "null"}]},
        },
        "required": ["name", "age", "email"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99999}, "admin": {"type": "boolean"}},
                "required": ["id", "admin"],
                "additionalProperties": False,
            },
            "tags": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
            "ratio": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["user", "tags", "ratio"],
        "additionalProperties": False,
    },
    "list": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"op": {"enum": ["add", "remove"]}, "n": {"type": "integer", "minimum": -9, "maximum": 9}},
            "required": ["op", "n"],
            "additionalProperties": False,
        },
        "maxItems": 5,
    },
    "refs": {
        "$defs": {"pt": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                                         "y": {"type": "integer", "minimum": 0, "maximum": 9}},
                         "required": ["x", "y"], "additionalProperties": False}},
        "type": "object",
        "properties": {"from": {"$ref": "#/$defs/pt"}, "to": {"$ref": "#/$defs/pt"}, "kind": {"const": "segment"}},
        "required": ["from", "to", "kind"],
        "additionalProperties": False,
    },
}


def ask(client, **kw):
    kw.setdefault("model", "tiny")
    kw.setdefault("messages", [{"role": "user", "content": "Answer in JSON."}])
    return client.chat.completions.create(**kw)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_answers_validate(client, name):
    schema = SCHEMAS[name]
    rf = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    r = ask(client, response_format=rf, n=4, temperature=1.0, seed=7, max_tokens=200)
    stopped = 0
    for c in r.choices:
        if c.finish_reason != "stop":
            continue  # cut by max_tokens, as OpenAI's are
        stopped += 1
        jsonschema.validate(json.loads(c.message.content), schema)
    assert stopped >= 3, [c.finish_reason for c in r.choices]


def test_json_schema_stream_equals_whole(client):
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMAS["person"]}}
    whole = ask(client, response_format=rf, temperature=0, max_tokens=100).choices[0].message.content
    text = "".join(ch.choices[0].delta.content or "" for ch in ask(client, response_format=rf, temperature=0, max_tokens=100, stream=True) if ch.choices)
    assert text == whole
    jsonschema.validate(json.loads(text), SCHEMAS["person"])


def test_json_object(client):
    r = ask(client, response_format={"type": "json_object"}, n=4, temperature=1.0, seed=3, max_tokens=300)
    for c in r.choices:
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.message.content), dict)


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]}},
        "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}},
]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_calls(client, choice):
    r = ask(client, tools=TOOLS, tool_choice=choice, n=4, temperature=1.0, seed=5, max_tokens=200)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for c in r.choices:
        if c.finish_reason == "length":
            continue
        assert c.finish_reason == "tool_calls", c
        assert c.message.tool_calls, c
        for call in c.message.tool_calls:
            if isinstance(choice, dict):
                assert call.function.name == "get_weather"
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_unenforceable_schema_is_400(client):
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(?<=a)b"}}}
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, response_format=rf)
    assert e.value.body["param"] == "response_format.json_schema.schema"
    assert "look-around" in e.value.body["message"]


class Step(pydantic.BaseModel):
    explanation: str
    output: str


class MathAnswer(pydantic.BaseModel):
    steps: list[Step]
    final_answer: str


def test_sdk_parse_with_pydantic_on_qwen(qwen_coder):
    # The SDK's structured-output example, unchanged (strict json_schema from a pydantic model).
    qc = qwen_coder.client()
    r = qc.chat.completions.parse(
        model="qwen-coder",
        messages=[{"role": "system", "content": "You are a helpful math tutor."},
                  {"role": "user", "content": "solve 8x + 7 = -23"}],
        response_format=MathAnswer,
        temperature=0,
        max_tokens=400,
    )
    c = r.choices[0]
    assert c.finish_reason == "stop", c
    assert isinstance(c.message.parsed, MathAnswer) and c.message.parsed.steps


def test_sdk_forced_function_on_qwen(qwen_coder):
    qc = qwen_coder.client()
    r = qc.chat.completions.create(
        model="qwen-coder", messages=[{"role": "user", "content": "Hello!"}], tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0, max_tokens=80)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), TOOLS[0]["function"]["parameters"])
