"""Reading MoE experts from Hugging Face style safetensors checkpoints.

The one place that knows checkpoint key layouts and formats; :mod:`ktsft.torch`
(:meth:`~ktsft.torch.MoELoRA.from_safetensors`) and ``ktsft.hf`` both read through it.

Layouts of one layer's routed experts (``prefix`` is e.g. ``model.layers.3.mlp.experts``):

- **per expert** (the Hub's layout): ``{prefix}.{e}.gate_proj.weight`` [I, H],
  ``{prefix}.{e}.up_proj.weight`` [I, H], ``{prefix}.{e}.down_proj.weight`` [H, I], row = output
  feature as in ``nn.Linear``. Other key formats and projection names (Mixtral's ``w1``, ``w3``,
  ``w2`` = gate, up, down: :data:`MIXTRAL_PROJ_NAMES`) are given by ``key_format`` and
  ``proj_names``.
- **fused** (what transformers 5 holds in memory and may save): ``{prefix}.gate_up_proj``
  [E, 2I, H] (the gate rows first, then the up rows) and ``{prefix}.down_proj`` [E, H, I].

Floating sources (bf16, fp16, fp32, fp64) are read one expert at a time (a fused tensor through a
safetensors slice, so only that expert's bytes are read) and handed over as stored;
:func:`to_bf16_expert` converts one matrix for the engine.

FP8 checkpoints as DeepSeek-V3/R1, Kimi-K2 and the Qwen3 "-FP8" releases ship them (per-expert
layout): each ``...{proj}.weight`` is ``float8_e4m3fn`` and is followed by
``...{proj}.weight_scale_inv``, one float32 scale per 128 x 128 block, ``W[n, c] = q[n, c] *
scale_inv[n // 128, c // 128]``. :func:`find_experts` recognises the layout by itself
(``ExpertLayout.fp8``); :func:`read_expert` then returns the scales too, and
:func:`dequantize_fp8_expert` turns one expert into bf16 for layers that do not store fp8.

INT4 checkpoints in the compressed-tensors ``pack-quantized`` symmetric layout, as
Kimi-K2-Thinking ships its experts (per-expert layout): each ``...{proj}.weight`` is replaced by
``...{proj}.weight_packed`` (int32 [rows, ceil(cols/8)]), ``...{proj}.weight_scale`` (bf16,
fp16 or fp32 [rows, ceil(cols/G)]) and ``...{proj}.weight_shape`` ([rows, cols]).
:func:`find_experts` recognises it too (``ExpertLayout.int4_group_size`` = G, which must be 32,
64 or 128); :func:`read_expert` then returns each expert already in ktsft's int4 layout (uint8
bytes and float32 ``*_scale``, converted exactly by
:func:`ktsft.int4_formats.compressed_tensors_to_int4`), and
:func:`ktsft.int4_formats.dequantize_int4_expert` turns one into bf16 for other layers.
Asymmetric checkpoints (``weight_zero_point``) are refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .gradients import BASE_NAMES
from .int4_formats import INT4_SCALE_NAMES, compatible_group_sizes, compressed_tensors_to_int4

__all__ = [
    "DEFAULT_KEY_FORMAT",
    "FUSED_DOWN_KEY",
    "FUSED_GATE_UP_KEY",
    "MIXTRAL_PROJ_NAMES",
    "PACKED_SUFFIX",
    "ExpertLayout",
    "SafetensorsIndex",
    "SCALE_INV_SUFFIX",
    "dequantize_fp8_expert",
    "find_experts",
    "find_module_experts",
    "hub_prefixes",
    "iter_experts",
    "read_expert",
    "to_bf16_expert",
]

DEFAULT_KEY_FORMAT = "{prefix}.{expert}.{proj}.weight"
"""Key of one expert's projection in a Hugging Face MoE checkpoint (Qwen3-MoE, DeepSeek, ...):
``{prefix}`` is e.g. ``model.layers.3.mlp.experts``, ``{expert}`` the expert index and ``{proj}``
one of ``gate_proj``, ``up_proj``, ``down_proj`` (or the names given by ``proj_names``)."""

MIXTRAL_PROJ_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
"""Mixtral's names of the three projections (``block_sparse_moe.experts.{e}.w1.weight``, ...)."""

