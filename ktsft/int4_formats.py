"""Converters from the int4 formats real checkpoints ship to ktsft's int4 layout (spec 5.2).

ktsft's int4 layout of a matrix W [rows, cols] (what :class:`~ktsft.MoESFT` takes with
``quant="int4"`` and :meth:`~ktsft.MoESFT.base_weights` returns): ``q`` uint8 [rows,
ceil(cols / 2)], two signed 4-bit values a byte (column 2i in the low nibble of byte i, two's
complement, values in [-8, 7]), and ``scale`` float32 [rows, ceil(cols / G)], ``W[n, c] = q[n, c]
* scale[n, c // G]`` with G = 32, 64 or 128.

Each converter here is exact: the 4-bit values are rearranged, never requantized, and the
scales are widened to float32 (bf16 and fp16 are exact there), so the engine multiplies by the
very values the checkpoint's own dequantization defines (:func:`ktsft.reference.dequantize_int4`
gives them in float64). Nothing is ever expanded to bf16 or float32 weights.

- **compressed-tensors** ``pack-quantized``, symmetric int4 (Kimi-K2-Thinking's experts):
  :func:`compressed_tensors_to_int4`.
- **GGUF** ``Q4_0`` (llama.cpp; blocks of 32 with one fp16 ``d``, value ``d * (q - 8)``):
  :func:`gguf_q4_0_to_int4`, and :class:`GGUFExperts` to read a llama.cpp MoE layer's
  ``blk.N.ffn_{gate,up,down}_exps.weight`` tensors from a GGUF file expert by expert.
- **GPTQ**, symmetric, no act-order (``qweight``, ``scales``, ``qzeros`` all at the midpoint):
  :func:`gptq_to_int4`.

Inputs may be NumPy arrays or torch CPU tensors (as ``safetensors`` reads them); outputs are
NumPy arrays, ready for :meth:`~ktsft.MoESFT.load_experts`.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .gradients import BASE_NAMES

__all__ = [
    "GGUF_EXPERT_KEYS",
    "GGUFExperts",
    "INT4_GROUP_SIZES",
    "INT4_SCALE_NAMES",
    "compatible_group_sizes",
    "compressed_tensors_to_int4",
    "dequantize_int4_expert",
    "gguf_q4_0_to_int4",
    "gptq_to_int4",
]

INT4_GROUP_SIZES = (32, 64, 128)
"""The int4 group sizes (columns per scale) the engine takes."""

GGUF_EXPERT_KEYS = {
    "gate_proj": "blk.{layer}.ffn_gate_exps.weight",
    "up_proj": "blk.{layer}.ffn_up_exps.weight",
    "down_proj": "blk.{layer}.ffn_down_exps.weight",
}
"""llama.cpp's names of one layer's stacked expert weights in a GGUF file."""

INT4_SCALE_NAMES = {"gate_proj": "gate_scale", "up_proj": "up_scale", "down_proj": "down_scale"}
"""The keys of an int4 expert's scales, as :meth:`~ktsft.MoESFT.load_experts` names them."""

Q4_0_BLOCK = 32
Q4_0_BLOCK_BYTES = 18  # fp16 d, then 16 bytes: value j in the low nibble of byte j, j + 16 high


def _numpy(a: Any, name: str) -> np.ndarray:
    """A NumPy view of an array or CPU tensor (torch bf16 widened to float32: exact)."""
    if type(a).__module__.startswith("torch"):
        import torch

        a = a.detach().cpu()
        if a.dtype == torch.bfloat16:
            a = a.to(torch.float32)
        return a.numpy()
    if isinstance(a, np.ndarray):
        return a
    raise TypeError(f"{name} must be a numpy.ndarray or torch.Tensor, got {type(a).__name__}")


def _float_scales(a: Any, name: str) -> np.ndarray:
    """Scales as float32, exactly (bf16 / fp16 / fp32 stored; anything else is an error)."""
    s = _numpy(a, name)
    if s.dtype.name not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"{name}: scales must be bfloat16, float16 or float32, got {s.dtype}")
    return np.ascontiguousarray(s.astype(np.float32))


