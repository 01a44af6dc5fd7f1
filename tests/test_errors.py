"""Every error of spec section 7, through the Python API and the seed-compatible API.

For each bad input: the right exception type, a message naming the argument with the expected and
the actual shape/dtype, the process alive, no state changed, and the object still usable (the next
valid call gives the right numbers against ktsft.reference, spec section 4 thresholds).
"""

from __future__ import annotations

import re

import ml_dtypes
import numpy as np
import pytest

import ktsft
from ktsft import reference
from ktsft.gradients import BASE_NAMES, LORA_NAMES

BF16 = np.dtype(ml_dtypes.bfloat16)
E, K, H, I, R, ALPHA, MAX_LEN, T = 8, 3, 96, 80, 4, 8.0, 16, 5  # noqa: E741
FWD_TOL, BWD_TOL = 0.01, 0.02  # spec section 4, bf16
FAMILIES = ("amx", "avx512", "avx2", "generic", "amx-emu")


# ---- local helpers ----------------------------------------------------------------------------


def _bf16(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).astype(BF16)


def _config(**kw) -> ktsft.MoESFTConfig:
    opts = dict(lora_rank=R, lora_alpha=ALPHA, max_len=MAX_LEN, max_cache_depth=2)
    opts.update(kw)
    return ktsft.MoESFTConfig(E, K, H, I, **opts)


SHAPES = _config().shapes()


def _params(seed: int = 0) -> dict:
    """Base and LoRA tensors, N(0, 1)/sqrt(fan_in), LoRA B nonzero so every path is used."""
    rng = np.random.default_rng(seed)
    return {n: _bf16(rng.standard_normal(s) / np.sqrt(s[-1])) for n, s in SHAPES.items()}


def _batch(seed: int = 1, t: int = T):
    """(x, expert_ids, weights, grad_output) for t tokens; expert 7 gets no route."""
    rng = np.random.default_rng(seed)
    x = _bf16(rng.standard_normal((t, H)))
    ids = np.stack([rng.permutation(E - 1)[:K] for _ in range(t)]).astype(np.int64)
    w = rng.uniform(0.1, 1.0, (t, K)).astype(np.float32)
    go = _bf16(rng.standard_normal((t, H)))
    return x, ids, w, go


def _f64(a) -> np.ndarray:
    if type(a).__module__.startswith("torch"):
        return a.detach().double().numpy()
    return np.asarray(a).astype(np.float64)


def _rel_err(ours, ref) -> float:
    ours, ref = _f64(ours), _f64(ref)
    return float(np.mean(np.abs(ours - ref)) / (np.mean(np.abs(ref)) + 1e-30))


def _raises(exc, *parts):
    """pytest.raises whose message must contain every part, in this order."""
    return pytest.raises(exc, match=".*".join(re.escape(p) for p in parts))


def _shape_msg(shape) -> str:
    return str(list(shape))


@pytest.fixture(scope="module")
def pool():
    return ktsft.ThreadPool(2)


@pytest.fixture
def params():
    return _params()


@pytest.fixture
def moe(pool, params):
    return ktsft.MoESFT(_config(), pool=pool, **params)


def _assert_works(moe, params, seed: int = 7, t: int = T) -> None:
    """A valid forward(save) + backward right after: correct numbers, stack back where it was."""
    depth = moe.cache_depth
    x, ids, w, go = _batch(seed, t)
    out = moe.forward(x, ids, w, save_for_backward=True)
    assert moe.cache_depth == depth + 1
    ref = reference.forward(x, ids, w, lora_alpha=ALPHA, **params)
    assert _rel_err(out, ref) < FWD_TOL
    g = moe.backward(go)
    assert moe.cache_depth == depth
    rg = reference.backward(go, x, ids, w, lora_alpha=ALPHA, **params)
    for name in ("input", "weights", *LORA_NAMES):
        assert _rel_err(getattr(g, name), getattr(rg, name)) < BWD_TOL, name


def _unavailable_family():
    available = ktsft.runtime_info()["available"]
    for fam in ("amx", "avx512", "avx2", "amx-emu"):
        if fam not in available:
            return fam, available
    pytest.skip("every kernel family is available on this machine")


# ---- forward arguments: dtype -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, np.int16])
def test_forward_x_wrong_dtype(moe, params, dtype):
    x, ids, w, _ = _batch()
    with _raises(TypeError, "x", "bfloat16", np.dtype(dtype).name):
        moe.forward(x.astype(dtype), ids, w)
    _assert_works(moe, params)


@pytest.mark.parametrize("dtype", [np.float64, np.float16, BF16])
def test_forward_weights_wrong_dtype(moe, params, dtype):
    x, ids, w, _ = _batch()
    with _raises(TypeError, "weights", "float32", np.dtype(dtype).name):
        moe.forward(x, ids, w.astype(dtype))
    _assert_works(moe, params)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint8, np.bool_])
def test_forward_expert_ids_wrong_dtype(moe, params, dtype):
    x, ids, w, _ = _batch()
    with _raises(TypeError, "expert_ids", "int64", np.dtype(dtype).name):
        moe.forward(x, ids.astype(dtype), w)
    _assert_works(moe, params)


def test_forward_torch_wrong_dtypes(moe, params):
    torch = pytest.importorskip("torch")
    x, ids, w, _ = _batch()
    xt = torch.from_numpy(x.astype(np.float32))
    idt, wt = torch.from_numpy(ids), torch.from_numpy(w)
    with _raises(TypeError, "x", "bfloat16", "float32"):
        moe.forward(xt, idt, wt)
    with _raises(TypeError, "weights", "float32", "float64"):
        moe.forward(xt.to(torch.bfloat16), idt, wt.double())
    with _raises(TypeError, "expert_ids", "int64", "float32"):
        moe.forward(xt.to(torch.bfloat16), idt.float(), wt)
    _assert_works(moe, params)


