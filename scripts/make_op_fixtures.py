#!/usr/bin/env python3
"""Writes the small graphs of tests/onnx_ops.rs (tests/fixtures/onnx/ops/).

Why: tests/onnx_ops.rs runs each graph on ONNX Runtime's own kernel and, after the load-time
edit (src/backend/onnx/gqa_edit.rs), on inferd's (src/backend/onnx/gqa.rs), and compares the two.
- packed.onnx:   query = packed q/k/v, rotary on rotated halves, default scale
- separate.onnx: query, key and value apart, interleaved rotary, scale 0.3
4 query heads, 2 KV heads, head size 16; cos/sin caches are graph inputs ([positions, 8]).
Usage: .venv-export/bin/python scripts/make_op_fixtures.py  (needs the onnx package)
"""
from pathlib import Path

import onnx
from onnx import TensorProto, helper

HEADS, KV_HEADS, HEAD = 4, 2, 16
OUT = Path(__file__).resolve().parent.parent / "tests/fixtures/onnx/ops"


def graph(packed):
    f = TensorProto.FLOAT
    ins = [helper.make_tensor_value_info("query", f, ["b", "s", (HEADS + 2 * KV_HEADS) * HEAD if packed else HEADS * HEAD])]
    if not packed:
        ins += [helper.make_tensor_value_info(n, f, ["b", "s", KV_HEADS * HEAD]) for n in ("key", "value")]
    ins += [helper.make_tensor_value_info(n, f, ["b", KV_HEADS, "past", HEAD]) for n in ("past_key", "past_value")]
    ins += [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["b"]),
            helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [1]),
            helper.make_tensor_value_info("cos_cache", f, ["positions", HEAD // 2]),
            helper.make_tensor_value_info("sin_cache", f, ["positions", HEAD // 2])]
    outs = [helper.make_tensor_value_info("output", f, ["b", "s", HEADS * HEAD])]
    outs += [helper.make_tensor_value_info(n, f, ["b", KV_HEADS, "present", HEAD]) for n in ("present_key", "present_value")]
    names = ["query", "" if packed else "key", "" if packed else "value", "past_key", "past_value",
             "seqlens_k", "total_sequence_length", "cos_cache", "sin_cache"]
    attrs = dict(num_heads=HEADS, kv_num_heads=KV_HEADS, do_rotary=1, rotary_interleaved=0 if packed else 1)
    if not packed:
        attrs["scale"] = 0.3
    node = helper.make_node("GroupQueryAttention", names, ["output", "present_key", "present_value"],
                            name="attn", domain="com.microsoft", **attrs)
    g = helper.make_graph([node], "gqa", ins, outs)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=9)


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    for name, packed in (("packed", True), ("separate", False)):
        onnx.save(graph(packed), OUT / f"{name}.onnx")
        print("wrote", OUT / f"{name}.onnx")
