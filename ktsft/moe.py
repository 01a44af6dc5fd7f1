"""The Python API: one MoE layer's forward and backward over the native engine."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any

import numpy as np

from . import _arrays, _core, reference
from ._core import SavedState
from .config import MoESFTConfig
from .gradients import BASE_NAMES, LORA_NAMES, Gradients
from .pool import ThreadPool

_BF16 = ("bfloat16",)
# Accepted dtypes of base weights stored as bf16, int8, fp8 (e4m3 or its raw bytes) and int4 (two
# nibbles a byte).
_DTYPES = {
    "bf16": _BF16,
    "int8": ("int8",),
    "fp8": ("float8_e4m3fn", "uint8"),
    "int4": ("uint8",),
}
# The scale arrays that go with quantized gate, up and down weights.
_SCALE_NAMES = {
    "int8": ("gate_scale", "up_scale", "down_scale"),
    "fp8": ("gate_scale_inv", "up_scale_inv", "down_scale_inv"),
    "int4": ("gate_scale", "up_scale", "down_scale"),
}
_SCALE_DOC = {
    "int8": "float32, one scale per row",
    "fp8": "float32, one scale per 128 x 128 block",
    "int4": "float32, one scale per row and group of group_size columns",
}
_ALL_SCALE_NAMES = _SCALE_NAMES["int8"] + _SCALE_NAMES["fp8"]


def _stored_kind(v: _arrays.View, quant: str) -> str:
    """How base weights of this dtype are stored in a layer of this quant mode: "int8", "fp8",
    "int4" (uint8 bytes in an int4 layer) or (anything else) "bf16"."""
    kinds = [k for k, d in _DTYPES.items() if v.dtype in d and k != "bf16"]
    return quant if quant in kinds else kinds[0] if kinds else "bf16"


def _scale_shape(quant: str, rows: int, cols: int, group: int = 32) -> tuple:
    """Scales of one [rows, cols] matrix: one per row (int8), one per 128 x 128 block (fp8), one
    per row and group of ``group`` columns (int4)."""
    if quant == "int8":
        return (rows,)
    if quant == "int4":
        return (rows, -(-cols // group))
    return (-(-rows // 128), -(-cols // 128))


def _weight_shape(stored: str, rows: int, cols: int) -> tuple:
    """One [rows, cols] matrix as given and read back: int4 holds two columns a byte."""
    return (rows, -(-cols // 2)) if stored == "int4" else (rows, cols)


class MoESFT:
    """Routed SwiGLU experts with LoRA on gate, up and down, on the CPU.

    The base weights are packed once, here, into the engine's own layout (the caller may free
    them afterwards). The six LoRA tensors are *not* copied: the engine reads them from the
    caller's memory at every call, so an in-place optimizer step is seen by the next call with
    no sync of any kind.

    With ``config.quant == "int8"`` the engine keeps the base weights as int8 with one float32
    scale per output row (spec section 5); with ``"fp8"`` as e4m3 bytes with one float32 scale
    per 128 x 128 block (spec section 5.1, DeepSeek-V3's ``weight_scale_inv``). Give bf16
    weights to have them quantized here, or the quantized weights with their scale arrays (e.g.
    saved from :meth:`base_weights`, or an fp8 checkpoint as it ships), which are used as they
    are. Weights may also be left out here and loaded expert by expert with
    :meth:`load_experts`, so that no full copy of them need exist in the caller's memory.

    Parameters
    ----------
    config : MoESFTConfig
        Sizes and options.
    gate_proj, up_proj : array, shape [E, I, H], optional
    down_proj : array, shape [E, H, I], optional
        Frozen base weights: bf16 (NumPy ``ml_dtypes.bfloat16`` or ``uint16`` bits, or torch
        bf16) in any mode; int8 with ``quant="int8"``; e4m3 (``ml_dtypes.float8_e4m3fn``,
        ``torch.float8_e4m3fn`` or their bytes as ``uint8``) with ``quant="fp8"``. All three or
        none.
    gate_lora_a, up_lora_a : array, bf16, shape [E, r, H]
    gate_lora_b, up_lora_b : array, bf16, shape [E, I, r]
    down_lora_a : array, bf16, shape [E, r, I]
    down_lora_b : array, bf16, shape [E, H, r]
        Trainable LoRA tensors, C-contiguous; ``requires_grad`` parameters are fine.
    pool : ThreadPool, optional
        Threads to run on; default: a new pool of :func:`~ktsft.pool.default_num_threads`.
    isa : str, optional
        Kernel family ("auto", "avx512", "generic", ...); default ``KTSFT_ISA`` or "auto".
    gate_scale, up_scale : array, float32, shape [E, I], optional
    down_scale : array, float32, shape [E, H], optional
        Per-row scales of int8 base weights (weight = int8 value * scale of its row).
    gate_scale_inv, up_scale_inv : array, float32, shape [E, ceil(I/128), ceil(H/128)], optional
    down_scale_inv : array, float32, shape [E, ceil(H/128), ceil(I/128)], optional
        Block scales of e4m3 base weights: ``W[n, c] = e4m3(q[n, c]) * scale_inv[n // 128,
        c // 128]``; finite.
    """

    def __init__(
        self,
        config: MoESFTConfig,
        *,
        gate_proj: Any = None,
        up_proj: Any = None,
        down_proj: Any = None,
        gate_lora_a: Any,
        gate_lora_b: Any,
        up_lora_a: Any,
        up_lora_b: Any,
        down_lora_a: Any,
        down_lora_b: Any,
        pool: ThreadPool | None = None,
        isa: str | None = None,
        gate_scale: Any = None,
        up_scale: Any = None,
        down_scale: Any = None,
        gate_scale_inv: Any = None,
        up_scale_inv: Any = None,
        down_scale_inv: Any = None,
    ):
        if not isinstance(config, MoESFTConfig):
            raise TypeError(f"config must be a ktsft.MoESFTConfig, got {type(config).__name__}")
        self.config = config
        self._shapes = config.shapes()
        self.pool = pool if pool is not None else ThreadPool()
        self._lora: dict = {}
        self.set_lora(
            gate_lora_a=gate_lora_a,
            gate_lora_b=gate_lora_b,
            up_lora_a=up_lora_a,
            up_lora_b=up_lora_b,
            down_lora_a=down_lora_a,
            down_lora_b=down_lora_b,
        )
        base = {"gate_proj": gate_proj, "up_proj": up_proj, "down_proj": down_proj}
        scales = dict(
            zip(
                _ALL_SCALE_NAMES,
                (gate_scale, up_scale, down_scale, gate_scale_inv, up_scale_inv, down_scale_inv),
            )
        )
        given = [n for n in BASE_NAMES if base[n] is not None]
        if given and len(given) != 3:
            missing = [n for n in BASE_NAMES if base[n] is None]
            raise TypeError(f"give all three base weights or none; missing {missing}")
        named = [n for n, v in scales.items() if v is not None]
        if not given and named:
            raise TypeError(f"{', '.join(named)} need the quantized base weights they scale")
        if isa is None:
            isa = os.environ.get("KTSFT_ISA", "auto")
        c = config
        self._engine = _core.Engine(
            self.pool._native,
            c.expert_num,
            c.num_experts_per_tok,
            c.hidden_size,
            c.intermediate_size,
            c.lora_rank,
            float(c.lora_alpha),
            c.max_len,
            c.max_cache_depth,
            isa,
            c.quant,
            c.group_size,
        )
        if given:
            stored = _stored_kind(_arrays.view(gate_proj, "gate_proj"), c.quant)
            for n in BASE_NAMES:  # the full [E, ...] shapes, before load_experts' checks
                shape = self._shapes[n][:1] + _weight_shape(stored, *self._shapes[n][1:])
                _arrays.checked(base[n], n, shape, _DTYPES[stored])
            self.load_experts(0, **base, **scales)

    # ---- base weights -----------------------------------------------------------------------

    def load_experts(
        self,
        first: int,
        gate_proj: Any,
        up_proj: Any,
        down_proj: Any,
        gate_scale: Any = None,
        up_scale: Any = None,
        down_scale: Any = None,
        gate_scale_inv: Any = None,
        up_scale_inv: Any = None,
        down_scale_inv: Any = None,
    ) -> None:
        """Packs the base weights of ``n`` experts from ``first`` on (replacing any loaded).

        Load a model expert by expert (``n = 1``) to keep the caller's memory at one expert
        beyond the packed copy; forward and backward need every expert loaded. A call that
        fails loads nothing.

        Parameters
        ----------
        first : int
            Index of the first expert, 0 <= first <= E - n.
        gate_proj, up_proj : array, shape [n, I, H] (or [I, H] for n = 1)
        down_proj : array, shape [n, H, I] (or [H, I])
            bf16 in any mode (quantized here in int8 and fp8 mode); int8 with the ``*_scale``
            arrays in int8 mode; e4m3 (or its ``uint8`` bytes) with the ``*_scale_inv`` arrays
            in fp8 mode.
        gate_scale, up_scale : array, float32, shape [n, I] (or [I])
        down_scale : array, float32, shape [n, H] (or [H])
            Per-row scales, with int8 weights only.
        gate_scale_inv, up_scale_inv : array, float32, shape [n, ceil(I/128), ceil(H/128)]
        down_scale_inv : array, float32, shape [n, ceil(H/128), ceil(I/128)]
            Block scales, with e4m3 weights only; every one finite.
        """
        c = self.config
        E, H, I = c.expert_num, c.hidden_size, c.intermediate_size  # noqa: E741
        first = _index(first, "first")
        base = {"gate_proj": gate_proj, "up_proj": up_proj, "down_proj": down_proj}
        scales = dict(
            zip(
                _ALL_SCALE_NAMES,
                (gate_scale, up_scale, down_scale, gate_scale_inv, up_scale_inv, down_scale_inv),
            )
        )
        gv = _arrays.view(gate_proj, "gate_proj")
        single = len(gv.shape) == 2
        n = 1 if single else (gv.shape[0] if gv.shape else 0)
        if not 0 <= first or n < 1 or first + n > E:
            raise ValueError(
                f"experts first = {first} .. {first + n - 1} must lie in [0, {E}) "
                f"(gate_proj has shape {list(gv.shape)})"
            )
        lead = () if single else (n,)
        rows = {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
        stored = _stored_kind(gv, c.quant)
        if stored != "bf16" and stored != c.quant:
            raise TypeError(
                f"gate_proj has dtype {gv.dtype} ({stored} weights) but this layer stores "
                f"{c.quant} base weights; use MoESFTConfig(quant={stored!r}) or give bf16 weights"
            )
        dtypes = _DTYPES[stored]
        ptrs = [
            _arrays.checked(base[m], m, lead + _weight_shape(stored, *rows[m]), dtypes).ptr
            for m in BASE_NAMES
        ]
        scale_ptrs = [0, 0, 0]
        wanted = _SCALE_NAMES.get(stored, ())
        extra = [s for s, v in scales.items() if v is not None and s not in wanted]
        if extra:
            kinds = [k for k, names in _SCALE_NAMES.items() if set(extra) & set(names)]
            raise TypeError(
                f"{', '.join(extra)} go with {' or '.join(kinds)} base weights only; gate_proj "
                f"holds {stored} weights"
            )
        for i, (m, s) in enumerate(zip(BASE_NAMES, wanted)):
            if scales[s] is None:
                raise TypeError(f"{stored} {m} needs {s} ({_SCALE_DOC[stored]})")
            shape = lead + _scale_shape(stored, *rows[m], c.group_size)
            scale_ptrs[i] = _arrays.checked(scales[s], s, shape, ("float32",)).ptr
        self.pool.run(lambda: self._engine.load_experts(first, n, stored, *ptrs, *scale_ptrs))

    def base_weights(self, first: int = 0, count: int | None = None) -> dict:
        """The packed base weights of ``count`` experts from ``first`` on, read back.

        In int8 and fp8 mode these are exactly the bytes and scales the kernels use (e.g. to
        save a quantized model and load it later without any bf16 copy).

        Returns
        -------
        dict of numpy.ndarray
            ``gate_proj``, ``up_proj`` [count, I, H], ``down_proj`` [count, H, I]: bf16
            (``ml_dtypes.bfloat16``), int8, or e4m3 (``ml_dtypes.float8_e4m3fn``); in int8 mode
            also ``gate_scale``, ``up_scale`` [count, I] and ``down_scale`` [count, H]; in fp8
            mode ``gate_scale_inv``, ``up_scale_inv`` [count, ceil(I/128), ceil(H/128)] and
            ``down_scale_inv`` [count, ceil(H/128), ceil(I/128)]; scales float32.
        """
        c = self.config
        E, H, I = c.expert_num, c.hidden_size, c.intermediate_size  # noqa: E741
        first = _index(first, "first")
        count = E - first if count is None else _index(count, "count")
        if first < 0 or count < 1 or first + count > E:
            raise ValueError(f"experts {first} .. {first + count - 1} must lie in [0, {E})")
        dtype = {"bf16": _arrays.BF16, "int8": np.int8, "fp8": _arrays.FP8, "int4": np.uint8}
        rows = {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
        out = {
            m: np.empty((count,) + _weight_shape(c.quant, *rows[m]), dtype[c.quant])
            for m in BASE_NAMES
        }
        for m, s in zip(BASE_NAMES, _SCALE_NAMES.get(c.quant, ())):
            out[s] = np.empty((count,) + _scale_shape(c.quant, *rows[m], c.group_size), np.float32)
        ptrs = [a.ctypes.data for a in out.values()]
        self.pool.run(lambda: self._engine.read_experts(first, count, *ptrs))
        return out

    def dequantized_weights(self, first: int = 0, count: int | None = None) -> dict:
        """The base weights the kernels multiply by, as float32, ``count`` experts from
        ``first`` on: bf16 values as they are, ``q * scale`` of its row (int8), ``e4m3(q) *
        scale_inv`` of its 128 x 128 block (fp8; the product rounded to float32 once).

        Returns
        -------
        dict of numpy.ndarray, float32
            ``gate_proj``, ``up_proj`` [count, I, H] and ``down_proj`` [count, H, I].
        """
        raw = self.base_weights(first, count)
        quant = self.config.quant
        out = {}
        for m, s in zip(BASE_NAMES, _SCALE_NAMES.get(quant, (None,) * 3)):
            w = raw[m].astype(np.float32)
            if quant == "int8":
                w *= raw[s][..., None]
            elif quant == "fp8":
                rows, cols = w.shape[-2:]
                w *= np.repeat(np.repeat(raw[s], 128, axis=-2), 128, axis=-1)[..., :rows, :cols]
            elif quant == "int4":
                cols = self._shapes[m][2]
                w = reference.dequantize_int4(raw[m], raw[s], cols, self.config.group_size)
                w = w.astype(np.float32)
            out[m] = w
        return out

    def set_profiling(self, on: bool = True) -> None:
        """Switches the engine's phase timers on (zeroing them) or off; see :meth:`phase_times`.

        Off by default: a switched-off timer costs one branch per phase."""
        self._engine.set_profiling(bool(on))

    def phase_times(self) -> dict:
        """Time spent in each parallel phase since :meth:`set_profiling` switched the timers on.

        Returns
        -------
        dict
            ``{name: (seconds, runs)}`` for the phases of the forward (``"FQ"``, ``"F0"`` ..
            ``"F4"``) and of the backward (``"BZ"``, ``"B0"`` .. ``"B5"``), documented in
            docs/design.rst, and for the whole calls (``"forward"``, ``"backward"``: setup such
            as routing and allocation is the difference from their phases' sum).
        """
        return self._engine.phase_times()

    @property
    def experts_loaded(self) -> int:
        """How many experts have base weights (forward needs all E)."""
        return self._engine.experts_loaded

    # ---- LoRA: references, never copies ---------------------------------------------------

    def set_lora(self, **tensors: Any) -> None:
        """Points the engine at new LoRA tensors (only needed after replacing an allocation).

        Parameters
        ----------
        **tensors
            Any of the six LoRA names mapped to new arrays of the same shape and dtype.
        """
        for name, a in tensors.items():
            if name not in LORA_NAMES:
                raise TypeError(f"unknown LoRA tensor {name!r}; expected one of {LORA_NAMES}")
            _arrays.checked(a, name, self._shapes[name], _BF16)
        self._lora.update(tensors)

    @property
    def lora(self) -> dict:
        """The six LoRA tensors the engine reads (the caller's own objects)."""
        return dict(self._lora)

    def _lora_ptrs(self) -> tuple:
        # Re-read at every call: a torch parameter whose .data was replaced is followed too.
        return tuple(
            _arrays.checked(self._lora[n], n, self._shapes[n], _BF16).ptr for n in LORA_NAMES
        )

    # ---- forward ----------------------------------------------------------------------------

    def submit_forward(
        self,
        x: Any,
        expert_ids: Any,
        weights: Any,
        save_for_backward: bool = False,
        out: Any = None,
        return_saved: bool = False,
    ) -> Future:
        """Queues a forward on the pool; returns a future of the output (of ``(output,
        saved)`` with ``return_saved``). Arguments as :meth:`forward`; they are checked now,
        the LoRA tensors are read when it runs."""
        return self.pool.submit(
            self._forward_task(x, expert_ids, weights, save_for_backward, out, return_saved)
        )

    def _forward_task(
        self, x, expert_ids, weights, save_for_backward, out, return_saved
    ) -> Callable[[], Any]:
        """The forward as a task for the pool, its arguments checked now."""
        c = self.config
        xv = _arrays.view(x, "x")
        if len(xv.shape) != 2:
            raise ValueError(f"x must have shape [T, {c.hidden_size}], got {list(xv.shape)}")
        T = xv.shape[0]
        if not 1 <= T <= c.max_len:
            raise ValueError(f"x has T = {T} tokens; expected 1 <= T <= max_len = {c.max_len}")
        xv = _arrays.checked(x, "x", (T, c.hidden_size), _BF16)
        ids_shape = _arrays.view(expert_ids, "expert_ids").shape
        if len(ids_shape) == 2 and ids_shape[0] == T and ids_shape[1] != c.num_experts_per_tok:
            raise ValueError(
                f"k mismatch: expert_ids has {ids_shape[1]} columns, expected "
                f"num_experts_per_tok = {c.num_experts_per_tok}"
            )
        k = c.num_experts_per_tok
        ids, ids_ptr = _arrays.as_int64_ids(expert_ids, "expert_ids", (T, k))
        wv = _arrays.checked(weights, "weights", (T, k), ("float32",))
        if out is None:
            out = _arrays.empty(
                xv.kind if xv.kind == "torch" else "numpy", (T, c.hidden_size), "float32"
            )
        ov = _arrays.checked(out, "out", (T, c.hidden_size), ("float32", "bfloat16"))
        keep = (x, ids, weights, out)  # alive until the task has run

        def task(keep=keep):  # the default argument keeps the arrays alive until it runs
            saved = self._engine.forward(
                T,
                k,
                ids_ptr,
                wv.ptr,
                xv.ptr,
                ov.ptr,
                ov.dtype == "bfloat16",
                self._lora_ptrs(),
                bool(save_for_backward or return_saved),
                bool(return_saved),
            )
            return (out, saved) if return_saved else out

        return task

    def forward(
        self,
        x: Any,
        expert_ids: Any,
        weights: Any,
        save_for_backward: bool = False,
        out: Any = None,
        return_saved: bool = False,
    ) -> Any:
        """Runs the layer: ``out_t = sum_j weights[t, j] * expert_{ids[t, j]}(x_t)``.

        Parameters
        ----------
        x : array, bf16, shape [T, H]
            Input tokens, 1 <= T <= max_len.
        expert_ids : array, int64 or int32, shape [T, k]
            Routed experts; -1 means no expert for that slot.
        weights : array, float32, shape [T, k]
            Routing weights.
        save_for_backward : bool, default False
            Push what :meth:`backward` needs onto the saved-state stack (a private copy: x may
            be overwritten afterwards).
        out : array, float32 or bf16, shape [T, H], optional
            Written in place and returned.
        return_saved : bool, default False
            Save what backward needs into a :class:`SavedState` handed to the caller instead of
            the stack (not counted against ``max_cache_depth``); pass it to
            ``backward(saved=...)``. It is freed when garbage-collected or released: this ties
            the state to an owner such as an autograd context.

        Returns
        -------
        array, shape [T, H]
            ``out``, or a new float32 array of the kind of ``x`` (NumPy or torch); with
            ``return_saved``, the pair ``(output, saved)``.
        """
        return self.pool.run(
            self._forward_task(x, expert_ids, weights, save_for_backward, out, return_saved)
        )

    # ---- backward ---------------------------------------------------------------------------

    def submit_backward(
        self,
        grad_output: Any,
        grad_input: Any = None,
        lora_grads: Mapping[str, Any] | None = None,
        accumulate: bool = False,
        need_grad_weights: bool = True,
        saved: SavedState | None = None,
    ) -> Future:
        """Queues a backward on the pool; returns a future of the :class:`Gradients`.
        Arguments as :meth:`backward`."""
        return self.pool.submit(
            self._backward_task(
                grad_output, grad_input, lora_grads, accumulate, need_grad_weights, saved
            )
        )

    def _backward_task(
        self, grad_output, grad_input, lora_grads, accumulate, need_grad_weights, saved
    ) -> Callable[[], Gradients]:
        """The backward as a task for the pool, its arguments checked now."""
        c = self.config
        if saved is not None:
            if not isinstance(saved, SavedState):
                raise TypeError(f"saved must be a ktsft.SavedState, got {type(saved).__name__}")
            if saved.engine is not self._engine:
                raise ValueError("saved: the saved state comes from the forward of another layer")
            if saved.released:
                raise ValueError("saved: this saved state was released")
        gv = _arrays.view(grad_output, "grad_output")
        if len(gv.shape) != 2:
            raise ValueError(
                f"grad_output must have shape [T, {c.hidden_size}], got {list(gv.shape)}"
            )
        T = gv.shape[0]
        gv = _arrays.checked(
            grad_output, "grad_output", (T, c.hidden_size), ("bfloat16", "float32")
        )
        out_kind = "torch" if gv.kind == "torch" else "numpy"
        bf16_kind = gv.kind if gv.dtype == "bfloat16" else out_kind
        if grad_input is None:
            grad_input = _arrays.empty(bf16_kind, (T, c.hidden_size), "bfloat16", zero=accumulate)
        giv = _arrays.checked(grad_input, "grad_input", (T, c.hidden_size), _BF16)
        lora_grads = dict(lora_grads or {})
        unknown = set(lora_grads) - set(LORA_NAMES)
        if unknown:
            raise TypeError(f"unknown lora_grads keys {sorted(unknown)}; expected {LORA_NAMES}")
        # New buffers start as zero pages of their own mapping, which backward maps in bulk for
        # the routed experts before writing them (freed heap memory is no warmer: its pages
        # come back one fault at a time as the gradients are stored). When at most half the
        # experts can get a token the pages are small, so the others are never touched; with
        # more routes (nearly) every page is written, and huge pages zero 2 MB at a time.
        few_routed = 2 * T * c.num_experts_per_tok <= c.expert_num
        grads_zeroed = all(lora_grads.get(n) is None for n in LORA_NAMES)
        for n in LORA_NAMES:
            if lora_grads.get(n) is None:
                kind = _arrays.view(self._lora[n], n).kind
                lora_grads[n] = (
                    _arrays.zeros_mapped(kind, self._shapes[n], "bfloat16", huge=not few_routed)
                    if grads_zeroed
                    else _arrays.empty(kind, self._shapes[n], "bfloat16", zero=accumulate)
                )
        grad_ptrs = tuple(
            _arrays.checked(lora_grads[n], f"lora_grads[{n!r}]", self._shapes[n], _BF16).ptr
            for n in LORA_NAMES
        )
        k = c.num_experts_per_tok
        grad_weights = None
        gw_ptr = 0
        if need_grad_weights:
            grad_weights = _arrays.empty(out_kind, (T, k), "float32", zero=accumulate)
            gw_ptr = _arrays.view(grad_weights, "grad_weights").ptr
        result = Gradients(input=grad_input, weights=grad_weights, **lora_grads)
        keep = (grad_output,)

        def task(keep=keep):
            self._engine.backward(
                T,
                gv.ptr,
                gv.dtype == "float32",
                giv.ptr,
                grad_ptrs,
                gw_ptr,
                bool(accumulate),
                grads_zeroed,
                self._lora_ptrs(),
                saved,
            )
            return result

        return task

    def backward(
        self,
        grad_output: Any,
        grad_input: Any = None,
        lora_grads: Mapping[str, Any] | None = None,
        accumulate: bool = False,
        need_grad_weights: bool = True,
        saved: SavedState | None = None,
    ) -> Gradients:
        """Gradients of the newest forward saved with ``save_for_backward=True`` (popped), or
        of the forward that returned ``saved``.

        Parameters
        ----------
        grad_output : array, bf16 or float32, shape [T, H]
            dL/d out of that forward (float32 is rounded to bf16 for the products).
        grad_input : array, bf16, shape [T, H], optional
            Buffer for dL/dx, written in place.
        lora_grads : mapping, optional
            LoRA name (``"gate_lora_a"``, ...) to a bf16 buffer of that tensor's shape, e.g.
            each parameter's ``.grad``; missing names get new arrays. When none is given, the
            six new arrays start as zero pages of their own memory mapping: only the pages of
            the experts that got tokens are ever written (the others cost no time and no
            memory until read). The pages are huge (2 MB, where the system allows) when more
            than half the experts can get a token (``2 T k > E``). Buffers passed in are
            written in full (zeros for experts without tokens).
        accumulate : bool, default False
            Add into the buffers instead of overwriting them (gradient accumulation).
        need_grad_weights : bool, default True
            Also compute dL/d routing weight.
        saved : SavedState, optional
            A state from ``forward(return_saved=True)``; it stays valid for further backward
            calls until released.

        Returns
        -------
        Gradients
            ``.input`` [T, H] bf16, the six LoRA gradients (bf16, shapes of the LoRA tensors)
            and ``.weights`` [T, k] float32 (None when ``need_grad_weights`` is False). Buffers
            passed in are returned as they are.
        """
        return self.pool.run(
            self._backward_task(
                grad_output, grad_input, lora_grads, accumulate, need_grad_weights, saved
            )
        )

    # ---- state ------------------------------------------------------------------------------

    @property
    def cache_depth(self) -> int:
        """Saved forwards waiting for their backward."""
        return self._engine.cache_depth

    def clear_cache(self) -> None:
        """Drops every saved forward (e.g. after an aborted step)."""
        self.pool.run(self._engine.cache_clear)

    @property
    def isa(self) -> str:
        """The kernel family this layer runs on."""
        return self._engine.isa

    @property
    def packed_bytes(self) -> int:
        """Bytes held by the packed base weights and their scales (the only copy the
        library keeps)."""
        return self._engine.packed_bytes

    def __repr__(self) -> str:
        c = self.config
        return (
            f"ktsft.MoESFT(E={c.expert_num}, k={c.num_experts_per_tok}, H={c.hidden_size}, "
            f"I={c.intermediate_size}, r={c.lora_rank}, quant={c.quant!r}, isa={self.isa!r}, "
            f"threads={self.pool.num_threads})"
        )


def _index(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)
