"""FP8 (e4m3) base weights with 128 x 128 block scales (spec section 5.1): the decoder, the
quantizer, the kernel GEMMs of every family, one packed copy, loading and reading back, accuracy
and errors through the Python API.

Two references: ``reference.forward(..., quant="fp8")``, the float64 math of the dequantized
weights, which the engine must match to the *bf16* goals (fp8 storage adds no kernel error), and
the float64 math of the unquantized bf16 model, which a bf16 model converted to fp8 must match to
forward < 0.06 and backward < 0.075 (e4m3's 3 mantissa bits).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from conftest import (
    BF16,
    BWD_TOL,
    FWD_TOL,
    GRAD_NAMES,
    LORA_NAMES,
    assert_close,
    assert_grads_close,
    bits,
    make_layer,
    make_moe,
    rel_err,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from test_amx_emu import _assert_fp32_sum as assert_fp32_sum
from test_engine import check_backward, check_forward
from test_int8 import problem, refs

import ktsft
from ktsft import _core, reference

ISAS = list(_core.isa_lists()[1])
FAST_ISAS = [i for i in ISAS if i != "amx-emu"]
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)

# Spec section 5.1: a bf16 model converted to fp8, against the unquantized model.
CONVERTED_FWD_TOL = 0.06
CONVERTED_BWD_TOL = 0.075

BASE = ("gate_proj", "up_proj", "down_proj")
SCALES = ("gate_scale_inv", "up_scale_inv", "down_scale_inv")


def run_poisoned(moe, p, x, ids, w, go):
    """Forward and backward into NaN-filled buffers, so that unwritten elements show."""
    T, H = x.shape
    out = moe.forward(x, ids, w, save_for_backward=True, out=np.full((T, H), np.nan, np.float32))
    gi = np.full((T, H), np.nan, dtype=BF16)
    lg = {n: np.full(p[n].shape, np.nan, dtype=BF16) for n in LORA_NAMES}
    return out, moe.backward(go, grad_input=gi, lora_grads=lg)


def blocks(rows, cols):
    return (-(-rows // 128), -(-cols // 128))


# ---- the decoder and the quantizer -------------------------------------------------------------


def test_decoder_matches_torch_for_all_256_bytes():
    torch = pytest.importorskip("torch")
    q = np.arange(256, dtype=np.uint8)
    out = np.full(256, -1.0, np.float32)
    _core.fp8_decode(q.ctypes.data, out.ctypes.data, 256)
    expected = torch.from_numpy(q.copy()).view(torch.float8_e4m3fn).float().numpy()
    assert np.array_equal(np.isnan(out), np.isnan(expected))
    assert np.isnan(out[[0x7F, 0xFF]]).all() and np.isnan(out).sum() == 2
    finite = ~np.isnan(expected)
    assert bits(out[finite]).tobytes() == bits(expected[finite]).tobytes()  # -0 included
    assert out[0x7E] == 448 and out[0xFE] == -448 and out[0x01] == 2.0**-9 and out[0x80] == 0


def torch_quantize(w):
    """The rule of spec section 5.1 written with torch: per block amax / 448, w / scale in
    float32, clamped to +-448, torch's own rounding to float8_e4m3fn."""
    torch = pytest.importorskip("torch")
    w32 = torch.from_numpy(np.asarray(w, np.float32))
    rows, cols = w32.shape
    q = torch.zeros(rows, cols, dtype=torch.float8_e4m3fn)
    scale = torch.zeros(blocks(rows, cols), dtype=torch.float32)
    for bi, r0 in enumerate(range(0, rows, 128)):
        for bj, c0 in enumerate(range(0, cols, 128)):
            blk = w32[r0 : r0 + 128, c0 : c0 + 128]
            amax = blk.abs().max()
            s = amax / torch.tensor(448.0, dtype=torch.float32)
            scale[bi, bj] = s
            if amax > 0:
                q[r0 : r0 + 128, c0 : c0 + 128] = (blk / s).clamp(-448, 448).to(q.dtype)
    return q.view(torch.uint8).numpy(), scale.numpy()


