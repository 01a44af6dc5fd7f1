"""What one base weight costs the kernels when it is already in cache, per storage mode.

Usage: python benchmarks/weight_cost.py [--hidden 1024] [--intermediate 256] [--calls 200]

One expert (H x I, rank 1), one token, one thread, so the three matrices (bf16: 1.5 MiB, int8
and fp8: 0.75 MiB at the default size) stay in L2 between calls: the forward and the backward
time per weight is then the cost of reading and widening the stored value (int8's sign
extension, fp8's e4m3 decode) plus the multiply, without the DRAM stream that hides it at small
batches. Modes are interleaved over 7 rounds; medians are printed.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import ktsft
from ktsft._arrays import BF16


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=256)
    p.add_argument("--calls", type=int, default=200)
    a = p.parse_args()
    H, I = a.hidden, a.intermediate  # noqa: E741
    pool = ktsft.ThreadPool(1)
    rng = np.random.default_rng(0)
    layers = {}
    for quant in ("bf16", "int8", "fp8"):
        cfg = ktsft.MoESFTConfig(1, 1, H, I, lora_rank=1, max_len=1, quant=quant)
        if not layers:
            params = {
                n: (rng.standard_normal(s) / 20).astype(BF16) for n, s in cfg.shapes().items()
            }
        layers[quant] = ktsft.MoESFT(cfg, **params, pool=pool)
    x = (rng.standard_normal((1, H)) / 20).astype(BF16)
    ids, w = np.zeros((1, 1), np.int64), np.ones((1, 1), np.float32)
    weights = 3 * H * I
    fwd = {q: [] for q in layers}
    bwd = {q: [] for q in layers}
    for _ in range(7):
        for quant, moe in layers.items():
            t0 = time.perf_counter()
            for _ in range(a.calls):
                moe.forward(x, ids, w, save_for_backward=True)
                moe.backward(x)
            t1 = time.perf_counter()
            for _ in range(a.calls):
                moe.forward(x, ids, w)
            t2 = time.perf_counter()
            fwd[quant].append((t2 - t1) / a.calls)
            bwd[quant].append((t1 - t0 - (t2 - t1)) / a.calls)
    print(f"one expert H={H} I={I}, one token, one thread ({ktsft.runtime_info()['kernels']})")
    for quant in layers:
        f, b = np.median(fwd[quant]), np.median(bwd[quant])
        print(
            f"{quant:<5} forward {f * 1e6:7.1f} us = {f / weights * 1e12:6.1f} ps/weight; "
            f"backward {b * 1e6:7.1f} us = {b / weights * 1e12:6.1f} ps/weight"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