def test_forward_out_wrong_dtype_and_shape(moe, params):
    x, ids, w, _ = _batch()
    with _raises(TypeError, "out", "float32", "float64"):
        moe.forward(x, ids, w, out=np.zeros((T, H), np.float64))
    with _raises(ValueError, "out", _shape_msg((T, H)), _shape_msg((T, H + 1))):
        moe.forward(x, ids, w, out=np.zeros((T, H + 1), np.float32))
    with _raises(ValueError, "out", _shape_msg((T, H)), _shape_msg((T + 1, H))):
        moe.forward(x, ids, w, out=np.zeros((T + 1, H), np.float32))
    _assert_works(moe, params)


# ---- forward arguments: shape, T, k, expert ids ----------------------------------------------


@pytest.mark.parametrize("bad", [(T, H + 1), (T, H - 1), (T, 1, H), (T * H,)])
def test_forward_x_wrong_shape(moe, params, bad):
    x, ids, w, _ = _batch()
    xb = _bf16(np.zeros(bad))
    with _raises(ValueError, "x", str(H), _shape_msg(bad)):
        moe.forward(xb, ids, w)
    _assert_works(moe, params)


@pytest.mark.parametrize("bad", [(T + 1, K), (T - 1, K), (T * K,), (T, K, 1)])
def test_forward_expert_ids_wrong_shape(moe, params, bad):
    x, _, w, _ = _batch()
    with _raises(ValueError, "expert_ids", _shape_msg((T, K)), _shape_msg(bad)):
        moe.forward(x, np.zeros(bad, np.int64), w)
    _assert_works(moe, params)


@pytest.mark.parametrize("bad", [(T + 1, K), (T, K + 1), (T, K - 1), (T * K,)])
def test_forward_weights_wrong_shape(moe, params, bad):
    x, ids, _, _ = _batch()
    with _raises(ValueError, "weights", _shape_msg((T, K)), _shape_msg(bad)):
        moe.forward(x, ids, np.full(bad, 0.5, np.float32))
    _assert_works(moe, params)


@pytest.mark.parametrize("t", [MAX_LEN + 1, 4 * MAX_LEN])
def test_forward_too_many_tokens(moe, params, t):
    x, ids, w, _ = _batch(t=t)
    with _raises(ValueError, f"T = {t}", f"max_len = {MAX_LEN}"):
        moe.forward(x, ids, w, save_for_backward=True)
    assert moe.cache_depth == 0
    _assert_works(moe, params, t=MAX_LEN)  # exactly max_len is fine


def test_forward_zero_tokens(moe, params):
    x = np.zeros((0, H), BF16)
    with _raises(ValueError, "T = 0", "max_len"):
        moe.forward(x, np.zeros((0, K), np.int64), np.zeros((0, K), np.float32), True)
    assert moe.cache_depth == 0
    _assert_works(moe, params)


@pytest.mark.parametrize("k", [1, K - 1, K + 1])
def test_forward_k_mismatch(moe, params, k):
    x, ids, w, _ = _batch()
    ids_k = np.resize(ids, (T, k))
    w_k = np.full((T, k), 0.5, np.float32)
    with _raises(ValueError, "k mismatch", f"{k} columns", f"num_experts_per_tok = {K}"):
        moe.forward(x, ids_k, w_k)
    _assert_works(moe, params)


@pytest.mark.parametrize(
    "bad_id, ids_dtype",
    [
        (E, np.int64),
        (E + 100, np.int64),
        (-2, np.int64),
        (-(2**40), np.int64),
        (2**40, np.int64),
        (E, np.int32),
        (-2, np.int32),
    ],
)
def test_forward_expert_id_out_of_range(moe, params, bad_id, ids_dtype):
    x, ids, w, _ = _batch()
    ids = ids.astype(ids_dtype)
    ids[3, 1] = bad_id
    out = np.full((T, H), 123.0, np.float32)
    with _raises(ValueError, "expert_ids[3, 1]", str(bad_id), "out of range", str(E)):
        moe.forward(x, ids, w, save_for_backward=True, out=out)
    assert moe.cache_depth == 0  # nothing pushed
    assert (out == 123.0).all()  # nothing written
    _assert_works(moe, params)


def test_forward_padding_id_minus_one_is_not_an_error(moe, params):
    x, ids, w, _ = _batch()
    ids[:, 0] = -1
    out = moe.forward(x, ids, w)
    ref = reference.forward(x, ids, w, lora_alpha=ALPHA, **params)
    assert _rel_err(out, ref) < FWD_TOL


# ---- non-array arguments ------------------------------------------------------------------------


def test_forward_python_lists_are_type_errors(moe, params):
    x, ids, w, _ = _batch()
    with _raises(TypeError, "x", "numpy.ndarray", "list"):
        moe.forward(x.astype(np.float32).tolist(), ids, w)
    with _raises(TypeError, "expert_ids", "list"):
        moe.forward(x, ids.tolist(), w)
    with _raises(TypeError, "weights", "list"):
        moe.forward(x, ids, w.tolist())
    with _raises(TypeError, "out", "list"):
        moe.forward(x, ids, w, out=[[0.0] * H] * T)
    with _raises(TypeError, "grad_output", "tuple"):
        moe.backward(tuple(map(tuple, x.astype(np.float32))))
    _assert_works(moe, params)


def test_non_cpu_tensor_is_a_type_error(moe, params):
    torch = pytest.importorskip("torch")
    x, ids, w, _ = _batch()
    xm = torch.empty((T, H), dtype=torch.bfloat16, device="meta")
    with _raises(TypeError, "x", "CPU", "meta"):
        moe.forward(xm, torch.from_numpy(ids), torch.from_numpy(w))
    with pytest.raises(TypeError, match="gate_lora_a.*CPU"):
        ktsft.MoESFT(
            _config(),
            pool=moe.pool,
            **{**params, "gate_lora_a": torch.empty(SHAPES["gate_lora_a"], device="meta")},
        )
    _assert_works(moe, params)