def special_matrix(rng, rows, cols):
    """Random bf16 values over many magnitudes, with an all-zero block, ties and subnormals."""
    w = rng.standard_normal((rows, cols)) * rng.choice([1e-6, 1e-2, 1.0, 300.0], (rows, cols))
    w = w.astype(np.float32)
    w[: min(rows, 128), : min(cols, 128)] = 0.0  # a zero block: scale 0, zero bytes
    if rows > 128 and cols > 2:
        w[128, :3] = [448.0, 1.0, -3.0e-3]  # amax 448: scale 1, exact values and a subnormal
    return w.astype(BF16)


@pytest.mark.parametrize("shape", [(1, 1), (130, 200), (128, 128), (300, 257), (129, 5)])
def test_quantizer_bit_for_bit_against_numpy_and_torch(rng, shape):
    w = special_matrix(rng, *shape)
    q = np.empty(shape, np.uint8)
    scale = np.empty(blocks(*shape), np.float32)
    _core.fp8_quantize(w.ctypes.data, shape[0], shape[1], q.ctypes.data, scale.ctypes.data)
    rq, rs = reference.quantize_fp8(w)
    tq, ts = torch_quantize(w.astype(np.float32))
    assert rq.dtype == FP8 and rs.dtype == np.float32 and rs.shape == blocks(*shape)
    assert q.tobytes() == rq.view(np.uint8).tobytes() == tq.tobytes()
    assert bits(scale).tobytes() == bits(rs).tobytes() == bits(ts).tobytes()


def test_quantizer_rounds_every_bf16_value_as_torch_does():
    """Every finite bf16 value of magnitude <= 448 in blocks whose amax is 448 (scale 1): the
    engine's e4m3 byte of each equals NumPy's (ml_dtypes) and torch's rounding."""
    torch = pytest.importorskip("torch")
    v = np.arange(65536, dtype=np.uint16).view(BF16).astype(np.float32)
    v = v[np.isfinite(v) & (np.abs(v) <= 448)]
    w = np.concatenate([v, np.zeros(-v.size % 127, np.float32)]).reshape(-1, 127)
    w = np.concatenate([np.full((w.shape[0], 1), 448.0, np.float32), w], axis=1).astype(BF16)
    q = np.empty(w.shape, np.uint8)
    scale = np.empty(blocks(*w.shape), np.float32)
    _core.fp8_quantize(w.ctypes.data, w.shape[0], w.shape[1], q.ctypes.data, scale.ctypes.data)
    assert (scale == 1).all()
    t = torch.from_numpy(w.astype(np.float32)).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    assert q.tobytes() == reference.quantize_fp8(w)[0].tobytes() == t.tobytes()


def test_quantizer_hand_computed_block():
    """amax 448 gives scale 1: values round to the nearest e4m3, ties to even."""
    row = np.array([[448.0, 17.0, 19.0, 0.5, -1.0625, 2.0**-10, 3 * 2.0**-10, 500.0 / 1e9]])
    q, scale = reference.quantize_fp8(row.astype(np.float32))
    assert scale.tolist() == [[1.0]]
    # 17 = 16 + 1: halfway between 16 and 18 -> 16 (even); 19 -> 20 (tie to even mantissa);
    # -1.0625 -> -1 (tie); 2^-10 -> 0 (tie with 2^-9); 3 2^-10 -> 2^-8 (tie to even)
    assert q.astype(np.float32).tolist() == [[448.0, 16.0, 20.0, 0.5, -1.0, 0.0, 2.0**-8, 0.0]]


def test_non_finite_weight_block_gets_nan_scale(rng, pool):
    """A NaN or Inf weight is no e4m3 value: its block's scale is NaN, so it propagates."""
    p = make_layer(rng, 2, 130, 40, 2)
    g = p["gate_proj"].astype(np.float32)
    g[0, 3, 129] = np.inf
    p["gate_proj"] = g.astype(BF16)
    moe = make_moe(p, 1, lora_alpha=8.0, pool=pool, quant="fp8")
    s = moe.base_weights()["gate_scale_inv"]
    assert np.isnan(s[0, 0, 1]) and np.isfinite(np.delete(s.ravel(), 1)).all()
    out = moe.forward(np.ones((1, 130), BF16), np.zeros((1, 1), np.int64), np.ones((1, 1), "f4"))
    assert np.isnan(out).all()


