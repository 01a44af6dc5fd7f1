"""What this build and this machine run: kernel families, CPU features, threads."""

from __future__ import annotations

import os

from . import _core
from .pool import default_num_threads

ENV_VARS = {
    "KTSFT_ISA": "kernel family: auto (default), amx, avx512, avx2, generic or amx-emu",
    "KTSFT_NUM_THREADS": "threads of a ThreadPool created without num_threads",
    "KTSFT_SPIN_US": "microseconds a waiting pool thread spins before it sleeps (default 100)",
}
"""Environment variables ktsft reads, with what they control."""


def runtime_info() -> dict:
    """The kernel family ktsft will use and why.

    Returns
    -------
    dict
        ``isa``: the family new layers get (``KTSFT_ISA`` or the best available; None when
        ``KTSFT_ISA`` names one that is unavailable, with the reason in ``isa_error``);
        ``best``: what ``auto`` picks; ``available``: families this CPU can run;
        ``kernels``: the instructions that family uses here (e.g. ``avx512-fma+vnni``: fp32
        FMA for bf16, vpdpbusd for int8); ``compiled``: families built into this library;
        ``cpu_features``: features that both cpuid and the OS enable; ``num_threads``: the
        default pool size;
        ``env``: the ktsft environment variables that are set.
    """
    compiled, available, best = _core.isa_lists()
    requested = os.environ.get("KTSFT_ISA", "auto")
    info = {
        "isa": None,
        "best": best,
        "available": available,
        "compiled": compiled,
        "cpu_features": _core.cpu_features(),
        "num_threads": None,
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
    }
    try:
        info["isa"] = _core.resolve_isa(requested)
        info["kernels"] = _core.isa_variant(requested)
    except ValueError as e:
        info["isa_error"] = str(e)
    try:
        info["num_threads"] = default_num_threads()
    except ValueError as e:
        info["num_threads_error"] = str(e)
    return info
