"""The spec's error metric (mean|ours - ref| / mean|ref|, ref = float64 on the same bf16 inputs)
for a forward and backward of a realistic layer shape, per kernel family.

Usage: python benchmarks/accuracy.py [--isa FAMILY] [--qlen T] [--quant {bf16,int8}]

With ``--quant int8`` the reference is still the unquantized model (spec section 4's int8 goals).
"""

from __future__ import annotations

import argparse

import numpy as np

import ktsft
from ktsft import reference
from ktsft._arrays import BF16

OUTPUTS = (
    "input",
    "gate_lora_a",
    "gate_lora_b",
    "up_lora_a",
    "up_lora_b",
    "down_lora_a",
    "down_lora_b",
    "weights",
)


def rel_err(ours, ref) -> float:
    ours = np.asarray(ours, dtype=np.float64)
    return float(np.abs(ours - ref).mean() / np.abs(ref).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--isa", default="auto")
    p.add_argument("--qlen", type=int, default=64)
    p.add_argument("--quant", choices=("bf16", "int8"), default="bf16")
    a = p.parse_args()
    E, k, H, I, r, T = 64, 6, 1024, 704, 16, a.qlen  # a DeepSeek-V2-Lite-like layer, narrower
    rng = np.random.default_rng(0)

    def bf16(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) / 100).astype(BF16)

    cfg = ktsft.MoESFTConfig(E, k, H, I, lora_rank=r, lora_alpha=32.0, max_len=T, quant=a.quant)
    params = {n: bf16(*s) for n, s in cfg.shapes().items()}
    moe = ktsft.MoESFT(cfg, **params, isa=a.isa)
    x, go = bf16(T, H), bf16(T, H)
    ids = np.stack([rng.permutation(E)[:k] for _ in range(T)])
    w = rng.random((T, k), dtype=np.float32)
    out = moe.forward(x, ids, w, save_for_backward=True)
    grads = moe.backward(go)
    ref_out = reference.forward(x, ids, w, **params, lora_alpha=32.0)
    ref_grads = reference.backward(go, x, ids, w, **params, lora_alpha=32.0)
    goals = (
        "forward < 0.04, backward < 0.06"
        if a.quant == "int8"
        else "forward < 0.01, backward < 0.02"
    )
    print(f"isa={moe.isa} quant={a.quant} E={E} k={k} H={H} I={I} r={r} T={T} (spec: {goals})")
    print(f"  forward      {rel_err(out, ref_out):.2e}")
    for name in OUTPUTS:
        print(f"  {name:<12} {rel_err(getattr(grads, name), getattr(ref_grads, name)):.2e}")


if __name__ == "__main__":
    main()
