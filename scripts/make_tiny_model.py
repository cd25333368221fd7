#!/usr/bin/env python3
"""Generate tiny, deterministic test models for inferd's test-suite.

Why: the real models are too large/slow for unit tests and are not available in CI. This script
builds a byte-level BPE tokenizer and random-weight Qwen2/Llama models small enough to run in
milliseconds, in both Hugging Face (safetensors) and GGUF (f32 + quantised) form, with the same
weights, so backends can be compared against each other and against llama.cpp.

The Llama weights are drawn directly in GGUF layout (q/k rows already in llama.cpp's
interleaved-rotary order); tiny-llama/ (Hugging Face layout) holds them with llama.cpp's
permute() undone on attn_q/attn_k, so transformers' LlamaForCausalLM (rotate-half rope) on
tiny-llama/ computes the same function as llama.cpp on tiny-llama.f32.gguf.

Deterministic: fixed seeds, no timestamps; re-running produces byte-identical files.
Usage: python scripts/make_tiny_model.py [OUT_DIR]   (default: tests/fixtures/generated/)
Deps: scripts/requirements-test.txt
"""
import hashlib
import json
import os
import sys
from pathlib import Path

# Single-threaded tokenizer training keeps merges reproducible.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import gguf  # noqa: E402
from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf import quants  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

SEED = 20241125
VOCAB_SIZE = 512
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, CTX = 64, 2, 4, 2, 128, 2048
HEAD_DIM = HIDDEN // HEADS
ROPE_THETA, RMS_EPS = 10000.0, 1e-6
# Weight std per role: the output projection is peaky (0.5) so logits are far from flat, while
# attention/MLP stay well conditioned (scores O(1)) so f32 implementations agree to ~1e-4.
STD = {"embed": 1.0, "qk": 0.15, "vo": 0.3, "gate_up": 0.25, "down": 0.15, "lm_head": 0.5}

# Qwen2's pre-tokenizer regex (same as the official Qwen2 tokenizer.json; llama.cpp "qwen2" pre).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
               r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Qwen2.5-Instruct chat template, verbatim (tools + default system prompt).
QWEN_TEMPLATE = r'''{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
'''

# SmolLM2-Instruct style ChatML template (different default system prompt, no tools).
LLAMA_TEMPLATE = r'''{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system
You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
' }}{% endif %}{{'<|im_start|>' + message['role'] + '
' + message['content'] + '<|im_end|>' + '
'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant
' }}{% endif %}'''

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun.",
    "Write a Python function that checks whether a number is prime.",
    "A prime number is a natural number greater than one that has no divisors other than one and itself.",
    "Once upon a time, there was a little model that wanted to learn how to talk.",
    "Hello! How can I help you today? I am a helpful assistant.",
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    "The capital of France is Paris. The capital of Japan is Tokyo.",
    "In 2024 there were 366 days; 12 months, 52 weeks and 1,440 minutes per day.",
    "def is_prime(n):\n    if n < 2:\n        return False\n    for i in range(2, int(n ** 0.5) + 1):\n"
    "        if n % i == 0:\n            return False\n    return True\n",
    "def fib(n: int) -> int:\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "fn main() {\n    let v: Vec<u32> = (1..=10).collect();\n    println!(\"{:?}\", v);\n}\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }\n",
    "import json\nprint(json.dumps({\"key\": [1, 2, 3], \"ok\": true}))\n",
    "SELECT name, count(*) FROM users WHERE age >= 18 GROUP BY name;",
    "curl -s http://localhost:8080/v1/chat/completions -H 'Content-Type: application/json'",
    "你好，世界！今天天气很好。我们一起学习机器学习。",
    "日本語のテキストも少し含めます。こんにちは。",
    "안녕하세요 세계",
    "Emoji test: 😀 🎉 🚀 👍🏽 ❤️ 🇫🇷",
    "Ünïcödé àccents: café, naïve, façade, Straße, Ελληνικά, русский текст.",
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n2 + 2 = 4.<|im_end|>\n",
]


def train_tokenizer() -> Tokenizer:
    """Byte-level BPE with Qwen2's normalizer/pre-tokenizer, specials appended at the end."""
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIALS), min_frequency=1, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(CORPUS * 8, trainer=trainer)
    tok.add_special_tokens(SPECIALS)
    # ByteLevel post-processor as in Qwen2 (no BOS/EOS added).
    from tokenizers import processors
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return tok


