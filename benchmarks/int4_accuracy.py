"""INT4 accuracy: the engine against the float64 int4 model and against the unquantized model,
and group scales (G = 32, 64, 128) against per-row int4 at model row widths.

Usage: python benchmarks/int4_accuracy.py

Part 1 runs ktsft.MoESFT(quant="int4") on Gaussian weights (tests/conftest.py's make_layer:
N(0, 1) / sqrt(fan_in)) and prints the spec metric mean|ours - ref| / mean|ref| of the forward
and of the worst backward output. Part 2 is NumPy only: y = x W^T with W [512, H] Gaussian and
x [64, H] Gaussian, W quantized with group scales (ktsft.reference.quantize_int4) or with one
scale per row (scale = amax / 7, the predecessor's scheme), against the float64 product.
"""

from __future__ import annotations

import numpy as np

import ktsft
from ktsft import reference

BF16 = ktsft._arrays.BF16
LORA = ("gate_lora_a", "gate_lora_b", "up_lora_a", "up_lora_b", "down_lora_a", "down_lora_b")
GRADS = ("input", *LORA, "weights")


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).mean() / np.abs(b).mean())


def layer(rng, E, H, I, r):  # noqa: E741
    shapes = {
        "gate_proj": (E, I, H),
        "up_proj": (E, I, H),
        "down_proj": (E, H, I),
        "gate_lora_a": (E, r, H),
        "gate_lora_b": (E, I, r),
        "up_lora_a": (E, r, H),
        "up_lora_b": (E, I, r),
        "down_lora_a": (E, r, I),
        "down_lora_b": (E, H, r),
    }
    return {n: (rng.standard_normal(s) / np.sqrt(s[-1])).astype(BF16) for n, s in shapes.items()}


def engine_table():
    print("engine, quant='int4' (G = 32): forward / worst backward output")
    for E, k, H, I, r, T in ((8, 2, 512, 384, 8, 64), (4, 2, 1024, 512, 8, 32)):  # noqa: E741
        rng = np.random.default_rng(0)
        p = layer(rng, E, H, I, r)
        x = rng.standard_normal((T, H)).astype(BF16)
        go = rng.standard_normal((T, H)).astype(BF16)
        ids = np.stack([rng.permutation(E)[:k] for _ in range(T)]).astype(np.int64)
        w = rng.random((T, k)).astype(np.float32)
        cfg = ktsft.MoESFTConfig(E, k, H, I, lora_rank=r, lora_alpha=16.0, quant="int4")
        moe = ktsft.MoESFT(cfg, **p)
        out = moe.forward(x, ids, w, save_for_backward=True)
        g = moe.backward(go)
        for quant in ("int4", "bf16"):
            kw = dict(lora_alpha=16.0, quant=quant, **p)
            ro = reference.forward(x, ids, w, **kw)
            rg = reference.backward(go, x, ids, w, **kw)
            worst = max(rel(getattr(g, n), getattr(rg, n)) for n in GRADS)
            what = "int4 model " if quant == "int4" else "unquantized"
            print(f"  E={E} H={H} I={I} T={T} vs {what}: {rel(out, ro):.4f} / {worst:.4f}")


def per_row_int4(w):
    amax = np.abs(w).max(axis=-1, keepdims=True)
    s = (amax / np.float32(7)).astype(np.float32)
    return np.clip(np.rint(w / s), -8, 7) * s.astype(np.float64)


def group_table():
    print("x W^T, W [512, H] Gaussian: group int4 vs per-row int4 (rel. error of the product)")
    rng = np.random.default_rng(0)
    for H in (2048, 7168):
        w = rng.standard_normal((512, H)).astype(np.float32)
        x = rng.standard_normal((64, H))
        exact = x @ w.T.astype(np.float64)
        row = [f"H={H}:"]
        for g in (32, 64, 128):
            wq = reference.dequantize_int4(*reference.quantize_int4(w, g), H, g)
            row.append(f"G={g} {rel(x @ wq.T, exact):.4f}")
        row.append(f"per-row {rel(x @ per_row_int4(w).T, exact):.4f}")
        print("  " + "  ".join(row))


if __name__ == "__main__":
    engine_table()
    group_table()
