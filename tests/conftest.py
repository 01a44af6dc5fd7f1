"""Shared Hypothesis profiles, random problem builders and error metrics for ktsft's tests.

Helpers are plain functions so test modules can ``from conftest import ...`` (pytest puts
``tests/`` on ``sys.path``); the most used ones are also fixtures.
"""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import pytest
from hypothesis import settings

from ktsft.gradients import BASE_NAMES, LORA_NAMES

# ---- Hypothesis profiles ----------------------------------------------------------------------

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=25, print_blob=True)
settings.register_profile("dev", deadline=None, max_examples=25)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev")
)

BF16 = np.dtype(ml_dtypes.bfloat16)

# Spec section 4, bf16 mode: forward and every backward output (never loosen these).
FWD_TOL = 0.01
BWD_TOL = 0.02

GRAD_NAMES = ("input", *LORA_NAMES, "weights")
"""Every output of a backward pass, in the order of :class:`ktsft.Gradients` fields."""


# ---- problem builders -------------------------------------------------------------------------


def layer_shapes(E: int, H: int, I: int, r: int) -> dict:  # noqa: E741 - the spec's name
    """Shape of each base weight and LoRA tensor (spec section 2), keyed by name."""
    return {
        "gate_proj": (E, I, H),
        "up_proj": (E, I, H),
        "down_proj": (E, H, I),
        "gate_lora_a": (E, r, H),
        "gate_lora_b": (E, I, r),
        "up_lora_a": (E, r, H),
        "up_lora_b": (E, I, r),
        "down_lora_a": (E, r, I),
        "down_lora_b": (E, H, r),
    }


def make_layer(rng, E: int, H: int, I: int, r: int) -> dict:  # noqa: E741
    """Random bf16 (``ml_dtypes.bfloat16``) base and LoRA tensors, keyed by name.

    Every tensor is N(0, 1) / sqrt(fan_in) (fan_in = the last axis) so activations stay O(1) at
    any size; LoRA B is nonzero (unlike PEFT's init) so every LoRA path is exercised.
    """
    return {
        n: (rng.standard_normal(s) / np.sqrt(s[-1])).astype(BF16)
        for n, s in layer_shapes(E, H, I, r).items()
    }


def make_routing(rng, T: int, k: int, E: int, pad: float = 0.2, unique: bool = False):
    """Random routing: (expert_ids int64 [T, k], weights float32 [T, k]).

    ``pad`` is the probability that a slot is -1 (padding). Duplicate experts in one token's row
    are allowed unless ``unique`` (which needs k <= E). Weights are uniform in [0.1, 1).
    """
    if unique:
        ids = np.stack([rng.permutation(E)[:k] for _ in range(T)]).astype(np.int64)
    else:
        ids = rng.integers(0, E, (T, k), dtype=np.int64)
    if pad > 0:
        ids[rng.random((T, k)) < pad] = -1
    weights = rng.uniform(0.1, 1.0, (T, k)).astype(np.float32)
    return ids, weights


def make_tokens(rng, T: int, H: int):
    """x [T, H] bf16 ~ N(0, 1)."""
    return rng.standard_normal((T, H)).astype(BF16)


# ---- conversions and metrics ------------------------------------------------------------------


def to_f64(a) -> np.ndarray:
    """Any result of ktsft (NumPy bf16 / uint16 bits / float, or a torch tensor) as float64."""
    if type(a).__module__.startswith("torch"):
        a = a.detach().float().numpy()
    a = np.asarray(a)
    if a.dtype == np.uint16:
        a = (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float64)


def bits(a) -> np.ndarray:
    """The raw bytes of an array (NumPy or torch) as a flat uint8 array, for exact comparisons."""
    if type(a).__module__.startswith("torch"):
        a = a.detach().contiguous().view(-1).view(__import__("torch").uint8).numpy()
    return np.ascontiguousarray(a).view(np.uint8).ravel().copy()


