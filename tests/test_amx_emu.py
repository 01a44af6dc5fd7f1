"""The AMX software model (``amx-emu``) and the AMX kernel families.

Part 1 checks every modelled tile instruction against a scalar NumPy implementation of its
definition in Intel's ISA reference (LDTILECFG/STTILECFG, TILELOADD/TILESTORED with strides and
start_row, TILEZERO, TDPBF16PS with round-to-nearest-even steps and denormals as zero,
TDPB[SU][SU]D with exact int32 wrap-around) and each fault. The model's state is per thread;
these calls run on the test's thread.

Part 2 runs the engine on ``amx-emu`` (and ``amx`` where the CPU has it) on random shapes that
are not tile multiples, and checks dispatch and the AMX permission report.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BF16, GRAD_NAMES, bits, make_moe
from hypothesis import given, settings
from hypothesis import strategies as st
from test_engine import check_backward, check_forward, problem, run_engine
from test_int8 import INT8_BWD_TOL, INT8_FWD_TOL, refs

import ktsft
from ktsft import _core

AMX_ISAS = [i for i in ("amx", "amx-emu") if i in _core.isa_lists()[1]]


# ---- helpers ------------------------------------------------------------------------------------


def config(tiles, palette=1, start_row=0):
    """A 64-byte tile configuration; tiles maps a tile number to (rows, colsb)."""
    cfg = np.zeros(64, np.uint8)
    cfg[0], cfg[1] = palette, start_row
    for t, (rows, colsb) in tiles.items():
        cfg[16 + 2 * t], cfg[17 + 2 * t], cfg[48 + t] = colsb & 0xFF, colsb >> 8, rows
    return cfg


def ldtilecfg(tiles, **kw):
    cfg = config(tiles, **kw)
    _core.amx_emu_ldtilecfg(cfg.ctypes.data)
    return cfg


def sttilecfg():
    out = np.full(64, 0xEE, np.uint8)
    _core.amx_emu_sttilecfg(out.ctypes.data)
    return out


def load(t, rows_bytes: np.ndarray):
    """tileloadd from a 2-D uint8 array (its row stride is the load stride)."""
    _core.amx_emu_tileloadd(t, rows_bytes.ctypes.data, rows_bytes.strides[0])


def store(t, rows, colsb):
    buf = np.zeros((rows, colsb), np.uint8)
    _core.amx_emu_tilestored(t, buf.ctypes.data, colsb)
    return buf


def as_bytes(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view(np.uint8).reshape(a.shape[0], -1)


@pytest.fixture(autouse=True)
def _fresh_state():
    _core.amx_emu_tilerelease()
    _core.amx_emu_clear_faults()
    yield
    _core.amx_emu_tilerelease()
    _core.amx_emu_clear_faults()


def _f32(u32):
    return np.asarray(u32, np.uint32).view(np.float32)


def _daz(f: np.float32) -> np.float32:
    """Denormal fp32 to zero of the same sign (the instruction's DAZ and FTZ)."""
    b = np.float32(f).view(np.uint32)
    return _f32(b & np.uint32(0x80000000)) if (b & 0x7F800000) == 0 else np.float32(f)


def ref_tdpbf16ps(c, a, b, M, N, K):
    """Intel's TDPBF16PS, element by element: c [16, 16] fp32, a [M, 2K] and b [K, 2N] bf16 bits.
    Each step is one FMA rounded to nearest even (the product of two bf16 is exact in float64
    and the sum of it and an fp32 of similar magnitude is exact in float64 here)."""
    out = c.copy()
    for m in range(M):
        for n in range(N):
            acc = out[m, n]
            for k in range(K):
                for i in (0, 1):
                    x = _daz(_f32(np.uint32(a[m, 2 * k + i]) << 16))
                    y = _daz(_f32(np.uint32(b[k, 2 * n + i]) << 16))
                    acc = _daz(np.float32(np.float64(_daz(acc)) + np.float64(x) * np.float64(y)))
            out[m, n] = acc
    return out


def ref_tdpb_i8(op, c, a, b, M, N, K):
    """TDPB[SU][SU]D: quads of bytes, signed or unsigned per the letters, int32 wrap-around."""
    sa, sb = op[4] == "s", op[5] == "s"
    av = a.view(np.int8 if sa else np.uint8).astype(np.int64).reshape(a.shape[0], -1)
    bv = b.view(np.int8 if sb else np.uint8).astype(np.int64).reshape(b.shape[0], -1)
    out = c.astype(np.int64).copy()
    for m in range(M):
        for n in range(N):
            out[m, n] += sum(
                av[m, 4 * k + i] * bv[k, 4 * n + i] for k in range(K) for i in range(4)
            )
    return ((out + 2**31) % 2**32 - 2**31).astype(np.int32)


def random_bf16(rng, shape, lo=-4, hi=4):
    """bf16 bit patterns of normal values with exponents in [lo, hi]."""
    mant = rng.integers(0, 128, shape)
    exp = rng.integers(lo, hi + 1, shape) + 127
    sign = rng.integers(0, 2, shape)
    return ((sign << 15) | (exp << 7) | mant).astype(np.uint16)


def run_dp(op, c, a, b, M, N, K):
    """Configure dst tmm0 [M, 4N], a tmm1 [M, 4K], b tmm2 [K, 4N]; load, multiply, store."""
    ldtilecfg({0: (M, 4 * N), 1: (M, 4 * K), 2: (K, 4 * N)})
    load(0, as_bytes(c))
    load(1, as_bytes(a))
    load(2, as_bytes(b))
    _core.amx_emu_dp(op, 0, 1, 2)
    return store(0, M, 4 * N)


# ---- ldtilecfg / sttilecfg ---------------------------------------------------------------------


def test_config_round_trip_and_release():
    cfg = ldtilecfg({0: (16, 64), 3: (5, 12), 7: (1, 4)}, start_row=2)
    assert sttilecfg().tobytes() == cfg.tobytes()
    _core.amx_emu_tilerelease()
    assert not sttilecfg().any()
    with pytest.raises(_core.AMXFault, match="not configured"):
        _core.amx_emu_tilezero(0)


def test_palette_0_is_the_init_state():
    ldtilecfg({0: (16, 64)})
    ldtilecfg({}, palette=0)
    assert not sttilecfg().any()
    with pytest.raises(_core.AMXFault, match="not configured"):
        load(0, np.zeros((16, 64), np.uint8))


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("palette", 2, "palette 2"),
        ("byte", 2, "reserved byte 2"),
        ("byte", 15, "reserved byte 15"),
        ("byte", 32, "reserved byte 32"),
        ("byte", 47, "reserved byte 47"),
        ("byte", 56, "reserved byte 56"),
        ("byte", 63, "reserved byte 63"),
        ("rows", 17, "rows 17 > 16"),
        ("colsb", 65, "colsb 65 > 64"),
        ("colsb", 0x100, "colsb 256 > 64"),
        ("start_row", 16, "start_row 16"),
    ],
)
def test_invalid_config_faults_and_keeps_the_old_one(field, value, match):
    good = ldtilecfg({0: (16, 64), 1: (4, 8)})
    bad = config({0: (16, 64)})
    if field == "palette":
        bad[0] = value
    elif field == "byte":
        bad[value] = 1
    elif field == "rows":
        bad[48 + 2] = value
    elif field == "colsb":
        bad[16 + 4], bad[17 + 4] = value & 0xFF, value >> 8
    else:
        bad[1] = value
    with pytest.raises(_core.AMXFault, match="#GP") as info:
        _core.amx_emu_ldtilecfg(bad.ctypes.data)
    assert match in str(info.value)
    assert sttilecfg().tobytes() == good.tobytes()
    assert _core.amx_emu_first_fault() == str(info.value)