# ---- the kernel GEMMs of every family ------------------------------------------------------------

# (m, rows, cols, n0, n): W is [rows, cols]; partial edge blocks, several blocks, n0 in the second
# half of a 128 block and in the second block
FP8_GEMM_CASES = [
    (1, 17, 33, 0, 17),
    (7, 130, 200, 64, 64),
    (33, 200, 130, 128, 2),
    (70, 257, 300, 192, 64),
    (3, 64, 129, 0, 64),
]


def fp8_gemm(isa, op, a, q, scale, n0, n):
    c = np.full((a.shape[0], n), np.nan, np.float32)
    _core.gemm_test(
        isa,
        op,
        a.ctypes.data,
        0,
        a.shape[0],
        q.ctypes.data,
        scale.ctypes.data,
        q.shape[0],
        q.shape[1],
        "fp8",
        n0,
        n,
        c.ctypes.data,
    )
    return c


def random_fp8(rng, rows, cols, nan_free=True):
    q = rng.integers(0, 256, (rows, cols), dtype=np.uint8)
    if nan_free:
        q[(q & 0x7F) == 0x7F] = 0x3F
    scale = (rng.random(blocks(rows, cols)) * 4 + 0.25).astype(np.float32)
    return q, scale


def bf16_rows(rng, shape):
    return rng.standard_normal(shape).astype(BF16)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m, rows, cols, n0, n", FP8_GEMM_CASES)
def test_kernel_gemm_nt_fp8(isa, m, rows, cols, n0, n):
    """x W^T: each 128-column block's fp32 partial sum times its block scale, then summed."""
    rng = np.random.default_rng(m + rows * cols)
    a, (q, scale) = bf16_rows(rng, (m, cols)), random_fp8(rng, rows, cols)
    c = fp8_gemm(isa, "nt", a, q, scale, n0, n)
    wd = reference.dequantize_fp8(q, scale)[n0 : n0 + n]
    terms = a.astype(np.float64)[:, None, :] * wd[None, :, :]
    assert_fp32_sum(c, terms, cols + blocks(rows, cols)[1] + 2, f"nt {isa}")


