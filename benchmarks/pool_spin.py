"""What the pool's spinning saves per step: one layer, one pool, spin_us switched between 0 and
the default every --steps steps, so that drift on a shared machine cannot bias the comparison.

Usage: python benchmarks/pool_spin.py [--shapes qwen3-30b-a3b] [--tokens 4] [--quant int8]
                                      [--rounds 10] [--steps 30] [--threads N] [--spin 100]

For each shape, T and mode: the median step time (forward + backward, new gradient buffers as
bench_sft.py's default) with spin_us = 0 (every wait sleeps on a condition variable) and with
spin_us = --spin, the median over rounds of their difference in microseconds and of their ratio.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from bench_sft import SHAPES, make_layer, step_inputs

import ktsft


def median_step_ms(moe, inputs, steps: int) -> float:
    for x, ids, w, go in inputs[:2]:  # after a switch: settle
        moe.forward(x, ids, w, save_for_backward=True)
        moe.backward(go)
    times = []
    for i in range(steps):
        x, ids, w, go = inputs[i % len(inputs)]
        t0 = time.perf_counter()
        moe.forward(x, ids, w, save_for_backward=True)
        moe.backward(go)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default="qwen3-30b-a3b")
    p.add_argument("--tokens", default="4")
    p.add_argument("--quant", default="int8")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--spin", type=float, default=100.0, help="spin_us against 0 (default 100)")
    a = p.parse_args()
    pool = ktsft.ThreadPool(a.threads)
    print(f"threads {pool.num_threads}; spin_us 0 against {a.spin:g}")
    for shape in a.shapes.split(","):
        if shape not in SHAPES:
            p.error(f"unknown shape {shape!r}; expected one of {sorted(SHAPES)}")
        for T in (int(t) for t in a.tokens.split(",")):
            for quant in a.quant.split(","):
                cfg, moe = make_layer(shape, T, 16, quant, pool)
                rng = np.random.default_rng(1)
                inputs = [step_inputs(cfg, T, rng) for _ in range(4)]
                sleep, spin = [], []
                for r in range(a.rounds):
                    for s in (0.0, a.spin) if r % 2 == 0 else (a.spin, 0.0):
                        pool.spin_us = s
                        (spin if s else sleep).append(median_step_ms(moe, inputs, a.steps))
                x, y = np.array(sleep), np.array(spin)
                print(
                    f"{shape} T={T} {quant} ({moe.isa}): sleeping {np.median(x):.3f} ms, "
                    f"spinning {np.median(y):.3f} ms per step: {np.median(x - y) * 1e3:.0f} us "
                    f"saved ({np.median(x / y):.3f}x)",
                    flush=True,
                )
                pool.spin_us = a.spin
                del moe
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