def test_ldtilecfg_zeroes_the_tiles():
    ldtilecfg({0: (16, 64)})
    load(0, np.full((16, 64), 7, np.uint8))
    ldtilecfg({0: (16, 64)})
    assert not store(0, 16, 64).any()


# ---- tileloadd / tilestored / tilezero ----------------------------------------------------------


@pytest.mark.parametrize(
    "rows, colsb, ld_stride, st_stride",
    [(16, 64, 64, 64), (5, 12, 100, 80), (3, 7, 7, 9), (16, 16, 4, 16)],
)
def test_load_store_configured_rows_and_bytes_with_strides(rows, colsb, ld_stride, st_stride):
    rng = np.random.default_rng(rows * 100 + colsb)
    src = rng.integers(0, 256, rows * ld_stride + 64, dtype=np.uint8)
    ldtilecfg({4: (rows, colsb)})
    _core.amx_emu_tileloadd(4, src.ctypes.data, ld_stride)
    dst = np.full(rows * st_stride + 64, 0xAA, np.uint8)
    _core.amx_emu_tilestored(4, dst.ctypes.data, st_stride)
    want = np.full_like(dst, 0xAA)
    for r in range(rows):  # row by row, so overlapping strides take the later row's bytes
        want[r * st_stride : r * st_stride + colsb] = src[r * ld_stride : r * ld_stride + colsb]
    assert dst.tobytes() == want.tobytes()


