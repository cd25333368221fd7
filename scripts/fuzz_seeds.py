#!/usr/bin/env python3
"""Write the fuzz targets' seed corpus (fuzz/corpus/<target>/) and dictionaries (fuzz/dict/).

Deterministic, standard library only. Every seed is small: valid requests of each shape a client
can send (every endpoint, content part shapes, tools, schemas, sampling parameters at and beyond
their bounds, logit_bias maps, stop lists), a few invalid ones, raw HTTP/1.1 and HTTP/2 requests,
and adapter files (PEFT and mlx-lm, several dtypes, wrong shapes and dtypes, truncated).
The input format of each target is described in fuzz/harness.rs.

Usage: python3 scripts/fuzz_seeds.py   (rewrites fuzz/corpus/ and fuzz/dict/)
"""
import json
import shutil
import struct
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"
DICT = ROOT / "fuzz" / "dict"
USER = "fuzz-user-key"
ADMIN = "fuzz-admin-key"
M = "tiny"
TOOLS_M = "tiny-tools"

U = {"role": "user", "content": "Hi"}


def chat(**kw):
    body = {"model": M, "messages": [U]}
    body.update(kw)
    return body


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
                       "required": ["city"]},
    },
}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}

CHAT = {
    "minimal": chat(),
    "multi_turn": chat(messages=[{"role": "system", "content": "Be brief."}, U, {"role": "assistant", "content": "Hello!"},
                                 {"role": "user", "content": "Count to 3."}], max_tokens=8),
    "developer": chat(messages=[{"role": "developer", "content": "Rules"}, U]),
    "parts": chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]),
    "parts_image": chat(messages=[{"role": "user", "content": [{"type": "text", "text": "see"},
                                                                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]),
    "parts_audio_file": chat(messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AA", "format": "wav"}},
                                                                     {"type": "file", "file": {"file_id": "f"}}]}]),
    "parts_missing_text": chat(messages=[{"role": "user", "content": [{"type": "text"}, {"text": "x"}, "str", None]}]),
    "parts_empty": chat(messages=[{"role": "user", "content": []}]),
    "tools_auto": chat(model=TOOLS_M, tools=[WEATHER], tool_choice="auto", max_tokens=4),
    "tools_named": chat(model=TOOLS_M, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}}),
    "tools_none": chat(model=TOOLS_M, tools=[WEATHER, {"type": "function", "function": {"name": "x"}}], tool_choice="none"),
    "tools_required_parallel": chat(model=TOOLS_M, tools=[WEATHER], tool_choice="required", parallel_tool_calls=True),
    "tool_turns": chat(model=TOOLS_M, tools=[WEATHER], messages=[
        U, {"role": "assistant", "content": None, "tool_calls": [CALL, dict(CALL, id="call_2", function={"name": "get_weather", "arguments": "not json"})]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 20}"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "rain"}]}], max_tokens=4),
    "tool_turns_plain_model": chat(messages=[U, {"role": "assistant", "tool_calls": [CALL]}, {"role": "tool", "content": "x", "name": "w"}]),
    "tools_odd": chat(model=TOOLS_M, tools=[{"type": "function"}, {"function": {"name": 5, "parameters": [1, {"a": None}]}}]),
    "response_format_text": chat(response_format={"type": "text"}),
    "response_format_json": chat(response_format={"type": "json_object"}),
    "response_format_schema": chat(response_format={"type": "json_schema", "json_schema": {
        "name": "r", "strict": True, "schema": {"type": "object", "properties": {"a": {"type": "array", "items": {"$ref": "#"}}}}}}),
    "stream_usage": chat(stream=True, stream_options={"include_usage": True}, max_tokens=5),
    "stream_n_logprobs": chat(stream=True, n=3, logprobs=True, top_logprobs=20, max_tokens=4, temperature=1.5, seed=3),
    "n_max": chat(n=16, max_tokens=2, temperature=0.9),
    "n_over": chat(n=17),
    "bounds_low": chat(temperature=0, top_p=1e-9, top_k=-1, min_p=0, presence_penalty=-2, frequency_penalty=-2,
                       repetition_penalty=1e-30, max_tokens=1, seed=0),
    "bounds_high": chat(temperature=2, top_p=1, top_k=9223372036854775807, min_p=1, presence_penalty=2, frequency_penalty=2,
                        repetition_penalty=1e30, max_completion_tokens=20, seed=18446744073709551615),
    "bounds_beyond": chat(temperature=2.0000001, top_p=0, top_k=-2, min_p=1.5, presence_penalty=-2.5, repetition_penalty=0,
                          max_tokens=0, n=0, seed=-1),
    "bounds_types": chat(temperature="1", top_k=1.5, max_tokens=1e3, n=None, seed=1.5, stream="yes", logprobs=1),
    "logit_bias": chat(logit_bias={"0": 100, "1": -100, " 5": 50.5, "511": -0.0, "100": 1e-300}, max_tokens=4, temperature=0.7),
    "logit_bias_bad": chat(logit_bias={"-1": 1, "512": 1, "abc": 2, "4294967296": 1, "3": 101}),
    "logit_bias_all_ban": chat(logit_bias={str(i): -100 for i in range(0, 512, 3)}, max_tokens=3),
    "stop": chat(stop=["\n", "the", "\u00e9\u4e2d", "<|im_end|>"], max_tokens=12, temperature=1.0, seed=1),
    "stop_one": chat(stop="a", max_tokens=12, temperature=1.0, seed=2),
    "stop_bad": chat(stop=["", "a", "b", "c", "d"]),
    "ignore_eos": chat(ignore_eos=True, max_tokens=30),
    "unicode": chat(messages=[{"role": "user", "content": "\u00e9\u00e8 \u4e2d\u6587 \U0001F600 \u0000 \u200b\ufeff <|im_start|>assistant"}]),
    "names": chat(messages=[{"role": "user", "content": "x", "name": "bob"}, {"role": "assistant", "content": "y", "name": None}]),
    "roles_bad": chat(messages=[{"role": "function", "content": "x"}, {"role": 3}, {"content": "x"}, 5]),
    "unknown_fields": chat(user="u", metadata={"a": "b"}, store=False, service_tier="auto", reasoning_effort="low", modalities=["text"]),
    "long_prompt": chat(messages=[{"role": "user", "content": "word " * 200}]),
    "max_tokens_edge": chat(max_tokens=100),
    "no_model": {"messages": [U]},
    "unknown_model": chat(model="nope"),
}

COMPLETIONS = {
    "text": {"model": M, "prompt": "Once upon a time", "max_tokens": 8},
    "tokens": {"model": M, "prompt": [1, 2, 3, 511], "max_tokens": 4},
    "token_lists": {"model": M, "prompt": [[5, 6, 7]], "max_tokens": 2},
    "texts_one": {"model": M, "prompt": ["hello"], "max_tokens": 2},
    "batched": {"model": M, "prompt": ["a", "b"]},
    "tokens_bad": {"model": M, "prompt": [-1, 512, 4294967296]},
    "empty": {"model": M, "prompt": ""},
    "empty_tokens": {"model": M, "prompt": []},
    "logprobs": {"model": M, "prompt": "The", "logprobs": 5, "max_tokens": 4, "temperature": 0.8, "seed": 9},
    "logprobs_over": {"model": M, "prompt": "The", "logprobs": 6},
    "stream": {"model": M, "prompt": "a b c", "stream": True, "stream_options": {"include_usage": True}, "n": 2, "max_tokens": 6,
               "logprobs": 2},
    "echo_suffix_best_of": {"model": M, "prompt": "x", "echo": True, "suffix": "y", "best_of": 3},
    "best_of_n": {"model": M, "prompt": "x", "best_of": 2, "n": 2, "max_tokens": 2},
    "stop_bias": {"model": M, "prompt": "abc", "stop": ["b", "\n\n"], "logit_bias": {"98": 100}, "max_tokens": 10},
    "sampling": {"model": M, "prompt": "q", "temperature": 1.9, "top_k": 3, "top_p": 0.5, "min_p": 0.1,
                 "repetition_penalty": 1.3, "presence_penalty": 1, "frequency_penalty": -1, "max_tokens": 10, "ignore_eos": True},
    "full_context": {"model": M, "prompt": [7] * 639, "max_tokens": 1},
    "over_context": {"model": M, "prompt": [7] * 640},
    "stream_options_no_stream": {"model": M, "prompt": "x", "stream_options": {"include_usage": True}},
}

TOKENIZE = {
    "t_prompt": {"model": M, "prompt": "Hello world"},
    "t_content": {"content": "Hello", "add_special": False},
    "t_messages": {"model": M, "messages": [U, {"role": "assistant", "content": "x"}], "add_generation_prompt": False},
    "t_messages_tools_model": {"model": TOOLS_M, "messages": [{"role": "user", "content": [{"type": "text", "text": "y"}]}]},
    "t_special": {"prompt": "<|im_start|>user", "add_special_tokens": True},
    "t_two": {"prompt": "a", "content": "b"},
    "t_none": {"model": M},
    "d_tokens": {"model": M, "tokens": [1, 2, 3, 509, 510, 511]},
    "d_bad": {"tokens": [-5, 512, 9999999999]},
    "d_empty": {"tokens": []},
    "d_adapter_model": {"model": "a", "tokens": [1]},
}

ADMIN_SEEDS = {
    "load_a": (0, {"lora_name": "x", "lora_path": "adapter-a"}),
    "load_b_base": (0, {"lora_name": "y", "lora_path": "adapter-b", "base_model_name": M}),
    "load_mlx_inplace": (0, {"lora_name": "z", "lora_path": "adapter-a-mlx", "load_inplace": True}),
    "load_qk": (0, {"lora_name": "qk", "lora_path": "llama-adapter-qk/"}),
    "load_bad_rank": (0, {"lora_name": "r", "lora_path": "bad-rank"}),
    "load_bad_target": (0, {"lora_name": "t", "lora_path": "bad-target"}),
    "load_bad_base": (0, {"lora_name": "b", "lora_path": "bad-base"}),
    "load_bad_corrupt": (0, {"lora_name": "c", "lora_path": "bad-corrupt"}),
    "load_bad_missing": (0, {"lora_name": "m", "lora_path": "bad-missing"}),
    "load_escape": (0, {"lora_name": "e", "lora_path": "../../etc"}),
    "load_abs": (0, {"lora_name": "e", "lora_path": "/etc"}),
    "load_base_name": (0, {"lora_name": M, "lora_path": "adapter-a"}),
    "load_unknown_base": (0, {"lora_name": "u", "lora_path": "adapter-a", "base_model_name": "tiny-tools"}),
    "load_extra_field": (0, {"lora_name": "u", "lora_path": "adapter-a", "x": 1}),
    "unload": (1, {"lora_name": "a"}),
    "unload_int_id": (1, {"lora_name": "a", "lora_int_id": 3}),
    "unload_missing": (1, {"lora_name": "nope"}),
    "user_key_load": (2, {"lora_name": "x", "lora_path": "adapter-a"}),
}


# --- safetensors -------------------------------------------------------------------------------

DT = {"F32": ("<f", 4), "F16": ("<e", 2), "F64": ("<d", 8), "I32": ("<i", 4), "U8": ("<B", 1)}


def tensor_bytes(dtype, shape, seed):
    n = 1
    for s in shape:
        n *= s
    if dtype == "BF16":
        out = b""
        for i in range(n):
            f = struct.pack("<f", ((i * 7 + seed) % 13 - 6) * 0.01)
            out += f[2:4]
        return out
    fmt, _ = DT[dtype]
    vals = [((i * 7 + seed) % 13 - 6) * (0.01 if fmt in "<f<e<d" else 1) for i in range(n)]
    if fmt in ("<i", "<B"):
        vals = [int(v) % 256 if fmt == "<B" else int(v) for v in vals]
    return b"".join(struct.pack(fmt, v) for v in vals)


def safetensors(tensors, metadata=None, fill=None):
    """`fill`: raw bytes of one element repeated over every tensor (NaN, infinity) instead of values."""
    header, data = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for i, (name, dtype, shape) in enumerate(tensors):
        b = tensor_bytes(dtype, shape, i)
        if fill is not None:
            b = fill * (len(b) // len(fill))
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(b)]}
        data += b
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + data


