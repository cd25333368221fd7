#!/usr/bin/env python3
"""Writes the small graphs of tests/onnx_ops.rs (tests/fixtures/onnx/ops/).

Why: tests/onnx_ops.rs runs each graph on ONNX Runtime's own kernel and, after the load-time
edit (src/backend/onnx/op_edit.rs), on inferd's, and compares the two.
GroupQueryAttention (src/backend/onnx/gqa.rs), 4 query heads, 2 KV heads, head size 16; cos/sin
caches are graph inputs ([positions, 8]):
- packed.onnx:   query = packed q/k/v, rotary on rotated halves, default scale
- separate.onnx: query, key and value apart, interleaved rotary, scale 0.3
MatMulNBits (src/backend/onnx/nbits.rs), int4, blocks of 32, accuracy_level 4, no zero points,
random but fixed weights and scales as initializers (as the exports have them):
- matmul_k96.onnx:  K 96 (3 blocks: a trailing single one), N 37
- matmul_k896.onnx: K 896 (28 blocks, Qwen2.5-0.5B's hidden size), N 22
Usage: .venv-export/bin/python scripts/make_op_fixtures.py  (needs the onnx package)
       .venv-export/bin/python scripts/make_op_fixtures.py --timing-graphs DIR
         writes the large graphs of tests/onnx_ops.rs::nbits_timing to DIR instead (not fixtures:
         mm_N_K.onnx for Qwen2.5-0.5B's projection shapes, 0.6-85 MB, and mm_chain_896.onnx,
         30 MLP up/down pairs, 163 MB)
"""
from pathlib import Path

import onnx
from onnx import TensorProto, helper, numpy_helper

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


def matmul_node(rng, x, y, k, n, suffix=""):
    """A MatMulNBits node y = x W (random int4 weights, scales) and its two initializers."""
    import numpy as np
    b = rng.integers(0, 256, size=(n, k // 32, 16), dtype=np.uint8)
    scales = (rng.random((n, k // 32), dtype=np.float32) * 0.02 + 0.001).astype(np.float32)
    node = helper.make_node("MatMulNBits", [x, "b" + suffix, "scales" + suffix], [y], name="mm" + suffix,
                            domain="com.microsoft", K=k, N=n, bits=4, block_size=32, accuracy_level=4)
    return node, [numpy_helper.from_array(b, "b" + suffix), numpy_helper.from_array(scales, "scales" + suffix)]


def matmul_model(nodes, inits, a, k, y, n):
    g = helper.make_graph(nodes, "matmul", [helper.make_tensor_value_info(a, TensorProto.FLOAT, ["m", k])],
                          [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["m", n])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=9)


def matmul(k, n, seed):
    import numpy as np
    node, inits = matmul_node(np.random.default_rng(seed), "a", "y", k, n)
    return matmul_model([node], inits, "a", k, "y", n)


def timing_graphs(out):
    import numpy as np
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for n, k in ((4864, 896), (896, 4864), (1152, 896), (151936, 896)):
        node, inits = matmul_node(rng, "A", "Y", k, n)
        onnx.save(matmul_model([node], inits, "A", k, "Y", n), out / f"mm_{n}_{k}.onnx")
    nodes, inits, x = [], [], "A"
    for i in range(30):
        for j, (n, k) in enumerate(((4864, 896), (896, 4864))):
            node, ws = matmul_node(rng, x, f"y{i}_{j}", k, n, f"{i}_{j}")
            nodes.append(node)
            inits += ws
            x = f"y{i}_{j}"
    onnx.save(matmul_model(nodes, inits, "A", 896, x, 896), out / "mm_chain_896.onnx")
    print("wrote the timing graphs to", out)


if __name__ == "__main__":
    import sys
    if len(sys.argv) == 3 and sys.argv[1] == "--timing-graphs":
        timing_graphs(Path(sys.argv[2]))
        sys.exit(0)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, packed in (("packed", True), ("separate", False)):
        onnx.save(graph(packed), OUT / f"{name}.onnx")
        print("wrote", OUT / f"{name}.onnx")
    for k, n, seed in ((96, 37, 1), (896, 22, 2)):
        onnx.save(matmul(k, n, seed), OUT / f"matmul_k{k}.onnx")
        print("wrote", OUT / f"matmul_k{k}.onnx")
