"""Training-step throughput of a Hugging Face Qwen3-MoE model: ktsft experts vs transformers'.

Usage: python benchmarks/bench_hf.py [--layers 4] [--experts 64] [--hidden 1024]
                                     [--moe-intermediate 384] [--top-k 8] [--tokens 128]
                                     [--rank 16] [--steps 3] [--threads N] [--torch-threads N]
                                     [--impls ktsft,eager,grouped_mm,batched_mm]

One randomly initialised bf16 Qwen3-MoE checkpoint is written to a temporary directory; then,
in this process and on the same token sequence, each implementation runs warm-up + ``--steps``
training steps (forward, ``loss.backward()``, AdamW step) and reports the median tokens/s:

- ``ktsft``: ``ktsft.hf.from_pretrained`` (experts on the engine, LoRA r on gate/up/down of
  every expert: the six LoRA tensors of spec section 2);
- ``eager``, ``grouped_mm``, ``batched_mm``: transformers' own experts implementations, with
  PEFT LoRA of rank r on the experts (``target_parameters`` = the fused ``gate_up_proj`` and
  ``down_proj``).

Only the experts' LoRA trains in every case; attention and router are frozen but passed through
by the backward. ``batched_mm`` gathers one [2I, H] and one [H, I] weight per route, T k of
each per layer, kept for the backward: it is skipped when that would exceed ``--max-gib``.
Threads: ktsft's pool gets ``--threads`` (default: the CPUs this process may use), torch's
intra-op threads ``--torch-threads`` (default: the same); they take turns, since each experts
call is synchronous. ``OMP_WAIT_POLICY`` is PASSIVE unless the environment sets it, as
``ktsft.hf`` makes it (docs/hf.rst, Threads); it applies to every implementation here.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP
import torch  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--moe-intermediate", type=int, default=384)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--torch-threads", type=int, default=None)
    p.add_argument("--impls", default="ktsft,eager,grouped_mm,batched_mm")
    p.add_argument("--max-gib", type=float, default=6.0)
    args = p.parse_args()

    import peft
    import transformers

    import ktsft
    import ktsft.hf

    torch.set_num_threads(args.torch_threads or args.threads)
    pool = ktsft.ThreadPool(args.threads)
    H, I, E, k = args.hidden, args.moe_intermediate, args.experts, args.top_k
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=4096,
        hidden_size=H,
        intermediate_size=2 * H,
        moe_intermediate_size=I,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=H // 8,
        num_experts=E,
        num_experts_per_tok=k,
        norm_topk_prob=True,
        max_position_embeddings=4 * args.tokens,
        tie_word_embeddings=False,
    )
    workdir = tempfile.mkdtemp()
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(workdir)
    tokens = torch.randint(1, cfg.vocab_size, (1, args.tokens), generator=torch.Generator())
    print(
        f"Qwen3-MoE: {args.layers} layers, E={E}, k={k}, H={H}, I={I}, r={args.rank}, "
        f"T={args.tokens} tokens/step, {args.threads} ktsft / {torch.get_num_threads()} torch "
        f"threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, "
        f"ktsft isa={ktsft.runtime_info()['isa']}"
    )

    results = {}
    for impl in args.impls.split(","):
        if impl == "batched_mm":
            gib = args.layers * args.tokens * k * 3 * H * I * 2 / 2**30
            if gib > args.max_gib:
                print(f"{impl:>11}: skipped, its gathered weights need {gib:.1f} GiB > --max-gib")
                continue
        if impl == "ktsft":
            model = ktsft.hf.from_pretrained(
                workdir, lora_rank=args.rank, lora_alpha=2.0 * args.rank, pool=pool,
                dtype=torch.bfloat16,
            )  # fmt: skip
            for n, prm in model.named_parameters():
                prm.requires_grad_(n.rsplit(".", 1)[-1] in ktsft.gradients.LORA_NAMES)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                workdir, dtype=torch.bfloat16, experts_implementation=impl
            )
            lora = peft.LoraConfig(
                r=args.rank,
                lora_alpha=2.0 * args.rank,
                target_modules=[],
                target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
            )
            model = peft.get_peft_model(model, lora)
        model.train()
        params = [prm for prm in model.parameters() if prm.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        times = []
        for step in range(args.steps + 1):
            t0 = time.perf_counter()
            loss = model(tokens, labels=tokens).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            if step:  # the first step warms up
                times.append(time.perf_counter() - t0)
        results[impl] = args.tokens / statistics.median(times)
        n_lora = sum(prm.numel() for prm in params)
        step_s = statistics.median(times)
        print(
            f"{impl:>11}: {results[impl]:8.1f} tokens/s (median step {step_s:.2f} s, "
            f"{n_lora / 1e6:.2f} M trainable, loss {loss.item():.3f})"
        )
        del model, opt, params
    if "ktsft" in results:
        for impl, rate in results.items():
            if impl != "ktsft":
                print(f"ktsft / {impl}: {results['ktsft'] / rate:.1f}x")


if __name__ == "__main__":
    main()
