"""``python -m ktsft demo``: LoRA-train a synthetic MoE layer toward a teacher.

A teacher layer is the frozen base plus a random LoRA adapter; the student starts from the base
alone (LoRA B = 0, as PEFT initializes it) and learns the teacher's outputs with Adam, the
updates written in place into the arrays the engine reads (zero copy: no sync call).
"""

from __future__ import annotations

import sys
import time

import numpy as np

from ._arrays import BF16
from .config import MoESFTConfig
from .gradients import LORA_NAMES
from .moe import MoESFT
from .pool import ThreadPool

DEMO_CONFIG = {
    "expert_num": 16,
    "num_experts_per_tok": 4,
    "hidden_size": 512,
    "intermediate_size": 256,
    "lora_rank": 8,
    "lora_alpha": 16.0,
}
"""The embedded layer shape of the demo (a small Qwen3-MoE-like layer)."""
DEMO_TOKENS = 128
DEMO_STEPS = 100
DEMO_LR = 3e-3
CHECKED_STEPS = 50


def _bf16(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).astype(BF16)


def _make_layer(cfg: MoESFTConfig, rng: np.random.Generator) -> dict:
    E, H, I = cfg.expert_num, cfg.hidden_size, cfg.intermediate_size
    return {
        "gate_proj": _bf16(rng.standard_normal((E, I, H)) / np.sqrt(H)),
        "up_proj": _bf16(rng.standard_normal((E, I, H)) / np.sqrt(H)),
        "down_proj": _bf16(rng.standard_normal((E, H, I)) / np.sqrt(I)),
    }


def _lora(cfg: MoESFTConfig, rng: np.random.Generator, b_std: float) -> dict:
    shapes = cfg.shapes()
    out = {}
    for name in LORA_NAMES:
        shape = shapes[name]
        if name.endswith("_a"):  # PEFT's kaiming-uniform bound for A: 1 / sqrt(fan_in)
            bound = 1.0 / np.sqrt(shape[2])
            out[name] = _bf16(rng.uniform(-bound, bound, shape))
        else:
            out[name] = _bf16(rng.standard_normal(shape) * b_std)
    return out


def _batch(cfg: MoESFTConfig, rng: np.random.Generator, tokens: int):
    x = _bf16(rng.standard_normal((tokens, cfg.hidden_size)))
    logits = rng.standard_normal((tokens, cfg.expert_num))
    ids = np.argsort(-logits, axis=1)[:, : cfg.num_experts_per_tok].astype(np.int64)
    top = np.take_along_axis(logits, ids, axis=1)
    w = np.exp(top - top.max(axis=1, keepdims=True))
    return x, ids, (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


class _Progress:
    """A one-line progress bar on a terminal, a line every tenth of the run elsewhere."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.stream = total, stream
        self.tty = stream.isatty()

    def update(self, step: int, text: str) -> None:
        done = int(30 * step / self.total)
        line = f"[{'#' * done}{'.' * (30 - done)}] {step:>4}/{self.total} {text}"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if step == self.total else ""))
            self.stream.flush()
        elif step == self.total or step % max(1, self.total // 10) == 0:
            self.stream.write(line + "\n")


def run_demo(steps=None, tokens=None, threads=None, seed=0, lr=DEMO_LR) -> int:
    """Runs the demo and returns its exit status.

    0 when it ran to the end; runs of at least ``CHECKED_STEPS`` steps also need the loss to
    have fallen (shorter runs are too noisy to judge on fresh random batches).
    """
    steps = DEMO_STEPS if steps is None else steps
    tokens = DEMO_TOKENS if tokens is None else tokens
    cfg = MoESFTConfig(**DEMO_CONFIG, max_len=max(tokens, 1))
    rng = np.random.default_rng(seed)
    pool = ThreadPool(threads)
    base = _make_layer(cfg, rng)
    # The teacher shares the student's initial A factors: its adapter is reachable by training.
    student_lora = _lora(cfg, rng, b_std=0.0)
    teacher_lora = _lora(cfg, rng, b_std=0.5 / np.sqrt(cfg.lora_rank))
    teacher_lora.update({n: a.copy() for n, a in student_lora.items() if n.endswith("_a")})
    teacher = MoESFT(cfg, **base, **teacher_lora, pool=pool)
    student = MoESFT(cfg, **base, **student_lora, pool=pool)
    print(
        f"ktsft demo: E={cfg.expert_num} k={cfg.num_experts_per_tok} H={cfg.hidden_size} "
        f"I={cfg.intermediate_size} r={cfg.lora_rank}, {tokens} tokens/step, {steps} steps, "
        f"kernels={student.isa}, threads={pool.num_threads}"
    )
    master = {n: a.astype(np.float32) for n, a in student_lora.items()}
    m1 = {n: np.zeros_like(a) for n, a in master.items()}
    m2 = {n: np.zeros_like(a) for n, a in master.items()}
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    progress = _Progress(steps)
    losses, busy = [], 0.0
    for step in range(1, steps + 1):
        x, ids, w = _batch(cfg, rng, tokens)
        target = teacher.forward(x, ids, w)
        t0 = time.perf_counter()
        out = student.forward(x, ids, w, save_for_backward=True)
        diff = out - target
        grads = student.backward((2.0 / diff.size) * diff, need_grad_weights=False)
        busy += time.perf_counter() - t0
        losses.append(float(np.mean(diff * diff)))
        for n in LORA_NAMES:  # Adam, then the in-place bf16 write the engine will read
            g = grads.lora()[n].astype(np.float32)
            m1[n] = beta1 * m1[n] + (1 - beta1) * g
            m2[n] = beta2 * m2[n] + (1 - beta2) * g * g
            update = (m1[n] / (1 - beta1**step)) / (np.sqrt(m2[n] / (1 - beta2**step)) + eps)
            master[n] -= lr * update
            student_lora[n][...] = master[n].astype(BF16)
        progress.update(step, f"loss {losses[-1]:.3e}  {tokens * step / busy:,.0f} tok/s")
    first, last = losses[0], float(np.mean(losses[-max(1, steps // 10) :]))
    print(
        f"loss {first:.4e} -> {last:.4e} ({first / max(last, 1e-30):.1f}x lower); "
        f"{tokens * steps / busy:,.0f} tokens/s forward+backward on '{student.isa}'"
    )
    return 1 if steps >= CHECKED_STEPS and last >= first else 0