def vocab_of(tok: Tokenizer):
    """Returns (tokens by id, merges as 'a b' strings, id map) from the trained tokenizer."""
    data = json.loads(tok.to_str())
    vocab = dict(data["model"]["vocab"])
    for at in data["added_tokens"]:
        vocab[at["content"]] = at["id"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    assert all(t is not None for t in tokens), "vocab ids are not contiguous"
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return tokens, merges, vocab


def qwen2_weights(rng: np.random.Generator, vocab: int) -> dict:
    """Random Qwen2 weights in HF naming (stds in STD; biases 0.2; norms 1 + N(0, 0.1))."""
    def n(*shape, std=0.5):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm():
        return (1.0 + rng.standard_normal(HIDDEN) * 0.1).astype(np.float32)
    kv = KV_HEADS * HEAD_DIM
    w = {"model.embed_tokens.weight": n(vocab, HIDDEN, std=STD["embed"])}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm()
        w[p + "self_attn.q_proj.weight"] = n(HIDDEN, HIDDEN, std=STD["qk"])
        w[p + "self_attn.q_proj.bias"] = n(HIDDEN, std=0.2)
        w[p + "self_attn.k_proj.weight"] = n(kv, HIDDEN, std=STD["qk"])
        w[p + "self_attn.k_proj.bias"] = n(kv, std=0.2)
        w[p + "self_attn.v_proj.weight"] = n(kv, HIDDEN, std=STD["vo"])
        w[p + "self_attn.v_proj.bias"] = n(kv, std=0.2)
        w[p + "self_attn.o_proj.weight"] = n(HIDDEN, HIDDEN, std=STD["vo"])
        w[p + "post_attention_layernorm.weight"] = norm()
        w[p + "mlp.gate_proj.weight"] = n(FFN, HIDDEN, std=STD["gate_up"])
        w[p + "mlp.up_proj.weight"] = n(FFN, HIDDEN, std=STD["gate_up"])
        w[p + "mlp.down_proj.weight"] = n(HIDDEN, FFN, std=STD["down"])
    w["model.norm.weight"] = norm()
    w["lm_head.weight"] = n(vocab, HIDDEN, std=STD["lm_head"])
    return w


HF_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf: str) -> str:
    """Maps an HF tensor name to llama.cpp's GGUF name (no permutation needed for NEOX rope)."""
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    parts = hf.split(".")
    return f"blk.{parts[2]}." + HF_TO_GGUF[".".join(parts[3:])]


FILE_TYPES = {QT.F32: gguf.LlamaFileType.ALL_F32, QT.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
              QT.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0, QT.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1}


