"""One LoRA-MoE SFT step (forward + backward) with ktsft, against the roofline and PyTorch.

Usage: python benchmarks/bench_moe.py [CONFIG] [QLEN] [--threads N] [--torch]

Prints tokens/s, achieved GFLOP/s and the fraction of the roofline: the slower of the
arithmetic ceiling (--peak-gflops) and the memory ceiling (bytes of the active experts'
weights, read twice per step, over --bandwidth-gbs). The defaults are this project's 2-core
machine (docs: hardware facts). With --torch it also runs the PyTorch eager baseline
(../shared/bench/torch_baseline.py) on the same config in a subprocess.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np

import ktsft
from ktsft._arrays import BF16

CONFIGS = {  # name: experts, hidden, intermediate, top_k (the same as the PyTorch baseline)
    "qwen3-30b-a3b": (128, 2048, 768, 8),
    "dsv2-lite": (64, 2048, 1408, 6),
    "dsv3": (256, 7168, 2048, 8),
    "tiny": (16, 512, 256, 4),
}
BASELINE = os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "bench", "torch_baseline.py"
)


def make_layer(
    name: str, qlen: int, rank: int, pool: ktsft.ThreadPool, quant: str = "bf16", seed: int = 0
):
    E, H, I, k = CONFIGS[name]
    rng = np.random.default_rng(seed)

    def r(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) / 100).astype(BF16)

    cfg = ktsft.MoESFTConfig(
        E, k, H, I, lora_rank=rank, lora_alpha=2.0 * rank, max_len=qlen, quant=quant
    )
    shapes = cfg.shapes()
    arrays = {n: r(*s) for n, s in shapes.items()}
    return cfg, ktsft.MoESFT(cfg, **arrays, pool=pool)


def step_inputs(cfg: ktsft.MoESFTConfig, qlen: int, rng: np.random.Generator):
    E, k, H = cfg.expert_num, cfg.num_experts_per_tok, cfg.hidden_size
    ids = np.stack([rng.permutation(E)[:k] for _ in range(qlen)]).astype(np.int64)
    w = rng.random((qlen, k), dtype=np.float32)
    w /= w.sum(axis=1, keepdims=True)
    x = (rng.standard_normal((qlen, H), dtype=np.float32) / 100).astype(BF16)
    go = (rng.standard_normal((qlen, H), dtype=np.float32) / 100).astype(BF16)
    return x, ids, w, go


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("config", nargs="?", default="qwen3-30b-a3b", choices=sorted(CONFIGS))
    p.add_argument("qlen", nargs="?", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--quant", choices=("bf16", "int8"), default="bf16")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--peak-gflops",
        type=float,
        default=400.0,
        help="arithmetic ceiling (2 cores: bf16 GEMM via oneDNN reaches ~400)",
    )
    p.add_argument(
        "--bandwidth-gbs",
        type=float,
        default=33.0,
        help="memory read bandwidth ceiling (2 cores: ~33 GB/s)",
    )
    p.add_argument("--torch", action="store_true", help="also run the PyTorch eager baseline")
    a = p.parse_args()

    pool = ktsft.ThreadPool(a.threads)
    cfg, moe = make_layer(a.config, a.qlen, a.rank, pool, a.quant)
    elt = 1 if a.quant == "int8" else 2  # bytes per base-weight element
    H, I, k, r = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_experts_per_tok,
        cfg.lora_rank,
    )
    rng = np.random.default_rng(1)
    times, active = [], []
    for i in range(a.repeats + 1):  # the first step warms up
        x, ids, w, go = step_inputs(cfg, a.qlen, rng)
        t0 = time.perf_counter()
        moe.forward(x, ids, w, save_for_backward=True)
        moe.backward(go)
        if i:
            times.append(time.perf_counter() - t0)
            active.append(len(np.unique(ids)))
    t = float(np.median(times))
    routes = a.qlen * k
    # forward: 3 base GEMMs; backward: 3 more (go W_d, dg W_g, du W_u); LoRA: ~4 r (H + I) each
    flops = routes * (12.0 * H * I + 8.0 * r * (H + I) * 3)
    weight_bytes = float(np.mean(active)) * 3 * H * I * elt * 2  # active experts, read twice
    roof = max(flops / (a.peak_gflops * 1e9), weight_bytes / (a.bandwidth_gbs * 1e9))
    bound = "arithmetic" if flops / (a.peak_gflops * 1e9) >= roof else "memory"
    print(
        f"ktsft {a.config} qlen={a.qlen} quant={a.quant} isa={moe.isa} threads={pool.num_threads}: "
        f"median {t * 1e3:.1f} ms, {a.qlen / t:.1f} tok/s, {flops / t / 1e9:.1f} GFLOP/s, "
        f"roofline {roof * 1e3:.1f} ms ({bound}-bound) -> {roof / t:.1%} of roofline; "
        f"packed weights {moe.packed_bytes / 2**20:.0f} MiB"
    )
    if a.torch:
        if not os.path.exists(BASELINE):
            print(f"PyTorch baseline not found at {BASELINE}", file=sys.stderr)
            return 1
        cmd = [sys.executable, BASELINE, a.config, str(a.qlen), str(pool.num_threads)]
        print(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
