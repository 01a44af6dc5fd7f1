"""PyTorch integration: an autograd Function and an ``nn.Module`` over the native engine.

:class:`MoELoRA` is one MoE layer's routed experts with LoRA on gate, up and down (spec section
8.3). It packs the frozen base weights into the engine (and keeps no copy of them), owns the six
LoRA tensors as bf16 ``torch.nn.Parameter`` objects that the engine reads in place at every
call (zero copy: an optimizer step is seen by the next call), and takes
``(hidden_states, expert_ids, routing_weights)``. Gradients reach the hidden states, the routing
weights (so a router upstream trains) and the six parameters; ``.grad`` accumulates over
backward calls as everywhere in PyTorch.

Saved state lives in the autograd graph: each forward that records a graph keeps the engine's
:class:`~ktsft.SavedState` on a tensor saved with ``ctx.save_for_backward``. So it is freed with
the graph, it is dropped (and recomputed) by non-reentrant ``torch.utils.checkpoint.checkpoint``
like any saved tensor, and a forward under ``torch.no_grad`` saves nothing. The engine's
saved-state stack (``max_cache_depth``) is not used.

Adapters are saved and loaded as safetensors with the parameter names as keys
(:meth:`MoELoRA.save_adapter`, :meth:`MoELoRA.load_adapter`); :meth:`MoELoRA.merged_weights`
folds them into bf16 expert weights for serving stacks without LoRA; and
:meth:`MoELoRA.from_safetensors` loads one layer's experts from a Hugging Face style checkpoint,
expert by expert (the key layouts are read by :mod:`ktsft.checkpoint`), and
:meth:`MoELoRA.from_gguf` one llama.cpp layer's ``Q4_0`` experts from a GGUF file.

This module imports torch (an optional dependency of ktsft); ``safetensors`` is needed for the
checkpoint and adapter functions only.
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from . import reference
from .checkpoint import (
    DEFAULT_KEY_FORMAT,
    ExpertLayout,
    SafetensorsIndex,
    dequantize_fp8_expert,
    find_experts,
    iter_experts,
    to_bf16_expert,
)
from .config import MoESFTConfig
from .gradients import BASE_NAMES, LORA_NAMES
from .int4_formats import GGUFExperts, dequantize_int4_expert
from .moe import MoESFT
from .pool import ThreadPool

__all__ = [
    "ADAPTER_FORMAT",
    "DEFAULT_KEY_FORMAT",
    "MoELoRA",
    "MoELoRAFunction",
    "default_pool",
]

ADAPTER_FORMAT = "ktsft-moe-lora"
"""``format`` entry of the metadata of adapter files written by :meth:`MoELoRA.save_adapter`."""

_INIT_CHOICES = (True, False, "gaussian")
_SHARED_POOL: ThreadPool | None = None
_SHARED_POOL_LOCK = threading.Lock()


def default_pool() -> ThreadPool:
    """The thread pool that :class:`MoELoRA` layers share when given none.

    Created at first use with :func:`~ktsft.pool.default_num_threads` threads; layers of one
    model run one after the other, so one pool serves them all without oversubscribing the CPU.
    """
    global _SHARED_POOL
    with _SHARED_POOL_LOCK:
        if _SHARED_POOL is None:
            _SHARED_POOL = ThreadPool()
        return _SHARED_POOL


# ---- the autograd Function --------------------------------------------------------------------


class _Counter:
    """Counts the saved states of one engine layer that are still alive (see
    :attr:`MoELoRA.live_saved_states`)."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def add(self, holder: torch.Tensor) -> None:
        with self._lock:
            self.count += 1
        weakref.finalize(holder, self._drop)

    def _drop(self) -> None:
        with self._lock:
            self.count -= 1


_COUNTERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_COUNTERS_LOCK = threading.Lock()


def _counter(moe: MoESFT) -> _Counter:
    with _COUNTERS_LOCK:
        c = _COUNTERS.get(moe)
        if c is None:
            c = _COUNTERS[moe] = _Counter()
        return c