def test_start_row_skips_rows_then_resets():
    ldtilecfg({0: (6, 8)}, start_row=3)
    load(0, np.full((6, 8), 9, np.uint8))
    assert sttilecfg()[1] == 0
    got = store(0, 6, 8)
    assert not got[:3].any() and (got[3:] == 9).all()


def test_store_from_start_row():
    ldtilecfg({0: (4, 4)})
    load(0, np.arange(16, dtype=np.uint8).reshape(4, 4))
    cfg = config({0: (4, 4)}, start_row=2)
    _core.amx_emu_ldtilecfg(cfg.ctypes.data)  # zeroes the tile, keeps start_row 2
    load(0, np.arange(16, dtype=np.uint8).reshape(4, 4))
    cfg[1] = 1
    _core.amx_emu_ldtilecfg(cfg.ctypes.data)
    load(0, np.arange(16, dtype=np.uint8).reshape(4, 4))
    out = np.full((4, 4), 0xFF, np.uint8)
    _core.amx_emu_tilestored(0, out.ctypes.data, 4)  # start_row is 0 again after the load
    assert out[0].tolist() == [0, 0, 0, 0] and out[1:].tolist() == [
        [4, 5, 6, 7],
        [8, 9, 10, 11],
        [12, 13, 14, 15],
    ]


def test_tilezero():
    ldtilecfg({2: (16, 64), 3: (16, 64)})
    load(2, np.full((16, 64), 5, np.uint8))
    load(3, np.full((16, 64), 6, np.uint8))
    _core.amx_emu_tilezero(2)
    assert not store(2, 16, 64).any()
    assert (store(3, 16, 64) == 6).all()


@pytest.mark.parametrize("call", ["load", "store", "zero"])
def test_tile_faults(call):
    fn = {
        "load": lambda t: load(t, np.zeros((16, 64), np.uint8)),
        "store": lambda t: store(t, 16, 64),
        "zero": _core.amx_emu_tilezero,
    }[call]
    with pytest.raises(_core.AMXFault, match="tiles are not configured"):
        fn(0)
    ldtilecfg({0: (16, 64)})
    with pytest.raises(_core.AMXFault, match="no tile register tmm8"):
        fn(8)
    with pytest.raises(_core.AMXFault, match="tmm1 is not configured"):
        fn(1)


# ---- the dot products ---------------------------------------------------------------------------

SHAPES = [(16, 16, 16), (1, 1, 1), (5, 3, 7), (16, 1, 16), (2, 16, 9), (13, 11, 16)]


@pytest.mark.parametrize("M, N, K", SHAPES)
def test_tdpbf16ps_matches_definition(M, N, K):
    rng = np.random.default_rng(M * 10000 + N * 100 + K)
    a = random_bf16(rng, (M, 2 * K))
    b = random_bf16(rng, (K, 2 * N))
    c = (rng.standard_normal((M, N)) * 8).astype(np.float32)
    got = run_dp("tdpbf16ps", c, a, b, M, N, K).view(np.float32)
    full = np.zeros((16, 16), np.float32)
    full[:M, :N] = c
    want = ref_tdpbf16ps(full, a, b, M, N, K)[:M, :N]
    assert got.view(np.uint32).tobytes() == want.view(np.uint32).tobytes()
    assert not np.array_equal(got, c)