# x W of at most 4 rows takes up to 1024 columns in one call (the engine's wide spans of a few
# routes per expert), across several 128-column blocks of scales
FP8_NN_WIDE_CASES = [(1, 300, 400, 64, 300), (4, 130, 1030, 0, 1024), (2, 45, 260, 128, 131)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m, rows, cols, n0, n", FP8_GEMM_CASES + FP8_NN_WIDE_CASES)
def test_kernel_gemm_nn_fp8(isa, m, rows, cols, n0, n):
    """x W: the block scale of each output column's block folded into A in fp32 (no rounding
    beyond fp32 summation; 3 bf16 parts per product on AMX)."""
    rng = np.random.default_rng(m * rows + cols)
    a, (q, scale) = bf16_rows(rng, (m, rows)), random_fp8(rng, rows, cols)
    c = fp8_gemm(isa, "nn", a, q, scale, n0, n)
    cols_block = np.arange(n0, n0 + n) // 128
    col_scale = np.repeat(scale[:, cols_block], 128, axis=0)[:rows].astype(np.float32)  # [rows, n]
    af = a.astype(np.float32)[:, :, None] * col_scale[None, :, :]  # the fp32 operand [m, rows, n]
    wv = reference.dequantize_fp8(q, np.ones_like(scale))[:, n0 : n0 + n]  # e4m3 values
    terms = np.swapaxes(af.astype(np.float64) * wv[None, :, :], 1, 2)
    assert_fp32_sum(c, terms, 3 * rows + blocks(rows, cols)[0] + 1, f"nn {isa}")


@pytest.mark.parametrize("isa", ISAS)
def test_kernel_decoders_of_every_byte(isa):
    """W holds all 256 bytes (scale 1) and A is the identity: x W^T and x W return each decoded
    value (the vector decoders of the families, against torch), NaN bytes poisoning their row
    (x W^T) or column (x W) through 0 * NaN as float64 math does."""
    torch = pytest.importorskip("torch")
    q = np.arange(256, dtype=np.uint8).reshape(16, 16)
    values = torch.from_numpy(q.copy()).view(torch.float8_e4m3fn).double().numpy()
    one = np.ones((1, 1), np.float32)
    eye = np.eye(16).astype(BF16)
    with np.errstate(invalid="ignore"):
        nt_expected = eye.astype(np.float64) @ values.T
        nn_expected = eye.astype(np.float64) @ values
    nt = fp8_gemm(isa, "nt", eye, q, one, 0, 16)
    nn = fp8_gemm(isa, "nn", eye, q, one, 0, 16)
    for got, expected in ((nt, nt_expected), (nn, nn_expected)):
        assert np.array_equal(np.isnan(got), np.isnan(expected))
        assert np.array_equal(got[~np.isnan(got)], expected[~np.isnan(expected)])
    assert np.isnan(nt[:, [7, 15]]).all() and not np.isnan(nt[:, :7]).any()


# ---- one copy, its size, loading and reading back --------------------------------------------


@pytest.mark.parametrize("isa", ISAS)
def test_packed_fp8_is_one_copy_at_most_1_02_of_the_bytes(pool, isa):
    """The Qwen3-30B-A3B layer's shape (E = 128, H = 2048, I = 768): loading one expert sizes
    the whole packed copy; e4m3 bytes plus block scales, no second copy."""
    E, H, I = 128, 2048, 768  # noqa: E741
    rng = np.random.default_rng(0)
    cfg = ktsft.MoESFTConfig(E, 8, H, I, lora_rank=2, quant="fp8")
    lora = {n: np.zeros(s, BF16) for n, s in cfg.shapes().items() if n in LORA_NAMES}
    moe = ktsft.MoESFT(cfg, pool=pool, isa=isa, **lora)
    one = {n: rng.standard_normal(s[1:]).astype(BF16) for n, s in cfg.shapes().items()}
    moe.load_experts(0, **{n: one[n] for n in BASE})
    weights = E * 3 * I * H
    scales = E * 4 * (2 * 6 * 16 + 16 * 6)
    assert weights + scales <= moe.packed_bytes <= 1.02 * (weights + scales), moe.packed_bytes


@pytest.mark.parametrize("isa", ISAS)
def test_fp8_load_and_bf16_load_give_identical_results(rng, pool, isa):
    """base_weights() returns the e4m3 bytes and scales bit for bit; loading them (as
    ml_dtypes e4m3, as uint8 bytes, whole or expert by expert, in any order) reproduces the
    layer bit for bit, with no bf16 copy involved."""
    E, k, H, I, r, T = 4, 2, 200, 130, 3, 9  # noqa: E741
    p, x, ids, w, go = problem(rng, E, k, H, I, r, T)
    first = make_moe(p, k, lora_alpha=8.0, pool=pool, isa=isa, quant="fp8")
    saved = first.base_weights()
    assert set(saved) == set(BASE + SCALES)
    for name, scale_name in zip(BASE, SCALES):
        q, s = reference.quantize_fp8(p[name])
        assert saved[name].dtype == FP8 and saved[name].tobytes() == q.tobytes(), name
        assert bits(saved[scale_name]).tobytes() == bits(s).tobytes(), scale_name
    lora = {n: p[n] for n in LORA_NAMES}
    whole = ktsft.MoESFT(first.config, pool=pool, isa=isa, **lora, **saved)
    as_bytes = {n: (a.view(np.uint8) if n in BASE else a) for n, a in saved.items()}
    streamed = ktsft.MoESFT(first.config, pool=pool, isa=isa, **lora)
    for e in reversed(range(E)):
        streamed.load_experts(e, **{n: a[e] for n, a in as_bytes.items()})
    expected = first.forward(x, ids, w, save_for_backward=True), first.backward(go)
    for moe in (whole, streamed):
        out = moe.forward(x, ids, w, save_for_backward=True)
        g = moe.backward(go)
        assert bits(out).tobytes() == bits(expected[0]).tobytes()
        for name in GRAD_NAMES:
            assert bits(getattr(g, name)).tobytes() == bits(getattr(expected[1], name)).tobytes()


def test_torch_float8_weights_and_scales(rng, pool):
    torch = pytest.importorskip("torch")
    E, k, H, I, r, T = 3, 2, 130, 70, 2, 6  # noqa: E741
    p, x, ids, w, go = problem(rng, E, k, H, I, r, T)
    ref = make_moe(p, k, lora_alpha=8.0, pool=pool, quant="fp8")
    saved = {
        n: torch.from_numpy(a.view(np.uint8) if n in BASE else a).view(
            torch.float8_e4m3fn if n in BASE else torch.float32
        )
        for n, a in ref.base_weights().items()
    }
    lora = {n: torch.from_numpy(p[n].view(np.uint16)).view(torch.bfloat16) for n in LORA_NAMES}
    moe = ktsft.MoESFT(ref.config, pool=pool, **lora, **saved)
    xt = torch.from_numpy(x.view(np.uint16)).view(torch.bfloat16)
    out = moe.forward(xt, torch.from_numpy(ids), torch.from_numpy(w))
    assert bits(out).tobytes() == bits(ref.forward(x, ids, w)).tobytes()


# ---- accuracy ------------------------------------------------------------------------------

NAMED = {
    # name: (E, k, H, I, r, T)
    "partial-blocks": (6, 4, 200, 130, 8, 37),
    "T=1": (5, 3, 130, 70, 4, 1),
    "k=1": (6, 1, 257, 129, 8, 40),
    "odd-small": (3, 2, 17, 9, 3, 7),
    "wider": (8, 2, 512, 384, 8, 64),
}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", list(NAMED))
def test_fp8_accuracy_named(rng, pool, isa, case):
    E, k, H, I, r, T = NAMED[case]  # noqa: E741
    p, x, ids, w, go = problem(rng, E, k, H, I, r, T)
    if case == "T=1":
        ids[0] = rng.permutation(E)[:k]
    moe = make_moe(p, k, lora_alpha=16.0, pool=pool, isa=isa, quant="fp8")
    out, g = run_poisoned(moe, p, x, ids, w, go)
    model_out, model_g = refs(p, x, ids, w, go, 16.0, "fp8")
    assert_close(out, model_out, FWD_TOL, "out vs dequantized model")
    assert_grads_close(g, model_g, BWD_TOL, where="vs dequantized model: ")
    exact_out, exact_g = refs(p, x, ids, w, go, 16.0, "bf16")
    assert_close(out, exact_out, CONVERTED_FWD_TOL, "out vs unquantized")
    assert_grads_close(g, exact_g, CONVERTED_BWD_TOL, where="vs unquantized: ")


SIZES = st.one_of(st.integers(1, 140), st.sampled_from([1, 63, 64, 65, 127, 128, 129, 200, 257]))


@pytest.mark.parametrize("isa", FAST_ISAS)
@settings(max_examples=15)
@given(
    E=st.integers(1, 6),
    k=st.integers(1, 4),
    H=SIZES,
    I=SIZES,
    r=st.integers(1, 6),
    T=st.integers(1, 30),
    pad=st.sampled_from([0.0, 0.2, 1.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_fp8_matches_dequantized_model_property(pool, isa, E, k, H, I, r, T, pad, seed):  # noqa: E741
    """Random shapes (rows and columns not multiples of 128, partial edge blocks, empty experts,
    k = 1, T = 1, all padding) against the float64 math of the dequantized weights, to the bf16
    goals, into NaN-poisoned buffers (test_engine's checks: where the roundings spec section 4
    allows make an output ill-conditioned on a tiny shape, it is held to the goal against the
    emulation of those roundings)."""
    rng = np.random.default_rng(seed)
    p, x, ids, w, go = problem(rng, E, k, H, I, r, T, pad=pad)
    moe = make_moe(p, k, lora_alpha=8.0, pool=pool, isa=isa, quant="fp8")
    out, g = run_poisoned(moe, p, x, ids, w, go)
    dequantized = dict(p)
    for n in BASE:
        dequantized[n] = reference.dequantize_fp8(*reference.quantize_fp8(p[n]))
    check_forward(out, dequantized, x, ids, w, 8.0)
    check_backward(g, dequantized, go, x, ids, w, 8.0)


def test_fp8_error_is_that_of_e4m3_storage(rng, pool):
    """On a model-sized layer the converted model costs what e4m3's 3 mantissa bits cost
    (about 0.02 here), several times the bf16 layer's rounding, and stays inside the goals."""
    E, k, H, I, r, T = 4, 2, 1024, 512, 8, 32  # noqa: E741
    p, x, ids, w, go = problem(rng, E, k, H, I, r, T, pad=0.0)
    exact_out, exact_g = refs(p, x, ids, w, go, 16.0, "bf16")
    moe = make_moe(p, k, lora_alpha=16.0, pool=pool, quant="fp8")
    out, g = run_poisoned(moe, p, x, ids, w, go)
    e16 = rel_err(make_moe(p, k, lora_alpha=16.0, pool=pool).forward(x, ids, w), exact_out)
    e8 = rel_err(out, exact_out)
    assert 4 * e16 < e8 < CONVERTED_FWD_TOL, (e16, e8)
    assert_grads_close(g, exact_g, CONVERTED_BWD_TOL)


def test_fp8_results_bit_identical_across_thread_counts(rng):
    """The per-block and the route-split phases (1 vs 2, 3, 8 threads) give the same bits."""
    E, k, H, I, r, T = 5, 3, 200, 130, 4, 23  # noqa: E741
    p, x, ids, w, go = problem(rng, E, k, H, I, r, T)
    results = []
    for n in (1, 2, 3, 8):
        with ktsft.ThreadPool(n) as pool:
            moe = make_moe(p, k, lora_alpha=8.0, pool=pool, quant="fp8")
            out = moe.forward(x, ids, w, save_for_backward=True)
            g = moe.backward(go)
            results.append([bits(out)] + [bits(getattr(g, name)) for name in GRAD_NAMES])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert a.tobytes() == b.tobytes()


# ---- errors: nothing half-loaded -------------------------------------------------------------


@pytest.fixture
def fp8_layer(rng, pool):
    E, H, I = 3, 200, 130  # noqa: E741
    p = make_layer(rng, E, H, I, 2)
    moe = make_moe(p, 2, lora_alpha=8.0, pool=pool, quant="fp8")
    return moe, moe.base_weights()


def test_bad_scales_are_clear_errors_and_load_nothing(fp8_layer, pool):
    moe, saved = fp8_layer
    lora = {n: np.zeros(s, BF16) for n, s in moe.config.shapes().items() if n in LORA_NAMES}
    fresh = ktsft.MoESFT(moe.config, pool=pool, **lora)
    one = {n: a[0] for n, a in saved.items()}
    with pytest.raises(ValueError, match=r"gate_scale_inv must have shape \[2, 2\], got \[2\]"):
        fresh.load_experts(0, **{**one, "gate_scale_inv": one["gate_scale_inv"][0]})
    with pytest.raises(TypeError, match="down_scale_inv must have dtype float32, got float64"):
        fresh.load_experts(0, **{**one, "down_scale_inv": one["down_scale_inv"].astype("f8")})
    with pytest.raises(TypeError, match="fp8 up_proj needs up_scale_inv"):
        fresh.load_experts(0, **{n: a for n, a in one.items() if n != "up_scale_inv"})
    bad = one["up_scale_inv"].copy()
    bad[1, 0] = np.nan
    with pytest.raises(ValueError, match=r"up_scale_inv of expert 2, block 2 is nan"):
        fresh.load_experts(2, **{**one, "up_scale_inv": bad})
    with pytest.raises(TypeError, match="gate_scale go with int8 or int4 .* only; .* holds fp8"):
        fresh.load_experts(0, **one, gate_scale=np.ones(130, np.float32))
    assert fresh.experts_loaded == 0
    bf16 = ktsft.MoESFT(ktsft.MoESFTConfig(3, 2, 200, 130, lora_rank=2), **lora)
    with pytest.raises(TypeError, match=r"e4m3fn \(fp8 weights\) but this layer stores bf16"):
        bf16.load_experts(0, **{n: one[n] for n in BASE})
    int8 = ktsft.MoESFT(ktsft.MoESFTConfig(3, 2, 200, 130, lora_rank=2, quant="int8"), **lora)
    with pytest.raises(TypeError, match="this layer stores int8"):
        int8.load_experts(0, **one)
    # the layer still works after all that
    fresh.load_experts(0, **{n: a[:] for n, a in saved.items()})
    assert fresh.experts_loaded == 3