class MoELoRAFunction(torch.autograd.Function):
    """``out = MoE(x)`` with gradients for ``x``, the routing weights and the six LoRA tensors.

    The low-level autograd op behind :class:`MoELoRA` (which flattens, casts and pads the
    arguments first); call it as ``MoELoRAFunction.apply(moe, x, expert_ids, weights,
    *lora)``.

    Parameters
    ----------
    moe : MoESFT
        The engine layer; it must read exactly the six tensors given as ``lora``.
    x : torch.Tensor, bf16, shape [T, H]
        Tokens, C-contiguous; any T >= 0 (split into calls of at most ``max_len`` tokens).
    expert_ids : torch.Tensor, int64, shape [T, k]
        Routed experts (-1: none), ``k = moe.config.num_experts_per_tok``.
    weights : torch.Tensor, float32, shape [T, k]
        Routing weights, C-contiguous.
    *lora : torch.Tensor
        The six LoRA tensors in :data:`~ktsft.gradients.LORA_NAMES` order (bf16).

    Returns
    -------
    torch.Tensor, float32, shape [T, H]
    """

    @staticmethod
    def forward(ctx, moe, x, expert_ids, weights, *lora):
        """Runs the engine's forward, saving its state for this graph (see the class)."""
        T, L = x.shape[0], moe.config.max_len
        out = torch.empty((T, moe.config.hidden_size), dtype=torch.float32)
        states = []
        for s in range(0, T, L):
            e = min(T, s + L)
            _, saved = moe.forward(
                x[s:e], expert_ids[s:e], weights[s:e], out=out[s:e], return_saved=True
            )
            states.append((s, e, saved))
        # The states ride on a tensor saved for backward: freed with the graph, dropped and
        # recomputed by non-reentrant checkpointing like any saved activation.
        holder = torch.empty(0)
        holder._ktsft_states = states
        _counter(moe).add(holder)
        ctx.moe = moe
        ctx.k = expert_ids.shape[1]
        # The LoRA tensors are saved too, so PyTorch checks that they are not modified in
        # place between this forward and its backward (the engine reads them again there).
        ctx.save_for_backward(holder, *lora)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        """Gradients for ``x`` (bf16), ``weights`` (float32) and the six LoRA tensors (bf16)
        from ``grad_output`` [T, H]; None for ``moe`` and ``expert_ids``."""
        holder, *lora = ctx.saved_tensors
        moe = ctx.moe
        states = holder._ktsft_states
        need = ctx.needs_input_grad
        T = grad_output.shape[0]
        H = moe.config.hidden_size
        go = grad_output
        if go.dtype not in (torch.float32, torch.bfloat16):
            go = go.float()
        go = go.contiguous()
        shapes = moe.config.shapes()
        grad_x = torch.empty((T, H), dtype=torch.bfloat16)
        lora_grads = {}  # with no tokens: zero gradients (below)
        need_w = bool(need[3])
        grad_w = torch.empty((T, ctx.k), dtype=torch.float32) if need_w else None
        # Pieces of a split input: each piece's LoRA gradients are summed in float32 and
        # rounded to bf16 once at the end (not re-rounded after every piece).
        total = {n: torch.zeros(shapes[n]) for n in LORA_NAMES} if len(states) > 1 else None
        for s, e, saved in states:
            g = moe.backward(go[s:e], grad_input=grad_x[s:e], need_grad_weights=need_w, saved=saved)
            if need_w:
                grad_w[s:e] = g.weights
            lora_grads = g.lora()
            if total is not None:
                for n in LORA_NAMES:
                    total[n] += lora_grads[n]
        if total is not None:
            lora_grads = {n: t.to(torch.bfloat16) for n, t in total.items()}
        if not states:
            lora_grads = {n: torch.zeros(shapes[n], dtype=torch.bfloat16) for n in LORA_NAMES}
        del lora
        return (
            None,
            grad_x if need[1] else None,
            None,
            grad_w,
            *(lora_grads[n] if need[4 + i] else None for i, n in enumerate(LORA_NAMES)),
        )


def _forward_no_graph(moe: MoESFT, x, expert_ids, weights) -> torch.Tensor:
    """The forward without saving anything (no_grad, or nothing needs a gradient)."""
    T, L = x.shape[0], moe.config.max_len
    out = torch.empty((T, moe.config.hidden_size), dtype=torch.float32)
    for s in range(0, T, L):
        e = min(T, s + L)
        moe.forward(x[s:e], expert_ids[s:e], weights[s:e], out=out[s:e])
    return out


# ---- the module -------------------------------------------------------------------------------


def _layer_group_size(source_group: int, quant: str, group_size: int | None, source: str) -> int:
    """The int4 group size of a layer loaded from a source: the source's when it holds int4
    (``source_group`` > 0) and the layer is int4, which an explicit ``group_size`` must equal;
    else ``group_size`` (default 32)."""
    if source_group and quant == "int4":
        if group_size is not None and group_size != source_group:
            raise ValueError(
                f"group_size={group_size!r} was asked for, but {source} has group size "
                f"{source_group}: an int4 checkpoint loads with its own groups"
            )
        return source_group
    return 32 if group_size is None else group_size


def _shape(w: Any) -> tuple:
    return tuple(w.shape)