def _bf(x: float) -> int:
    return int(np.float32(x).view(np.uint32) >> 16)


def _dp1(acc_bits: int, pairs):
    """One output element, K = len(pairs): acc + sum of the (a0, b0, a1, b1) bf16 bit pairs."""
    K = len(pairs)
    a = np.array([[v for p in pairs for v in (p[0], p[2])]], np.uint16)
    b = np.array([[p[1], p[3]] for p in pairs], np.uint16)
    c = np.array([[acc_bits]], np.uint32)
    return int(run_dp("tdpbf16ps", c, a, b, 1, 1, K).view(np.uint32)[0, 0])


def test_tdpbf16ps_rounds_each_step_to_nearest_even():
    one, half_ulp = np.float32(1).view(np.uint32), _bf(2.0**-24)
    # 1 + 2^-24 ties to 1 (even), twice: each of the two products is its own rounded step
    assert _dp1(int(one), [(half_ulp, _bf(1.0), half_ulp, _bf(1.0))]) == one
    # 1 + 3 * 2^-24 rounds up to 1 + 2^-22 (nearest), then + 0
    three = _bf(3 * 2.0**-24)
    assert _dp1(int(one), [(three, _bf(1.0), 0, 0)]) == np.float32(1 + 2.0**-22).view(np.uint32)


def test_tdpbf16ps_denormals():
    tiny = _bf(2.0**-126)  # smallest normal
    # a denormal bf16 input is zero, even times 2^100
    assert _dp1(0, [(0x0001, _bf(2.0**100), 0, 0)]) == 0
    # a denormal result is flushed to zero
    assert _dp1(0, [(_bf(2.0**-70), _bf(-(2.0**-60)), 0, 0)]) & 0x7FFFFFFF == 0
    assert _dp1(0, [(_bf(2.0**-70), _bf(2.0**-60), _bf(2.0**-126), _bf(1.0))]) == tiny << 16
    # a denormal accumulator is read as zero: 2^-126 + denormal would be a larger normal
    assert _dp1(0x00000005, [(tiny, _bf(1.0), 0, 0)]) == np.float32(2.0**-126).view(np.uint32)
    # a normal result stays
    assert _dp1(0, [(tiny, _bf(2.0), 0, 0)]) == np.float32(2.0**-125).view(np.uint32)


def test_tdpbf16ps_nan_and_inf_propagate():
    inf = _bf(np.inf)
    assert np.isnan(_f32(_dp1(0, [(_bf(np.nan), _bf(1.0), 0, 0)])))
    assert _f32(_dp1(0, [(inf, _bf(2.0), 0, 0)])) == np.inf
    assert np.isnan(_f32(_dp1(0, [(inf, _bf(1.0), inf, _bf(-1.0))])))


@pytest.mark.parametrize("op", ["tdpbssd", "tdpbsud", "tdpbusd", "tdpbuud"])
@pytest.mark.parametrize("M, N, K", SHAPES)
def test_int8_dot_products_match_definition(op, M, N, K):
    rng = np.random.default_rng(M * 10000 + N * 100 + K)
    a = rng.integers(0, 256, (M, 4 * K), dtype=np.uint8)
    b = rng.integers(0, 256, (K, 4 * N), dtype=np.uint8)
    c = rng.integers(-(2**31), 2**31, (M, N), dtype=np.int64).astype(np.int32)
    got = run_dp(op, c, a, b, M, N, K).view(np.int32)
    full = np.zeros((16, 16), np.int32)
    full[:M, :N] = c
    assert np.array_equal(got, ref_tdpb_i8(op, full, a, b, M, N, K)[:M, :N])


