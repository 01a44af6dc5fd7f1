"""Every kernel variant this machine can run against its generic twin and the float64 reference.

A family holds variants chosen from the CPU features (avx512: vdpbf16ps or fp32 FMA for bf16,
vpdpbusd or vpmaddwd for int8). ``_core.kernels_testing_set`` makes engines created afterwards
pick the variant for a narrower feature set, or run the vdpbf16ps code on its software model, so
every variant is tested here whatever the CPU has. Each runs forward and backward, bf16, int8 and
fp8, on random shapes that are not tile multiples, with experts without tokens, k = 1, T = 1 and
NaN-poisoned output buffers. It must match the generic family, which quantizes the same way and
rounds at the same places (only fp32 summation order differs), and the reference within the
spec's budget wherever the generic family itself is comfortably inside it (tiny shapes can be
ill-conditioned; test_engine.py explains).
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from conftest import (
    BASE_NAMES,
    BF16,
    BWD_TOL,
    FWD_TOL,
    GRAD_NAMES,
    LORA_NAMES,
    make_layer,
    make_routing,
    make_tokens,
    ref_backward,
    ref_forward,
    rel_err,
    to_f64,
)
from hypothesis import example, given
from hypothesis import strategies as st
from test_amx_emu import _assert_fp32_sum, _bf16, _f64, gemm
from test_engine import emulate

from ktsft import _core

ALL = 0xFFFFFFFF
AVX512_BF16, AVX512_VNNI = 1 << 6, 1 << 7  # KT_CPU_* bits of src_c/include/ktsft.h
AVAILABLE = _core.isa_lists()[1]

# (family, feature mask, emulate vdpbf16ps): the variants worth running on this machine
CANDIDATES = [
    ("avx512", ALL, False),
    ("avx512", ALL & ~(AVX512_BF16 | AVX512_VNNI), False),
    ("avx512", ALL, True),
    ("avx512", ALL & ~AVX512_VNNI, True),
    ("avx2", ALL, False),
]


def _variant_name(isa: str, mask: int, emulate: bool) -> str:
    _core.kernels_testing_set(mask, emulate)
    try:
        return _core.isa_variant(isa)
    finally:
        _core.kernels_testing_set(ALL, False)


VARIANTS = {}
for _isa, _mask, _emu in CANDIDATES:
    if _isa in AVAILABLE:
        VARIANTS.setdefault(_variant_name(_isa, _mask, _emu), (_isa, _mask, _emu))

# Fast vs generic: the same computation up to fp32 summation order (a bf16 rounding of g, u, h,
# dg or du may flip for a few elements). Not a spec budget: a much tighter check for bugs.
TWIN_TOL = 2e-3
SPEC_TOL = {
    "bf16": (FWD_TOL, BWD_TOL),
    "int8": (0.04, 0.06),
    "fp8": (0.06, 0.075),
    "int4": (0.21, 0.25),
}


@contextlib.contextmanager
def selected(variant: str):
    """Engines created inside pick ``variant`` of its family."""
    isa, mask, emulate = VARIANTS[variant]
    _core.kernels_testing_set(mask, emulate)
    try:
        yield isa
    finally:
        _core.kernels_testing_set(ALL, False)


def run(p, k, x, ids, w, go, alpha, pool, isa, quant):
    """Forward (saved) and backward into NaN-filled buffers through the engine itself (every
    quant mode: bf16 weights are quantized at load); returns (out, grads by name, the engine's
    kernel variant)."""
    E, I, H = p["gate_proj"].shape
    T, r = x.shape[0], p["gate_lora_a"].shape[1]
    eng = _core.Engine(pool._native, E, k, H, I, r, alpha, T, 1, isa, quant)
    eng.load_weights(*(p[n].ctypes.data for n in BASE_NAMES))
    lora = tuple(p[n].ctypes.data for n in LORA_NAMES)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    out = np.full((T, H), np.nan, dtype=np.float32)
    eng.forward(
        T, k, ids.ctypes.data, w.ctypes.data, x.ctypes.data, out.ctypes.data, False, lora, True
    )
    g = {n: np.full(p[n].shape, np.nan, dtype=BF16) for n in LORA_NAMES}
    g["input"] = np.full((T, H), np.nan, dtype=BF16)
    g["weights"] = np.full(ids.shape, np.nan, dtype=np.float32)
    eng.backward(
        T,
        go.ctypes.data,
        False,
        g["input"].ctypes.data,
        tuple(g[n].ctypes.data for n in LORA_NAMES),
        g["weights"].ctypes.data,
        False,
        False,
        lora,
    )
    return out, g, eng.kernel_variant


def compare(fast, gen, ref, tol, what, emus=None, twin=True):
    """fast within TWIN_TOL of generic, and of the reference within tol where generic is
    comfortably inside it. With ``emus`` (this output under the roundings spec section 4
    allows, test_engine.emulate) the problem is too small for the twin check: one bf16 rounding
    of dg or du falling the other way under another fp32 summation order moves an output by
    more than TWIN_TOL there, so fast is held to the spec goal against the nearer emulation,
    as test_engine does for ill-conditioned outputs. ``twin=False``: as small, in a quantized
    mode the emulation does not model; only the check against the reference remains."""
    f, g = to_f64(fast), to_f64(gen)
    assert not np.isnan(f).any(), f"{what}: NaN in result"
    if not np.any(g):
        assert not np.any(f), f"{what}: generic is all zero, max |fast| {np.abs(f).max()}"
        return
    if emus is not None:
        err = min(rel_err(f, em) for em in emus)
        assert err < tol, f"{what}: rel_err vs allowed-rounding emulation {err:.3g} >= {tol}"
        return
    if twin:
        err = rel_err(f, g)
        assert err < TWIN_TOL, f"{what}: rel_err vs generic {err:.3g} >= {TWIN_TOL}"
    if ref is not None and rel_err(g, ref) < tol / 2:
        err = rel_err(f, ref)
        assert err < tol, f"{what}: rel_err vs reference {err:.3g} >= {tol}"


# Fewer rounded backward intermediates (routes x I values of dg and du) than this: too few for
# the twin check (see compare); measured: R I = 18 moved grad_input by 0.0027 between families,
# and in int8 R I = 29 (E 1, k 1, H 150, I 29, r 18, T 1) moved up_lora_a by 0.0030.
MIN_ROUNDED = 128


def check(name, pool, p, k, x, ids, w, go, alpha, quant):
    with selected(name) as isa:
        out, g, used = run(p, k, x, ids, w, go, alpha, pool, isa, quant)
    assert used == name
    out0, g0, _ = run(p, k, x, ids, w, go, alpha, pool, "generic", quant)
    fwd_tol, bwd_tol = SPEC_TOL[quant]
    compare(out, out0, ref_forward(p, x, ids, w, alpha), fwd_tol, f"{name}/{quant} forward")
    ref = ref_backward(p, go, x, ids, w, alpha)
    small = int((ids >= 0).sum()) * p["gate_proj"].shape[1] < MIN_ROUNDED
    emulated = small and quant == "bf16"
    emus = [emulate(p, x, ids, w, go, alpha, rd)[1] for rd in (False, True)] if emulated else None
    for n in GRAD_NAMES:
        em = None if emus is None else [getattr(e, n) for e in emus]
        what = f"{name}/{quant} {n}"
        compare(g[n], g0[n], getattr(ref, n), bwd_tol, what, em, twin=not small)
        if n in LORA_NAMES:  # experts without routes: exactly zero
            for e in np.nonzero(~np.isin(np.arange(p[n].shape[0]), ids))[0]:
                assert not np.any(to_f64(g[n][e])), f"{name} {n}[{e}] not zero"


def problem(rng, E, k, H, I, r, T, pad):  # noqa: E741
    p = make_layer(rng, E, H, I, r)
    ids, w = make_routing(rng, T, k, E, pad=pad)
    return p, make_tokens(rng, T, H), ids, w, make_tokens(rng, T, H)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("quant", ["bf16", "int8", "fp8", "int4"])
@given(
    E=st.integers(1, 6),
    k=st.integers(1, 4),
    H=st.integers(1, 150),
    I=st.integers(1, 150),
    r=st.integers(1, 20),
    T=st.integers(1, 24),
    pad=st.sampled_from([0.0, 0.3]),
    seed=st.integers(0, 2**32 - 1),
)
# int4, 2 threads: a B4 item narrower than the span its scratch was sized for (H 66 in spans of
# 64) once took a larger chunk of folded rows than the scratch held, into the other thread's
@example(E=5, k=4, H=66, I=20, r=20, T=5, pad=0.0, seed=1906)
def test_variant_matches_generic_property(variant, pool, quant, E, k, H, I, r, T, pad, seed):  # noqa: E741
    rng = np.random.default_rng(seed)
    p, x, ids, w, go = problem(rng, E, k, H, I, r, T, pad)
    check(variant, pool, p, k, x, ids, w, go, 4.0, quant)


CASES = {  # E, k, H, I, r, T: tile multiples, many rows per expert, chunked sums, large rank
    "tile-multiples": (4, 2, 128, 64, 16, 32),
    "rows-and-chunks": (3, 2, 300, 200, 8, 64),
    "one-expert-many-routes": (1, 1, 96, 136, 4, 150),
    "rank-above-64": (2, 2, 80, 70, 70, 9),
    "t1-k1": (5, 1, 33, 47, 3, 1),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("quant", ["bf16", "int8", "fp8", "int4"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_variant_matches_generic_named(variant, pool, rng, quant, case):
    E, k, H, I, r, T = CASES[case]  # noqa: E741
    p, x, ids, w, go = problem(rng, E, k, H, I, r, T, pad=0.1)
    if E > 2:
        ids[ids == 1] = 0  # expert 1 gets no token
    check(variant, pool, p, k, x, ids, w, go, 8.0, quant)


def test_best_variant_uses_what_the_cpu_has():
    if "avx512" not in AVAILABLE:
        pytest.skip("no AVX-512 here")
    features, name = set(_core.cpu_features()), _core.isa_variant("avx512")
    assert name.startswith("avx512-bf16+" if "avx512_bf16" in features else "avx512-fma+")
    assert name.endswith("+vnni" if "avx512_vnni" in features else "+vpmaddwd")


def test_runtime_info_reports_the_variant():
    import ktsft

    info = ktsft.runtime_info()
    assert info["kernels"] == _core.isa_variant(info["isa"])
    assert info["kernels"].startswith(info["isa"])


# ---- x W of a few rows: the avx2 and avx512 path without transposes ----------------------------

FEW_ISAS = [i for i in ("avx2", "avx512") if i in AVAILABLE]
KERNEL_ISAS_ALL = [i for i in ("generic", "avx2", "avx512", "amx", "amx-emu") if i in AVAILABLE]
# (rows, cols, n0, n): k = rows is not a multiple of 16 and n not one of 8; 300 and 530 rows
# span several chunks of W; n0 + n = cols with 200 ends at the last column block of W.
FEW_SHAPES = [
    (1, 13, 0, 13),
    (37, 70, 64, 6),
    (45, 200, 192, 8),
    (300, 200, 128, 61),
    (530, 64, 0, 64),
]


@pytest.mark.parametrize("isa", FEW_ISAS)
@pytest.mark.parametrize("wtype", ["bf16", "int8"])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 13])
@pytest.mark.parametrize("rows, cols, n0, n", FEW_SHAPES)
def test_gemm_nn_few_rows(isa, wtype, m, rows, cols, n0, n):
    """At most 4 rows of A (1-2 tokens per expert) take x W without transposes, 5 and more the
    transposed path (8 and 13: register tiles of 6 rows and a partial one): either is within
    the fp32 summation bound of the float64 sum of the fp32 products (int8: A times the row
    scale in fp32), with NaN-poisoned outputs."""
    rng = np.random.default_rng(m * 1000 + rows + cols + n)
    a = _bf16(rng, (m, rows))
    if wtype == "int8":
        w = rng.integers(-127, 128, (rows, cols), dtype=np.int8)
        sw = (rng.random(rows, dtype=np.float32) + 0.5) / 127
        af = (_f64(a).astype(np.float32) * sw[None, :]).astype(np.float64)
        c = gemm(isa, "nn", a, w, n0, n, w_scale=sw)
        terms = af[:, None, :] * w.T[None, n0 : n0 + n, :].astype(np.float64)
    else:
        w = _bf16(rng, (rows, cols))
        c = gemm(isa, "nn", a, w, n0, n)
        terms = _f64(a)[:, None, :] * _f64(w).T[None, n0 : n0 + n, :]
    _assert_fp32_sum(c, terms, rows, f"{isa} nn {wtype}")


# At most 4 rows take up to 1024 columns in one call (the engine's wide spans of a few routes per
# expert): several column groups and chunks of W, partial last groups, n0 > 0.
WIDE_SHAPES = [(300, 1100, 64, 1000), (40, 300, 0, 300), (530, 1030, 0, 1024), (17, 203, 64, 139)]


@pytest.mark.parametrize("isa", KERNEL_ISAS_ALL)
@pytest.mark.parametrize("wtype", ["bf16", "int8"])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("rows, cols, n0, n", WIDE_SHAPES)
def test_gemm_nn_few_rows_wide(isa, wtype, m, rows, cols, n0, n):
    """Every family's x W of a few rows over a wide span of columns, as test_gemm_nn_few_rows."""
    test_gemm_nn_few_rows(isa, wtype, m, rows, cols, n0, n)


