"""How much faster one base-weight mode's step is than another's, measured so that drift cannot
bias it.

Usage: python benchmarks/quant_speedup.py [--modes bf16,int8] [--shapes qwen3-30b-a3b,dsv2-lite]
                                          [--tokens 4] [--rounds 40] [--threads N]
                                          [--grads new|reused]

Two layers of the same shape (benchmarks/bench_sft.py's shapes and random weights), one in each
of the two modes (bf16, int8, fp8 or int4, optionally with a kernel family: bf16@avx512; the
speedup is the first one's step time over the second's), live side by side; every round runs
one step (forward + backward) of each on the same inputs, alternating which goes first. On a
shared machine the speed drifts by tens of percent within a minute, so timing the two modes one
after the other (as bench_sft.py's table does) can tilt their ratio either way; the median over
rounds of the per-round ratio does not drift with the machine. Gradient buffers as in
bench_sft.py (--grads).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from bench_sft import SHAPES, make_layer, step_inputs

import ktsft


def step_time(moe, x, ids, w, go, buffers) -> float:
    t0 = time.perf_counter()
    moe.forward(x, ids, w, save_for_backward=True)
    moe.backward(go, **buffers)
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--modes", default="bf16,int8", help="baseline,mode: QUANT or QUANT@ISA (int8@avx512)"
    )
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--tokens", default="4")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--grads", choices=("new", "reused"), default="new")
    a = p.parse_args()
    base, mode = a.modes.split(",")
    pool = ktsft.ThreadPool(a.threads)
    print(
        f"threads {pool.num_threads}; kernels {ktsft.runtime_info()['kernels']}; "
        f"gradient buffers: {a.grads}; {a.rounds} rounds"
    )
    width = max(10, len(base) + 4, len(mode) + 4)  # "int8@avx512 ms" needs more than 10
    print(
        f"{'shape':<14}{'T':>5}{base + ' ms':>{width}}{mode + ' ms':>{width}}{'speedup':>9}"
        f"{'(q25-q75)':>14}"
    )
    for shape in a.shapes.split(","):
        for T in (int(t) for t in a.tokens.split(",")):
            built = {
                q: make_layer(shape, T, 16, q.split("@")[0], pool, isa=q.partition("@")[2] or None)
                for q in (base, mode)
            }
            cfg = built[base][0]
            layers = {q: moe for q, (_, moe) in built.items()}
            rng = np.random.default_rng(1)
            buffers = {q: {} for q in layers}
            times = {q: [] for q in layers}
            for i in range(a.rounds + 1):  # round 0 warms up
                x, ids, w, go = step_inputs(cfg, T, rng)
                order = (base, mode) if i % 2 else (mode, base)
                for q in order:
                    if a.grads == "reused" and not buffers[q]:
                        layers[q].forward(x, ids, w, save_for_backward=True)
                        g = layers[q].backward(go)
                        buffers[q] = {"grad_input": g.input, "lora_grads": g.lora()}
                    t = step_time(layers[q], x, ids, w, go, buffers[q])
                    if i:
                        times[q].append(t)
            ratio = np.array(times[base]) / np.array(times[mode])
            q25, q75 = np.percentile(ratio, [25, 75])
            print(
                f"{shape:<14}{T:>5}{np.median(times[base]) * 1e3:>{width}.1f}"
                f"{np.median(times[mode]) * 1e3:>{width}.1f}{np.median(ratio):>8.2f}x"
                f"{f'({q25:.2f}-{q75:.2f})':>14}"
            )
            del built, layers
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