def rel_err(ours, ref) -> float:
    """The spec's error metric: ``mean|ours - ref| / mean|ref|``, in float64."""
    ours, ref = to_f64(ours), to_f64(ref)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.mean(np.abs(ours - ref)) / np.mean(np.abs(ref)))


def assert_close(ours, ref, tol: float, what: str = "") -> None:
    """``rel_err(ours, ref) < tol``; where the reference is all zero, ours must be exactly 0
    (the metric is undefined there). NaN anywhere in ours fails."""
    o, r = to_f64(ours), to_f64(ref)
    assert o.shape == r.shape, (what, o.shape, r.shape)
    assert not np.isnan(o).any(), f"{what}: NaN in result"
    if not np.any(r):
        assert not np.any(o), f"{what}: reference is all zero, ours has max |.| {np.abs(o).max()}"
        return
    err = rel_err(o, r)
    assert err < tol, f"{what}: rel_err {err:.3g} >= {tol}"


def assert_grads_close(got, ref, tol: float = BWD_TOL, names=GRAD_NAMES, where: str = "") -> None:
    """Every named field of two :class:`ktsft.Gradients` within ``tol`` (see assert_close).

    LoRA gradients are compared expert by expert as well as whole, so an expert that should get
    exactly zero (no routes) must be exactly zero.
    """
    for name in names:
        g, r = getattr(got, name), getattr(ref, name)
        assert g is not None, f"{where}{name} is None"
        assert_close(g, r, tol, f"{where}{name}")
        if name in LORA_NAMES:
            g64, r64 = to_f64(g), to_f64(r)
            for e in range(r64.shape[0]):
                if not np.any(r64[e]):
                    assert not np.any(g64[e]), f"{where}{name}[{e}] should be exactly zero"


# ---- running the engine and the reference -----------------------------------------------------


def make_moe(params: dict, k: int, *, lora_alpha: float, pool=None, isa=None, lora=None, **cfg):
    """A ktsft.MoESFT over ``params`` (LoRA tensors may be overridden by ``lora``); ``cfg``:
    further MoESFTConfig options (max_cache_depth, max_len, ...)."""
    import ktsft

    E, I, H = params["gate_proj"].shape
    r = params["gate_lora_a"].shape[1]
    config = ktsft.MoESFTConfig(
        int(E), int(k), int(H), int(I), lora_rank=int(r), lora_alpha=float(lora_alpha), **cfg
    )
    tensors = dict(params)
    if lora is not None:
        tensors.update(lora)
    return ktsft.MoESFT(config, pool=pool, isa=isa, **tensors)


def ref_forward(params: dict, x, ids, w, lora_alpha: float) -> np.ndarray:
    from ktsft import reference

    return reference.forward(x, ids, w, lora_alpha=lora_alpha, **params)


def ref_backward(params: dict, go, x, ids, w, lora_alpha: float):
    from ktsft import reference

    return reference.backward(go, x, ids, w, lora_alpha=lora_alpha, **params)


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def rng(request):
    """A NumPy Generator seeded from the test's name (stable across runs and orderings)."""
    seed = sum(ord(c) * (i + 1) for i, c in enumerate(request.node.nodeid)) % (2**32)
    return np.random.default_rng(seed)


@pytest.fixture(scope="session")
def pool():
    """A shared two-thread ktsft.ThreadPool."""
    import ktsft

    p = ktsft.ThreadPool(2)
    yield p
    p.close()


__all__ = [
    "BASE_NAMES",
    "BF16",
    "BWD_TOL",
    "FWD_TOL",
    "GRAD_NAMES",
    "LORA_NAMES",
    "assert_close",
    "assert_grads_close",
    "bits",
    "layer_shapes",
    "make_layer",
    "make_moe",
    "make_routing",
    "make_tokens",
    "ref_backward",
    "ref_forward",
    "rel_err",
    "to_f64",
]
