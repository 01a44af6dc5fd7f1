"""What running a synchronous call on the calling thread saves (ThreadPool.run with nothing
queued) against handing it to the pool's dispatcher thread and waiting for the result, in one
process: rounds of steps alternate between the two.

Usage: python benchmarks/inline_call.py [--shape qwen3-30b-a3b] [--tokens 1,4] [--quant int8]
                                        [--steps 40] [--rounds 12] [--threads 2]
"""

from __future__ import annotations

import argparse

import numpy as np
from bench_sft import SHAPES, make_layer, step_inputs
from pool_spin import median_step_ms

import ktsft


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(SHAPES))
    p.add_argument("--tokens", default="1,4")
    p.add_argument("--quant", default="int8")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    pool = ktsft.ThreadPool(a.threads)
    here, queued = pool.run, pool._run_queued  # queued: the hand-off to the dispatcher

    for T in (int(t) for t in a.tokens.split(",")):
        for quant in a.quant.split(","):
            cfg, moe = make_layer(a.shape, T, 16, quant, pool)
            rng = np.random.default_rng(1)
            inputs = [step_inputs(cfg, T, rng) for _ in range(8)]
            res = {"queued": [], "here": []}
            for r in range(a.rounds):
                for mode in ("queued", "here") if r % 2 == 0 else ("here", "queued"):
                    pool.run = queued if mode == "queued" else here
                    res[mode].append(median_step_ms(moe, inputs, a.steps))
            pool.run = here
            q, h = np.array(res["queued"]), np.array(res["here"])
            print(
                f"{a.shape} T={T} {quant} {moe.isa}: queued {np.median(q):.3f} ms, "
                f"on the calling thread {np.median(h):.3f} ms: {np.median(q - h) * 1e3:.0f} "
                f"us less, {np.median(q / h):.3f}x (quartiles {np.quantile(q / h, 0.25):.3f}-"
                f"{np.quantile(q / h, 0.75):.3f})",
                flush=True,
            )
            del moe


if __name__ == "__main__":
    main()