def compatible_group_sizes(cols: int, groups: int) -> tuple:
    """The engine group sizes G with ceil(cols / G) == groups.

    With two or more groups at most one G fits; with one group every G >= cols fits, and all of
    them mean the same (one scale for the whole row)."""
    return tuple(g for g in INT4_GROUP_SIZES if -(-cols // g) == groups)


def _group_size(cols: int, groups: int, group_size: int | None, name: str) -> int:
    fits = compatible_group_sizes(cols, groups)
    if not fits:
        implied = f"{cols / groups:g}" if groups else "none"
        raise ValueError(
            f"{name}: {groups} scale(s) per row of {cols} columns means groups of {implied} "
            f"columns; the int4 engine takes group sizes {INT4_GROUP_SIZES} only"
        )
    if group_size is None:
        return fits[0]
    if group_size not in fits:
        raise ValueError(
            f"{name}: {groups} scale(s) per row of {cols} columns is group size "
            f"{' = '.join(map(str, fits))}, but group_size={group_size!r} was asked for"
        )
    return int(group_size)


def _le_bytes(words: np.ndarray) -> np.ndarray:
    """The bytes of int32 words in little-endian order (as the formats define them)."""
    return np.ascontiguousarray(words, dtype="<i4").view(np.uint8)


def _xor_nibbles(b: np.ndarray, cols: int) -> np.ndarray:
    """Offset-8 nibbles (u = q + 8) as ktsft's two's-complement ones (u ^ 8), bytes past the
    row's end dropped and an odd row's last high nibble zeroed (as :func:`pack_int4` pads)."""
    out = np.ascontiguousarray(b[..., : -(-cols // 2)] ^ np.uint8(0x88))
    if cols % 2:
        out[..., -1] &= np.uint8(0x0F)
    return out


def compressed_tensors_to_int4(
    weight_packed: Any,
    weight_scale: Any,
    weight_shape: Any = None,
    *,
    group_size: int | None = None,
    name: str = "weight",
) -> tuple:
    """One compressed-tensors ``pack-quantized`` symmetric int4 matrix in ktsft's int4 layout.

    compressed-tensors (``pack_to_int32``) stores value ``q`` in [-8, 7] as the nibble ``q + 8``,
    eight a little-endian int32 word, column ``c`` in bits ``4 (c % 8)`` of word ``c // 8``; the
    weight is ``q * weight_scale[n, c // G]``. The conversion is a byte view and an XOR.

    Parameters
    ----------
    weight_packed : array, int32, shape [rows, ceil(cols / 8)]
    weight_scale : array, bfloat16, float16 or float32, shape [rows, ceil(cols / G)]
    weight_shape : array of 2 ints, optional
        ``[rows, cols]``, as the checkpoint stores it; default: ``cols = 8 * words`` (a width
        that is a multiple of 8).
    group_size : {32, 64, 128}, optional
        Checked against the scales' shape; default: taken from it.
    name : str
        The tensor's name, for error messages (e.g. the checkpoint key without ``_packed``).

    Returns
    -------
    q : numpy.ndarray, uint8, shape [rows, ceil(cols / 2)]
    scale : numpy.ndarray, float32, shape [rows, ceil(cols / G)]
    group_size : int

    Raises
    ------
    ValueError
        Wrong dtypes or shapes, or a group size the engine does not take.
    """
    p = _numpy(weight_packed, f"{name}_packed")
    if p.dtype != np.int32 or p.ndim != 2:
        raise ValueError(
            f"{name}_packed must be an int32 matrix [rows, ceil(cols / 8)], got {p.dtype} "
            f"{list(p.shape)}"
        )
    rows, words = p.shape
    if weight_shape is None:
        cols = 8 * words
    else:
        shape = _numpy(weight_shape, f"{name}_shape").reshape(-1)
        if shape.size != 2 or shape.dtype.kind not in "iu":
            raise ValueError(
                f"{name}_shape must hold 2 integers [rows, cols], got "
                f"{shape.dtype} {shape.tolist()}"
            )
        if int(shape[0]) != rows or -(-int(shape[1]) // 8) != words:
            raise ValueError(
                f"{name}_packed: expected shape [{int(shape[0])}, {-(-int(shape[1]) // 8)}] for "
                f"{name}_shape {shape.tolist()} (8 values an int32), got {list(p.shape)}"
            )
        cols = int(shape[1])
    s = _float_scales(weight_scale, f"{name}_scale")
    if s.ndim != 2 or s.shape[0] != rows:
        raise ValueError(
            f"{name}_scale must have shape [{rows}, groups] for {name} [{rows}, {cols}], got "
            f"{list(s.shape)}"
        )
    g = _group_size(cols, s.shape[1], group_size, f"{name}_scale")
    q = _xor_nibbles(_le_bytes(p).reshape(rows, 4 * words), cols)
    return q, s, g


def gguf_q4_0_to_int4(data: Any, cols: int | None = None, *, name: str = "weight") -> tuple:
    """GGUF ``Q4_0`` rows in ktsft's int4 layout (group size 32).

    A Q4_0 block covers 32 consecutive values of a row: an fp16 ``d`` then 16 bytes, value ``j``
    (0 <= j < 16) in the low nibble of byte ``j`` and value ``j + 16`` in its high nibble, each
    ``d * (u - 8)`` for the nibble ``u`` (ggml's ``dequantize_row_q4_0``, and
    ``gguf.quants.dequantize``). ``d`` may be negative (ggml divides the signed extreme by -8);
    the engine takes negative scales as they are.

    Parameters
    ----------
    data : array, uint8, shape [..., rows, cols / 32 * 18]
        The raw blocks, e.g. ``gguf.quants.quantize(w, GGMLQuantizationType.Q4_0)`` or a
        ``GGUFReader`` tensor's ``data`` (leading dimensions, such as experts, are kept).
    cols : int, optional
        Values per row, a multiple of 32 (checked against ``data``); default: from ``data``.
    name : str
        The tensor's name, for error messages.

    Returns
    -------
    q : numpy.ndarray, uint8, shape [..., rows, cols / 2]
    scale : numpy.ndarray, float32, shape [..., rows, cols / 32]
    """
    b = _numpy(data, name)
    if b.dtype != np.uint8 or b.ndim < 2 or b.shape[-1] % Q4_0_BLOCK_BYTES:
        raise ValueError(
            f"{name}: Q4_0 data must be uint8 [..., rows, blocks * {Q4_0_BLOCK_BYTES}] (one "
            f"{Q4_0_BLOCK_BYTES}-byte block per {Q4_0_BLOCK} values), got {b.dtype} {list(b.shape)}"
        )
    nb = b.shape[-1] // Q4_0_BLOCK_BYTES
    if cols is not None and cols != nb * Q4_0_BLOCK:
        raise ValueError(
            f"{name}: {cols} columns need {-(-cols // Q4_0_BLOCK) * Q4_0_BLOCK_BYTES} bytes of "
            f"Q4_0 blocks per row (rows of a multiple of {Q4_0_BLOCK} values), got {b.shape[-1]}"
        )
    blocks = b.reshape(b.shape[:-1] + (nb, Q4_0_BLOCK_BYTES))
    d = np.ascontiguousarray(blocks[..., :2]).view("<f2")[..., 0].astype(np.float32)
    qs = blocks[..., 2:]
    u = np.concatenate([qs & np.uint8(15), qs >> np.uint8(4)], axis=-1)  # [..., nb, 32] in order
    s = u ^ np.uint8(8)  # u - 8 as a two's-complement nibble
    q = s[..., 0::2] | (s[..., 1::2] << np.uint8(4))
    return np.ascontiguousarray(q.reshape(b.shape[:-1] + (nb * 16,))), d


def gptq_to_int4(
    qweight: Any,
    scales: Any,
    qzeros: Any,
    g_idx: Any = None,
    *,
    checkpoint_format: str = "gptq",
    group_size: int | None = None,
    name: str = "weight",
) -> tuple:
    """A symmetric 4-bit GPTQ matrix without act-order in ktsft's int4 layout.

    GPTQ stores ``W^T``: ``qweight[i, n]`` holds the unsigned nibbles ``u`` of columns ``8 i ..
    8 i + 7`` of output row ``n`` (column ``8 i + j`` in bits ``4 j``), ``scales[g, n]`` and the
    zero points ``qzeros[g, n // 8]`` (bits ``4 (n % 8)``) per group ``g`` of G input columns, and
    ``W[n, c] = scales[g, n] * (u - zero)`` with ``g = g_idx[c]``. The *stored* zero depends on
    the checkpoint format (transformers' ``GPTQConfig.format`` / ``checkpoint_format`` in
    ``quantize_config.json``): ``"gptq"`` (v1, AutoGPTQ and GPTQModel's default) stores
    ``zero - 1`` and adds 1 when dequantizing, so a symmetric checkpoint stores 7; ``"gptq_v2"``
    stores the zero itself, 8. Only the midpoint zero 8 is ktsft's math (``q = u - 8`` in
    [-8, 7]), and only ``g_idx[c] == c // G`` (no act-order / ``desc_act``) keeps groups of
    consecutive columns.

    Parameters
    ----------
    qweight : array, int32, shape [cols / 8, rows]
    scales : array, float16 (bf16 / float32 also taken), shape [cols / G, rows]
    qzeros : array, int32, shape [cols / G, ceil(rows / 8)]
    g_idx : array of ints, shape [cols], optional
    checkpoint_format : {"gptq", "gptq_v2"}, default "gptq"
        How the zero points are stored (above).
    group_size : {32, 64, 128}, optional
        Checked against the scales' shape; default: taken from it.
    name : str
        The layer's name, for error messages.

    Returns
    -------
    q : numpy.ndarray, uint8, shape [rows, cols / 2]
    scale : numpy.ndarray, float32, shape [rows, cols / G]
    group_size : int

    Raises
    ------
    ValueError
        Bad shapes or dtypes, a group size the engine does not take, a zero point other than
        the midpoint (asymmetric quantization), or act-order.
    """
    zero = {"gptq": 7, "gptq_v2": 8}
    if checkpoint_format not in zero:
        raise ValueError(
            f"checkpoint_format must be one of {sorted(zero)}, got {checkpoint_format!r}"
        )
    qw = _numpy(qweight, f"{name}.qweight")
    if qw.dtype != np.int32 or qw.ndim != 2:
        raise ValueError(
            f"{name}.qweight must be an int32 matrix [cols / 8, rows], got {qw.dtype} "
            f"{list(qw.shape)}"
        )
    words, rows = qw.shape
    cols = 8 * words
    s = _float_scales(scales, f"{name}.scales")
    if s.ndim != 2 or s.shape[1] != rows:
        raise ValueError(
            f"{name}.scales must have shape [groups, {rows}] for {name}.qweight "
            f"{list(qw.shape)} ([cols / 8, rows]), got {list(s.shape)}"
        )
    ng = s.shape[0]
    g = _group_size(cols, ng, group_size, f"{name}.scales")
    if ng * g != cols:  # GPTQ groups are whole: cols / G scales
        raise ValueError(f"{name}.scales: {ng} groups of {g} do not cover {cols} columns")
    qz = _numpy(qzeros, f"{name}.qzeros")
    if qz.dtype != np.int32 or qz.shape != (ng, -(-rows // 8)):
        raise ValueError(
            f"{name}.qzeros must be int32 with shape {[ng, -(-rows // 8)]} (8 zero points an "
            f"int32), got {qz.dtype} {list(qz.shape)}"
        )
    zb = _le_bytes(qz).reshape(ng, -1)
    z = np.stack([zb & np.uint8(15), zb >> np.uint8(4)], axis=-1).reshape(ng, -1)[:, :rows]
    bad = np.argwhere(z != zero[checkpoint_format])
    if bad.size:
        gi, n = bad[0]
        raise ValueError(
            f"{name}.qzeros: group {gi}, row {n} stores zero point {z[gi, n]}, expected "
            f"{zero[checkpoint_format]} everywhere (the midpoint 8 in checkpoint_format="
            f"{checkpoint_format!r}); {len(bad)} of {z.size} differ: asymmetric GPTQ does not "
            "fit ktsft's symmetric int4 (q * scale)"
        )
    if g_idx is not None:
        gid = _numpy(g_idx, f"{name}.g_idx").reshape(-1)
        want = np.arange(cols) // g
        if gid.shape != want.shape or not np.array_equal(gid, want):
            first = int(np.argmax(gid != want)) if gid.shape == want.shape else None
            where = (
                f"g_idx[{first}] = {gid[first]}, not {want[first]}"
                if first is not None
                else f"{gid.size} entries for {cols} columns"
            )
            raise ValueError(
                f"{name}.g_idx is not c // {g} ({where}): act-order (desc_act) GPTQ groups "
                "columns out of order, which ktsft's consecutive groups cannot hold"
            )
    # Byte k of word i holds columns 8 i + 2 k (low nibble) and 8 i + 2 k + 1: ktsft's pairing.
    b = _le_bytes(qw).reshape(words, rows, 4)
    q = np.ascontiguousarray(b.transpose(1, 0, 2).reshape(rows, cols // 2) ^ np.uint8(0x88))
    return q, np.ascontiguousarray(s.T), g


class GGUFExperts:
    """One llama.cpp MoE layer's expert weights in a GGUF file, read expert by expert.

    llama.cpp stacks a layer's experts into ``blk.{layer}.ffn_gate_exps.weight``,
    ``ffn_up_exps`` (GGUF shape [H, I, E], i.e. [E, I, H] in row-major order: GGUF lists
    dimensions fastest first) and ``ffn_down_exps`` (GGUF [I, H, E]: [E, H, I]). All three
    must be ``Q4_0``. The file is memory-mapped (``gguf.GGUFReader``): :meth:`read_expert`
    touches only that expert's bytes.

    Parameters
    ----------
    path : str or os.PathLike
        A GGUF file (needs the ``gguf`` package).
    layer : int
        The block index N.

    Attributes
    ----------
    expert_num, hidden_size, intermediate_size : int
        E, H, I.
    group_size : int
        32 (Q4_0's block).
    """

    group_size = Q4_0_BLOCK

    def __init__(self, path: str | os.PathLike, layer: int):
        from gguf import GGMLQuantizationType, GGUFReader

        self.path = os.fspath(path)
        reader = GGUFReader(self.path)
        tensors = {t.name: t for t in reader.tensors}
        self._data = {}
        shapes = {}
        for n in BASE_NAMES:
            key = GGUF_EXPERT_KEYS[n].format(layer=layer)
            if key not in tensors:
                near = sorted(k for k in tensors if k.startswith(f"blk.{layer}."))[:6]
                raise KeyError(f"{key!r} is not in {self.path}; tensors of blk.{layer}: {near}")
            t = tensors[key]
            if t.tensor_type != GGMLQuantizationType.Q4_0:
                raise ValueError(
                    f"{key} in {self.path} is {t.tensor_type.name}; only Q4_0 experts load "
                    "into the int4 engine as they are"
                )
            if len(t.shape) != 3:
                raise ValueError(
                    f"{key} in {self.path} must have 3 dimensions (GGUF [cols, rows, E]), got "
                    f"{[int(d) for d in t.shape]}"
                )
            shapes[n] = tuple(int(d) for d in reversed(t.shape))  # [E, rows, cols]
            self._data[n] = t.data
        E, I, H = shapes["gate_proj"]
        want = {"gate_proj": (E, I, H), "up_proj": (E, I, H), "down_proj": (E, H, I)}
        for n in BASE_NAMES:
            if shapes[n] != want[n]:
                key = GGUF_EXPERT_KEYS[n].format(layer=layer)
                raise ValueError(
                    f"{key} in {self.path} must be [E, rows, cols] = {list(want[n])} (from "
                    f"ffn_gate_exps [E, I, H] = {[E, I, H]}), got {list(shapes[n])}"
                )
        self.layer = layer
        self.expert_num, self.hidden_size, self.intermediate_size = E, H, I

    def read_expert(self, expert: int) -> dict:
        """Expert ``expert`` in ktsft's int4 layout: ``gate_proj``, ``up_proj`` uint8
        [I, H / 2], ``down_proj`` [H, I / 2], and ``gate_scale``, ``up_scale`` float32
        [I, H / 32], ``down_scale`` [H, I / 32]."""
        if not 0 <= expert < self.expert_num:
            raise IndexError(f"expert {expert} is outside [0, {self.expert_num})")
        out = {}
        for n in BASE_NAMES:
            key = GGUF_EXPERT_KEYS[n].format(layer=self.layer)
            out[n], out[INT4_SCALE_NAMES[n]] = gguf_q4_0_to_int4(
                self._data[n][expert], name=f"{key}[{expert}]"
            )
        return out

    def __iter__(self):
        """``(e, read_expert(e))`` for e = 0 .. E-1."""
        for e in range(self.expert_num):
            yield e, self.read_expert(e)


def dequantize_int4_expert(
    mats: dict, hidden_size: int, intermediate_size: int, group_size: int
) -> dict:
    """One int4 expert in ktsft's layout (``gate_proj``, ``up_proj``, ``down_proj`` bytes and
    ``gate_scale``, ``up_scale``, ``down_scale``, as the readers here return it) as bf16 torch
    matrices [I, H], [I, H], [H, I]: ``q * scale`` exact in float64, rounded to bf16 once."""
    import torch

    from .reference import dequantize_int4

    cols = {"gate_proj": hidden_size, "up_proj": hidden_size, "down_proj": intermediate_size}
    out = {}
    for n in BASE_NAMES:
        w = dequantize_int4(mats[n], mats[INT4_SCALE_NAMES[n]], cols[n], group_size)
        out[n] = torch.from_numpy(w).to(torch.bfloat16)
    return out
