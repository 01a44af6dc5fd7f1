"""ktsft's LoRA-MoE SFT step against the roofline floor and PyTorch eager, in one process.

Usage: python benchmarks/bench_sft.py [--threads N] [--shapes qwen3-30b-a3b,dsv2-lite]
                                      [--tokens 4,128,1024] [--quant bf16,int8,fp8,int4]
                                      [--repeats R] [--no-torch] [--grads new|reused]

For each layer shape, T and base-weight mode it times ktsft's forward, backward and the step
(forward + backward; the median of R steps after a warm-up), and PyTorch eager doing the same
step as /work/shared/bench/torch_baseline.py (imported from there, run in this process with the
same number of threads). The ceilings of the roofline are measured at the start of the run:

  read bandwidth   torch.sum over a 1 GiB float32 tensor (best of 5)
  bf16 GEMM rate   torch.matmul of bf16 [4096, 2048] x [2048, 2048] (best of 5)
  fp32 GEMM rate   the same in float32

and the floor of a step is max(bytes of the active experts' base weights, read once by the
forward and once by the backward / bandwidth, FLOPs / bf16 GEMM rate). FLOPs per route: 12 H I
for the six base GEMMs plus 18 r (H + I) for the LoRA products. "roof" is floor / measured step.
On CPUs without AVX512_BF16, PyTorch's bf16 GEMM is far below what the FMA units do in fp32, so
"roof32" also gives the stricter floor with the faster of the two GEMM rates.
With T = 1024 it also reports the peak memory the step allocates beyond the packed weights
(resident set sampled every millisecond, minus the resident set before the step).

Gradient buffers: by default backward makes new ones every step, as ktsft.torch does under
autograd, so allocating them is part of the step (when at most half the experts can get a token
they are fresh zero pages, and only the routed experts' pages are mapped). --grads reused writes
the same caller-owned buffers every step (a training loop that keeps its gradient buffers): no
new memory, but every expert without tokens is zeroed again.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import os
import threading
import time

import numpy as np

import ktsft
from ktsft._arrays import BF16

SHAPES = {  # name: experts, hidden, intermediate, top_k
    "qwen3-30b-a3b": (128, 2048, 768, 8),
    "dsv2-lite": (64, 2048, 1408, 6),
}
BASELINE = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "bench", "torch_baseline.py"
)


def load_baseline():
    """The PyTorch baseline module, imported from its own file (not copied into ktsft)."""
    spec = importlib.util.spec_from_file_location("torch_baseline", BASELINE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for name, shape in SHAPES.items():
        mod.CONFIGS.setdefault(name, shape)
    return mod


def measure_ceilings(threads: int) -> tuple[float, float, float]:
    """(read bandwidth in bytes/s, bf16 and fp32 GEMM rates in FLOP/s), best of 5 each."""
    import torch

    torch.set_num_threads(threads)
    big = torch.ones(1 << 28, dtype=torch.float32)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        big.sum()
        best = min(best, time.perf_counter() - t0)
    bandwidth = big.numel() * 4 / best
    del big
    rates = []
    for dtype in (torch.bfloat16, torch.float32):
        a = torch.randn(4096, 2048).to(dtype)
        b = torch.randn(2048, 2048).to(dtype)
        a @ b
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        rates.append(2.0 * 4096 * 2048 * 2048 / best)
    return bandwidth, rates[0], rates[1]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the resident set every millisecond while active; .extra: peak minus start.
    glibc's free memory is handed back first (malloc_trim), so that what the step allocates
    shows up as growth instead of reusing the previous step's freed blocks."""

    def __enter__(self):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.extra = self.peak - self.start


def make_layer(shape: str, T: int, rank: int, quant: str, pool, seed: int = 0):
    E, H, I, k = SHAPES[shape]  # noqa: E741
    rng = np.random.default_rng(seed)
    cfg = ktsft.MoESFTConfig(
        E, k, H, I, lora_rank=rank, lora_alpha=2.0 * rank, max_len=T, quant=quant
    )
    arrays = {
        n: (rng.standard_normal(s, dtype=np.float32) / 100).astype(BF16)
        for n, s in cfg.shapes().items()
    }
    return cfg, ktsft.MoESFT(cfg, **arrays, pool=pool)


def step_inputs(cfg, T: int, rng):
    E, k, H = cfg.expert_num, cfg.num_experts_per_tok, cfg.hidden_size
    ids = np.stack([rng.permutation(E)[:k] for _ in range(T)]).astype(np.int64)
    w = rng.random((T, k), dtype=np.float32)
    w /= w.sum(axis=1, keepdims=True)
    x = (rng.standard_normal((T, H), dtype=np.float32) / 100).astype(BF16)
    go = (rng.standard_normal((T, H), dtype=np.float32) / 100).astype(BF16)
    return x, ids, w, go