# ---- construction: base weights and LoRA tensors ----------------------------------------------


@pytest.mark.parametrize("name", BASE_NAMES + LORA_NAMES)
def test_construct_wrong_dtype(pool, params, name):
    bad = {**params, name: params[name].astype(np.float32)}
    with _raises(TypeError, name, "bfloat16", "float32"):
        ktsft.MoESFT(_config(), pool=pool, **bad)
    bad = {**params, name: params[name].astype(np.float64)}
    with _raises(TypeError, name, "bfloat16", "float64"):
        ktsft.MoESFT(_config(), pool=pool, **bad)
    _assert_works(ktsft.MoESFT(_config(), pool=pool, **params), params)


@pytest.mark.parametrize("name", BASE_NAMES + LORA_NAMES)
def test_construct_wrong_shape(pool, params, name):
    shape = SHAPES[name]
    for bad_shape in [(shape[0] + 1, *shape[1:]), (*shape[:2], shape[2] + 1), shape[1:]]:
        bad = {**params, name: np.zeros(bad_shape, BF16)}
        with _raises(ValueError, name, _shape_msg(shape), _shape_msg(bad_shape)):
            ktsft.MoESFT(_config(), pool=pool, **bad)
    _assert_works(ktsft.MoESFT(_config(), pool=pool, **params), params)


def _transposed(a: np.ndarray) -> np.ndarray:
    """A non-contiguous view with a's shape (the last two axes of a transposed buffer)."""
    e, m, n = a.shape
    buf = np.ascontiguousarray(a.transpose(0, 2, 1))
    v = buf.transpose(0, 2, 1)
    assert v.shape == a.shape and not v.flags.c_contiguous
    return v


def _strided(a: np.ndarray) -> np.ndarray:
    """A non-contiguous ``[:, ::2]``-style view with a's shape and values."""
    e, m, n = a.shape
    buf = np.zeros((e, 2 * m, n), a.dtype)
    buf[:, ::2] = a
    v = buf[:, ::2]
    assert v.shape == a.shape and not v.flags.c_contiguous
    return v


@pytest.mark.parametrize("make_view", [_transposed, _strided])
@pytest.mark.parametrize("name", BASE_NAMES + LORA_NAMES)
def test_construct_non_contiguous(pool, params, name, make_view):
    bad = {**params, name: make_view(params[name])}
    with _raises(ValueError, name, "contiguous"):
        ktsft.MoESFT(_config(), pool=pool, **bad)
    _assert_works(ktsft.MoESFT(_config(), pool=pool, **params), params)


@pytest.mark.parametrize("name", LORA_NAMES)
def test_set_lora_bad_tensor_changes_nothing(moe, params, name):
    """set_lora validates every tensor before re-pointing any of them."""
    other = _params(seed=5)
    with _raises(ValueError, name, "contiguous"):
        moe.set_lora(
            **{n: other[n] for n in LORA_NAMES if n != name}, **{name: _strided(other[name])}
        )
    with _raises(TypeError, name, "bfloat16", "float32"):
        moe.set_lora(
            **{n: other[n] for n in LORA_NAMES if n != name},
            **{name: other[name].astype(np.float32)},
        )
    assert all(moe.lora[n] is params[n] for n in LORA_NAMES)
    _assert_works(moe, params)


def test_set_lora_unknown_name(moe, params):
    with _raises(TypeError, "gate_lora_c", "gate_lora_a"):
        moe.set_lora(gate_lora_c=params["gate_lora_a"])
    _assert_works(moe, params)


def test_lora_parameter_made_non_contiguous_later_is_reported(pool, params):
    """Zero copy re-reads the caller's tensors at every call, so it re-checks them too."""
    torch = pytest.importorskip("torch")
    lora = {
        n: torch.nn.Parameter(torch.from_numpy(params[n].astype(np.float32)).to(torch.bfloat16))
        for n in LORA_NAMES
    }
    base = {n: params[n] for n in BASE_NAMES}
    moe = ktsft.MoESFT(_config(), pool=pool, **base, **lora)
    x, ids, w, _ = _batch()
    good = lora["down_lora_b"].data
    lora["down_lora_b"].data = good.transpose(1, 2).contiguous().transpose(1, 2)
    with _raises(ValueError, "down_lora_b", "contiguous"):
        moe.forward(
            torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16),
            torch.from_numpy(ids),
            torch.from_numpy(w),
            save_for_backward=True,
        )
    assert moe.cache_depth == 0
    lora["down_lora_b"].data = good
    _assert_works(moe, params)


def test_config_must_be_a_config(pool, params):
    with _raises(TypeError, "config", "MoESFTConfig", "dict"):
        ktsft.MoESFT(dict(expert_num=E), pool=pool, **params)


# ---- config values ------------------------------------------------------------------------------

INT_FIELDS = (
    "expert_num",
    "num_experts_per_tok",
    "hidden_size",
    "intermediate_size",
    "lora_rank",
    "max_len",
    "max_cache_depth",
)


def _config_kw(**override) -> dict:
    kw = dict(
        expert_num=E,
        num_experts_per_tok=K,
        hidden_size=H,
        intermediate_size=I,
        lora_rank=R,
        lora_alpha=ALPHA,
        max_len=MAX_LEN,
        max_cache_depth=2,
    )
    kw.update(override)
    return kw


@pytest.mark.parametrize("value", [0, -1, -(2**40)])
@pytest.mark.parametrize("field", INT_FIELDS)
def test_config_sizes_must_be_positive(field, value):
    with _raises(ValueError, field, "> 0", str(value)):
        ktsft.MoESFTConfig(**_config_kw(**{field: value}))