def peft(mods, r=2, dtype="F32", layers=(0,), shapes=None, fill=None):
    t = []
    for layer in layers:
        for mod, (out_dim, in_dim) in mods.items():
            prefix = f"base_model.model.model.layers.{layer}.{'mlp' if mod in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{mod}"
            a, b = shapes or ([r, in_dim], [out_dim, r])
            t.append((f"{prefix}.lora_A.weight", dtype, a))
            t.append((f"{prefix}.lora_B.weight", dtype, b))
    return safetensors(t, {"format": "pt"}, fill)


def mlx(mods, r=2, dtype="F32", layers=(0,)):
    t = []
    for layer in layers:
        for mod, (out_dim, in_dim) in mods.items():
            part = "mlp" if mod in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            t.append((f"model.layers.{layer}.{part}.{mod}.lora_a", dtype, [in_dim, r]))
            t.append((f"model.layers.{layer}.{part}.{mod}.lora_b", dtype, [r, out_dim]))
    return safetensors(t)


def peft_config(r=2, alpha=4, targets=("q_proj", "v_proj"), **kw):
    c = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(targets), "bias": "none"}
    c.update(kw)
    return json.dumps(c).encode()


def mlx_config(rank=2, scale=2.0):
    return json.dumps({"fine_tune_type": "lora", "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0}}).encode()


def adapter_seed(fmt, config, weights):
    return bytes([fmt]) + struct.pack("<H", len(config)) + config + weights


QV = {"q_proj": (64, 64), "v_proj": (32, 64)}
ALL = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
       "gate_proj": (128, 64), "up_proj": (128, 64), "down_proj": (64, 128)}


def adapter_seeds():
    s = {}
    s["peft_qv_f32"] = adapter_seed(0, peft_config(), peft(QV))
    s["peft_all_f16_rslora"] = adapter_seed(0, peft_config(r=1, alpha=2, targets=list(ALL), use_rslora=True), peft(ALL, r=1, dtype="F16", layers=(0, 1)))
    s["peft_bf16"] = adapter_seed(0, peft_config(r=1), peft(QV, r=1, dtype="BF16"))
    s["peft_f64"] = adapter_seed(0, peft_config(r=1), peft(QV, r=1, dtype="F64"))
    s["peft_i32"] = adapter_seed(0, peft_config(r=1), peft(QV, r=1, dtype="I32"))
    s["peft_u8"] = adapter_seed(0, peft_config(r=1), peft(QV, r=1, dtype="U8"))
    s["peft_wrong_shape"] = adapter_seed(0, peft_config(r=2), peft(QV, shapes=([2, 63], [64, 2])))
    s["peft_rank_mismatch"] = adapter_seed(0, peft_config(r=2), peft(QV, shapes=([2, 64], [64, 3])))
    s["peft_3d"] = adapter_seed(0, peft_config(r=2), peft({"q_proj": (64, 64)}, shapes=([2, 4, 16], [64, 2])))
    s["peft_layer_99"] = adapter_seed(0, peft_config(r=1), peft(QV, r=1, layers=(99,)))
    s["peft_rank_pattern"] = adapter_seed(0, peft_config(r=8, rank_pattern={"q_proj": 1}), peft(QV, r=1))
    s["peft_zero_rank"] = adapter_seed(0, peft_config(r=0), peft(QV, r=0))
    s["peft_nan_alpha"] = adapter_seed(0, b'{"r": 1, "lora_alpha": 1e308, "use_rslora": true}', peft(QV, r=1))
    s["peft_nan_f32"] = adapter_seed(0, peft_config(r=1), peft(QV, r=1, fill=struct.pack("<f", float("nan"))))
    s["peft_inf_f16"] = adapter_seed(0, peft_config(r=1), peft(QV, r=1, dtype="F16", fill=b"\x00\x7c"))
    s["peft_huge_f32"] = adapter_seed(0, peft_config(r=1, alpha=1e30), peft(QV, r=1, fill=struct.pack("<f", 3e38)))
    s["peft_dora_bias"] = adapter_seed(0, peft_config(r=1, use_dora=True, bias="all"), peft(QV, r=1))
    s["peft_truncated"] = adapter_seed(0, peft_config(), peft(QV)[:700])
    s["peft_header_only"] = adapter_seed(0, peft_config(), peft(QV)[:8])
    s["peft_huge_header_len"] = adapter_seed(0, peft_config(), struct.pack("<Q", 1 << 62) + b"{}")
    absurd = b'{"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,16]}}'
    s["peft_absurd_shape"] = adapter_seed(0, peft_config(), struct.pack("<Q", len(absurd)) + absurd + b"\0" * 16)
    overlap = b'{"a.layers.0.q_proj.lora_A.weight":{"dtype":"F32","shape":[2,64],"data_offsets":[0,512]},"a.layers.0.q_proj.lora_B.weight":{"dtype":"F32","shape":[64,2],"data_offsets":[0,512]}}'
    s["peft_overlapping_offsets"] = adapter_seed(0, peft_config(), struct.pack("<Q", len(overlap)) + overlap + b"\0" * 512)
    s["peft_empty_tensors"] = adapter_seed(0, peft_config(), safetensors([]))
    s["peft_bad_config"] = adapter_seed(0, b"{not json", peft(QV))
    s["mlx_f32"] = adapter_seed(1, mlx_config(), mlx(QV))
    s["mlx_all_f16"] = adapter_seed(1, mlx_config(rank=1, scale=20.0), mlx(ALL, r=1, dtype="F16", layers=(0, 1)))
    s["mlx_rank_mismatch"] = adapter_seed(1, mlx_config(rank=3), mlx(QV))
    fixture = ROOT / "tests" / "fixtures" / "lora" / "adapter-a"
    s["fixture_adapter_a"] = adapter_seed(0, (fixture / "adapter_config.json").read_bytes(), (fixture / "adapter_model.safetensors").read_bytes())
    return s


# --- raw HTTP ----------------------------------------------------------------------------------

def http1(method, path, body=b"", headers=(), key=USER):
    lines = [f"{method} {path} HTTP/1.1", "Host: x"]
    if key:
        lines.append(f"Authorization: Bearer {key}")
    lines += list(headers)
    if body and not any(h.lower().startswith("transfer-encoding") for h in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def chunked(body, size=7):
    out = b""
    for i in range(0, len(body), size):
        part = body[i:i + size]
        out += f"{len(part):x}\r\n".encode() + part + b"\r\n"
    return out + b"0\r\n\r\n"


def h2_frame(kind, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def hpack_literal(idx, value):
    v = value.encode()
    return bytes([0x00 | idx]) + bytes([len(v)]) + v  # literal without indexing, indexed name (idx < 16)


def h2(method_get=True, path="/health", body=b""):
    pre = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    settings = h2_frame(0x4, 0, 0, b"")
    block = bytes([0x82 if method_get else 0x83, 0x86]) + hpack_literal(4, path) + hpack_literal(1, "x")
    auth = b"\x0f\x08" + bytes([len("Bearer " + USER)]) + ("Bearer " + USER).encode()  # authorization: static index 23
    block += auth
    if body:
        frames = h2_frame(0x1, 0x4, 1, block) + h2_frame(0x0, 0x1, 1, body)
    else:
        frames = h2_frame(0x1, 0x5, 1, block)
    return pre + settings + frames


def raw_seeds():
    small = json.dumps(chat(max_tokens=2)).encode()
    comp = json.dumps({"model": M, "prompt": "hi", "max_tokens": 2, "stream": True}).encode()
    s = {
        "health": http1("GET", "/health", key=None),
        "ready_metrics": http1("GET", "/ready", key=None) + http1("GET", "/metrics"),
        "metrics_nokey": http1("GET", "/metrics", key=None),
        "models": http1("GET", "/v1/models") + http1("GET", "/v1/models/tiny") + http1("GET", "/v1/models/a/b%2Fc"),
        "chat": http1("POST", "/v1/chat/completions", small, ["Content-Type: application/json"]),
        "chat_chunked": http1("POST", "/v1/chat/completions", chunked(small), ["Transfer-Encoding: chunked"]),
        "stream_pipelined": http1("POST", "/v1/completions", comp) + http1("GET", "/health", key=None),
        "wrong_key": http1("POST", "/v1/completions", comp, key="nope"),
        "admin_user_key": http1("POST", "/v1/load_lora_adapter", b'{"lora_name":"x","lora_path":"adapter-a"}'),
        "admin_key": http1("POST", "/v1/load_lora_adapter", b'{"lora_name":"x","lora_path":"adapter-a"}', key=ADMIN)
                     + http1("POST", "/v1/unload_lora_adapter", b'{"lora_name":"x"}', key=ADMIN),
        "preflight": http1("OPTIONS", "/v1/chat/completions", key=None, headers=[
            "Origin: https://app.example", "Access-Control-Request-Method: POST",
            "Access-Control-Request-Headers: authorization, content-type"]),
        "cors_other_origin": http1("POST", "/v1/completions", comp, ["Origin: https://evil.example"]),
        "expect_continue": http1("POST", "/tokenize", b'{"prompt":"x"}', ["Expect: 100-continue"]),
        "content_length_lie": b"POST /tokenize HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + USER.encode()
                              + b"\r\nContent-Length: 100\r\n\r\n{\"prompt\":\"x\"}",
        "content_length_huge": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n{}",
        "two_lengths": b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        "http10": b"GET /health HTTP/1.0\r\n\r\n",
        "method_not_allowed": http1("DELETE", "/v1/chat/completions") + http1("GET", "/nope/../v1/models"),
        "bearer_odd": http1("GET", "/v1/models", key=None, headers=["Authorization: Bearer", "Authorization: Basic eA=="]),
        "h2_health": h2(),
        "h2_post": h2(False, "/tokenize", b'{"prompt":"hi"}'),
    }
    return s


def dict_entry(text):
    """One libFuzzer dictionary line: printable ASCII as is, \\ and \" escaped, the rest as \\xAB."""
    out = ""
    for b in text.encode():
        c = chr(b)
        if c in '\\"':
            out += "\\" + c
        elif 32 <= b < 127:
            out += c
        else:
            out += f"\\x{b:02X}"
    return f'"{out}"'


def write(target, name, data):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(data, (dict, list)):
        data = json.dumps(data, ensure_ascii=False).encode()
    (d / name).write_bytes(data)


def main():
    if CORPUS.exists():
        shutil.rmtree(CORPUS)
    for k, v in CHAT.items():
        write("chat", k, v)
    for k, v in COMPLETIONS.items():
        write("completions", k, v)
    for k, v in TOKENIZE.items():
        sel = 1 if k.startswith("d_") else 0
        write("tokenize", k, bytes([sel]) + json.dumps(v).encode())
    for k, (sel, v) in ADMIN_SEEDS.items():
        write("admin", k, bytes([sel]) + json.dumps(v).encode())
    for k, v in adapter_seeds().items():
        write("adapter", k, v)
    for k, v in raw_seeds().items():
        write("raw_http", k, v)

    DICT.mkdir(parents=True, exist_ok=True)
    keys = ["model", "messages", "role", "content", "system", "developer", "user", "assistant", "tool", "type", "text",
            "image_url", "input_audio", "name", "tool_calls", "tool_call_id", "function", "arguments", "parameters",
            "tools", "tool_choice", "auto", "none", "required", "response_format", "json_object", "json_schema", "schema",
            "stream", "stream_options", "include_usage", "max_tokens", "max_completion_tokens", "temperature", "top_p",
            "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "stop",
            "n", "logprobs", "top_logprobs", "ignore_eos", "prompt", "echo", "suffix", "best_of", "tokens",
            "add_special_tokens", "add_special", "add_generation_prompt", "lora_name", "lora_path", "base_model_name",
            "load_inplace", "lora_int_id", "tiny", "tiny-tools", "adapter-a", "adapter-b", "adapter-a-mlx"]
    values = ["true", "false", "null", "0", "-1", "1", "2", "16", "17", "100", "-100", "1e308", "-1e308", "1e-300",
              "9223372036854775807", "18446744073709551615", "18446744073709551616", "-9223372036854775808", "0.0",
              "-0.0", "2.0000001", "[]", "{}", "[[]]", "\"\"", "\\u0000", "\\ud800", "<|im_start|>", "<|im_end|>",
              "<|endoftext|>"]
    lines = [dict_entry(f'"{k}"') for k in keys] + [dict_entry(v) for v in values]
    (DICT / "json.dict").write_text("\n".join(lines) + "\n")
    http = ["GET ", "POST ", "OPTIONS ", " HTTP/1.1\r\n", "\r\n", "\r\n\r\n", "Host: x\r\n", "Content-Length: ",
            "Transfer-Encoding: chunked\r\n", "Content-Type: application/json\r\n", "Authorization: Bearer ",
            USER, ADMIN, "Origin: https://app.example\r\n", "Access-Control-Request-Method: POST\r\n",
            "Expect: 100-continue\r\n", "Connection: close\r\n", "/v1/chat/completions", "/v1/completions", "/tokenize",
            "/detokenize", "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/lora_adapters", "/v1/models",
            "/health", "/ready", "/metrics", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]
    (DICT / "http.dict").write_text("\n".join(dict_entry(h) for h in http) + "\n")
    n = sum(1 for _ in CORPUS.rglob("*") if _.is_file())
    size = sum(p.stat().st_size for p in CORPUS.rglob("*") if p.is_file())
    print(f"wrote {n} seeds ({size} bytes) under {CORPUS.relative_to(ROOT)} and 2 dictionaries under {DICT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
