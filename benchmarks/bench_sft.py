"""ktsft's LoRA-MoE SFT step against the roofline floor and PyTorch eager, in one process.

Usage: python benchmarks/bench_sft.py [--threads N] [--shapes qwen3-30b-a3b,dsv2-lite]
                                      [--tokens 4,128,1024,4096] [--quant bf16,int8,fp8,int4]
                                      [--repeats R] [--no-torch] [--torch-dtype bfloat16,float32]
                                      [--torch-max-tokens 1024] [--grads new|reused]
                                      [--phases] [--plot FILE.png]

For each layer shape, T and base-weight mode it times ktsft's forward, backward and the step
(forward + backward; the median of R steps after a warm-up), and PyTorch eager doing the same
step as /work/shared/bench/torch_baseline.py (its model and expert loop imported from there, run
in this process with the same number of threads; in bf16 as the baseline writes it and, with
--torch-dtype, in float32, what a user on a CPU without bf16 arithmetic would run; skipped above
--torch-max-tokens tokens, where it takes minutes). The ceilings of the roofline are measured
at the start of the run:

  read bandwidth   torch.sum over a 1 GiB float32 tensor (best of 5)
  GEMM rate        torch.matmul [4096, 2048] x [2048, 2048] in bf16 and in fp32 (best of 5);
                   the compute ceiling is the faster of the two (a CPU without bf16 arithmetic
                   computes bf16 in fp32), and the header says which

and the floor of a step is max(bytes of the active experts' base weights, read once by the
forward and once by the backward / bandwidth, FLOPs / GEMM rate). FLOPs per route: 12 H I
for the six base GEMMs plus 18 r (H + I) for the LoRA products. "roof" is floor / measured step.
With T = 1024 it also reports the peak memory the step allocates beyond the packed weights
(resident set sampled every millisecond, minus the resident set before the step).

--phases prints, per row, where the step's time goes, from the engine's own timers
(MoESFT.set_profiling; the phases are those of docs/design.rst): ms per step, and for the four
base-weight GEMM phases the GFLOP/s of their base products and the GB/s of the weights they
read, each as a fraction of its ceiling. --plot draws the roofline picture: achieved GFLOP/s
against arithmetic intensity (FLOPs per weight byte) for every row, under the two ceilings
(needs matplotlib).

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


def make_layer(shape: str, T: int, rank: int, quant: str, pool, seed: int = 0, isa=None):
    E, H, I, k = SHAPES[shape]  # noqa: E741
    rng = np.random.default_rng(seed)
    cfg = ktsft.MoESFTConfig(
        E, k, H, I, lora_rank=rank, lora_alpha=2.0 * rank, max_len=T, quant=quant
    )
    arrays = {
        n: (rng.standard_normal(s, dtype=np.float32) / 100).astype(BF16)
        for n, s in cfg.shapes().items()
    }
    return cfg, ktsft.MoESFT(cfg, **arrays, pool=pool, isa=isa)


def step_inputs(cfg, T: int, rng):
    E, k, H = cfg.expert_num, cfg.num_experts_per_tok, cfg.hidden_size
    ids = np.stack([rng.permutation(E)[:k] for _ in range(T)]).astype(np.int64)
    w = rng.random((T, k), dtype=np.float32)
    w /= w.sum(axis=1, keepdims=True)
    x = (rng.standard_normal((T, H), dtype=np.float32) / 100).astype(BF16)
    go = (rng.standard_normal((T, H), dtype=np.float32) / 100).astype(BF16)
    return x, ids, w, go


BYTES_PER_WEIGHT = {"bf16": 2, "int8": 1, "fp8": 1, "int4": 0.5 + 4 / 32}  # int4: + a scale / 32

# The phases whose base-weight GEMMs the roofline counts: (multiple of R H I FLOPs, of the
# active experts' H I weights read).
GEMM_PHASES = {"F1": (4, 2), "F3": (2, 1), "B2": (2, 1), "B4": (4, 2)}
PHASE_ORDER = ("FQ", "F0", "F1", "F2", "F3", "F4", "BZ", "B0", "B1", "B2", "B3", "B4", "B5")


def bench_ktsft(shape, T, quant, rank, pool, repeats, reuse_grads=False, phases=False):
    cfg, moe = make_layer(shape, T, rank, quant, pool)
    rng = np.random.default_rng(1)
    fwd, bwd, active, extra = [], [], [], None
    buffers = {}  # with reuse_grads: the warm-up step's gradients, written again by every step
    for i in range(repeats + 1):  # the first step warms up
        if i == 1 and phases:
            moe.set_profiling(True)
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
        "phases": moe.phase_times() if phases else None,
    }


def bench_torch(baseline, shape, T, repeats, dtype="bfloat16"):
    """The baseline's step (its model, its expert loop), in bf16 as it is written or in
    float32: hidden states, base weights and LoRA parameters all of that dtype."""
    import torch

    E, H, I, K = baseline.CONFIGS[shape]  # noqa: E741
    base, lora = baseline.make(shape)
    dt = getattr(torch, dtype)
    base = {n: t.to(dt) for n, t in base.items()}
    lora = {n: torch.nn.Parameter(t.detach().to(dt)) for n, t in lora.items()}

    def step(seed):
        g = torch.Generator().manual_seed(seed)
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
        w = torch.rand(T, K, generator=g)
        w = w / w.sum(-1, keepdim=True)
        x = (torch.randn(T, H, generator=g) / 100).to(dt).requires_grad_()
        baseline.moe_lora(x, ids, w, base, lora, 32.0 / 16).sum().backward()

    step(1)  # warm-up
    ts = []
    for i in range(repeats):
        t0 = time.perf_counter()
        step(2 + i)
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def print_phases(r, shape, T, quant, rank, bandwidth, rate):
    """Where the step's time goes, per phase (ms per step; GEMM phases against the ceilings)."""
    E, H, I, k = SHAPES[shape]  # noqa: E741
    steps = r["phases"]["forward"][1]
    R, b = T * k, BYTES_PER_WEIGHT[quant]
    parts = []
    for name in PHASE_ORDER:
        seconds, runs = r["phases"][name]
        if not runs:
            continue
        ms = seconds / steps * 1e3
        if name in GEMM_PHASES:
            nf, nw = GEMM_PHASES[name]
            flops, wbytes = nf * R * H * I, nw * r["active"] * H * I * b
            gf, gb = flops / (seconds / steps), wbytes / (seconds / steps)
            parts.append(
                f"{name} {ms:.1f} ms ({gf / 1e9:.0f} GFLOP/s {gf / rate:.0%}, "
                f"{gb / 1e9:.1f} GB/s {gb / bandwidth:.0%})"
            )
        else:
            parts.append(f"{name} {ms:.1f}")
    setup = sum(r["phases"][n][0] for n in ("forward", "backward")) - sum(
        r["phases"][n][0] for n in PHASE_ORDER
    )
    parts.append(f"setup {setup / steps * 1e3:.1f}")
    print(f"    phases {shape} T={T} {quant}: " + "; ".join(parts), flush=True)