@pytest.mark.parametrize("value", [8.0, "8", True, None, np.float64(8.0)])
@pytest.mark.parametrize("field", INT_FIELDS)
def test_config_sizes_must_be_ints(field, value):
    with _raises(TypeError, field, "int", type(value).__name__):
        ktsft.MoESFTConfig(**_config_kw(**{field: value}))


@pytest.mark.parametrize("field", INT_FIELDS)
def test_config_sizes_too_large(field):
    with _raises(ValueError, field, "2**31"):
        ktsft.MoESFTConfig(**_config_kw(**{field: 2**31}))


@pytest.mark.parametrize("value", ["32", None, float("nan")])
def test_config_lora_alpha_must_be_a_number(value):
    with _raises(TypeError, "lora_alpha", "number"):
        ktsft.MoESFTConfig(**_config_kw(lora_alpha=value))


def test_config_unknown_quant():
    with _raises(ValueError, "quant", "bf16", "int8", "fp8", "int3"):
        ktsft.MoESFTConfig(**_config_kw(quant="int3"))


# ---- base weights: int8, partial loads -------------------------------------------------------


@pytest.fixture
def int8_params(pool, params):
    """The int8 weights and scales of ``params`` (as base_weights() gives them)."""
    cfg = ktsft.MoESFTConfig(**_config_kw(quant="int8"))
    return ktsft.MoESFT(cfg, pool=pool, **params).base_weights()


def _lora_of(params):
    return {n: params[n] for n in LORA_NAMES}


def test_int8_weights_need_quant_int8(pool, params, int8_params):
    base = {n: int8_params[n] for n in BASE_NAMES}
    with _raises(TypeError, "gate_proj", "int8", "quant='int8'"):
        ktsft.MoESFT(_config(), pool=pool, **_lora_of(params), **base)


def test_int8_weights_need_their_scales(pool, params, int8_params):
    cfg = ktsft.MoESFTConfig(**_config_kw(quant="int8"))
    kw = dict(int8_params)
    del kw["up_scale"]
    with _raises(TypeError, "up_proj", "up_scale"):
        ktsft.MoESFT(cfg, pool=pool, **_lora_of(params), **kw)


def test_int8_scale_shape_and_dtype(pool, params, int8_params):
    cfg = ktsft.MoESFTConfig(**_config_kw(quant="int8"))
    kw = dict(int8_params, down_scale=int8_params["down_scale"][:, :-1])
    with _raises(ValueError, "down_scale", _shape_msg((E, H)), _shape_msg((E, H - 1))):
        ktsft.MoESFT(cfg, pool=pool, **_lora_of(params), **kw)
    kw = dict(int8_params, gate_scale=int8_params["gate_scale"].astype(np.float64))
    with _raises(TypeError, "gate_scale", "float32", "float64"):
        ktsft.MoESFT(cfg, pool=pool, **_lora_of(params), **kw)


def test_scales_without_int8_weights(pool, params, int8_params):
    cfg = ktsft.MoESFTConfig(**_config_kw(quant="int8"))
    scales = {n: int8_params[n] for n in ("gate_scale", "up_scale", "down_scale")}
    with _raises(TypeError, "int8"):
        ktsft.MoESFT(cfg, pool=pool, **params, **scales)
    with _raises(TypeError, "scale", "base weights"):
        ktsft.MoESFT(cfg, pool=pool, **_lora_of(params), **scales)


def test_some_base_weights_missing(pool, params):
    kw = dict(params)
    del kw["down_proj"]
    with _raises(TypeError, "all three", "down_proj"):
        ktsft.MoESFT(_config(), pool=pool, **kw)


def test_partially_loaded_layer_refuses_forward_and_still_works_after(pool, params):
    moe = ktsft.MoESFT(_config(), pool=pool, **_lora_of(params))
    x, ids, w, go = _batch()
    with _raises(ktsft.EngineStateError, "Weights not loaded", f"0 of {E}"):
        moe.forward(x, ids, w)
    moe.load_experts(0, **{n: params[n][: E - 1] for n in BASE_NAMES})
    assert moe.experts_loaded == E - 1
    with _raises(ktsft.EngineStateError, "Weights not loaded", f"{E - 1} of {E}"):
        moe.forward(x, ids, w, save_for_backward=True)
    with _raises(ktsft.EngineStateError, "Weights not loaded"):
        moe.base_weights(E - 1)
    assert moe.cache_depth == 0
    moe.load_experts(E - 1, **{n: params[n][E - 1] for n in BASE_NAMES})
    _assert_works(moe, params)


@pytest.mark.parametrize("first, count", [(-1, 1), (E - 1, 2), (E, 1)])
def test_load_experts_out_of_range(pool, params, first, count):
    moe = ktsft.MoESFT(_config(), pool=pool, **_lora_of(params))
    with _raises(ValueError, "experts", f"[0, {E})"):
        moe.load_experts(first, **{n: params[n][:count] for n in BASE_NAMES})
    assert moe.experts_loaded == 0


def test_load_experts_shape_mismatch(pool, params):
    moe = ktsft.MoESFT(_config(), pool=pool, **_lora_of(params))
    kw = {n: params[n][:2] for n in BASE_NAMES}
    kw["up_proj"] = params["up_proj"][:3]
    with _raises(ValueError, "up_proj", _shape_msg((2, I, H)), _shape_msg((3, I, H))):
        moe.load_experts(0, **kw)
    assert moe.experts_loaded == 0


@pytest.mark.parametrize("first, count", [(0, 0), (E - 1, 2), (-1, 1), (0, True)])
def test_base_weights_range(moe, first, count):
    with pytest.raises((ValueError, TypeError), match="experts|count"):
        moe.base_weights(first, count)