@pytest.mark.parametrize(
    "op, start, byte, total",
    [
        ("tdpbuud", 2**31 - 1, 255, 2**31 - 1 + 64 * 255 * 255),  # past INT32_MAX
        ("tdpbssd", -(2**31), 127, -(2**31) - 64 * 127 * 128),  # below INT32_MIN: a = 127, b = -128
        ("tdpbssd", 0, 127, -64 * 127 * 128),
    ],
)
def test_int8_wrap_around(op, start, byte, total):
    a = np.full((1, 64), byte, np.uint8)
    b = np.full((16, 4), 128 if op == "tdpbssd" else 255, np.uint8)
    c = np.array([[start]], np.int64).astype(np.int32)
    got = int(run_dp(op, c, a, b, 1, 1, 16).view(np.int32)[0, 0])
    assert got == (total + 2**31) % 2**32 - 2**31


def test_signedness_of_each_operand():
    a = np.full((1, 4), 0xFF, np.uint8)  # -1 signed, 255 unsigned
    b = np.full((1, 4), 0xFE, np.uint8)  # -2 signed, 254 unsigned
    c = np.zeros((1, 1), np.int32)
    want = {"tdpbssd": 4 * 2, "tdpbsud": 4 * -254, "tdpbusd": 4 * -510, "tdpbuud": 4 * 255 * 254}
    for op, v in want.items():
        assert int(run_dp(op, c, a, b, 1, 1, 1).view(np.int32)[0, 0]) == v, op


@pytest.mark.parametrize(
    "tiles, operands, match",
    [
        ({0: (4, 16), 1: (4, 16), 2: (4, 16)}, (0, 0, 2), "not distinct"),
        ({0: (4, 16), 1: (4, 16), 2: (4, 16)}, (0, 1, 1), "not distinct"),
        ({0: (4, 16), 1: (4, 16), 2: (4, 16)}, (2, 1, 2), "not distinct"),
        ({0: (4, 16), 1: (5, 16), 2: (4, 16)}, (0, 1, 2), "a.rows 5 != dst.rows 4"),
        ({0: (4, 16), 1: (4, 16), 2: (4, 12)}, (0, 1, 2), "b.colsb 12 != dst.colsb 16"),
        ({0: (4, 16), 1: (4, 20), 2: (4, 16)}, (0, 1, 2), "a.colsb / 4 = 5 != b.rows 4"),
        ({0: (4, 16), 1: (4, 16)}, (0, 1, 2), "tmm2 is not configured"),
        ({0: (4, 16), 1: (4, 16), 2: (4, 16)}, (0, 1, 9), "no tile register tmm9"),
    ],
)
@pytest.mark.parametrize("op", ["tdpbf16ps", "tdpbssd", "tdpbuud"])
def test_dot_product_shape_faults_leave_dst_unchanged(tiles, operands, match, op):
    ldtilecfg(tiles)
    rows, colsb = tiles[0]
    before = np.arange(rows * colsb, dtype=np.uint8).reshape(rows, colsb)
    load(0, before)
    for t in tiles:
        if t:
            load(t, np.ones((16, 64), np.uint8))
    with pytest.raises(_core.AMXFault, match="#UD") as info:
        _core.amx_emu_dp(op, *operands)
    assert match in str(info.value) and op in str(info.value)
    assert store(0, rows, colsb).tobytes() == before.tobytes()
    assert _core.amx_emu_first_fault() == str(info.value)


def test_dot_product_without_config_faults():
    with pytest.raises(_core.AMXFault, match="tiles are not configured"):
        _core.amx_emu_dp("tdpbf16ps", 0, 1, 2)
    with pytest.raises(ValueError, match="op must be"):
        _core.amx_emu_dp("tdpfp16ps", 0, 1, 2)


def test_first_fault_is_kept_until_cleared():
    with pytest.raises(_core.AMXFault) as first:
        _core.amx_emu_tilezero(0)
    ldtilecfg({0: (1, 4)})
    with pytest.raises(_core.AMXFault):
        _core.amx_emu_tilezero(5)
    assert _core.amx_emu_first_fault() == str(first.value)
    _core.amx_emu_clear_faults()
    assert _core.amx_emu_first_fault() is None


# ---- one kernel GEMM against float64 and the generic twin -----------------------------------

