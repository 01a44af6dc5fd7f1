"""Command line: ``python -m ktsft demo | info``."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list | None = None) -> int:
    """Entry point of ``python -m ktsft`` and the ``ktsft`` script."""
    parser = argparse.ArgumentParser(prog="python -m ktsft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="LoRA-train a synthetic MoE layer toward a teacher")
    demo.add_argument("--steps", type=int, default=None, help="training steps")
    demo.add_argument("--tokens", type=int, default=None, help="tokens per step")
    demo.add_argument("--threads", type=int, default=None, help="native threads")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--quant",
        choices=("bf16", "int8", "fp8", "int4"),
        default="bf16",
        help="how base weights are stored",
    )
    sub.add_parser("info", help="kernel family, CPU features, threads (JSON)")
    args = parser.parse_args(argv)

    if args.command == "info":
        from .runtime import ENV_VARS, runtime_info

        info = runtime_info()
        info["env_vars"] = ENV_VARS
        print(json.dumps(info, indent=2))
        return 0
    from .demo import run_demo

    return run_demo(
        steps=args.steps, tokens=args.tokens, threads=args.threads, seed=args.seed, quant=args.quant
    )


if __name__ == "__main__":
    sys.exit(main())