def test_numpy_integer_sizes_are_rejected_or_work():
    """np.int64 is not a Python int: either accepted as the same value or a TypeError, never a
    silently different size."""
    try:
        cfg = ktsft.MoESFTConfig(**_config_kw(expert_num=np.int64(E)))
    except TypeError as e:
        assert "expert_num" in str(e)
    else:
        assert cfg.expert_num == E


# ---- backward arguments -------------------------------------------------------------------------


@pytest.fixture
def saved(moe):
    """moe with one forward saved; returns (moe, x, ids, w, go)."""
    x, ids, w, go = _batch()
    moe.forward(x, ids, w, save_for_backward=True)
    assert moe.cache_depth == 1
    return moe, x, ids, w, go


def _grad_buffers(fill=np.nan) -> dict:
    return {n: np.full(SHAPES[n], fill, BF16) for n in LORA_NAMES}


def _assert_backward_still_pairs(moe, params, x, ids, w, go) -> None:
    """The saved entry is intact: a correct backward now gives the reference gradients."""
    assert moe.cache_depth == 1
    g = moe.backward(go)
    assert moe.cache_depth == 0
    rg = reference.backward(go, x, ids, w, lora_alpha=ALPHA, **params)
    for name in ("input", "weights", *LORA_NAMES):
        assert _rel_err(getattr(g, name), getattr(rg, name)) < BWD_TOL, name
    _assert_works(moe, params)


@pytest.mark.parametrize("rows", [T - 1, T + 1, 1])
def test_backward_grad_output_rows_mismatch(saved, params, rows):
    moe, x, ids, w, go = saved
    grads = _grad_buffers()
    gi = np.full((rows, H), np.nan, BF16)
    before = {n: b.tobytes() for n, b in grads.items()}
    gi_before = gi.tobytes()
    with _raises(ValueError, "grad_output", f"{rows} rows", f"{T} tokens", _shape_msg((T, H))):
        moe.backward(_bf16(np.ones((rows, H))), grad_input=gi, lora_grads=grads)
    assert moe.cache_depth == 1  # the saved entry was not popped
    assert all(grads[n].tobytes() == before[n] for n in LORA_NAMES)  # untouched
    assert gi.tobytes() == gi_before
    _assert_backward_still_pairs(moe, params, x, ids, w, go)


@pytest.mark.parametrize("bad", [(T, H + 1), (T,), (T, H, 1)])
def test_backward_grad_output_wrong_shape(saved, params, bad):
    moe, x, ids, w, go = saved
    with _raises(ValueError, "grad_output", str(H), _shape_msg(bad)):
        moe.backward(np.zeros(bad, BF16))
    _assert_backward_still_pairs(moe, params, x, ids, w, go)


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int16])
def test_backward_grad_output_wrong_dtype(saved, params, dtype):
    moe, x, ids, w, go = saved
    with _raises(TypeError, "grad_output", "bfloat16", np.dtype(dtype).name):
        moe.backward(go.astype(dtype))
    _assert_backward_still_pairs(moe, params, x, ids, w, go)


def test_backward_grad_input_wrong(saved, params):
    moe, x, ids, w, go = saved
    with _raises(TypeError, "grad_input", "bfloat16", "float32"):
        moe.backward(go, grad_input=np.zeros((T, H), np.float32))
    with _raises(ValueError, "grad_input", _shape_msg((T, H)), _shape_msg((T, H - 1))):
        moe.backward(go, grad_input=np.zeros((T, H - 1), BF16))
    with _raises(ValueError, "grad_input", "contiguous"):
        moe.backward(go, grad_input=np.zeros((H, T), BF16).T)
    with _raises(ValueError, "grad_input", "contiguous"):
        moe.backward(go, grad_input=np.zeros((T, 2 * H), BF16)[:, ::2])
    _assert_backward_still_pairs(moe, params, x, ids, w, go)


@pytest.mark.parametrize("name", LORA_NAMES)
def test_backward_lora_grad_buffer_wrong(saved, params, name):
    moe, x, ids, w, go = saved
    label = f"lora_grads[{name!r}]"
    shape = SHAPES[name]
    cases = [
        (TypeError, np.zeros(shape, np.float32), ("bfloat16", "float32")),
        (TypeError, np.zeros(shape, np.float64), ("bfloat16", "float64")),
        (ValueError, np.zeros(shape[1:], BF16), (_shape_msg(shape), _shape_msg(shape[1:]))),
        (ValueError, _transposed(np.zeros(shape, BF16)), ("contiguous",)),
        (ValueError, _strided(np.zeros(shape, BF16)), ("contiguous",)),
    ]
    for exc, bad, parts in cases:
        grads = _grad_buffers()
        grads[name] = bad
        gi = np.full((T, H), np.nan, BF16)
        before = {n: g.tobytes() for n, g in grads.items()}
        with _raises(exc, label, *parts):
            moe.backward(go, grad_input=gi, lora_grads=grads)
        assert moe.cache_depth == 1
        assert all(grads[n].tobytes() == before[n] for n in LORA_NAMES)
        assert np.isnan(gi.astype(np.float32)).all()
    _assert_backward_still_pairs(moe, params, x, ids, w, go)


def test_backward_lora_grads_unknown_key(saved, params):
    moe, x, ids, w, go = saved
    with _raises(TypeError, "lora_grads", "gate_lora_c"):
        moe.backward(go, lora_grads={"gate_lora_c": np.zeros(SHAPES["gate_lora_a"], BF16)})
    _assert_backward_still_pairs(moe, params, x, ids, w, go)


def test_backward_torch_grad_buffers_wrong_dtype(saved, params):
    torch = pytest.importorskip("torch")
    moe, x, ids, w, go = saved
    grads = {n: torch.zeros(SHAPES[n], dtype=torch.bfloat16) for n in LORA_NAMES}
    grads["up_lora_b"] = torch.zeros(SHAPES["up_lora_b"], dtype=torch.float32)
    with _raises(TypeError, "lora_grads['up_lora_b']", "bfloat16", "float32"):
        moe.backward(torch.from_numpy(go.astype(np.float32)), lora_grads=grads)
    grads["up_lora_b"] = torch.zeros((E, R, I), dtype=torch.bfloat16).transpose(1, 2)
    with _raises(ValueError, "lora_grads['up_lora_b']", "contiguous"):
        moe.backward(torch.from_numpy(go.astype(np.float32)), lora_grads=grads)
    _assert_backward_still_pairs(moe, params, x, ids, w, go)