KERNEL_ISAS = list(_core.isa_lists()[1])
U = 2.0**-24  # fp32 unit roundoff

# (m, rows, cols, n0, n): W is [rows, cols]; "x W^T" outputs rows, "x W" outputs cols. The
# kernel contract (src_c/internal.h): n0 is a multiple of KT_BLOCK_N = 64, n <= 64.
GEMM_CASES = [(1, 17, 33, 0, 17), (17, 33, 70, 0, 20), (33, 70, 130, 64, 6), (40, 130, 65, 64, 1)]


def gemm(isa, op, a, w, n0, n, a_scale=None, w_scale=None):
    c = np.full((a.shape[0], n), np.nan, np.float32)
    ptr = lambda v: 0 if v is None else v.ctypes.data  # noqa: E731
    _core.gemm_test(
        isa,
        op,
        a.ctypes.data,
        ptr(a_scale),
        a.shape[0],
        w.ctypes.data,
        ptr(w_scale),
        w.shape[0],
        w.shape[1],
        "int8" if w.dtype == np.int8 else "bf16",
        n0,
        n,
        c.ctypes.data,
    )
    return c


def _bf16(rng, shape, positive=False):
    v = rng.standard_normal(shape)
    return (np.abs(v) if positive else v).astype(np.float32).astype(BF16).view(np.uint16)


def _f64(bf16_bits):
    return bf16_bits.view(BF16).astype(np.float64)


def _assert_fp32_sum(c, terms, nterms, what):
    """|c - exact| within the fp32 summation bound nterms * u * sum|terms| (products exact)."""
    exact, size = terms.sum(axis=-1), np.abs(terms).sum(axis=-1)
    err = np.abs(c.astype(np.float64) - exact)
    assert np.all(err <= 1.01 * nterms * U * size), f"{what}: max err/bound {np.max(err / size)}"


@pytest.mark.parametrize("isa", KERNEL_ISAS)
@pytest.mark.parametrize("m, rows, cols, n0, n", GEMM_CASES)
def test_kernel_gemm_nt(isa, m, rows, cols, n0, n):
    rng = np.random.default_rng(m + rows + cols)
    a, w = _bf16(rng, (m, cols)), _bf16(rng, (rows, cols))
    c = gemm(isa, "nt", a, w, n0, n)
    terms = _f64(a)[:, None, :] * _f64(w)[None, n0 : n0 + n, :]
    _assert_fp32_sum(c, terms, cols, "nt")


@pytest.mark.parametrize("isa", KERNEL_ISAS)
@pytest.mark.parametrize("m, rows, cols, n0, n", GEMM_CASES)
def test_kernel_gemm_nt_q8_is_exact(isa, m, rows, cols, n0, n):
    """int32 sums are exact and the scales apply in the generic twin's order: bit for bit."""
    rng = np.random.default_rng(m * rows + cols)
    a = rng.integers(-127, 128, (m, cols), dtype=np.int8)
    w = rng.integers(-127, 128, (rows, cols), dtype=np.int8)
    sa, sw = rng.random(m, dtype=np.float32) / 127, rng.random(rows, dtype=np.float32) / 127
    c = gemm(isa, "nt_q8", a, w, n0, n, sa, sw)
    assert bits(c).tobytes() == bits(gemm("generic", "nt_q8", a, w, n0, n, sa, sw)).tobytes()
    dots = a.astype(np.int64) @ w[n0 : n0 + n].astype(np.int64).T
    assert np.array_equal(c, (sa[:, None] * sw[None, n0 : n0 + n]) * dots.astype(np.float32))