class MoELoRA(nn.Module):
    """The routed experts of one MoE layer with LoRA adapters, as a PyTorch module.

    Base weights are packed into the native engine here (quantized to int8 with
    ``quant="int8"``, to e4m3 with 128 x 128 block scales with ``quant="fp8"``); the module keeps
    no reference to them. The six LoRA tensors are
    ``torch.nn.Parameter`` objects in bf16 with the spec's shapes, read in place by the
    engine at every call.

    Parameters
    ----------
    gate_proj, up_proj : torch.Tensor, bf16, shape [E, I, H]
    down_proj : torch.Tensor, bf16, shape [E, H, I]
        Frozen base weights (PEFT layout: row = output feature). float16/float32/float64 are
        converted to bf16 expert by expert; NumPy ``ml_dtypes.bfloat16`` arrays work too.
    lora_rank : int, default 16
        r.
    lora_alpha : float, default 32.0
        The LoRA scale is ``lora_alpha / lora_rank``.
    quant : {"bf16", "int8", "fp8", "int4"}, default "bf16"
        How the engine stores the base weights (spec sections 5, 5.1 and 5.2). An fp8 checkpoint
        loads into an fp8 layer as it ships (:meth:`from_safetensors`), into a bf16 or int8
        layer dequantized one expert at a time; an int4 checkpoint (compressed-tensors, GGUF
        ``Q4_0``: :meth:`from_safetensors`, :meth:`from_gguf`) likewise into an int4 layer as
        it ships, into any other dequantized one expert at a time. An int4 layer quantizes
        float32 (and float16, and fp8 dequantized in float32) weights from their float32 values,
        bf16 ones in the engine: no rounding to bf16 on the way.
    max_len : int, default 4096
        Most tokens per engine call; longer inputs are run in pieces of ``max_len`` tokens.
    pool : ThreadPool, optional
        Native threads; default: :func:`default_pool`, shared by all layers.
    num_experts_per_tok : int, default 8
        The most experts per token (k) a call may route to; calls with fewer columns in
        ``expert_ids`` are padded with -1 (no work), more is an error.
    init_lora_weights : {True, "gaussian", False}, default True
        As in PEFT. True: A uniform in +-1/sqrt(fan_in) (PEFT's kaiming-uniform), B zero, so
        the layer starts as the base model. "gaussian": A normal with std 1/r, B zero. False:
        A and B both uniform in +-1/sqrt(fan_in) (not the base model; for tests). Uses torch's
        global random generator.
    isa : str, optional
        Kernel family; default ``KTSFT_ISA`` or "auto".
    group_size : {32, 64, 128}, default 32
        Columns per scale of int4 base weights (``quant="int4"`` only).

    Attributes
    ----------
    gate_lora_a, up_lora_a : torch.nn.Parameter, bf16, shape [E, r, H]
    gate_lora_b, up_lora_b : torch.nn.Parameter, bf16, shape [E, I, r]
    down_lora_a : torch.nn.Parameter, bf16, shape [E, r, I]
    down_lora_b : torch.nn.Parameter, bf16, shape [E, H, r]
        The trainable LoRA tensors (spec section 2).
    moe : MoESFT
        The engine layer (base weights, kernels, threads).

    Examples
    --------
    >>> layer = MoELoRA(gate_proj, up_proj, down_proj, lora_rank=8, lora_alpha=16.0)
    >>> opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    >>> y = layer(hidden_states, expert_ids, routing_weights)   # [..., H]
    >>> loss_fn(y).backward(); opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        gate_proj: Any,
        up_proj: Any,
        down_proj: Any,
        lora_rank: int = 16,
        lora_alpha: float = 32.0,
        quant: str = "bf16",
        max_len: int = 4096,
        pool: ThreadPool | None = None,
        *,
        num_experts_per_tok: int = 8,
        init_lora_weights: bool | str = True,
        isa: str | None = None,
        group_size: int = 32,
    ):
        base = {"gate_proj": gate_proj, "up_proj": up_proj, "down_proj": down_proj}
        for n, w in base.items():
            if not isinstance(w, (torch.Tensor, np.ndarray)):
                raise TypeError(
                    f"{n} must be a torch.Tensor or numpy.ndarray, got {type(w).__name__}"
                )
            if isinstance(w, torch.Tensor) and (not w.is_floating_point() or w.element_size() < 2):
                raise TypeError(
                    f"{n} must have dtype bfloat16 (float16/float32/float64 are converted), "
                    f"got {w.dtype}"
                )
            if len(w.shape) != 3:
                raise ValueError(
                    f"{n} must have 3 dimensions ([E, I, H] for gate/up, [E, H, I] for down), "
                    f"got shape {list(w.shape)}"
                )
        E, I, H = _shape(gate_proj)
        expected = {"gate_proj": (E, I, H), "up_proj": (E, I, H), "down_proj": (E, H, I)}
        for n, w in base.items():
            if _shape(w) != expected[n]:
                raise ValueError(
                    f"{n} must have shape {list(expected[n])} (from gate_proj [E, I, H]), "
                    f"got {list(w.shape)}"
                )
        super().__init__()
        self._setup(
            E,
            H,
            I,
            lora_rank,
            lora_alpha,
            quant,
            max_len,
            pool,
            num_experts_per_tok,
            isa,
            group_size=group_size,
        )
        views = base
        if all(
            isinstance(w, torch.Tensor)
            and w.dtype == torch.bfloat16
            and w.device.type == "cpu"
            and w.is_contiguous()
            for w in views.values()
        ):  # packed straight from the caller's tensors, no copy
            self.moe.load_experts(0, *(w.detach() for w in views.values()))
        else:  # converted one expert at a time: at most one expert's copy besides the packed
            for e in range(E):
                self._load_float_expert(
                    e, {n: views[n][e] for n in BASE_NAMES}, {n: f"{n}[{e}]" for n in BASE_NAMES}
                )
        self.reset_lora_parameters(init_lora_weights)

    def _setup(
        self,
        E: int,
        H: int,
        I: int,
        lora_rank: int = 16,
        lora_alpha: float = 32.0,
        quant: str = "bf16",
        max_len: int = 4096,
        pool: ThreadPool | None = None,
        num_experts_per_tok: int = 8,
        isa: str | None = None,
        *,
        group_size: int = 32,
    ) -> None:
        """Creates the engine (without base weights) and the six LoRA parameters."""
        k = num_experts_per_tok
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"num_experts_per_tok must be an int >= 1, got {k!r}")
        if pool is not None and not isinstance(pool, ThreadPool):
            raise TypeError(f"pool must be a ktsft.ThreadPool, got {type(pool).__name__}")
        config = MoESFTConfig(
            int(E),
            int(k),
            int(H),
            int(I),
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            max_len=max_len,
            max_cache_depth=1,
            quant=quant,
            group_size=group_size,
        )
        shapes = config.shapes()
        for n in LORA_NAMES:
            self.register_parameter(n, nn.Parameter(torch.zeros(shapes[n], dtype=torch.bfloat16)))
        lora = {n: getattr(self, n) for n in LORA_NAMES}
        pool = pool if pool is not None else default_pool()
        self.moe = MoESFT(config, pool=pool, isa=isa, **lora)

    # ---- construction from a checkpoint ------------------------------------------------------

    @classmethod
    def from_safetensors(
        cls,
        files: str | os.PathLike | Sequence[str | os.PathLike],
        prefix: str,
        expert_num: int,
        key_format: str = DEFAULT_KEY_FORMAT,
        *,
        proj_names: Mapping[str, str] | None = None,
        **options: Any,
    ) -> MoELoRA:
        """One MoE layer's experts from a Hugging Face style safetensors checkpoint.

        Streams expert by expert: each expert's three matrices are read (and converted to bf16
        if stored otherwise), packed, and dropped before the next, so peak memory stays near
        the packed size. Sharded checkpoints (``model-00001-of-00004.safetensors``, ...) are
        handled by passing every shard that holds this layer; other keys are ignored. The fused
        transformers 5 keys ``{prefix}.gate_up_proj`` [E, 2I, H] and ``{prefix}.down_proj``
        [E, H, I] are used when the per-expert keys of expert 0 are absent (layouts:
        :mod:`ktsft.checkpoint`).

        A compressed-tensors ``pack-quantized`` int4 checkpoint (``weight_packed``,
        ``weight_scale``, ``weight_shape``) loads into a ``quant="int4"`` layer exactly as it
        ships, no bf16 copy at any time, with the checkpoint's group size (``group_size`` may
        be left out; given, it must be the checkpoint's); into a layer of another mode each
        expert is dequantized (exactly, rounded to bf16 once) and stored as the layer stores it.

        Parameters
        ----------
        files : str, os.PathLike or sequence of them
            The safetensors file(s).
        prefix : str
            Key prefix of the layer's experts, e.g. ``"model.layers.3.mlp.experts"``.
        expert_num : int
            E; experts 0 .. E-1 must all be present.
        key_format : str, default ``DEFAULT_KEY_FORMAT``
            Python format string of one key with the fields ``{prefix}``, ``{expert}`` and
            ``{proj}``; the stored matrices are [I, H] (gate, up) and [H, I] (down), row =
            output feature as in ``nn.Linear``.
        proj_names : mapping, optional
            ``{proj}`` values for ``"gate_proj"``, ``"up_proj"``, ``"down_proj"``, e.g.
            ``{"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}`` for Mixtral.
        **options
            Further :class:`MoELoRA` arguments (``lora_rank``, ``lora_alpha``, ``quant``,
            ``max_len``, ``pool``, ``num_experts_per_tok``, ``init_lora_weights``, ``isa``,
            ``group_size``).

        Returns
        -------
        MoELoRA
        """
        index = SafetensorsIndex(files)
        layout = find_experts(index, prefix, expert_num, key_format, proj_names=proj_names)
        return cls._loaded(
            (layout.expert_num, layout.hidden_size, layout.intermediate_size),
            layout.int4_group_size,
            f"the int4 checkpoint at {layout.prefix!r}",
            options,
            lambda layer: layer.load_experts_from(index, layout),
        )

    @classmethod
    def from_gguf(cls, path: str | os.PathLike, layer: int, **options: Any) -> MoELoRA:
        """One llama.cpp MoE layer's ``Q4_0`` experts from a GGUF file (needs ``gguf``).

        Reads ``blk.{layer}.ffn_gate_exps.weight``, ``ffn_up_exps`` and ``ffn_down_exps``
        (:class:`ktsft.int4_formats.GGUFExperts`) expert by expert from the memory-mapped
        file. With ``quant="int4"`` (group size 32, Q4_0's block) the nibbles and the fp16 block
        scales load exactly as they are; in any other mode each expert is dequantized
        (``d * (q - 8)``, exact, rounded to bf16 once) and stored as the layer stores it.

        Parameters
        ----------
        path : str or os.PathLike
        layer : int
            The block index N.
        **options
            Further :class:`MoELoRA` arguments, as in :meth:`from_safetensors`.

        Returns
        -------
        MoELoRA
        """
        experts = GGUFExperts(path, layer)

        def load(module: MoELoRA) -> None:
            for e, mats in experts:
                module._load_int4_expert(e, mats, experts.group_size)

        return cls._loaded(
            (experts.expert_num, experts.hidden_size, experts.intermediate_size),
            experts.group_size,
            f"the Q4_0 experts of blk.{layer} in {experts.path}",
            options,
            load,
        )

    @classmethod
    def _loaded(cls, sizes: tuple, source_group: int, source: str, options: dict, load) -> MoELoRA:
        """A layer of ``sizes`` (E, H, I) built from ``options`` (the group size settled against
        the source's, see :func:`_layer_group_size`), its experts packed by ``load(layer)`` and
        its LoRA tensors initialized."""
        options["group_size"] = _layer_group_size(
            source_group, options.get("quant", "bf16"), options.get("group_size"), source
        )
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        init = options.pop("init_lora_weights", True)
        layer._setup(*sizes, **options)
        load(layer)
        layer.reset_lora_parameters(init)
        return layer

    def _load_int4_expert(self, e: int, mats: dict, group_size: int) -> None:
        """Expert ``e`` given in ktsft's int4 layout: as it is into an int4 layer (of the same
        group size), dequantized to bf16 into any other."""
        if self.quant == "int4":
            if group_size != self.moe.config.group_size:
                raise ValueError(
                    f"the checkpoint's int4 experts have group size {group_size}, this layer "
                    f"{self.moe.config.group_size}"
                )
            self.moe.load_experts(e, **mats)
            return
        bf16 = dequantize_int4_expert(mats, self.hidden_size, self.intermediate_size, group_size)
        del mats
        self.moe.load_experts(e, *(bf16[n] for n in BASE_NAMES))

    def load_experts_from(self, index: SafetensorsIndex, layout: ExpertLayout) -> None:
        """Packs (or quantizes) the experts described by ``layout`` into the engine, streaming
        them from ``index`` one expert at a time (see :mod:`ktsft.checkpoint`).

        Parameters
        ----------
        index : ktsft.checkpoint.SafetensorsIndex
        layout : ktsft.checkpoint.ExpertLayout
            Found by :func:`ktsft.checkpoint.find_experts`; its E, H and I must be this layer's.
        """
        sizes = (layout.expert_num, layout.hidden_size, layout.intermediate_size)
        if sizes != (self.expert_num, self.hidden_size, self.intermediate_size):
            raise ValueError(
                f"the checkpoint's experts at {layout.prefix!r} have (E, H, I) = {sizes}, this "
                f"layer has {(self.expert_num, self.hidden_size, self.intermediate_size)}"
            )
        for e, mats in iter_experts(index, layout):
            if layout.int4_group_size:
                self._load_int4_expert(e, mats, layout.int4_group_size)
                continue
            if layout.fp8 and self.quant == "fp8":  # e4m3 bytes and scales as they ship
                self.moe.load_experts(e, **mats)
                continue
            if layout.fp8:  # dequantized one expert at a time, then stored as this layer does
                dtype = torch.float32 if self.quant == "int4" else torch.bfloat16
                mats = dequantize_fp8_expert(mats, dtype)
            self._load_float_expert(e, mats, {n: layout.source(e, n) for n in BASE_NAMES})
            del mats

    def _load_float_expert(self, e: int, mats: Mapping, sources: Mapping) -> None:
        """Expert ``e`` from floating matrices: bf16 ones packed (or quantized by the engine) as
        they are; others rounded to bf16 first, except in an int4 layer, which quantizes them
        from their float32 values (spec section 5.2: fp32 and fp8 sources are not rounded to
        bf16 on the way)."""
        if self.quant == "int4" and any(
            not (isinstance(mats[n], torch.Tensor) and mats[n].dtype == torch.bfloat16)
            for n in BASE_NAMES
        ):
            quantized = {}
            for n, s in zip(BASE_NAMES, ("gate_scale", "up_scale", "down_scale")):
                w = mats[n]
                if isinstance(w, torch.Tensor):
                    if not w.is_floating_point() or w.dtype.itemsize == 1:
                        to_bf16_expert(w, sources[n])  # raises its error for these dtypes
                    w = w.detach().to(device="cpu", dtype=torch.float32).numpy()
                quantized[n], quantized[s] = reference.quantize_int4(w, self.moe.config.group_size)
            self.moe.load_experts(e, **quantized)
            return
        self.moe.load_experts(e, *(to_bf16_expert(mats[n], sources[n]) for n in BASE_NAMES))

    # ---- LoRA parameters ---------------------------------------------------------------------

    def reset_lora_parameters(self, init_lora_weights: bool | str = True) -> None:
        """Re-initializes the six LoRA tensors in place (see ``init_lora_weights`` above)."""
        if not (init_lora_weights is True or init_lora_weights is False) and (
            init_lora_weights != "gaussian"
        ):
            raise ValueError(
                f"init_lora_weights must be one of {_INIT_CHOICES}, got {init_lora_weights!r}"
            )
        r = self.lora_rank
        with torch.no_grad():
            for n in LORA_NAMES:
                p = getattr(self, n)
                fan_in = p.shape[-1]
                if n.endswith("_a") and init_lora_weights == "gaussian":
                    v = torch.randn(p.shape, dtype=torch.float32) / r
                elif n.endswith("_a") or init_lora_weights is False:
                    bound = 1.0 / math.sqrt(fan_in)
                    v = torch.empty(p.shape, dtype=torch.float32).uniform_(-bound, bound)
                else:
                    v = torch.zeros(p.shape, dtype=torch.float32)
                p.copy_(v)

    def lora_parameters(self) -> dict:
        """The six LoRA parameters keyed by :data:`~ktsft.gradients.LORA_NAMES`."""
        return {n: getattr(self, n) for n in LORA_NAMES}

    # ---- forward -------------------------------------------------------------------------------

    def forward(
        self, hidden_states: torch.Tensor, expert_ids: torch.Tensor, routing_weights: torch.Tensor
    ) -> torch.Tensor:
        """``out_t = sum_j routing_weights[t, j] * expert_{expert_ids[t, j]}(hidden_states_t)``.

        Parameters
        ----------
        hidden_states : torch.Tensor, floating, shape [..., H]
            Tokens on the CPU (bf16 is used as is; other dtypes are rounded to bf16).
        expert_ids : torch.Tensor, int64 or int32, shape [..., k]
            Routed experts, k <= ``num_experts_per_tok``; -1 means no expert for that slot.
        routing_weights : torch.Tensor, floating, shape [..., k]
            Routing weights (used in float32); their gradient is dL/d weight.

        Returns
        -------
        torch.Tensor, shape [..., H], dtype of ``hidden_states``
        """
        x, ids, w, lead = self._check_inputs(hidden_states, expert_ids, routing_weights)
        params = [getattr(self, n) for n in LORA_NAMES]
        lora = self.moe.lora
        if any(lora[n] is not p for n, p in zip(LORA_NAMES, params)):
            self.moe.set_lora(**dict(zip(LORA_NAMES, params)))  # a parameter was replaced
        record = torch.is_grad_enabled() and (
            x.requires_grad or w.requires_grad or any(p.requires_grad for p in params)
        )
        if record:
            out = MoELoRAFunction.apply(self.moe, x, ids, w, *params)
        else:
            out = _forward_no_graph(self.moe, x.detach(), ids, w.detach())
        return out.to(hidden_states.dtype).reshape(*lead, self.hidden_size)

    def _check_inputs(self, hidden_states, expert_ids, routing_weights):
        H, k = self.hidden_size, self.num_experts_per_tok
        args = {
            "hidden_states": hidden_states,
            "expert_ids": expert_ids,
            "routing_weights": routing_weights,
        }
        for n, a in args.items():
            if not isinstance(a, torch.Tensor):
                raise TypeError(f"{n} must be a torch.Tensor, got {type(a).__name__}")
            if a.device.type != "cpu":
                raise ValueError(
                    f"{n} must be on the CPU (the experts run there), got a tensor on {a.device}; "
                    "pass .cpu() and move the result back"
                )
        if not hidden_states.is_floating_point():
            raise TypeError(f"hidden_states must be floating point, got {hidden_states.dtype}")
        if hidden_states.dim() < 1 or hidden_states.shape[-1] != H:
            raise ValueError(
                f"hidden_states must have shape [..., {H}] (hidden_size), got "
                f"{list(hidden_states.shape)}"
            )
        lead = tuple(hidden_states.shape[:-1])
        if expert_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"expert_ids must have dtype int64 or int32, got {expert_ids.dtype}")
        if tuple(expert_ids.shape[:-1]) != lead or expert_ids.dim() != len(lead) + 1:
            raise ValueError(
                f"expert_ids must have shape {[*lead, 'k']} (hidden_states' leading dims), "
                f"got {list(expert_ids.shape)}"
            )
        kk = expert_ids.shape[-1]
        if not 1 <= kk <= k:
            raise ValueError(
                f"expert_ids has {kk} experts per token; expected 1 .. num_experts_per_tok = "
                f"{k} (set num_experts_per_tok when building the layer)"
            )
        if not routing_weights.is_floating_point():
            raise TypeError(f"routing_weights must be floating point, got {routing_weights.dtype}")
        if tuple(routing_weights.shape) != tuple(expert_ids.shape):
            raise ValueError(
                f"routing_weights must have the shape of expert_ids {list(expert_ids.shape)}, "
                f"got {list(routing_weights.shape)}"
            )
        T = math.prod(lead)
        x = hidden_states.reshape(T, H).to(torch.bfloat16).contiguous()
        ids = expert_ids.detach().reshape(T, kk).to(torch.int64)
        w = routing_weights.reshape(T, kk).to(torch.float32)
        if kk < k:  # pad to the engine's k with "no expert" slots
            ids = torch.cat([ids, ids.new_full((T, k - kk), -1)], dim=1)
            w = torch.cat([w, w.new_zeros((T, k - kk))], dim=1)
        return x, ids.contiguous(), w.contiguous(), lead

    # ---- adapters ------------------------------------------------------------------------------

    def adapter_metadata(self) -> dict:
        """The metadata written into adapter files (all values are strings)."""
        return {
            "format": ADAPTER_FORMAT,
            "lora_rank": str(self.lora_rank),
            "lora_alpha": repr(float(self.lora_alpha)),
            "expert_num": str(self.expert_num),
            "hidden_size": str(self.hidden_size),
            "intermediate_size": str(self.intermediate_size),
        }

    def save_adapter(self, path: str | os.PathLike) -> None:
        """Writes the six LoRA tensors to a safetensors file.

        Keys are the parameter names (``gate_lora_a``, ``gate_lora_b``, ``up_lora_a``,
        ``up_lora_b``, ``down_lora_a``, ``down_lora_b``), values bf16 with the spec's shapes;
        the metadata holds :meth:`adapter_metadata` (rank, alpha and the layer sizes).

        Parameters
        ----------
        path : str or os.PathLike
        """
        from safetensors.torch import save_file

        tensors = {n: getattr(self, n).detach().contiguous() for n in LORA_NAMES}
        save_file(tensors, os.fspath(path), metadata=self.adapter_metadata())

    def load_adapter(self, path: str | os.PathLike, *, check_alpha: bool = True) -> None:
        """Copies LoRA tensors from a safetensors file into the parameters, in place.

        The parameters stay the same objects (optimizers and the engine keep working with
        them). Other float dtypes in the file are rounded to bf16.

        Parameters
        ----------
        path : str or os.PathLike
            A file with the six keys of :meth:`save_adapter` and no others.
        check_alpha : bool, default True
            Refuse a file whose metadata records another ``lora_alpha`` (it would change the
            adapter's effect: the scale is alpha / r).
        """
        from safetensors import safe_open

        path = os.fspath(path)
        with safe_open(path, framework="pt") as f:
            keys = set(f.keys())
            meta = f.metadata() or {}
            missing = [n for n in LORA_NAMES if n not in keys]
            extra = sorted(keys - set(LORA_NAMES))
            if missing or extra:
                raise KeyError(
                    f"{path}: an adapter needs exactly the keys {list(LORA_NAMES)}; missing "
                    f"{missing}, unexpected {extra}"
                )
            if check_alpha and "lora_alpha" in meta:
                alpha = float(meta["lora_alpha"])
                if alpha != float(self.lora_alpha):
                    raise ValueError(
                        f"{path} was saved with lora_alpha = {alpha}, this layer has "
                        f"lora_alpha = {self.lora_alpha} (pass check_alpha=False to load anyway)"
                    )
            tensors = {}
            for n in LORA_NAMES:
                t = f.get_tensor(n)
                p = getattr(self, n)
                if tuple(t.shape) != tuple(p.shape):
                    raise ValueError(
                        f"{path}: {n} must have shape {list(p.shape)}, got {list(t.shape)}"
                    )
                if not t.is_floating_point():
                    raise TypeError(f"{path}: {n} must be floating point, got {t.dtype}")
                tensors[n] = t
        with torch.no_grad():  # all checked first: a bad file changes nothing
            for n, t in tensors.items():
                getattr(self, n).copy_(t)

    def merged_weights(self) -> dict:
        """Base weights with the adapters folded in, for serving stacks without LoRA.

        ``W + s * B @ A`` per expert and projection (``s = lora_alpha / lora_rank``),
        computed in float32 and rounded to bf16 once. In int8 and fp8 mode ``W`` is the
        dequantized weight the engine uses (:meth:`ktsft.MoESFT.dequantized_weights`). Built one
        expert at a time.

        Returns
        -------
        dict of torch.Tensor
            ``"gate_proj"``, ``"up_proj"`` bf16 [E, I, H] and ``"down_proj"`` bf16 [E, H, I].
        """
        E, H, I = self.expert_num, self.hidden_size, self.intermediate_size
        s = self.scaling
        out = {
            "gate_proj": torch.empty((E, I, H), dtype=torch.bfloat16),
            "up_proj": torch.empty((E, I, H), dtype=torch.bfloat16),
            "down_proj": torch.empty((E, H, I), dtype=torch.bfloat16),
        }
        with torch.no_grad():
            for e in range(E):
                base = self.moe.dequantized_weights(e, 1)
                for proj, part in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
                    W = torch.from_numpy(base[proj][0])
                    A = getattr(self, f"{part}_lora_a")[e].float()
                    B = getattr(self, f"{part}_lora_b")[e].float()
                    W.addmm_(B, A, alpha=s)
                    out[proj][e] = W.to(torch.bfloat16)
        return out

    # ---- properties ----------------------------------------------------------------------------

    @property
    def expert_num(self) -> int:
        """E."""
        return self.moe.config.expert_num

    @property
    def hidden_size(self) -> int:
        """H."""
        return self.moe.config.hidden_size

    @property
    def intermediate_size(self) -> int:
        """I."""
        return self.moe.config.intermediate_size

    @property
    def num_experts_per_tok(self) -> int:
        """The most experts per token a call may use (k)."""
        return self.moe.config.num_experts_per_tok

    @property
    def lora_rank(self) -> int:
        """r."""
        return self.moe.config.lora_rank

    @property
    def lora_alpha(self) -> float:
        """LoRA alpha."""
        return self.moe.config.lora_alpha

    @property
    def scaling(self) -> float:
        """``lora_alpha / lora_rank``."""
        return self.moe.config.scale

    @property
    def quant(self) -> str:
        """ "bf16", "int8", "fp8" or "int4": how the base weights are stored."""
        return self.moe.config.quant

    @property
    def max_len(self) -> int:
        """Most tokens of one engine call (longer inputs are split)."""
        return self.moe.config.max_len

    @property
    def live_saved_states(self) -> int:
        """Forwards of this layer whose saved state is alive (waiting for a backward)."""
        return _counter(self.moe).count

    def extra_repr(self) -> str:
        return (
            f"expert_num={self.expert_num}, hidden_size={self.hidden_size}, "
            f"intermediate_size={self.intermediate_size}, lora_rank={self.lora_rank}, "
            f"lora_alpha={self.lora_alpha}, quant={self.quant!r}, "
            f"num_experts_per_tok={self.num_experts_per_tok}, isa={self.moe.isa!r}"
        )