# ---- the saved-state stack ----------------------------------------------------------------------


def test_backward_on_empty_stack(moe, params):
    _, _, _, go = _batch()
    grads = _grad_buffers()
    before = {n: g.tobytes() for n, g in grads.items()}
    with pytest.raises(Exception, match="max_cache_depth") as info:
        moe.backward(go, lora_grads=grads)
    assert moe.cache_depth == 0
    assert all(grads[n].tobytes() == before[n] for n in LORA_NAMES)
    _assert_works(moe, params)
    # Spec section 7: the Python API reports it as ValueError/TypeError.
    assert isinstance(info.value, ValueError), repr(info.value)


def test_forward_on_full_stack(moe, params):
    batches = [_batch(seed=s) for s in (11, 12)]
    for x, ids, w, _ in batches:
        moe.forward(x, ids, w, save_for_backward=True)
    assert moe.cache_depth == 2
    x3, ids3, w3, _ = _batch(seed=13)
    out = np.full((T, H), 5.0, np.float32)
    with pytest.raises(Exception, match="max_cache_depth = 2") as info:
        moe.forward(x3, ids3, w3, save_for_backward=True, out=out)
    assert moe.cache_depth == 2
    assert (out == 5.0).all()
    # A forward that saves nothing still runs on a full stack.
    out = moe.forward(x3, ids3, w3)
    assert _rel_err(out, reference.forward(x3, ids3, w3, lora_alpha=ALPHA, **params)) < FWD_TOL
    # The two saved entries still pair LIFO with their backward.
    for x, ids, w, go in reversed(batches):
        g = moe.backward(go)
        rg = reference.backward(go, x, ids, w, lora_alpha=ALPHA, **params)
        assert _rel_err(g.input, rg.input) < BWD_TOL
        assert _rel_err(g.gate_lora_a, rg.gate_lora_a) < BWD_TOL
    assert moe.cache_depth == 0
    _assert_works(moe, params)
    # Spec section 7: the Python API reports it as ValueError/TypeError.
    assert isinstance(info.value, ValueError), repr(info.value)


def test_failed_save_changes_no_state(moe, params):
    """A forward(save) that fails (bad expert id) pushes nothing: the entry below stays on top."""
    x, ids, w, go = _batch(seed=21)
    moe.forward(x, ids, w, save_for_backward=True)
    xb, idsb, wb, _ = _batch(seed=22)
    idsb[0, 0] = E
    with _raises(ValueError, "expert_ids[0, 0]"):
        moe.forward(xb, idsb, wb, save_for_backward=True)
    assert moe.cache_depth == 1
    _assert_backward_still_pairs(moe, params, x, ids, w, go)


def test_clear_cache(moe, params):
    x, ids, w, _ = _batch()
    moe.forward(x, ids, w, save_for_backward=True)
    moe.clear_cache()
    assert moe.cache_depth == 0
    with pytest.raises(Exception, match="max_cache_depth"):  # type: test_backward_on_empty_stack
        moe.backward(_batch()[3])
    _assert_works(moe, params)


def test_accumulate_without_buffers_starts_from_zero(moe, params, monkeypatch):
    """backward(accumulate=True) adds into the buffers; the ones the library allocates itself
    (grad_input, LoRA grads, grad weights) must start at zero, not at whatever memory held.
    Uninitialized memory is simulated by making the library's empty() return NaN-filled arrays.
    """
    import ktsft._arrays as arrays

    real_empty = arrays.empty

    def nan_empty(kind, shape, dtype, *, zero=False):
        a = real_empty(kind, shape, dtype, zero=zero)
        if not zero:
            a[...] = np.nan
        return a

    monkeypatch.setattr(arrays, "empty", nan_empty)
    x, ids, w, go = _batch()
    moe.forward(x, ids, w, save_for_backward=True)
    g = moe.backward(go, accumulate=True)
    rg = reference.backward(go, x, ids, w, lora_alpha=ALPHA, **params)
    for name in ("input", "weights", *LORA_NAMES):
        n_nan = int(np.isnan(_f64(getattr(g, name))).sum())
        assert n_nan == 0, f"{name}: {n_nan} NaN (the buffer was not zeroed before adding)"
        assert _rel_err(getattr(g, name), getattr(rg, name)) < BWD_TOL, name


# ---- kernel family (ISA) ------------------------------------------------------------------------


def test_unavailable_isa_argument(pool, params):
    fam, available = _unavailable_family()
    with pytest.raises(ktsft.ISAUnavailableError) as info:
        ktsft.MoESFT(_config(), pool=pool, isa=fam, **params)
    assert isinstance(info.value, ValueError)
    msg = str(info.value)
    assert fam in msg and "available" in msg
    for a in available:
        assert a in msg
    _assert_works(ktsft.MoESFT(_config(), pool=pool, **params), params)


def test_unavailable_isa_env(pool, params, monkeypatch):
    fam, available = _unavailable_family()
    monkeypatch.setenv("KTSFT_ISA", fam)
    with _raises(ktsft.ISAUnavailableError, f"KTSFT_ISA={fam}", "available", available[-1]):
        ktsft.MoESFT(_config(), pool=pool, **params)
    info = ktsft.runtime_info()
    assert info["isa"] is None and fam in info["isa_error"]
    monkeypatch.setenv("KTSFT_ISA", "auto")
    _assert_works(ktsft.MoESFT(_config(), pool=pool, **params), params)