@pytest.mark.parametrize("isa", KERNEL_ISAS)
@pytest.mark.parametrize("m, rows, cols, n0, n", GEMM_CASES)
@pytest.mark.parametrize("wtype", ["bf16", "int8"])
def test_kernel_gemm_nn(isa, m, rows, cols, n0, n, wtype):
    """x W on the packed W^T. int8: A times the row scale in fp32, no further rounding, so the
    error is that of fp32 summation (of 3 bf16 parts per product on AMX)."""
    rng = np.random.default_rng(m * cols + rows)
    a = _bf16(rng, (m, rows))
    if wtype == "int8":
        w = rng.integers(-127, 128, (rows, cols), dtype=np.int8)
        sw = (rng.random(rows, dtype=np.float32) + 0.5) / 127
        af = (_f64(a).astype(np.float32) * sw[None, :]).astype(np.float64)  # the fp32 operand
        c = gemm(isa, "nn", a, w, n0, n + 0, w_scale=sw)
        terms = af[:, None, :] * w.T[None, n0 : n0 + n, :].astype(np.float64)
        _assert_fp32_sum(c, terms, 3 * rows + 1, "nn int8")
    else:
        w = _bf16(rng, (rows, cols))
        c = gemm(isa, "nn", a, w, n0, n)
        terms = _f64(a)[:, None, :] * _f64(w).T[None, n0 : n0 + n, :]
        _assert_fp32_sum(c, terms, rows, "nn bf16")


@pytest.mark.parametrize("isa", KERNEL_ISAS)
def test_kernel_gemm_nn_int8_keeps_every_bit_of_the_scaled_operand(isa):
    """Positive data, where a dropped low part of A * scale would bias every sum by ~2^-17:
    the result stays within 2^-19 of the exact sum of the fp32 operands."""
    rng = np.random.default_rng(7)
    m, rows, cols = 20, 96, 48
    a = _bf16(rng, (m, rows), positive=True)
    w = rng.integers(1, 128, (rows, cols), dtype=np.int8)
    sw = (rng.random(rows, dtype=np.float32) + 0.5) / 127
    af = (_f64(a).astype(np.float32) * sw[None, :]).astype(np.float64)
    exact = af @ w.astype(np.float64)
    c = gemm(isa, "nn", a, w, 0, cols, w_scale=sw)
    assert np.max(np.abs(c - exact) / exact) < 2.0**-19


# ---- the engine on the AMX families --------------------------------------------------------------


def _no_fault():
    assert _core.amx_emu_first_fault() is None, _core.amx_emu_first_fault()


