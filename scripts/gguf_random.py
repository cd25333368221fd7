#!/usr/bin/env python3
"""A GGUF file with a real model's exact layout and random weights, from the real file's header.

The GPU machine cannot fetch models and takes at most 64 MiB per call, but a GGUF's header (its
metadata, tokenizer, chat template and tensor table) is small. Speed does not depend on weight
values when EOS is ignored, so: cut the header here, carry it, and write the tensors there as
random but valid blocks of the same types (every f16 scale finite and small). The file then has
the real layout and byte size.

    python3 scripts/gguf_random.py header models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf qwen.header
    python3 scripts/gguf_random.py fill qwen.header /tmp/qwen-random.gguf [--seed 1]

Needs only Python 3 and numpy (no gguf package: the header is parsed here).
"""
import argparse
import struct
import sys

import numpy as np

# ggml type -> (block size in values, bytes per block, byte offsets of f16 scales in a block)
TYPES = {
    0: (1, 4, None),          # F32
    1: (1, 2, None),          # F16
    30: (1, 2, None),         # BF16
    2: (32, 18, [0]),         # Q4_0: d, qs[16]
    3: (32, 20, [0, 2]),      # Q4_1: d, m, qs[16]
    6: (32, 22, [0]),         # Q5_0: d, qh[4], qs[16]
    7: (32, 24, [0, 2]),      # Q5_1: d, m, qh[4], qs[16]
    8: (32, 34, [0]),         # Q8_0: d, qs[32]
    10: (256, 84, [80, 82]),  # Q2_K: scales[16], qs[64], d, dmin
    11: (256, 110, [108]),    # Q3_K: hmask[32], qs[64], scales[12], d
    12: (256, 144, [0, 2]),   # Q4_K: d, dmin, scales[12], qs[128]
    13: (256, 176, [0, 2]),   # Q5_K: d, dmin, scales[12], qh[32], qs[128]
    14: (256, 210, [208]),    # Q6_K: ql[128], qh[64], scales[16], d
}


class Reader:
    def __init__(self, data):
        self.data, self.pos = data, 0

    def take(self, fmt):
        v = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return v[0] if len(v) == 1 else v

    def string(self):
        n = self.take("Q")
        s = self.data[self.pos:self.pos + n]
        self.pos += n
        return s.decode("utf-8", "replace")

    def value(self, t):
        scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
        if t in scalar:
            return self.take(scalar[t])
        if t == 8:
            return self.string()
        if t == 9:
            et, n = self.take("I"), self.take("Q")
            return [self.value(et) for _ in range(n)]
        raise ValueError(f"unknown GGUF value type {t}")


def parse(data):
    """(tensors [(name, dims, type, offset)], data start, alignment) of a GGUF's header."""
    r = Reader(data)
    if r.take("4s") != b"GGUF":
        sys.exit("not a GGUF file")
    version, n_tensors, n_kv = r.take("I"), r.take("Q"), r.take("Q")
    if version < 2:
        sys.exit(f"GGUF version {version} is not supported")
    align = 32
    for _ in range(n_kv):
        key, t = r.string(), r.take("I")
        v = r.value(t)
        if key == "general.alignment":
            align = int(v)
    tensors = []
    for _ in range(n_tensors):
        name = r.string()
        nd = r.take("I")
        dims = [r.take("Q") for _ in range(nd)]
        tensors.append((name, dims, r.take("I"), r.take("Q")))
    start = (r.pos + align - 1) // align * align
    return tensors, start, align


def nbytes(dims, t):
    block, size, _ = TYPES[t]
    n = int(np.prod(dims))
    assert n % block == 0, f"{n} values are not whole blocks of {block}"
    return n // block * size


def random_tensor(name, dims, t, rng):
    if t not in TYPES:
        sys.exit(f"{name}: ggml type {t} is not handled")
    n = int(np.prod(dims))
    block, size, scales = TYPES[t]
    if scales is None:
        vals = (1.0 + 0.02 * rng.standard_normal(n)) if "norm" in name else 0.02 * rng.standard_normal(n)
        if t == 0:
            return vals.astype("<f4").tobytes()
        if t == 1:
            return vals.astype("<f2").tobytes()
        return (vals.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()  # bf16
    blocks = rng.integers(0, 256, size=(n // block, size), dtype=np.uint8)
    for off in scales:
        d = rng.uniform(0.001, 0.01, size=n // block).astype("<f2")
        blocks[:, off:off + 2] = d.view(np.uint8).reshape(-1, 2)
    return blocks.tobytes()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("header", help="copy a GGUF's header (everything before the tensor data)")
    h.add_argument("gguf")
    h.add_argument("out")
    f = sub.add_parser("fill", help="write a GGUF from a header, with random valid tensors")
    f.add_argument("header")
    f.add_argument("out")
    f.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    if a.cmd == "header":
        with open(a.gguf, "rb") as fh:
            head = fh.read(64 << 20)
        _, start, _ = parse(head)
        with open(a.out, "wb") as fh:
            fh.write(head[:start])
        print(f"{a.out}: {start} bytes of header")
        return
    with open(a.header, "rb") as fh:
        head = fh.read()
    tensors, start, align = parse(head)
    rng = np.random.default_rng(a.seed)
    with open(a.out, "wb") as fh:
        fh.write(head[:start])
        pos = 0
        for name, dims, t, off in sorted(tensors, key=lambda x: x[3]):
            if off > pos:
                fh.write(b"\0" * (off - pos))
                pos = off
            data = random_tensor(name, dims, t, rng)
            assert len(data) == nbytes(dims, t)
            fh.write(data)
            pos += len(data)
    print(f"{a.out}: {len(tensors)} tensors, {start + pos} bytes")


if __name__ == "__main__":
    main()