def test_gemm_nn_wide_needs_few_rows():
    """More than 4 rows of A take at most 64 columns: the harness refuses wider calls."""
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="at most 64"):
        gemm("generic", "nn", _bf16(rng, (5, 40)), _bf16(rng, (40, 200)), 0, 128)


# ---- the bf16 store of outputs and gradients --------------------------------------------------


def _special_floats(rng, n):
    """Random float32 with the cases rounding to bf16 can get wrong mixed in: NaNs (with
    payloads, signalling ones too), infinities, zeros, subnormals, exact ties of the rounding,
    the largest finite values (which round to infinity) and their neighbours."""
    v = (rng.standard_normal(n) * np.exp2(rng.integers(-130, 128, n))).astype(np.float32)
    bits = v.view(np.uint32)
    special = np.array(
        [0x7FC00000, 0xFFC00001, 0x7F800001, 0x7FA5A5A5, 0x7F800000, 0xFF800000, 0x0, 0x80000000,
         0x00000001, 0x807FFFFF, 0x00008000, 0x3F808000, 0x3F818000, 0x3F80FFFF, 0x7F7FFFFF,
         0x7F7F8000, 0x7F7F7FFF, 0xFF7FFFFF],
        dtype=np.uint32,
    )  # fmt: skip
    where = rng.integers(0, n, special.size)
    bits[where] = special
    return v