@pytest.mark.parametrize("isa", AMX_ISAS)
@settings(max_examples=6, deadline=None)
@given(
    E=st.integers(1, 5),
    k=st.integers(1, 3),
    H=st.sampled_from([1, 17, 33, 64, 65, 70]),
    I=st.sampled_from([1, 16, 31, 33, 65, 130]),  # noqa: E741
    r=st.integers(1, 4),
    T=st.integers(1, 35),
    pad=st.sampled_from([0.0, 0.2, 1.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_amx_matches_reference_property(pool, isa, E, k, H, I, r, T, pad, seed):  # noqa: E741
    """Bounded (amx-emu is slow): shapes that are not tile multiples, empty experts, T = 1,
    k = 1, all padding; bf16 and int8; NaN-poisoned outputs."""
    rng = np.random.default_rng(seed)
    p, x, ids, w, go = problem(rng, E, k, H, I, r, T, pad=pad)
    moe = make_moe(p, k, lora_alpha=8.0, pool=pool, isa=isa)
    out, g = run_engine(moe, x, ids, w, go)
    check_forward(out, p, x, ids, w, 8.0)
    check_backward(g, p, go, x, ids, w, 8.0)
    q8 = make_moe(p, k, lora_alpha=8.0, pool=pool, isa=isa, quant="int8")
    out = q8.forward(x, ids, w, save_for_backward=True, out=np.full((T, H), np.nan, np.float32))
    gi = np.full((T, H), np.nan, dtype=BF16)
    lg = {n: np.full(p[n].shape, np.nan, dtype=BF16) for n in GRAD_NAMES[1:-1]}
    g = q8.backward(go, grad_input=gi, lora_grads=lg)
    model_out, model_g = refs(p, x, ids, w, go, 8.0, "int8")
    from conftest import assert_close, assert_grads_close

    assert_close(out, model_out, INT8_FWD_TOL, "out")
    assert_grads_close(g, model_g, INT8_BWD_TOL)
    _no_fault()


@pytest.mark.parametrize("quant", ["bf16", "int8"])
def test_amx_emu_int8_forward_is_bit_identical_to_generic(rng, pool, quant):
    """int8 "x W^T" sums exactly in int32 and applies the scales in the generic's order, so the
    int8 forward equals the generic family's bit for bit; bf16 agrees to fp32 summation order."""
    p, x, ids, w, _ = problem(rng, 5, 2, 70, 130, 3, 21)
    outs = [
        make_moe(p, 2, lora_alpha=8.0, pool=pool, isa=isa, quant=quant).forward(x, ids, w)
        for isa in ("generic", "amx-emu")
    ]
    if quant == "int8":
        assert bits(outs[0]).tobytes() == bits(outs[1]).tobytes()
    else:
        np.testing.assert_allclose(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    _no_fault()


def test_amx_emu_packed_layout_round_trips(rng, pool):
    """Reading the weights back from the tiled layout gives the input, bf16 and int8."""
    p = problem(rng, 3, 2, 70, 33, 2, 4)[0]
    base = ("gate_proj", "up_proj", "down_proj")
    bf = make_moe(p, 2, lora_alpha=8.0, pool=pool, isa="amx-emu").base_weights()
    for name in base:
        assert bits(bf[name]).tobytes() == bits(p[name]).tobytes()
    ref = make_moe(p, 2, lora_alpha=8.0, pool=pool, isa="generic", quant="int8").base_weights()
    got = make_moe(p, 2, lora_alpha=8.0, pool=pool, isa="amx-emu", quant="int8").base_weights()
    for name in ref:
        assert np.array_equal(got[name], ref[name]), name


def test_kernel_reloads_a_foreign_tile_config(rng):
    """Tiles are configured once per thread; when other code on the thread loaded another
    configuration, the kernel notices (sttilecfg) and loads its own again."""
    E, k, H, T = 3, 2, 40, 9  # noqa: N806
    p, x, ids, w, _ = problem(rng, E, k, H, 33, 2, T)
    with ktsft.ThreadPool(1) as tp:
        moe = make_moe(p, k, lora_alpha=8.0, pool=tp, isa="amx-emu")
        expected = moe.forward(x, ids, w)
        ids64, w32 = np.ascontiguousarray(ids, np.int64), np.ascontiguousarray(w, np.float32)
        lora = moe._lora_ptrs()

        def forward_here():  # on this thread, the pool's only one: the kernels use its tiles
            out = np.full((T, H), np.nan, np.float32)
            args = (ids64.ctypes.data, w32.ctypes.data, x.ctypes.data, out.ctypes.data)
            moe._engine.forward(T, k, *args, False, lora, False)
            return out

        assert bits(forward_here()).tobytes() == bits(expected).tobytes()
        kernel_cfg = sttilecfg()
        assert kernel_cfg[0] == 1 and (kernel_cfg[48:56] == 16).all()
        ldtilecfg({0: (2, 8), 1: (2, 8)})
        assert bits(forward_here()).tobytes() == bits(expected).tobytes()
        assert sttilecfg().tobytes() == kernel_cfg.tobytes()
    _no_fault()


# ---- dispatch -----------------------------------------------------------------------------------


def test_amx_emu_is_always_available_and_never_auto():
    compiled, available, best = _core.isa_lists()
    assert "amx-emu" in compiled and "amx-emu" in available
    assert best != "amx-emu"


def test_amx_dispatch_follows_cpu_and_permission(monkeypatch):
    status = _core.amx_status()
    _, available, best = _core.isa_lists()
    if status == "granted" and "amx" in _core.isa_lists()[0]:
        assert "amx" in available and best == "amx"
        assert {"amx_tile", "amx_bf16", "amx_int8"} <= set(_core.cpu_features())
        return
    assert "amx" not in available and best != "amx"
    monkeypatch.setenv("KTSFT_ISA", "amx")
    info = ktsft.runtime_info()
    assert info["isa"] is None
    why = status if "amx" in _core.isa_lists()[0] else "not built into this library"
    assert why in info["isa_error"] and "amx-emu" in info["isa_error"]