def bench_ktsft(shape, T, quant, rank, pool, repeats, reuse_grads=False):
    cfg, moe = make_layer(shape, T, rank, quant, pool)
    rng = np.random.default_rng(1)
    fwd, bwd, active, extra = [], [], [], None
    buffers = {}  # with reuse_grads: the warm-up step's gradients, written again by every step
    for i in range(repeats + 1):  # the first step warms up
        x, ids, w, go = step_inputs(cfg, T, rng)
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            moe.forward(x, ids, w, save_for_backward=True)
            t1 = time.perf_counter()
            g = moe.backward(go, **buffers)
            t2 = time.perf_counter()
        if reuse_grads and not buffers:
            buffers = {"grad_input": g.input, "lora_grads": g.lora()}
        if i:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            active.append(len(np.unique(ids)))
            extra = mem.extra if extra is None else max(extra, mem.extra)
    step = [f + b for f, b in zip(fwd, bwd)]
    return {
        "fwd": float(np.median(fwd)),
        "bwd": float(np.median(bwd)),
        "step": float(np.median(step)),
        "active": float(np.mean(active)),
        "extra": extra,
        "isa": f"{moe.isa} ({moe._engine.kernel_variant})",
    }


def bench_torch(baseline, shape, T, repeats):
    base, lora = baseline.make(shape)
    baseline.step(shape, T, base, lora)  # warm-up
    ts = []
    for i in range(repeats):
        t0 = time.perf_counter()
        baseline.step(shape, T, base, lora, seed=2 + i)
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--tokens", default="4,128,1024")
    p.add_argument("--quant", default="bf16,int8")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch eager baseline")
    p.add_argument(
        "--grads",
        choices=("new", "reused"),
        default="new",
        help="new: backward makes new gradient buffers every step (as ktsft.torch does); "
        "reused: the caller's buffers are written again every step",
    )
    a = p.parse_args()

    pool = ktsft.ThreadPool(a.threads)
    threads = pool.num_threads
    bandwidth, gemm, gemm32 = measure_ceilings(threads)
    baseline = None if a.no_torch else load_baseline()
    print(
        f"threads {threads}; measured: read bandwidth {bandwidth / 1e9:.1f} GB/s, "
        f"bf16 GEMM {gemm / 1e9:.0f} GFLOP/s (fp32 GEMM {gemm32 / 1e9:.0f}); "
        f"ktsft {ktsft.runtime_info()['isa']}; gradient buffers: {a.grads}"
    )
    head = (
        f"{'shape':<14}{'T':>5} {'quant':<5}{'fwd ms':>9}{'bwd ms':>9}{'step ms':>9}"
        f"{'tok/s':>9}{'torch ms':>10}{'vs torch':>9}{'floor ms':>9}{'roof':>7}{'roof32':>8}"
    )
    print(head)
    print("-" * len(head))
    rows = []
    for shape in a.shapes.split(","):
        E, H, I, k = SHAPES[shape]  # noqa: E741
        for T in (int(t) for t in a.tokens.split(",")):
            torch_ms = None if baseline is None else bench_torch(baseline, shape, T, a.repeats)
            for quant in a.quant.split(","):
                r = bench_ktsft(shape, T, quant, a.rank, pool, a.repeats, a.grads == "reused")
                # bytes per weight: bf16 2, int8/fp8 1, int4 half a byte + a float32 per 32
                per = {"bf16": 2.0, "int4": 0.5 + 4 / 32}.get(quant, 1.0)
                wbytes = r["active"] * 3 * H * I * per * 2
                flops = T * k * (12.0 * H * I + 18.0 * a.rank * (H + I))
                floor = max(wbytes / bandwidth, flops / gemm)
                floor32 = max(wbytes / bandwidth, flops / max(gemm, gemm32))
                vs = "" if torch_ms is None else f"{torch_ms / r['step']:.1f}x"
                tms = "" if torch_ms is None else f"{torch_ms * 1e3:.1f}"
                print(
                    f"{shape:<14}{T:>5} {quant:<5}{r['fwd'] * 1e3:>9.1f}{r['bwd'] * 1e3:>9.1f}"
                    f"{r['step'] * 1e3:>9.1f}{T / r['step']:>9.0f}{tms:>10}{vs:>9}"
                    f"{floor * 1e3:>9.1f}{floor / r['step']:>7.0%}{floor32 / r['step']:>8.0%}",
                    flush=True,
                )
                rows.append((shape, T, quant, r))
    print(f"kernels: {rows[0][3]['isa'] if rows else ''}")
    for shape, T, quant, r in rows:
        if T == 1024:
            print(
                f"{shape} T=1024 {quant}: peak allocation beyond the packed weights "
                f"{r['extra'] / 2**20:.0f} MiB"
            )
    for shape in a.shapes.split(","):
        for T in (4,):
            got = {q: r["step"] for s, t, q, r in rows if s == shape and t == T}
            if "bf16" in got and "int8" in got:
                print(f"{shape} T={T}: int8 step {got['bf16'] / got['int8']:.2f}x faster than bf16")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