@pytest.mark.parametrize("name", ["sse9", "AMX", "avx-512", "generic "])
def test_unknown_isa_name(pool, params, monkeypatch, name):
    with _raises(ktsft.ISAUnavailableError, "unknown kernel family", "amx", "generic"):
        ktsft.MoESFT(_config(), pool=pool, isa=name, **params)
    monkeypatch.setenv("KTSFT_ISA", name)
    with pytest.raises(ValueError, match="unknown kernel family"):
        ktsft.MoESFT(_config(), pool=pool, **params)


def test_empty_isa_env_means_auto(pool, params, monkeypatch):
    monkeypatch.setenv("KTSFT_ISA", "")
    moe = ktsft.MoESFT(_config(), pool=pool, **params)
    assert moe.isa == ktsft.runtime_info()["best"]


def test_every_available_isa_can_be_forced(pool, params):
    for fam in ktsft.runtime_info()["available"]:
        moe = ktsft.MoESFT(_config(), pool=pool, isa=fam, **params)
        assert moe.isa == fam
        _assert_works(moe, params)


def test_isa_error_message_lists_known_families(pool, params):
    with pytest.raises(ktsft.ISAUnavailableError) as info:
        ktsft.MoESFT(_config(), pool=pool, isa="nope", **params)
    for fam in FAMILIES:
        assert fam in str(info.value)


# ---- the seed-compatible API: errors are RuntimeError at CPUInfer.sync() ------------------------

kt_kernel_ext = ktsft.kt_kernel_ext


class _Seed:
    """A seed-API layer over numpy arrays kept alive here (pointers carry no lifetime)."""

    def __init__(self, cpu_infer, params, load=True, cls=None, **overrides):
        self.cpu = cpu_infer
        self.params = params
        c = kt_kernel_ext.moe.MOESFTConfig()
        c.expert_num, c.num_experts_per_tok, c.hidden_size, c.intermediate_size = E, K, H, I
        c.lora_rank, c.lora_alpha, c.max_cache_depth, c.max_len = R, ALPHA, 1, MAX_LEN
        c.layer_idx = 0
        for n in BASE_NAMES + LORA_NAMES:
            setattr(c, n, params[n].ctypes.data)
        c.pool = cpu_infer.backend_
        for k, v in overrides.items():
            setattr(c, k, v)
        self.config = c
        self.moe = (cls or kt_kernel_ext.moe.AMXBF16_SFT_MOE)(c)
        if load:
            self.run(self.moe.load_weights_task())

    def run(self, task):
        self.cpu.submit(task)
        self.cpu.sync()

    def forward_task(self, x, ids, w, save, t=None, k=K):
        self._keep = bsz = np.array([x.shape[0] if t is None else t], np.int64)
        out = np.full((max(x.shape[0], 1), H), np.nan, np.float32)
        self._out = out
        task = self.moe.forward_sft_task(
            bsz.ctypes.data, k, ids.ctypes.data, w.ctypes.data, x.ctypes.data, out.ctypes.data, save
        )
        return task, out

    def backward_task(self, go, grads, gi, gw=None):
        ptrs = [grads[n].ctypes.data for n in LORA_NAMES]
        return self.moe.backward_task(
            go.ctypes.data, gi.ctypes.data, *ptrs, 0 if gw is None else gw.ctypes.data
        )

    def assert_works(self, seed=31):
        x, ids, w, go = _batch(seed)
        task, out = self.forward_task(x, ids, w, True)
        self.run(task)
        ref = reference.forward(x, ids, w, lora_alpha=ALPHA, **self.params)
        assert _rel_err(out, ref) < FWD_TOL
        grads, gi = _grad_buffers(), np.full((T, H), np.nan, BF16)
        gw = np.full((T, K), np.nan, np.float32)
        self.run(self.backward_task(go, grads, gi, gw))
        rg = reference.backward(go, x, ids, w, lora_alpha=ALPHA, **self.params)
        assert _rel_err(gi, rg.input) < BWD_TOL
        assert _rel_err(gw, rg.weights) < BWD_TOL
        for n in LORA_NAMES:
            assert _rel_err(grads[n], getattr(rg, n)) < BWD_TOL, n


@pytest.fixture(scope="module")
def cpu_infer():
    return kt_kernel_ext.CPUInfer(2)


@pytest.fixture
def seed_layer(cpu_infer, params):
    return _Seed(cpu_infer, params)


def test_seed_forward_before_weights_loaded(cpu_infer, params):
    layer = _Seed(cpu_infer, params, load=False)
    x, ids, w, go = _batch()
    task, out = layer.forward_task(x, ids, w, True)
    cpu_infer.submit(task)
    with _raises(RuntimeError, "Weights not loaded"):
        cpu_infer.sync()
    assert np.isnan(out).all()  # nothing written
    cpu_infer.submit(layer.backward_task(go, _grad_buffers(), np.zeros((T, H), BF16)))
    with _raises(RuntimeError, "Weights not loaded"):
        cpu_infer.sync()
    layer.run(layer.moe.load_weights_task())
    layer.assert_works()


def test_seed_sync_reports_an_error_once(seed_layer):
    x, ids, w, _ = _batch()
    task, _ = seed_layer.forward_task(x, ids, w, False, k=K + 1)
    seed_layer.cpu.submit(task)
    with pytest.raises(RuntimeError):
        seed_layer.cpu.sync()
    seed_layer.cpu.sync()  # nothing pending: no error now
    seed_layer.assert_works()


@pytest.mark.parametrize("k", [1, K + 1])
def test_seed_k_mismatch(seed_layer, k):
    x, ids, w, _ = _batch()
    ids_k, w_k = np.resize(ids, (T, k)), np.full((T, k), 0.5, np.float32)
    task, out = seed_layer.forward_task(x, ids_k, w_k, True, k=k)
    seed_layer.cpu.submit(task)
    with _raises(RuntimeError, "k mismatch", f"{k} columns", f"num_experts_per_tok = {K}"):
        seed_layer.cpu.sync()
    assert seed_layer.moe._engine.cache_depth == 0
    seed_layer.assert_works()