FUSED_GATE_UP_KEY = "{prefix}.gate_up_proj"
"""Key of a layer's fused gate and up weights [E, 2I, H] (gate rows first), transformers 5."""

FUSED_DOWN_KEY = "{prefix}.down_proj"
"""Key of a layer's fused down weights [E, H, I], transformers 5."""

SCALE_INV_SUFFIX = "_scale_inv"
"""An fp8 weight's block scales are stored under its key with this suffix (DeepSeek-V3)."""

SCALE_NAMES = {
    "gate_proj": "gate_scale_inv",
    "up_proj": "up_scale_inv",
    "down_proj": "down_scale_inv",
}
"""The names :func:`read_expert` gives the block scales of an fp8 expert's projections."""

FP8_BLOCK = 128

PACKED_SUFFIX = "_packed"
"""A compressed-tensors int4 weight is stored under its key with this suffix (``weight_packed``),
its group scales with ``_scale`` and its shape with ``_shape``."""


def to_bf16_expert(w: Any, name: str) -> Any:
    """One expert's base weight as a C-contiguous bf16 CPU tensor (NumPy arrays passed through).

    Parameters
    ----------
    w : torch.Tensor (floating, 2 or more bytes per element) or numpy.ndarray
    name : str
        Named in error messages.
    """
    if isinstance(w, np.ndarray):
        return np.ascontiguousarray(w)
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(w).__name__}")
    if not w.is_floating_point() or w.dtype.itemsize == 1:
        raise TypeError(
            f"{name} must have dtype bfloat16 (float16/float32/float64 are converted), got "
            f"{w.dtype}; float8 checkpoints must be dequantized to bf16 first"
        )
    return w.detach().to(device="cpu", dtype=torch.bfloat16).contiguous()