def plot_roofline(path, points, bandwidth, rate, rate_name):
    """Achieved GFLOP/s against FLOPs per weight byte, under the bandwidth and GEMM ceilings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    lo = min(p[0] for p in points) / 2
    hi = max(p[0] for p in points) * 2
    xs = np.geomspace(lo, hi, 200)
    ax.plot(
        xs,
        np.minimum(xs * bandwidth, rate) / 1e9,
        "k-",
        lw=2,
        label=f"roofline: {bandwidth / 1e9:.1f} GB/s, {rate / 1e9:.0f} GFLOP/s ({rate_name})",
    )
    markers = {"bf16": "o", "int8": "s", "fp8": "^"}
    for intensity, gflops, shape, T, quant in points:
        ax.scatter(
            intensity,
            gflops,
            marker=markers.get(quant, "x"),
            s=45,
            color=plt.cm.viridis(np.log(T) / np.log(8192)),
            label=f"{shape} {quant}" if T == min(q[3] for q in points) else None,
        )
        ax.annotate(
            f"T={T}", (intensity, gflops), textcoords="offset points", xytext=(4, 3), fontsize=7
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOPs per byte of base weights read)")
    ax.set_ylabel("achieved GFLOP/s (step)")
    ax.set_title("ktsft LoRA-MoE SFT step against the roofline")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"roofline picture: {path}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--tokens", default="4,128,1024,4096")
    p.add_argument("--quant", default="bf16,int8,fp8")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch eager baseline")
    p.add_argument("--torch-dtype", default="bfloat16,float32", help="dtypes of the baseline")
    p.add_argument(
        "--torch-max-tokens",
        type=int,
        default=1024,
        help="no baseline above this many tokens (it takes minutes there)",
    )
    p.add_argument(
        "--grads",
        choices=("new", "reused"),
        default="new",
        help="new: backward makes new gradient buffers every step (as ktsft.torch does); "
        "reused: the caller's buffers are written again every step",
    )
    p.add_argument("--phases", action="store_true", help="per-phase times of every row")
    p.add_argument("--plot", metavar="FILE.png", help="draw the roofline picture (matplotlib)")
    a = p.parse_args()

    pool = ktsft.ThreadPool(a.threads)
    threads = pool.num_threads
    bandwidth, gemm16, gemm32 = measure_ceilings(threads)
    rate, rate_name = max((gemm16, "bf16 GEMM"), (gemm32, "fp32 GEMM"))
    baseline = None if a.no_torch else load_baseline()
    torch_dtypes = [] if baseline is None else a.torch_dtype.split(",")
    print(
        f"threads {threads}; measured: read bandwidth {bandwidth / 1e9:.1f} GB/s, bf16 GEMM "
        f"{gemm16 / 1e9:.0f} GFLOP/s, fp32 GEMM {gemm32 / 1e9:.0f} GFLOP/s: compute ceiling "
        f"{rate / 1e9:.0f} GFLOP/s ({rate_name}); ktsft {ktsft.runtime_info()['isa']}; "
        f"gradient buffers: {a.grads}"
    )
    short = {"bfloat16": "torch16", "float32": "torch32"}
    head = (
        f"{'shape':<14}{'T':>5} {'quant':<5}{'fwd ms':>9}{'bwd ms':>9}{'step ms':>9}{'tok/s':>9}"
        + "".join(f"{short[d] + ' ms':>12}{'vs':>7}" for d in torch_dtypes)
        + f"{'floor ms':>9}{'bound':>7}{'roof':>7}"
    )
    print(head)
    print("-" * len(head))
    rows, points = [], []
    for shape in a.shapes.split(","):
        E, H, I, k = SHAPES[shape]  # noqa: E741
        for T in (int(t) for t in a.tokens.split(",")):
            small = T <= a.torch_max_tokens
            torch_s = {
                d: bench_torch(baseline, shape, T, a.repeats, d) if small else None
                for d in torch_dtypes
            }
            for quant in a.quant.split(","):
                r = bench_ktsft(
                    shape, T, quant, a.rank, pool, a.repeats, a.grads == "reused", a.phases
                )
                wbytes = r["active"] * 3 * H * I * BYTES_PER_WEIGHT[quant] * 2
                flops = T * k * (12.0 * H * I + 18.0 * a.rank * (H + I))
                floor = max(wbytes / bandwidth, flops / rate)
                bound = "bytes" if wbytes / bandwidth >= flops / rate else "FLOPs"
                cols = ""
                for d in torch_dtypes:
                    t = torch_s[d]
                    ms, vs = ("", "") if t is None else (f"{t * 1e3:.1f}", f"{t / r['step']:.1f}x")
                    cols += f"{ms:>12}{vs:>7}"
                print(
                    f"{shape:<14}{T:>5} {quant:<5}{r['fwd'] * 1e3:>9.1f}{r['bwd'] * 1e3:>9.1f}"
                    f"{r['step'] * 1e3:>9.1f}{T / r['step']:>9.0f}{cols}"
                    f"{floor * 1e3:>9.1f}{bound:>7}{floor / r['step']:>7.0%}",
                    flush=True,
                )
                if a.phases:
                    print_phases(r, shape, T, quant, a.rank, bandwidth, rate)
                rows.append((shape, T, quant, r))
                points.append((flops / wbytes, flops / r["step"] / 1e9, shape, T, quant))
    print(f"kernels: {rows[0][3]['isa'] if rows else ''}")
    for shape, T, quant, r in rows:
        if T == 1024:
            print(
                f"{shape} T=1024 {quant}: peak allocation beyond the packed weights "
                f"{r['extra'] / 2**20:.0f} MiB"
            )
    if a.plot and points:
        plot_roofline(a.plot, points, bandwidth, rate, rate_name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