@pytest.mark.parametrize("isa", [i for i in AVAILABLE if i != "generic"])
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy on the NaN, Inf and overflow cases
def test_store_bf16_matches_portable_bit_for_bit(isa, accumulate):
    """Each family's bf16 store gives the bits of the portable one (round to nearest even, a NaN
    kept with its payload, quiet) at every length around its vector widths, into NaN-poisoned or
    accumulated buffers; finite values also match ml_dtypes' rounding."""
    rng = np.random.default_rng(7)
    for n in [0, 1, 7, 8, 9, 15, 16, 17, 31, 33, 1000]:
        v = _special_floats(rng, max(n, 1))[:n]
        start = _special_floats(rng, max(n, 1))[:n].astype(BF16).view(np.uint16)
        if not accumulate:
            start = np.full(n, 0x7FC1, np.uint16)  # NaN poison: unwritten elements show
        out = {}
        for family in ("generic", isa):
            dst = np.concatenate([start, [0x1234]]).astype(np.uint16)  # one guard past the end
            _core.store_bf16_test(family, dst.ctypes.data, v.ctypes.data, n, accumulate)
            assert dst[n] == 0x1234, f"{family}: wrote past n = {n}"
            out[family] = dst[:n]
        total = v + start.view(BF16).astype(np.float32) if accumulate else v
        nan = np.isnan(total)
        # a sum of two NaNs may keep either one's payload (the order of an addition's operands is
        # the compiler's): there both must be NaN; everywhere else the same bits
        exact = ~nan if accumulate else np.ones(n, bool)
        np.testing.assert_array_equal(out[isa][exact], out["generic"][exact], err_msg=f"{isa}, {n}")
        for family in out:
            assert np.all(np.isnan(out[family][nan].view(BF16).astype(np.float32))), family
        finite = np.isfinite(total)
        want = total[finite].astype(BF16).view(np.uint16)
        np.testing.assert_array_equal(out["generic"][finite], want, err_msg=f"generic, n {n}")