class SafetensorsIndex:
    """Which file of a set of safetensors files holds each key; reads tensors on demand.

    Only the headers are read at construction. A key stored in several files is taken from the
    first file that has it.

    Parameters
    ----------
    files : str, os.PathLike or sequence of them
        The safetensors file(s), e.g. every shard of a checkpoint.
    """

    def __init__(self, files: str | os.PathLike | Sequence[str | os.PathLike]):
        from safetensors import safe_open

        if isinstance(files, (str, os.PathLike)):
            files = [files]
        self.files = [os.fspath(f) for f in files]
        if not self.files:
            raise ValueError("files must name at least one safetensors file")
        self._where: dict = {}
        self._shape: dict = {}
        self._dtype: dict = {}
        for f in self.files:
            with safe_open(f, framework="pt") as fh:
                for k in fh.keys():
                    if k not in self._where:
                        sl = fh.get_slice(k)
                        self._where[k] = f
                        self._shape[k] = tuple(sl.get_shape())
                        self._dtype[k] = sl.get_dtype()

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike) -> SafetensorsIndex:
        """The safetensors files of a model directory: those listed by
        ``model.safetensors.index.json`` if it exists, else every ``*.safetensors`` file."""
        model_dir = os.fspath(model_dir)
        index = os.path.join(model_dir, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
        else:
            names = sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors"))
        if not names:
            raise FileNotFoundError(
                f"{model_dir} holds no safetensors checkpoint (no *.safetensors file and no "
                "model.safetensors.index.json)"
            )
        return cls([os.path.join(model_dir, n) for n in names])

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def keys(self) -> list:
        """Every key, in file order."""
        return list(self._where)

    def file_of(self, key: str) -> str:
        """The file that holds ``key``."""
        return self._where[key]

    def shape(self, key: str) -> tuple:
        """The stored shape of ``key`` (from the header)."""
        return self._shape[key]

    def dtype(self, key: str) -> str:
        """The stored dtype of ``key`` as the header names it ("BF16", "F8_E4M3", ...)."""
        return self._dtype[key]

    def get(self, key: str, index: int | None = None) -> torch.Tensor:
        """The tensor ``key`` as stored, or only its row ``index`` along the first axis (read
        through a slice: only those bytes are read)."""
        from safetensors import safe_open

        with safe_open(self._where[key], framework="pt") as fh:
            if index is None:
                return fh.get_tensor(key)
            return fh.get_slice(key)[index]


@dataclass(frozen=True)
class ExpertLayout:
    """Where and how one MoE layer's routed experts are stored (see the module docstring).

    Attributes
    ----------
    kind : {"per_expert", "fused"}
    prefix : str
        Key prefix of the layer's experts.
    expert_num, hidden_size, intermediate_size : int
        E, H, I.
    key_format : str
        Per-expert layout: the format of one key (``{prefix}``, ``{expert}``, ``{proj}``).
    proj_names : dict
        Per-expert layout: the ``{proj}`` value of ``gate_proj``, ``up_proj``, ``down_proj``.
    fp8 : bool
        Per-expert layout: the weights are e4m3 with ``weight_scale_inv`` block scales.
    int4_group_size : int
        Per-expert layout: the weights are compressed-tensors ``pack-quantized`` symmetric int4
        (``weight_packed``, ``weight_scale``, ``weight_shape``) with this many columns per
        scale; 0 otherwise.
    """

    kind: str
    prefix: str
    expert_num: int
    hidden_size: int
    intermediate_size: int
    key_format: str = DEFAULT_KEY_FORMAT
    proj_names: Mapping[str, str] | None = None
    fp8: bool = False
    int4_group_size: int = 0

    def key(self, expert: int, proj: str) -> str:
        """Per-expert layout: the key of ``proj`` (one of ``BASE_NAMES``) of ``expert``."""
        names = self.proj_names or {}
        return self.key_format.format(prefix=self.prefix, expert=expert, proj=names.get(proj, proj))

    def source(self, expert: int, proj: str) -> str:
        """Where ``proj`` of ``expert`` is stored, for messages: its key, or ``key[e]`` (and the
        half of gate_up) in the fused layout."""
        if self.kind == "fused":
            gu, dn = self.fused_keys()
            half = {"gate_proj": ", gate half", "up_proj": ", up half"}
            return f"{dn}[{expert}]" if proj == "down_proj" else f"{gu}[{expert}{half[proj]}]"
        return self.key(expert, proj)

    def fused_keys(self) -> tuple:
        """Fused layout: the keys (gate_up, down)."""
        return (
            FUSED_GATE_UP_KEY.format(prefix=self.prefix),
            FUSED_DOWN_KEY.format(prefix=self.prefix),
        )


def _check_expert_num(expert_num: Any) -> int:
    if isinstance(expert_num, bool) or not isinstance(expert_num, (int, np.integer)):
        raise TypeError(f"expert_num must be an int, got {type(expert_num).__name__}")
    if expert_num < 1:
        raise ValueError(f"expert_num must be >= 1, got {expert_num}")
    return int(expert_num)


def find_experts(
    index: SafetensorsIndex,
    prefix: str,
    expert_num: int,
    key_format: str = DEFAULT_KEY_FORMAT,
    *,
    proj_names: Mapping[str, str] | None = None,
) -> ExpertLayout:
    """The layout of one layer's experts in a checkpoint, checked: every key present, shapes
    consistent (no tensor data is read).

    The per-expert layout given by ``key_format`` and ``proj_names`` is looked for first; if none
    of its keys for expert 0 exist and the fused keys ``{prefix}.gate_up_proj`` and
    ``{prefix}.down_proj`` do, the fused layout is used.

    Parameters
    ----------
    index : SafetensorsIndex
    prefix : str
        Key prefix of the layer's experts, e.g. ``"model.layers.3.mlp.experts"``.
    expert_num : int
        E; experts 0 .. E-1 must all be present.
    key_format : str, default ``DEFAULT_KEY_FORMAT``
    proj_names : mapping, optional
        ``{proj}`` values for ``"gate_proj"``, ``"up_proj"``, ``"down_proj"`` (default: those).

    Returns
    -------
    ExpertLayout

    Raises
    ------
    KeyError
        Expert weights missing (the message names the first missing key and how many).
    ValueError
        Shapes that do not fit together.
    """
    E = _check_expert_num(expert_num)
    names = {n: n for n in BASE_NAMES}
    if proj_names is not None:
        unknown = set(proj_names) - set(BASE_NAMES)
        if unknown:
            raise ValueError(f"proj_names: unknown keys {sorted(unknown)}; use {BASE_NAMES}")
        names.update(proj_names)
    per = ExpertLayout("per_expert", prefix, E, 0, 0, key_format, names)
    gu, dn = per.fused_keys()
    if per.key(0, "gate_proj") not in index and per.key(0, "gate_proj") + PACKED_SUFFIX in index:
        return _check_compressed_int4(index, per)
    if all(per.key(0, n) not in index for n in BASE_NAMES) and gu in index and dn in index:
        return _check_fused(index, prefix, E)
    missing = [per.key(e, n) for e in range(E) for n in BASE_NAMES if per.key(e, n) not in index]
    if missing:
        hint = sorted(k for k in index.keys() if k.endswith(f"{names['gate_proj']}.weight"))[:3]
        raise KeyError(
            f"{len(missing)} expert weight(s) not found in {index.files}, first {missing[0]!r} "
            f"(key_format={key_format!r}, prefix={prefix!r}); keys ending like gate_proj "
            f"there: {hint}"
        )
    k0 = per.key(0, "gate_proj")
    gshape = index.shape(k0)
    if len(gshape) != 2:
        raise ValueError(f"{k0} must be a matrix [I, H], got {list(gshape)}")
    I, H = gshape
    expected = {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
    fp8 = index.dtype(k0) == "F8_E4M3"
    for e in range(E):
        for n in BASE_NAMES:
            k = per.key(e, n)
            s = index.shape(k)
            if s != expected[n]:
                raise ValueError(
                    f"{k} in {index.file_of(k)} must have shape {list(expected[n])} (from "
                    f"{k0} [I, H] = {list(gshape)}), got {list(s)}"
                )
            if (index.dtype(k) == "F8_E4M3") != fp8:
                raise ValueError(
                    f"{k} in {index.file_of(k)} has dtype {index.dtype(k)} but {k0} has "
                    f"{index.dtype(k0)}: an expert layer is either all float8_e4m3fn or not"
                )
            if fp8:
                _check_scale_inv(index, k, expected[n])
    return ExpertLayout("per_expert", prefix, E, H, I, key_format, names, fp8)


def _check_scale_inv(index: SafetensorsIndex, key: str, shape: tuple) -> None:
    """An fp8 weight's block scales: present, floating, [ceil(rows/128), ceil(cols/128)]."""
    sk = key + SCALE_INV_SUFFIX
    blocks = tuple(-(-d // FP8_BLOCK) for d in shape)
    if sk not in index:
        raise KeyError(
            f"{key} is float8_e4m3fn but its block scales {sk!r} are not in {index.files} "
            f"(expected float32 {list(blocks)}: one scale per 128 x 128 block)"
        )
    if index.shape(sk) != blocks or index.dtype(sk) not in ("F32", "BF16", "F16"):
        raise ValueError(
            f"{sk} in {index.file_of(sk)} must be float32 with shape {list(blocks)} (one scale "
            f"per 128 x 128 block of {key} {list(shape)}), got {index.dtype(sk)} "
            f"{list(index.shape(sk))}"
        )


def _check_compressed_int4(index: SafetensorsIndex, per: ExpertLayout) -> ExpertLayout:
    """A compressed-tensors int4 layer: every key present, dtypes and shapes consistent, one
    engine group size for all three projections (only the two ``weight_shape`` tensors of
    expert 0 are read)."""
    E = per.expert_num
    parts = (PACKED_SUFFIX, "_scale", "_shape")
    missing = [
        per.key(e, n) + p
        for e in range(E)
        for n in BASE_NAMES
        for p in parts
        if per.key(e, n) + p not in index
    ]
    if missing:
        raise KeyError(
            f"{len(missing)} compressed-tensors int4 tensor(s) not found in {index.files}, first "
            f"{missing[0]!r} (each projection needs weight_packed, weight_scale and weight_shape)"
        )
    k0, d0 = per.key(0, "gate_proj"), per.key(0, "down_proj")
    gshape = index.get(k0 + "_shape").reshape(-1).tolist()
    if len(gshape) != 2:
        raise ValueError(f"{k0}_shape must hold 2 integers [I, H], got {gshape}")
    I, H = (int(v) for v in gshape)
    dshape = index.get(d0 + "_shape").reshape(-1).tolist()
    if dshape != [H, I]:
        raise ValueError(
            f"{d0}_shape must be {[H, I]} (from {k0}_shape [I, H] = {[I, H]}), got {dshape}"
        )
    expected = {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
    groups = {n: index.shape(per.key(0, n) + "_scale")[-1:] for n in BASE_NAMES}
    for e in range(E):
        for n in BASE_NAMES:
            k = per.key(e, n)
            zp = k + "_zero_point"
            if zp in index:
                raise ValueError(
                    f"{zp} is in {index.file_of(zp)}: asymmetric int4 (with zero points) does "
                    "not fit ktsft's symmetric int4 (q * scale); only symmetric pack-quantized "
                    "checkpoints load"
                )
            rows, cols = expected[n]
            pk, sk = k + PACKED_SUFFIX, k + "_scale"
            if index.dtype(pk) != "I32" or index.shape(pk) != (rows, -(-cols // 8)):
                raise ValueError(
                    f"{pk} in {index.file_of(pk)} must be int32 with shape "
                    f"{[rows, -(-cols // 8)]} (8 values an int32 of {k} {[rows, cols]}), got "
                    f"{index.dtype(pk)} {list(index.shape(pk))}"
                )
            sshape = (rows,) + groups[n]
            if index.dtype(sk) not in ("F32", "BF16", "F16") or index.shape(sk) != sshape:
                raise ValueError(
                    f"{sk} in {index.file_of(sk)} must be bf16, fp16 or fp32 with shape "
                    f"{list(sshape)} (as {per.key(0, n)}_scale), got {index.dtype(sk)} "
                    f"{list(index.shape(sk))}"
                )
    cols = {"gate_proj": H, "up_proj": H, "down_proj": I}
    fits = {n: compatible_group_sizes(cols[n], groups[n][0] if groups[n] else 0) for n in cols}
    common = sorted(set.intersection(*(set(f) for f in fits.values())))
    if not common:
        said = ", ".join(f"{n}: {groups[n][0]} per {cols[n]} columns" for n in BASE_NAMES)
        raise ValueError(
            f"the int4 group scales of {per.prefix!r} ({said}) are no single group size of "
            "32, 64 or 128, the sizes the int4 engine takes"
        )
    return ExpertLayout(
        "per_expert", per.prefix, E, H, I, per.key_format, per.proj_names, int4_group_size=common[0]
    )


def hub_prefixes(module_prefix: str) -> list:
    """Where a checkpoint may hold the experts of the transformers module ``module_prefix``:
    ``(prefix, proj_names)`` pairs, most likely first.

    transformers 5 names every experts module ``...mlp.experts``; checkpoints on the Hub use
    that prefix with ``gate_proj``/``up_proj``/``down_proj`` (or fused keys), and Mixtral's use
    ``...block_sparse_moe.experts`` with ``w1``/``w3``/``w2`` (:data:`MIXTRAL_PROJ_NAMES`).
    """
    out = [(module_prefix, None)]
    if ".mlp." in module_prefix:
        out.append((module_prefix.replace(".mlp.", ".block_sparse_moe."), MIXTRAL_PROJ_NAMES))
    out.append((module_prefix, MIXTRAL_PROJ_NAMES))
    return out


def find_module_experts(
    index: SafetensorsIndex, module_prefix: str, expert_num: int
) -> ExpertLayout:
    """The layout of the experts of the transformers module ``module_prefix`` (e.g.
    ``model.layers.3.mlp.experts``) in a checkpoint: the first of :func:`hub_prefixes` whose
    expert 0 (or fused keys) the checkpoint holds, checked by :func:`find_experts`.

    Raises
    ------
    KeyError
        None of the layouts is there (the message lists the keys looked for), or one is there
        only in part.
    """
    tried = []
    for prefix, names in hub_prefixes(module_prefix):
        layout = ExpertLayout("per_expert", prefix, 1, 0, 0, DEFAULT_KEY_FORMAT, names)
        keys = [layout.key(0, n) for n in BASE_NAMES]
        present = any(k in index or k + PACKED_SUFFIX in index for k in keys)
        if present or all(k in index for k in layout.fused_keys()):
            return find_experts(index, prefix, expert_num, proj_names=names)
        tried.append(keys[0])
    tried.append(FUSED_GATE_UP_KEY.format(prefix=module_prefix))
    layer = module_prefix.rsplit(".", 2)[0]
    near = sorted(k for k in index.keys() if k.startswith(layer + "."))[:4]
    raise KeyError(
        f"the experts of {module_prefix!r} ({expert_num} experts) are not in {index.files}: "
        f"none of {tried} is there; keys of {layer!r} there: {near}"
    )


def _check_fused(index: SafetensorsIndex, prefix: str, E: int) -> ExpertLayout:
    gu = FUSED_GATE_UP_KEY.format(prefix=prefix)
    dn = FUSED_DOWN_KEY.format(prefix=prefix)
    gshape, dshape = index.shape(gu), index.shape(dn)
    if len(gshape) != 3 or gshape[0] != E or gshape[1] % 2:
        raise ValueError(
            f"{gu} in {index.file_of(gu)} must have shape [E={E}, 2I, H], got {list(gshape)}"
        )
    I2, H = gshape[1:]
    if dshape != (E, H, I2 // 2):
        raise ValueError(
            f"{dn} in {index.file_of(dn)} must have shape {[E, H, I2 // 2]} (from {gu} "
            f"[E, 2I, H] = {list(gshape)}), got {list(dshape)}"
        )
    if "F8_E4M3" in (index.dtype(gu), index.dtype(dn)):
        raise ValueError(
            f"{gu} / {dn}: fused float8_e4m3fn experts are not supported; fp8 experts are read "
            "in the per-expert layout (...{proj}.weight + ...{proj}.weight_scale_inv)"
        )
    return ExpertLayout("fused", prefix, E, H, I2 // 2)


def read_expert(index: SafetensorsIndex, layout: ExpertLayout, expert: int) -> dict:
    """One expert's three matrices as stored: ``{"gate_proj": [I, H], "up_proj": [I, H],
    "down_proj": [H, I]}`` (torch tensors in the checkpoint's dtype); for an fp8 layout also
    their block scales ``gate_scale_inv``, ``up_scale_inv``, ``down_scale_inv`` (float32).

    A compressed-tensors int4 layout gives ktsft's int4 layout instead (NumPy): the bytes
    ``gate_proj``, ``up_proj`` uint8 [I, ceil(H/2)], ``down_proj`` [H, ceil(I/2)] and the
    scales ``gate_scale``, ``up_scale`` float32 [I, ceil(H/G)], ``down_scale`` [H, ceil(I/G)]."""
    if layout.int4_group_size:
        out = {}
        for n in BASE_NAMES:
            k = layout.key(expert, n)
            out[n], out[INT4_SCALE_NAMES[n]], _ = compressed_tensors_to_int4(
                index.get(k + PACKED_SUFFIX),
                index.get(k + "_scale"),
                index.get(k + "_shape"),
                group_size=layout.int4_group_size,
                name=k,
            )
        return out
    if layout.fp8:
        out = {n: index.get(layout.key(expert, n)) for n in BASE_NAMES}
        for n in BASE_NAMES:
            scale = index.get(layout.key(expert, n) + SCALE_INV_SUFFIX)
            out[SCALE_NAMES[n]] = scale.to(torch.float32).contiguous()
        return out
    if layout.kind == "fused":
        gu, dn = layout.fused_keys()
        gate_up = index.get(gu, expert)
        I = layout.intermediate_size
        return {
            "gate_proj": gate_up[:I],
            "up_proj": gate_up[I:],
            "down_proj": index.get(dn, expert),
        }
    return {n: index.get(layout.key(expert, n)) for n in BASE_NAMES}


def dequantize_fp8_expert(
    mats: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.bfloat16
) -> dict:
    """One fp8 expert (as :func:`read_expert` returns it) as ``dtype`` matrices: ``q *
    scale_inv`` per 128 x 128 block, computed in float32 (e4m3 is exact there; one rounding) and,
    for bf16, rounded to bf16 once."""
    out = {}
    for n in BASE_NAMES:
        q, s = mats[n], mats[SCALE_NAMES[n]]
        rows, cols = q.shape
        full = s.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)[:rows, :cols]
        out[n] = (q.to(torch.float32) * full).to(dtype)
    return out


def iter_experts(index: SafetensorsIndex, layout: ExpertLayout) -> Iterator:
    """``(e, read_expert(index, layout, e))`` for e = 0 .. E-1, one expert in memory at a time
    (the caller drops each before asking for the next)."""
    for e in range(layout.expert_num):
        yield e, read_expert(index, layout, e)
