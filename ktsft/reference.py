"""NumPy float64 reference of the MoE LoRA forward and backward (spec section 3).

The test oracle for every kernel, and public for users who want to check results. All math runs
in float64 on the given values (bf16 inputs are exact in float64), with no intermediate rounding.

Arrays may be NumPy float arrays, NumPy ``ml_dtypes.bfloat16`` arrays, NumPy ``uint16`` arrays
holding raw bf16 bits, or PyTorch CPU tensors of any dtype (``requires_grad`` included). PyTorch
is optional: it is only touched when a tensor is passed.

Shapes (spec section 2), with ``T`` tokens, ``k`` experts per token, ``E`` experts, ``H`` hidden
size, ``I`` intermediate size, ``r`` LoRA rank and ``s = lora_alpha / r``:

==========================================  ==========
``x``                                       [T, H]
``expert_ids``, ``weights``                 [T, k]
``gate_proj``, ``up_proj``                  [E, I, H]
``down_proj``                               [E, H, I]
``gate_lora_a``, ``up_lora_a``              [E, r, H]
``gate_lora_b``, ``up_lora_b``              [E, I, r]
``down_lora_a``                             [E, r, I]
``down_lora_b``                             [E, H, r]
==========================================  ==========

``expert_ids[t, j] == -1`` is padding: the route contributes nothing and its routing-weight
gradient is 0. The same expert twice in one token's row is two independent routes.

INT8 (spec section 5): :func:`quantize_int8` is the quantizer the engine applies at load, bit
for bit. ``quant="int8"`` in :func:`forward` / :func:`backward` models the engine's int8
arithmetic in float64: base weights quantized and dequantized; ``x`` and ``h`` quantized per row
for the base-weight products of the forward (the LoRA products use them unquantized); the
backward multiplies by the dequantized weights; and the bf16 roundings spec section 4 allows
(``g``, ``u``, ``h``, ``dg``, ``du``) are applied, because the engine quantizes its bf16 ``h``
and a quantizer turns a tiny difference into a whole step. The spec's int8 accuracy goals are
measured against ``quant="bf16"``, the exact math of the unquantized model.

FP8 (spec section 5.1): :func:`quantize_fp8` is the engine's e4m3 quantizer (one scale per
128 x 128 block), bit for bit, and :func:`dequantize_fp8` the weights an fp8 engine multiplies
by. ``quant="fp8"`` quantizes bf16 base weights that way and runs the exact float64 math on the
dequantized weights: the activations stay bf16, so nothing else changes (for a checkpoint that
ships in fp8, pass ``dequantize_fp8(q, scale_inv)`` with ``quant="bf16"``).

INT4 (spec section 5.2): :func:`quantize_int4` is the engine's quantizer (one scale per row and
group of ``group_size`` columns), bit for bit, and :func:`dequantize_int4` the weights an int4
engine multiplies by; :func:`pack_int4` / :func:`unpack_int4` convert between signed values and
the bytes (two nibbles a byte, the low nibble the even column). The engine's forward is W4A8 in
every kernel family: ``x`` and ``h`` are quantized per row to int8 exactly as in the int8 mode,
so ``quant="int4"`` models it as ``quant="int8"`` does, with the int4 weights in place of the
int8 ones (``group_size`` says which groups). For weights that ship quantized (an int4
checkpoint loaded by :mod:`ktsft.int4_formats`), pass the values the engine multiplies by
(:func:`dequantize_int4` of its bytes and scales) with ``base_quantized=True``: they are used
as given and only the activations are modelled.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from .gradients import BASE_NAMES, LORA_NAMES, Gradients

__all__ = [
    "backward",
    "dequantize_fp8",
    "dequantize_int4",
    "dequantize_int8",
    "forward",
    "pack_int4",
    "quantize_fp8",
    "quantize_int4",
    "quantize_int8",
    "unpack_int4",
]

QUANT_MODES = ("bf16", "int8", "fp8", "int4")
INT4_GROUP_SIZES = (32, 64, 128)
FP8_BLOCK = 128
FP8_MAX = 448.0


def _to_numpy(a):
    """Any supported array object as a NumPy array (torch bf16 widened to float32)."""
    if type(a).__module__.startswith("torch"):
        import torch

        t = a.detach().cpu()
        if t.is_floating_point() and t.dtype not in (torch.float16, torch.float32, torch.float64):
            t = t.float()  # bfloat16 and other dtypes NumPy lacks; exact for bf16
        return t.numpy()
    return np.asarray(a)


def _as_f64(a):
    """Convert a float array argument to a float64 NumPy array.

    Parameters
    ----------
    a : array_like or torch.Tensor
        NumPy float array, NumPy ``ml_dtypes.bfloat16`` array, NumPy ``uint16`` array of raw bf16
        bits, or a PyTorch CPU tensor of any dtype (``requires_grad`` allowed).

    Returns
    -------
    numpy.ndarray
        float64 array of the same shape holding the exact values.
    """
    arr = _to_numpy(a)
    if arr.dtype == np.uint16:  # raw bf16 bits: the high half of a float32
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float64)


def _as_ids(expert_ids, num_experts):
    """Expert ids as int64, checked to lie in [-1, num_experts)."""
    ids = _to_numpy(expert_ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"expert_ids: expected an integer dtype, got {ids.dtype}")
    ids = ids.astype(np.int64)
    bad = (ids < -1) | (ids >= num_experts)
    if bad.any():
        raise ValueError(
            f"expert_ids: ids must lie in [-1, {num_experts}) (-1 = padding), "
            f"got {int(ids[bad].flat[0])}"
        )
    return ids


def quantize_int8(w):
    """Symmetric per-row int8 quantization (spec section 5), as the engine does it at load.

    ``scale = max|row| / 127`` (float32), ``q = round_half_even(row / scale)`` (float32
    division) clamped to [-127, 127]. A zero row gets scale 0 and q 0; a row holding NaN or
    Inf gets scale NaN and q 0.

    Parameters
    ----------
    w : array, shape [..., n]
        Values of any supported kind (bf16 as ``ml_dtypes.bfloat16``, ``uint16`` bits or
        torch); the rows are the last axis. They are taken as float32.

    Returns
    -------
    q : numpy.ndarray, int8, shape [..., n]
    scale : numpy.ndarray, float32, shape [...]
    """
    w32 = _as_f64(w).astype(np.float32)
    finite = np.isfinite(w32).all(axis=-1)
    amax = np.abs(np.where(np.isfinite(w32), w32, 0)).max(axis=-1, initial=np.float32(0))
    scale = (amax / np.float32(127)).astype(np.float32)
    div = np.where(scale > 0, scale, np.float32(1))[..., None]
    with np.errstate(invalid="ignore"):
        q = np.clip(np.rint(np.where(np.isfinite(w32), w32, 0) / div), -127, 127)
    q = np.where(finite[..., None], q, 0).astype(np.int8)
    return q, np.where(finite, scale, np.float32(np.nan)).astype(np.float32)


def dequantize_int8(q, scale):
    """Dequantized int8 rows, in float64 (exact): the weights the int8 engine multiplies by.

    Parameters
    ----------
    q : array, int8, shape [..., n]
    scale : array, float32, shape [...]

    Returns
    -------
    numpy.ndarray, float64, shape [..., n]
        ``q * scale[..., None]``.
    """
    return np.asarray(q, np.float64) * np.asarray(scale, np.float64)[..., None]


def _blocks(a, fill):
    """[..., rows, cols] padded with ``fill`` to whole 128 x 128 blocks, as
    [..., row blocks, 128, column blocks, 128]."""
    rows, cols = a.shape[-2:]
    nbr, nbc = -(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK)
    pad = [(0, 0)] * (a.ndim - 2) + [(0, nbr * FP8_BLOCK - rows), (0, nbc * FP8_BLOCK - cols)]
    padded = np.pad(a, pad, constant_values=fill)
    return padded.reshape(a.shape[:-2] + (nbr, FP8_BLOCK, nbc, FP8_BLOCK))


def _unblock(b, rows, cols):
    lead = b.shape[:-4]
    nbr, nbc = b.shape[-4], b.shape[-2]
    return np.ascontiguousarray(
        b.reshape(lead + (nbr * FP8_BLOCK, nbc * FP8_BLOCK))[..., :rows, :cols]
    )


def quantize_fp8(w):
    """e4m3 quantization with one scale per 128 x 128 block (spec section 5.1), as the engine
    does it at load.

    Per block ``scale = amax / 448`` (float32), ``q = e4m3(w / scale)``: the division in
    float32, then rounded to the nearest e4m3 value (ties to even) and saturated at +-448. An
    all-zero block gets scale 0 and zero bytes; a block holding NaN or Inf gets scale NaN and
    zero bytes. Edge blocks are partial.

    Parameters
    ----------
    w : array, shape [..., rows, cols]
        Values of any supported kind, taken as float32.

    Returns
    -------
    q : numpy.ndarray, ``ml_dtypes.float8_e4m3fn``, shape [..., rows, cols]
    scale_inv : numpy.ndarray, float32, shape [..., ceil(rows / 128), ceil(cols / 128)]
    """
    w32 = _as_f64(w).astype(np.float32)
    rows, cols = w32.shape[-2:]
    b = _blocks(w32, 0)
    finite = np.isfinite(b).all(axis=(-3, -1))
    amax = np.abs(np.where(np.isfinite(b), b, 0)).max(axis=(-3, -1))
    scale = (amax / np.float32(FP8_MAX)).astype(np.float32)
    div = np.where(scale > 0, scale, np.float32(1))[..., :, None, :, None]
    with np.errstate(invalid="ignore"):
        v = np.clip(np.where(np.isfinite(b), b, 0) / div, -FP8_MAX, FP8_MAX).astype(np.float32)
    keep = (finite & (amax > 0))[..., :, None, :, None]
    q = np.where(keep, v, np.float32(0)).astype(ml_dtypes.float8_e4m3fn)
    return _unblock(q, rows, cols), np.where(finite, scale, np.float32(np.nan))


def dequantize_fp8(q, scale_inv):
    """Dequantized e4m3 weights, in float64 (exact): ``q[n, c] * scale_inv[n // 128, c // 128]``.

    Parameters
    ----------
    q : array, shape [..., rows, cols]
        ``ml_dtypes.float8_e4m3fn``, ``torch.float8_e4m3fn`` or the bytes as ``uint8``.
    scale_inv : array, float32, shape [..., ceil(rows / 128), ceil(cols / 128)]

    Returns
    -------
    numpy.ndarray, float64, shape [..., rows, cols]
    """
    if type(q).__module__.startswith("torch"):
        q = q.detach().cpu().view(__import__("torch").uint8).numpy()
    q = np.asarray(q)
    if q.dtype == np.uint8:
        q = q.view(ml_dtypes.float8_e4m3fn)
    rows, cols = q.shape[-2:]
    values = _blocks(q.astype(np.float64), 0.0)
    scale = np.asarray(_to_numpy(scale_inv), np.float64)[..., :, None, :, None]
    return _unblock(values * scale, rows, cols)


def pack_int4(q):
    """Signed 4-bit values as bytes, two a byte: column 2i in the low nibble of byte i, 2i + 1 in
    its high nibble (0 past an odd row's end).

    Parameters
    ----------
    q : array of integers in [-8, 7], shape [..., cols]

    Returns
    -------
    numpy.ndarray, uint8, shape [..., ceil(cols / 2)]
    """
    q = np.asarray(q)
    if q.size and (q.min() < -8 or q.max() > 7):
        raise ValueError(f"q: int4 values must lie in [-8, 7], got {q.min()} .. {q.max()}")
    cols = q.shape[-1]
    nib = np.pad(q.astype(np.int16) & 15, [(0, 0)] * (q.ndim - 1) + [(0, cols % 2)])
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).astype(np.uint8)


def unpack_int4(packed, cols):
    """The signed values of int4 bytes (the inverse of :func:`pack_int4`).

    Parameters
    ----------
    packed : array, uint8, shape [..., ceil(cols / 2)]
    cols : int
        Values per row.

    Returns
    -------
    numpy.ndarray, int8, shape [..., cols]
    """
    b = np.asarray(_to_numpy(packed))
    if b.dtype != np.uint8 or b.shape[-1:] != (-(-cols // 2),):
        raise ValueError(
            f"packed: expected uint8 [..., {-(-cols // 2)}] for {cols} columns, got "
            f"{b.dtype} {list(b.shape)}"
        )
    nib = np.stack([b & 15, b >> 4], axis=-1).reshape(b.shape[:-1] + (-1,))[..., :cols]
    return (nib.astype(np.int8) - ((nib & 8) << 1).astype(np.int8)).astype(np.int8)


def _groups(a, group_size, fill):
    """[..., cols] padded with ``fill`` to whole groups, as [..., groups, group_size]."""
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES}, got {group_size!r}")
    cols = a.shape[-1]
    ng = -(-cols // group_size)
    pad = [(0, 0)] * (a.ndim - 1) + [(0, ng * group_size - cols)]
    return np.pad(a, pad, constant_values=fill).reshape(a.shape[:-1] + (ng, group_size))


def quantize_int4(w, group_size=32):
    """Symmetric int4 quantization with one scale per row and group of ``group_size`` columns
    (spec section 5.2), as the engine does it at load.

    Per group ``scale = amax / 7`` (float32), ``q = round_half_even(w / scale)`` (float32
    division) clamped to [-8, 7]. An all-zero group gets scale 0 and q 0; a group holding NaN or
    Inf gets scale NaN and q 0. The last group of a row may be partial.

    Parameters
    ----------
    w : array, shape [..., rows, cols]
        Values of any supported kind, taken as float32.
    group_size : {32, 64, 128}, default 32

    Returns
    -------
    q : numpy.ndarray, uint8, shape [..., rows, ceil(cols / 2)]
        The values packed two a byte (:func:`pack_int4`).
    scale : numpy.ndarray, float32, shape [..., rows, ceil(cols / group_size)]
    """
    w32 = _as_f64(w).astype(np.float32)
    cols = w32.shape[-1]
    b = _groups(w32, group_size, 0)
    finite = np.isfinite(b).all(axis=-1)
    clean = np.where(np.isfinite(b), b, np.float32(0))
    amax = np.abs(clean).max(axis=-1)
    scale = (amax / np.float32(7)).astype(np.float32)
    div = np.where(scale > 0, scale, np.float32(1))[..., None]
    q = np.clip(np.rint(clean / div), -8, 7)
    q = np.where((finite & (amax > 0))[..., None], q, 0).astype(np.int8)
    q = q.reshape(w32.shape[:-1] + (-1,))[..., :cols]
    return pack_int4(q), np.where(finite, scale, np.float32(np.nan)).astype(np.float32)


def dequantize_int4(q, scale, cols, group_size=32):
    """Dequantized int4 weights, in float64 (exact): ``q[n, c] * scale[n, c // group_size]``.

    Parameters
    ----------
    q : array, uint8, shape [..., rows, ceil(cols / 2)]
        Packed values (:func:`pack_int4`).
    scale : array, float32, shape [..., rows, ceil(cols / group_size)]
    cols : int
        Columns of the matrix.
    group_size : {32, 64, 128}, default 32

    Returns
    -------
    numpy.ndarray, float64, shape [..., rows, cols]
    """
    values = unpack_int4(q, cols).astype(np.float64)
    sc = np.asarray(_to_numpy(scale), np.float64)
    ng = -(-cols // group_size)
    if sc.shape != values.shape[:-1] + (ng,):
        raise ValueError(
            f"scale: expected shape {list(values.shape[:-1] + (ng,))} for {cols} columns in "
            f"groups of {group_size}, got {list(sc.shape)}"
        )
    g = _groups(values, group_size, 0.0) * sc[..., None]
    return g.reshape(values.shape[:-1] + (-1,))[..., :cols]


def _fake_quant_rows(a):
    """Rows of ``a`` quantized per row as the int8 forward quantizes x and h, back in float64."""
    return dequantize_int8(*quantize_int8(a.astype(np.float32)))


def _round_bf16(a):
    """float64 values rounded to bf16 (nearest even) and back."""
    return (
        np.asarray(a, np.float64).astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
    )


def _sigmoid(z):
    """Overflow-free logistic function, accurate in relative terms for both signs."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _prepare(x, expert_ids, weights, params, lora_alpha, quant, group_size=32, quantized=False):
    """Convert and shape-check all inputs; returns (x, ids, w, params as float64, s). The base
    weights are quantized as ``quant`` says unless ``quantized`` (they are the engine's values)."""
    if quant not in QUANT_MODES:
        raise ValueError(f"quant must be one of {QUANT_MODES}, got {quant!r}")
    p = {name: _as_f64(v) for name, v in params.items()}
    if quant == "int4" and not quantized:
        for name in BASE_NAMES:
            q, sc = quantize_int4(p[name], group_size)
            p[name] = dequantize_int4(q, sc, p[name].shape[-1], group_size)
    if quant in ("int8", "fp8") and not quantized:
        quantize, dequantize = {
            "int8": (quantize_int8, dequantize_int8),
            "fp8": (quantize_fp8, dequantize_fp8),
        }[quant]
        for name in BASE_NAMES:
            p[name] = dequantize(*quantize(p[name]))
    x = _as_f64(x)
    w = _as_f64(weights)
    E, I, H = p["gate_proj"].shape
    r = p["gate_lora_a"].shape[1]
    if r <= 0:
        raise ValueError(f"gate_lora_a: rank must be > 0, got shape {p['gate_lora_a'].shape}")
    expected = {
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
    for name, shape in expected.items():
        if p[name].shape != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {p[name].shape}")
    if x.ndim != 2 or x.shape[1] != H:
        raise ValueError(f"x: expected shape [T, {H}], got {x.shape}")
    ids = _as_ids(expert_ids, E)
    T = x.shape[0]
    if ids.ndim != 2 or ids.shape[0] != T:
        raise ValueError(f"expert_ids: expected shape [{T}, k], got {ids.shape}")
    if w.shape != ids.shape:
        raise ValueError(f"weights: expected shape {ids.shape}, got {w.shape}")
    return x, ids, w, p, float(lora_alpha) / r


def _routes_by_expert(ids):
    """Yield (e, tok, slot) for each expert with at least one route; padding skipped."""
    k = ids.shape[1]
    flat = ids.ravel()
    order = np.argsort(flat, kind="stable")
    sorted_ids = flat[order]
    experts, starts = np.unique(sorted_ids, return_index=True)
    ends = np.append(starts[1:], flat.size)
    for e, lo, hi in zip(experts, starts, ends):
        if e < 0:
            continue
        routes = order[lo:hi]
        yield int(e), routes // k, routes % k


def _expert_forward(xe, e, p, s, quant):
    """Forward intermediates for the routed rows ``xe`` [n, H] of expert ``e``."""
    int8 = quant in ("int8", "int4")  # int8 activations for the base weights (int4: W4A8)
    xb = _fake_quant_rows(xe) if int8 else xe  # the base-weight operand
    a_g = xe @ p["gate_lora_a"][e].T
    g = xb @ p["gate_proj"][e].T + s * (a_g @ p["gate_lora_b"][e].T)
    a_u = xe @ p["up_lora_a"][e].T
    u = xb @ p["up_proj"][e].T + s * (a_u @ p["up_lora_b"][e].T)
    if int8:
        g, u = _round_bf16(g), _round_bf16(u)
    sg = _sigmoid(g)
    h = g * sg * u
    if int8:
        h = _round_bf16(h)
    hb = _fake_quant_rows(h) if int8 else h
    a_d = h @ p["down_lora_a"][e].T
    y = hb @ p["down_proj"][e].T + s * (a_d @ p["down_lora_b"][e].T)
    return a_g, g, a_u, u, sg, h, a_d, y


def forward(
    x,
    expert_ids,
    weights,
    *,
    gate_proj,
    up_proj,
    down_proj,
    gate_lora_a,
    gate_lora_b,
    up_lora_a,
    up_lora_b,
    down_lora_a,
    down_lora_b,
    lora_alpha,
    quant="bf16",
    group_size=32,
    base_quantized=False,
):
    """Forward of the routed SwiGLU experts with LoRA on gate, up and down (spec section 3).

    Parameters
    ----------
    x : array, shape [T, H]
        Input tokens.
    expert_ids : integer array, shape [T, k]
        Expert of each route; -1 is padding.
    weights : array, shape [T, k]
        Routing weights.
    gate_proj, up_proj : array, shape [E, I, H]
    down_proj : array, shape [E, H, I]
        Frozen base weights.
    gate_lora_a, up_lora_a : array, shape [E, r, H]
    gate_lora_b, up_lora_b : array, shape [E, I, r]
    down_lora_a : array, shape [E, r, I]
    down_lora_b : array, shape [E, H, r]
        LoRA adapters; the rank ``r`` is read from ``gate_lora_a``.
    lora_alpha : float
        LoRA scaling numerator; the scale is ``s = lora_alpha / r``.
    quant : {"bf16", "int8", "fp8", "int4"}, default "bf16"
        "int8", "fp8" and "int4" model the engine's quantized modes (see the module
        docstring); "bf16" is the exact math on the given values.
    group_size : {32, 64, 128}, default 32
        Columns per scale of ``quant="int4"``.
    base_quantized : bool, default False
        The base weights are already the dequantized values of quantized weights (e.g.
        :func:`dequantize_int4` of a checkpoint's): ``quant`` then models the activations only.

    Returns
    -------
    numpy.ndarray, float64, shape [T, H]
        ``out_t = sum_j weights[t, j] * y_tj``.

    Raises
    ------
    ValueError
        An expert id outside [-1, E), or inconsistent shapes.
    """
    tensors = (gate_proj, up_proj, down_proj)
    tensors += (gate_lora_a, gate_lora_b, up_lora_a, up_lora_b, down_lora_a, down_lora_b)
    params = dict(zip(BASE_NAMES + LORA_NAMES, tensors))
    x, ids, w, p, s = _prepare(
        x, expert_ids, weights, params, lora_alpha, quant, group_size, base_quantized
    )
    T, k = ids.shape
    ys = np.zeros((T, k, x.shape[1]))  # y of every route, zero for padding
    for e, tok, slot in _routes_by_expert(ids):
        ys[tok, slot] = _expert_forward(x[tok], e, p, s, quant)[-1]
    return np.einsum("tk,tkh->th", w, ys)


def backward(
    grad_output,
    x,
    expert_ids,
    weights,
    *,
    gate_proj,
    up_proj,
    down_proj,
    gate_lora_a,
    gate_lora_b,
    up_lora_a,
    up_lora_b,
    down_lora_a,
    down_lora_b,
    lora_alpha,
    quant="bf16",
    group_size=32,
    base_quantized=False,
):
    """Backward of :func:`forward`: gradients of input, LoRA tensors and routing weights.

    The forward intermediates are recomputed from the arguments. Base weights get no gradient.

    Parameters
    ----------
    grad_output : array, shape [T, H]
        dL/d out.
    x, expert_ids, weights, lora_alpha, quant, group_size, base_quantized
        As in :func:`forward`.
    gate_proj, up_proj, down_proj
        As in :func:`forward`.
    gate_lora_a, gate_lora_b, up_lora_a, up_lora_b, down_lora_a, down_lora_b
        As in :func:`forward`.

    Returns
    -------
    ktsft.gradients.Gradients
        Every field a float64 NumPy array: ``input`` [T, H], the six LoRA gradients in the
        shapes of their tensors (zero for experts without routes), and ``weights`` [T, k] with
        ``weights[t, j] = <grad_output[t], y_tj>`` (0 for padding routes).

    Raises
    ------
    ValueError
        An expert id outside [-1, E), or inconsistent shapes.
    """
    tensors = (gate_proj, up_proj, down_proj)
    tensors += (gate_lora_a, gate_lora_b, up_lora_a, up_lora_b, down_lora_a, down_lora_b)
    params = dict(zip(BASE_NAMES + LORA_NAMES, tensors))
    x, ids, w, p, s = _prepare(
        x, expert_ids, weights, params, lora_alpha, quant, group_size, base_quantized
    )
    go = _as_f64(grad_output)
    if go.shape != x.shape:
        raise ValueError(f"grad_output: expected shape {x.shape}, got {go.shape}")
    T, k = ids.shape
    grads = {name: np.zeros_like(p[name]) for name in LORA_NAMES}
    dxs = np.zeros((T, k, x.shape[1]))  # dx of every route, summed over k at the end
    grad_w = np.zeros((T, k))
    for e, tok, slot in _routes_by_expert(ids):
        xe, goe = x[tok], go[tok]
        a_g, g, a_u, u, sg, h, a_d, y = _expert_forward(xe, e, p, s, quant)
        grad_w[tok, slot] = np.einsum("nh,nh->n", goe, y)
        dy = w[tok, slot][:, None] * goe
        b_d = dy @ p["down_lora_b"][e]
        dh = dy @ p["down_proj"][e] + s * (b_d @ p["down_lora_a"][e])
        grads["down_lora_b"][e] = s * (dy.T @ a_d)
        grads["down_lora_a"][e] = s * (b_d.T @ h)
        dg = dh * u * sg * (1.0 + g * (1.0 - sg))
        du = dh * g * sg
        if quant in ("int8", "int4"):
            dg, du = _round_bf16(dg), _round_bf16(du)
        b_g = dg @ p["gate_lora_b"][e]
        b_u = du @ p["up_lora_b"][e]
        dxs[tok, slot] = (
            dg @ p["gate_proj"][e]
            + du @ p["up_proj"][e]
            + s * (b_g @ p["gate_lora_a"][e])
            + s * (b_u @ p["up_lora_a"][e])
        )
        grads["gate_lora_b"][e] = s * (dg.T @ a_g)
        grads["gate_lora_a"][e] = s * (b_g.T @ xe)
        grads["up_lora_b"][e] = s * (du.T @ a_u)
        grads["up_lora_a"][e] = s * (b_u.T @ xe)
    return Gradients(input=dxs.sum(axis=1), weights=grad_w, **grads)