def write_gguf(path: Path, arch: str, name: str, tensors: dict, tokens, merges, vocab,
               template: str, qtype: QT) -> None:
    """Writes one GGUF in llama.cpp's layout; 2-D matrices in qtype, norms/biases in f32."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_context_length(CTX)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(ROPE_THETA)
    w.add_layer_norm_rms_eps(RMS_EPS)
    if arch == "llama":
        w.add_vocab_size(len(tokens))
    w.add_file_type(FILE_TYPES[qtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab["<|endoftext|>"])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_pad_token_id(vocab["<|endoftext|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(template)
    for key, arr in tensors.items():
        if arr.ndim == 2 and qtype != QT.F32:
            w.add_tensor(key, quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(key, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_hf_dir(out: Path, tok: Tokenizer, vocab, weights: dict) -> None:
    """Writes a Hugging Face Qwen2 directory (config, safetensors, tokenizer files)."""
    out.mkdir(parents=True, exist_ok=True)
    eot, ims, ime = (vocab[s] for s in SPECIALS)
    config = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "attention_dropout": 0.0, "bos_token_id": eot, "eos_token_id": ime, "hidden_act": "silu",
        "hidden_size": HIDDEN, "initializer_range": 0.02, "intermediate_size": FFN,
        "max_position_embeddings": CTX, "max_window_layers": LAYERS,
        "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": RMS_EPS, "rope_scaling": None, "rope_theta": ROPE_THETA,
        "sliding_window": CTX, "tie_word_embeddings": False, "torch_dtype": "float32",
        "use_cache": True, "use_sliding_window": False, "vocab_size": len(vocab),
    }
    dump = lambda obj: json.dumps(obj, indent=2, ensure_ascii=False) + "\n"  # noqa: E731
    (out / "config.json").write_text(dump(config), encoding="utf-8")
    (out / "generation_config.json").write_text(dump({
        "bos_token_id": eot, "eos_token_id": [ime, eot], "do_sample": False}), encoding="utf-8")
    tok.save(str(out / "tokenizer.json"))
    added = {str(vocab[s]): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False, "special": True} for s in SPECIALS}
    (out / "tokenizer_config.json").write_text(dump({
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "bos_token": None,
        "chat_template": QWEN_TEMPLATE, "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": CTX,
        "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}), encoding="utf-8")
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})


def write_llama_hf_dir(out: Path, tok: Tokenizer, vocab, weights: dict) -> None:
    """Writes a Hugging Face Llama directory (LlamaForCausalLM, tied embeddings, no biases,
    SmolLM2's chat template) holding `weights` (HF names, HF q/k row order)."""
    out.mkdir(parents=True, exist_ok=True)
    eot, ims, ime = (vocab[s] for s in SPECIALS)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": eot,
        "eos_token_id": ime, "head_dim": HEAD_DIM, "hidden_act": "silu", "hidden_size": HIDDEN,
        "initializer_range": 0.02, "intermediate_size": FFN, "max_position_embeddings": CTX,
        "mlp_bias": False, "num_attention_heads": HEADS, "num_hidden_layers": LAYERS,
        "num_key_value_heads": KV_HEADS, "pad_token_id": eot, "pretraining_tp": 1,
        "rms_norm_eps": RMS_EPS, "rope_scaling": None, "rope_theta": ROPE_THETA,
        "tie_word_embeddings": True, "torch_dtype": "float32", "use_cache": True,
        "vocab_size": len(vocab),
    }
    dump = lambda obj: json.dumps(obj, indent=2, ensure_ascii=False) + "\n"  # noqa: E731
    (out / "config.json").write_text(dump(config), encoding="utf-8")
    (out / "generation_config.json").write_text(dump({
        "bos_token_id": eot, "eos_token_id": ime, "pad_token_id": eot, "do_sample": False}),
        encoding="utf-8")
    tok.save(str(out / "tokenizer.json"))
    added = {str(vocab[s]): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False, "special": True} for s in SPECIALS}
    # Special tokens as in the GGUF (bos/pad <|endoftext|>, eos <|im_end|>, no BOS added).
    (out / "tokenizer_config.json").write_text(dump({
        "add_bos_token": False, "add_eos_token": False, "add_prefix_space": False,
        "added_tokens_decoder": added, "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": "<|endoftext|>", "chat_template": LLAMA_TEMPLATE,
        "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>",
        "model_max_length": CTX, "pad_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": None}), encoding="utf-8")
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp convert_hf_to_gguf.py's LlamaModel.permute(w, n_head, n_head_kv)
    (called with n_head for attn_q, n_head_kv for attn_k), which reorders each head's rows from
    HF's rotate-half order [2, d/2] to ggml's interleaved order [d/2, 2]:
        permute(w)  = w.reshape(n, 2, d // 2, in).swapaxes(1, 2).reshape(w.shape)
        unpermute(w) = w.reshape(n, d // 2, 2, in).swapaxes(1, 2).reshape(w.shape)
    Pure row reordering: values are copied bit for bit."""
    d = w.shape[0] // n_head
    return np.ascontiguousarray(
        w.reshape(n_head, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def permute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permute (HF row order -> GGUF row order); inverse of unpermute_rope_rows."""
    d = w.shape[0] // n_head
    return np.ascontiguousarray(
        w.reshape(n_head, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


GGUF_TO_HF = {v: k for k, v in HF_TO_GGUF.items()}


def llama_hf_weights(gguf_tensors: dict) -> dict:
    """The tiny-llama GGUF tensors under HF names, in HF layout: attn_q / attn_k rows un-permuted
    (n_head resp. n_head_kv heads), everything else as is; tied, so no lm_head.weight."""
    out = {}
    for k, v in gguf_tensors.items():
        if k == "token_embd.weight":
            out["model.embed_tokens.weight"] = v
        elif k == "output_norm.weight":
            out["model.norm.weight"] = v
        else:
            _, layer, rest = k.split(".", 2)
            hf = f"model.layers.{layer}." + GGUF_TO_HF[rest]
            if rest == "attn_q.weight":
                v = unpermute_rope_rows(v, HEADS)
            elif rest == "attn_k.weight":
                v = unpermute_rope_rows(v, KV_HEADS)
            out[hf] = v
    assert "output.weight" not in gguf_tensors  # tied embeddings
    for k, v in out.items():  # round trip: permuting back gives the GGUF bytes
        g = gguf_tensors[gguf_name(k)]
        if k.endswith("q_proj.weight"):
            v = permute_rope_rows(v, HEADS)
        elif k.endswith("k_proj.weight"):
            v = permute_rope_rows(v, KV_HEADS)
        assert v.tobytes() == g.tobytes(), k
    return out


def llama_weights(qwen: dict, rng: np.random.Generator) -> dict:
    """Llama GGUF tensors: fresh random weights, no biases, tied embeddings (no output.weight)."""
    out = {}
    for k, v in qwen.items():
        if k.endswith(".bias") or k == "lm_head.weight":
            continue
        # Tied: token_embd doubles as the output matrix, so it takes the peaky lm_head std.
        role = next(r for sub, r in [("embed_tokens", "lm_head"), ("q_proj", "qk"), ("k_proj", "qk"),
                                     ("v_proj", "vo"), ("o_proj", "vo"), ("gate_proj", "gate_up"),
                                     ("up_proj", "gate_up"), ("down_proj", "down"), ("", None)]
                    if sub in k)
        std = STD[role] if role else 0.0
        if v.ndim == 1:
            out[gguf_name(k)] = (1.0 + rng.standard_normal(v.shape) * 0.1).astype(np.float32)
        else:
            out[gguf_name(k)] = (rng.standard_normal(v.shape) * std).astype(np.float32)
    return out


def generate(out: Path) -> dict:
    """Writes every fixture under out; returns {relative path: sha256}."""
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    tokens, merges, vocab = vocab_of(tok)
    assert len(tokens) == VOCAB_SIZE, len(tokens)
    rng = np.random.default_rng(SEED)
    qwen = qwen2_weights(rng, len(tokens))
    write_hf_dir(out / "tiny-qwen2", tok, vocab, qwen)
    qg = {gguf_name(k): v for k, v in qwen.items()}
    for qtype, suffix in [(QT.F32, "f32"), (QT.Q8_0, "q8_0"), (QT.Q4_0, "q4_0")]:
        write_gguf(out / f"tiny-qwen2.{suffix}.gguf", "qwen2", "tiny-qwen2", qg,
                   tokens, merges, vocab, QWEN_TEMPLATE, qtype)
    lg = llama_weights(qwen, np.random.default_rng(SEED + 1))
    for qtype, suffix in [(QT.F32, "f32"), (QT.Q4_1, "q4_1")]:
        write_gguf(out / f"tiny-llama.{suffix}.gguf", "llama", "tiny-llama", lg,
                   tokens, merges, vocab, LLAMA_TEMPLATE, qtype)
    write_llama_hf_dir(out / "tiny-llama", tok, vocab, llama_hf_weights(lg))
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


def main() -> int:
    """CLI: [OUT_DIR] [--check-determinism] (also generates into a temp dir and compares)."""
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    root = Path(__file__).resolve().parent.parent
    out = Path(args[0]) if args else root / "tests" / "fixtures" / "generated"
    digests = generate(out)
    for name, digest in digests.items():
        print(f"{digest}  {name}  ({(out / name).stat().st_size} bytes)")
    if "--check-determinism" in sys.argv:
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            again = generate(Path(tmp))
        if again != digests:
            bad = sorted(k for k in digests if digests[k] != again.get(k))
            print(f"NOT deterministic: {bad}", file=sys.stderr)
            return 1
        print("deterministic: second run byte-identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