@pytest.mark.parametrize("t", [0, MAX_LEN + 1, -1])
def test_seed_token_count_out_of_range(seed_layer, t):
    x, ids, w, _ = _batch(t=max(t, 1))
    task, out = seed_layer.forward_task(x, ids, w, True, t=t)
    seed_layer.cpu.submit(task)
    with _raises(RuntimeError, f"max_len = {MAX_LEN}", str(t)):
        seed_layer.cpu.sync()
    assert seed_layer.moe._engine.cache_depth == 0
    seed_layer.assert_works()


@pytest.mark.parametrize("bad_id", [E, -2])
def test_seed_expert_id_out_of_range(seed_layer, bad_id):
    x, ids, w, _ = _batch()
    ids[2, 2] = bad_id
    task, out = seed_layer.forward_task(x, ids, w, True)
    seed_layer.cpu.submit(task)
    with _raises(RuntimeError, "expert_ids[2, 2]", str(bad_id), "out of range"):
        seed_layer.cpu.sync()
    assert np.isnan(out).all()
    # Nothing was pushed: a backward now is an underflow, not a pairing with the failed forward.
    cpu = seed_layer.cpu
    cpu.submit(seed_layer.backward_task(_batch()[3], _grad_buffers(), np.zeros((T, H), BF16)))
    with _raises(RuntimeError, "max_cache_depth"):
        cpu.sync()
    seed_layer.assert_works()


def test_seed_cache_overflow_and_underflow(seed_layer):
    x, ids, w, go = _batch()
    task, _ = seed_layer.forward_task(x, ids, w, True)
    seed_layer.run(task)
    task, out = seed_layer.forward_task(x, ids, w, True)
    seed_layer.cpu.submit(task)
    with _raises(RuntimeError, "max_cache_depth = 1"):
        seed_layer.cpu.sync()
    assert seed_layer.moe._engine.cache_depth == 1
    grads, gi = _grad_buffers(0.0), np.zeros((T, H), BF16)
    seed_layer.run(seed_layer.backward_task(go, grads, gi))
    before = {n: g.tobytes() for n, g in grads.items()}
    seed_layer.cpu.submit(seed_layer.backward_task(go, grads, gi))
    with _raises(RuntimeError, "max_cache_depth = 1"):
        seed_layer.cpu.sync()
    assert all(grads[n].tobytes() == before[n] for n in LORA_NAMES)
    seed_layer.assert_works()


@pytest.mark.parametrize("name", LORA_NAMES)
def test_seed_lora_pointer_not_set(cpu_infer, params, name):
    layer = _Seed(cpu_infer, params, **{name: 0})
    x, ids, w, _ = _batch()
    task, out = layer.forward_task(x, ids, w, True)
    cpu_infer.submit(task)
    with _raises(RuntimeError, name, "not set"):
        cpu_infer.sync()
    assert layer.moe._engine.cache_depth == 0
    p = params
    layer.run(layer.moe.update_lora_weights_task(*(p[n].ctypes.data for n in LORA_NAMES)))
    layer.assert_works()


@pytest.mark.parametrize("name", BASE_NAMES)
def test_seed_base_pointer_not_set(cpu_infer, params, name):
    layer = _Seed(cpu_infer, params, load=False, **{name: 0})
    cpu_infer.submit(layer.moe.load_weights_task())
    with _raises(RuntimeError, name):
        cpu_infer.sync()
    x, ids, w, _ = _batch()
    task, _ = layer.forward_task(x, ids, w, False)
    cpu_infer.submit(task)
    with _raises(RuntimeError, "Weights not loaded"):
        cpu_infer.sync()


@pytest.mark.parametrize("field", INT_FIELDS)
def test_seed_config_sizes(cpu_infer, params, field):
    with pytest.raises((ValueError, RuntimeError), match=f"{field}.*> 0.*0"):
        _Seed(cpu_infer, params, **{field: 0})
    with pytest.raises(TypeError, match=f"{field}.*int.*float"):
        _Seed(cpu_infer, params, **{field: 4.0})
    _Seed(cpu_infer, params).assert_works()


def test_seed_config_pool_not_set(cpu_infer, params):
    with _raises(TypeError, "pool", "backend_"):
        _Seed(cpu_infer, params, pool=None)


def test_seed_unavailable_isa(cpu_infer, params, monkeypatch):
    fam, available = _unavailable_family()
    monkeypatch.setenv("KTSFT_ISA", fam)
    with _raises(ktsft.ISAUnavailableError, fam, "available", available[-1]):
        _Seed(cpu_infer, params)
    monkeypatch.delenv("KTSFT_ISA")
    _Seed(cpu_infer, params).assert_works()


def test_seed_int8_forward_before_weights_loaded(cpu_infer, params):
    layer = _Seed(cpu_infer, params, load=False, cls=kt_kernel_ext.moe.AMXInt8_SFT_MOE)
    x, ids, w, go = _batch()
    task, out = layer.forward_task(x, ids, w, True)
    cpu_infer.submit(task)
    with _raises(RuntimeError, "Weights not loaded"):
        cpu_infer.sync()
    layer.run(layer.moe.load_weights_task())
    task, out = layer.forward_task(x, ids, w, False)
    layer.run(task)
    ref = reference.forward(x, ids, w, lora_alpha=ALPHA, quant="int8", **params)
    assert _rel_err(out, ref) < FWD_TOL


def test_seed_submit_rejects_non_tasks(cpu_infer):
    with _raises(TypeError, "submit", "task"):
        cpu_infer.submit(42)
    cpu_infer.sync()
