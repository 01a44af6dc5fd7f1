"""``python -m ktsft demo``: LoRA-train a synthetic MoE layer toward a teacher, PyTorch style.

A teacher layer is the frozen base plus a random LoRA adapter; the student, a
:class:`ktsft.torch.MoELoRA` over the same base, starts from the base alone (LoRA B = 0, PEFT's
init) and learns the teacher's outputs with ``torch.optim.AdamW``: ``loss.backward()`` fills the
parameters' ``.grad``, ``optimizer.step()`` updates them in place, and the engine reads the new
values at the next call (zero copy: no sync). Needs PyTorch.
"""

from __future__ import annotations

import sys
import time

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


def _base_weights(torch, gen, E: int, H: int, I: int) -> dict:
    def w(*shape):
        return (torch.randn(shape, generator=gen) / shape[-1] ** 0.5).to(torch.bfloat16)

    return {"gate_proj": w(E, I, H), "up_proj": w(E, I, H), "down_proj": w(E, H, I)}


def _batch(torch, gen, tokens: int, H: int, E: int, k: int):
    """Tokens [T, H] bf16 and a softmax-over-top-k routing (ids int64, weights float32)."""
    x = torch.randn((tokens, H), generator=gen).to(torch.bfloat16)
    logits = torch.randn((tokens, E), generator=gen)
    top, ids = torch.topk(logits, k, dim=-1)
    return x, ids, torch.softmax(top, dim=-1)


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


def run_demo(steps=None, tokens=None, threads=None, seed=0, lr=DEMO_LR, quant="bf16") -> int:
    """Runs the demo and returns its exit status.

    0 when it ran to the end; runs of at least ``CHECKED_STEPS`` steps also need the loss to
    have fallen (shorter runs are too noisy to judge on fresh random batches). 2 without
    PyTorch.
    """
    try:
        import torch

        from .torch import MoELoRA
    except ImportError as e:
        print(f"the demo needs PyTorch ({e}): pip install 'ktsft[torch]'", file=sys.stderr)
        return 2
    steps = DEMO_STEPS if steps is None else steps
    tokens = DEMO_TOKENS if tokens is None else tokens
    c = DEMO_CONFIG
    E, k, H, I = c["expert_num"], c["num_experts_per_tok"], c["hidden_size"], c["intermediate_size"]
    r = c["lora_rank"]
    torch.manual_seed(seed)  # the LoRA init uses torch's global generator, as PEFT does
    gen = torch.Generator().manual_seed(seed)
    pool = ThreadPool(threads)
    options = dict(
        lora_rank=r,
        lora_alpha=c["lora_alpha"],
        quant=quant,
        max_len=max(tokens, 1),
        pool=pool,
        num_experts_per_tok=k,
    )
    base = _base_weights(torch, gen, E, H, I)
    student = MoELoRA(**base, **options)  # PEFT init: A random, B = 0
    teacher = MoELoRA(**base, **options).requires_grad_(False)
    del base  # both layers packed their own copy; nothing else holds the weights
    with torch.no_grad():  # the teacher: the student's A factors and a random B (reachable)
        for name, p in teacher.lora_parameters().items():
            if name.endswith("_a"):
                p.copy_(getattr(student, name))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 / r**0.5))
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    print(
        f"ktsft demo: E={E} k={k} H={H} I={I} r={r} quant={quant}, {tokens} tokens/step, "
        f"{steps} steps, kernels={student.moe.isa}, threads={pool.num_threads}"
    )
    progress = _Progress(steps)
    losses, busy = [], 0.0
    for step in range(1, steps + 1):
        x, ids, w = _batch(torch, gen, tokens, H, E, k)
        with torch.no_grad():
            target = teacher(x, ids, w)
        t0 = time.perf_counter()
        out = student(x, ids, w)  # bf16 [T, H]
        loss = torch.nn.functional.mse_loss(out.float(), target.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        busy += time.perf_counter() - t0
        optimizer.step()  # in place: the engine sees it at the next call
        losses.append(loss.item())
        progress.update(step, f"loss {losses[-1]:.3e}  {tokens * step / busy:,.0f} tok/s")
    first, last = losses[0], sum(losses[-max(1, steps // 10) :]) / max(1, steps // 10)
    print(
        f"loss {first:.4e} -> {last:.4e} ({first / max(last, 1e-30):.1f}x lower); "
        f"{tokens * steps / busy:,.0f} tokens/s forward+backward on '{student.moe.isa}'"
    )
    return 1 if steps >= CHECKED_STEPS and last >= first else 0
