#!/usr/bin/python3
"""Independent reference for MLX affine quantisation (issue 19).

A numpy port of MLX's CPU `quantize<T, U>` (the affine branch, bits >= 2), which is what
`mx.quantize(w, group_size, bits)` runs on the CPU stream:

    ml-explore/mlx, mlx/backend/cpu/quantized.cpp, commit 784203f0db24a1effe1b98462d301e9d756857fc
    (function `template <typename T, typename U> void quantize(...)`, called by
    fast::Quantize::eval_cpu)

Per group of `group_size` consecutive elements of a row, in float32:
    w_min, w_max       over the group
    mask  = |w_min| > |w_max|
    scale = max((w_max - w_min) / n_bins, 1e-7);  scale = mask ? scale : -scale
    edge  = mask ? w_min : w_max
    q0    = rint(edge / scale)
    bias  = 0; if q0 != 0: scale = edge / q0; bias = edge
    q     = clamp(rint((w - bias) / scale), 0, n_bins)      (unrounded float scale and bias)
    scales[g] = bfloat16(scale); biases[g] = bfloat16(bias)  (round to nearest even)
q is packed LSB-first into u32 words (element k of a word at bits [k*bits, (k+1)*bits)).

So MLX is not the min/max quantiser of DESIGN.md §2: it picks the edge with the larger
magnitude, makes it land exactly on a grid point (scale may be negative: the max edge maps to
q = 0 when |max| >= |min|), and quantises against the float scale/bias before they are rounded
to bf16. tests/quant_ref_test.cpp states the relation to ours.

Usage (writes tests/data/refs/mlx_quantize_ref.safetensors; see tools/refs/README.md):
    /usr/bin/python3 tools/refs/mlx_quantize_ref.py tests/data/qwen3_moe/model.safetensors \
        tests/data/refs/mlx_quantize_ref.safetensors
"""
import json
import struct
import sys

import numpy as np

F32 = np.float32


def read_safetensors(path):
    """Returns {name: (dtype string, shape, raw bytes)}; a tiny parser, no safetensors package."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        a, b = t["data_offsets"]
        out[name] = (t["dtype"], t["shape"], data[a:b])
    return out


def bf16_bits_to_f32(u16):
    return (u16.astype(np.uint32) << 16).view(F32)


def f32_to_bf16_bits(x):
    """Round to nearest even, as MLX's bfloat16_t conversion (NaN never occurs here)."""
    u = np.asarray(x, dtype=F32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16)


def mlx_quantize(w, group_size, bits):
    """w: float32 [..., cols] -> (packed u32 [..., cols*bits/32], scales bf16 bits, biases bf16 bits)."""
    assert bits in (2, 4, 8) and w.shape[-1] % group_size == 0
    lead, cols = w.shape[:-1], w.shape[-1]
    g = w.astype(F32).reshape(-1, cols // group_size, group_size)
    n_bins = F32((1 << bits) - 1)
    eps = F32(1e-7)
    w_min = g.min(axis=-1)
    w_max = g.max(axis=-1)
    mask = np.abs(w_min) > np.abs(w_max)
    scale = np.maximum((w_max - w_min) / n_bins, eps).astype(F32)
    scale = np.where(mask, scale, -scale).astype(F32)
    edge = np.where(mask, w_min, w_max).astype(F32)
    q0 = np.rint(edge / scale).astype(F32)
    nz = q0 != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(nz, edge / np.where(nz, q0, F32(1)), scale).astype(F32)
    bias = np.where(nz, edge, F32(0)).astype(F32)
    q = np.rint((g - bias[..., None]) / scale[..., None]).astype(F32)
    q = np.minimum(np.maximum(q, F32(0)), n_bins).astype(np.uint32)
    per_word = 32 // bits
    q = q.reshape(-1, cols // per_word, per_word)
    shifts = (np.arange(per_word, dtype=np.uint32) * np.uint32(bits))
    packed = np.bitwise_or.reduce(q << shifts, axis=-1).astype(np.uint32)
    return (packed.reshape(*lead, cols * bits // 32),
            f32_to_bf16_bits(scale).reshape(*lead, cols // group_size),
            f32_to_bf16_bits(bias).reshape(*lead, cols // group_size))


def edge_cases():
    """[8, 64] bf16-exact rows that exercise each branch: mixed sign, all negative, all positive,
    |min| == |max|, constant (q0 == 0 path with eps), all zero, tiny range, an exact grid."""
    rng = np.random.default_rng(19)
    rows = [
        rng.standard_normal(64) * 0.05,
        -np.abs(rng.standard_normal(64)) * 0.02 - 0.01,
        np.abs(rng.standard_normal(64)) * 0.02 + 0.01,
        np.concatenate([[-0.5, 0.5], rng.uniform(-0.5, 0.5, 62)]),
        np.full(64, 0.375),
        np.zeros(64),
        1.0 + rng.integers(0, 3, 64) * 2.0 ** -7,
        np.arange(64) % 16 * 0.125 - 1.0,
    ]
    w = np.stack(rows).astype(F32)
    return bf16_bits_to_f32(f32_to_bf16_bits(w))  # bf16-exact, as checkpoint weights are


def main(src, dst):
    st = read_safetensors(src)

    def get(name):
        dtype, shape, raw = st[name]
        assert dtype == "BF16", name
        return bf16_bits_to_f32(np.frombuffer(raw, dtype=np.uint16)).reshape(shape)

    inputs = {
        "q_proj": get("model.layers.0.self_attn.q_proj.weight"),  # [128, 64]
        "experts_gate": np.stack([get(f"model.layers.0.mlp.experts.{e}.gate_proj.weight")
                                  for e in range(16)]),  # [16, 32, 64]
        "edge_cases": edge_cases(),  # [8, 64]
    }
    recipes = [(4, 64), (8, 64), (2, 64), (4, 32)]
    tensors = {}
    for name, w in inputs.items():
        tensors[name + ".input"] = ("BF16", list(w.shape), f32_to_bf16_bits(w).tobytes())
        for bits, group in recipes:
            if name == "experts_gate" and (bits, group) != (4, 64):
                continue
            p, s, b = mlx_quantize(w, group, bits)
            key = f"{name}.q{bits}g{group}"
            tensors[key + ".weight"] = ("U32", list(p.shape), p.tobytes())
            tensors[key + ".scales"] = ("BF16", list(s.shape), s.tobytes())
            tensors[key + ".biases"] = ("BF16", list(b.shape), b.tobytes())
    header, blobs, off = {}, [], 0
    for name in sorted(tensors):
        dtype, shape, raw = tensors[name]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    header["__metadata__"] = {"source": "tools/refs/mlx_quantize_ref.py (port of MLX CPU quantize, "
                                        "mlx 784203f0db24a1effe1b98462d301e9d756857fc)"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(dst, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
