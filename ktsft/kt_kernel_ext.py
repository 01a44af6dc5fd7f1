"""The seed-compatible API: the predecessor's interface over ktsft's engine.

A training loop written for the predecessor runs with only the import changed::

    import ktsft
    kt_kernel_ext = ktsft.kt_kernel_ext

    CPUInfer = kt_kernel_ext.CPUInfer(num_threads)
    config = kt_kernel_ext.moe.MOESFTConfig()
    ...                                   # sizes and tensor.data_ptr() pointers
    config.pool = CPUInfer.backend_
    moe = kt_kernel_ext.moe.AMXBF16_SFT_MOE(config)
    CPUInfer.submit(moe.load_weights_task()); CPUInfer.sync()
    CPUInfer.submit(moe.forward_sft_task(bsz_ptr, k, ids_ptr, w_ptr, x_ptr, out_ptr, True))
    CPUInfer.sync()

Pointers are integers (``tensor.data_ptr()``) and carry no shape or dtype: the arrays must be
contiguous with the spec's shapes and dtypes (bf16 weights, int64 ids, float32 routing weights
and float32 output). Errors surface as ``RuntimeError`` from :meth:`CPUInfer.sync`.
"""

from __future__ import annotations

import ctypes
import os
import types
from typing import Callable

from .config import SIZE_FIELDS, MoESFTConfig
from .gradients import LORA_NAMES
from .pool import ThreadPool

__all__ = ["CPUInfer", "moe"]


class _Task:
    """A unit of work for :meth:`CPUInfer.submit`; runs once, raising RuntimeError on error."""

    def __init__(self, name: str, fn: Callable[[], None]):
        self.name = name
        self._fn = fn

    def __call__(self) -> None:
        try:
            self._fn()
        except Exception as e:  # the seed API reports every failure as RuntimeError
            raise RuntimeError(f"{self.name}: {e}") from e

    def __repr__(self) -> str:
        return f"<kt_kernel_ext task {self.name}>"


class CPUInfer:
    """The predecessor's task runner: ``submit(task)`` queues, ``sync()`` waits and raises.

    Parameters
    ----------
    num_threads : int
        Native threads doing the math.
    """

    def __init__(self, num_threads: int):
        self.backend_ = ThreadPool(int(num_threads))

    def submit(self, task: Callable[[], None]) -> None:
        """Queues a task made by a ``*_task()`` method; returns at once."""
        if not callable(task):
            raise TypeError(f"submit() expects a task from a *_task() method, got {task!r}")
        self.backend_.submit(task)

    def sync(self) -> None:
        """Waits for every submitted task; raises RuntimeError for the first that failed."""
        self.backend_.sync()


class MOESFTConfig:
    """Sizes, pointers and the pool of one layer, set attribute by attribute."""

    _POINTERS = ("gate_proj", "up_proj", "down_proj") + LORA_NAMES

    def __init__(self):
        self.expert_num = 0
        self.num_experts_per_tok = 0
        self.hidden_size = 0
        self.intermediate_size = 0
        self.lora_rank = 16
        self.lora_alpha = 32.0
        self.max_cache_depth = 1
        self.max_len = 4096
        self.layer_idx = 0
        self.pool = None
        for name in self._POINTERS:
            setattr(self, name, 0)

    def __repr__(self) -> str:
        return (
            f"MOESFTConfig(expert_num={self.expert_num}, "
            f"num_experts_per_tok={self.num_experts_per_tok}, hidden_size={self.hidden_size}, "
            f"intermediate_size={self.intermediate_size}, lora_rank={self.lora_rank}, "
            f"lora_alpha={self.lora_alpha}, max_len={self.max_len}, "
            f"max_cache_depth={self.max_cache_depth}, layer_idx={self.layer_idx})"
        )


def _int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"MOESFTConfig.{name} must be an int, got {type(value).__name__}")
    return value


class AMXBF16_SFT_MOE:  # noqa: N801 - the predecessor's name
    """One layer with bf16 base weights; runs on any x86-64 CPU with its best kernels.

    Parameters
    ----------
    config : MOESFTConfig
        Sizes, the nine pointers and ``pool = CPUInfer.backend_``. The LoRA pointers are read
        at every call (zero copy); the base weights are packed by :meth:`load_weights_task`.
    """

    _quant = "bf16"

    def __init__(self, config: MOESFTConfig):
        from . import _core

        pool = config.pool
        if not isinstance(pool, ThreadPool):
            raise TypeError("config.pool must be set to CPUInfer.backend_")
        # The sizes get the Python API's checks (positive ints, < 2**31, a numeric alpha).
        c = MoESFTConfig(
            **{n: getattr(config, n) for n in SIZE_FIELDS}, lora_alpha=config.lora_alpha
        )
        self._config = config
        self._k = c.num_experts_per_tok
        self._engine = _core.Engine(
            pool._native,
            c.expert_num,
            c.num_experts_per_tok,
            c.hidden_size,
            c.intermediate_size,
            c.lora_rank,
            c.lora_alpha,
            c.max_len,
            c.max_cache_depth,
            os.environ.get("KTSFT_ISA", "auto"),
            self._quant,
        )
        self._lora = tuple(_int(getattr(config, n), n) for n in LORA_NAMES)
        self._base = tuple(
            _int(getattr(config, n), n) for n in ("gate_proj", "up_proj", "down_proj")
        )

    def load_weights_task(self) -> _Task:
        """Packs the base weights from ``config.gate_proj``/``up_proj``/``down_proj``."""
        return _Task("load_weights_task", lambda: self._engine.load_weights(*self._base))

    def warm_up_task(self) -> _Task:
        """Runs one small forward (touches the packed weights and the pool's threads)."""

        def run():
            import numpy as np

            H = self._config.hidden_size
            k = self._k
            ids = (np.arange(k, dtype=np.int64) % self._config.expert_num).reshape(1, k)
            w = np.full((1, k), 1.0 / k, dtype=np.float32)
            x = np.zeros((1, H), dtype=np.uint16)
            out = np.empty((1, H), dtype=np.float32)
            self._engine.forward(
                1,
                k,
                ids.ctypes.data,
                w.ctypes.data,
                x.ctypes.data,
                out.ctypes.data,
                False,
                self._lora,
                False,
            )

        return _Task("warm_up_task", run)

    def forward_sft_task(
        self,
        bsz_ptr: int,
        k: int,
        expert_ids_ptr: int,
        weights_ptr: int,
        input_ptr: int,
        output_ptr: int,
        save_for_backward: bool,
    ) -> _Task:
        """Forward of T = ``*bsz_ptr`` (int64) tokens into a float32 [T, H] output."""

        def run():
            T = ctypes.c_int64.from_address(bsz_ptr).value if bsz_ptr else 0
            self._engine.forward(
                T,
                int(k),
                expert_ids_ptr,
                weights_ptr,
                input_ptr,
                output_ptr,
                False,
                self._lora,
                bool(save_for_backward),
            )

        return _Task("forward_sft_task", run)

    def backward_task(
        self,
        grad_output_ptr: int,
        grad_input_ptr: int,
        grad_gate_lora_a_ptr: int,
        grad_gate_lora_b_ptr: int,
        grad_up_lora_a_ptr: int,
        grad_up_lora_b_ptr: int,
        grad_down_lora_a_ptr: int,
        grad_down_lora_b_ptr: int,
        grad_weights_ptr: int = 0,
    ) -> _Task:
        """Backward of the newest saved forward; bf16 grads overwritten, ``grad_weights_ptr``
        (float32 [T, k]) 0 when not wanted."""
        grads = (
            grad_gate_lora_a_ptr,
            grad_gate_lora_b_ptr,
            grad_up_lora_a_ptr,
            grad_up_lora_b_ptr,
            grad_down_lora_a_ptr,
            grad_down_lora_b_ptr,
        )

        def run():
            T = self._engine.cache_top_tokens
            self._engine.backward(
                T,
                grad_output_ptr,
                False,
                grad_input_ptr,
                grads,
                grad_weights_ptr,
                False,
                False,
                self._lora,
            )

        return _Task("backward_task", run)

    def update_lora_weights_task(
        self,
        gate_lora_a_ptr: int,
        gate_lora_b_ptr: int,
        up_lora_a_ptr: int,
        up_lora_b_ptr: int,
        down_lora_a_ptr: int,
        down_lora_b_ptr: int,
    ) -> _Task:
        """Re-points the six LoRA tensors (only for new allocations: in-place updates are seen
        without it)."""
        ptrs = (
            gate_lora_a_ptr,
            gate_lora_b_ptr,
            up_lora_a_ptr,
            up_lora_b_ptr,
            down_lora_a_ptr,
            down_lora_b_ptr,
        )

        def run():
            self._lora = tuple(_int(p, n) for p, n in zip(ptrs, LORA_NAMES))

        return _Task("update_lora_weights_task", run)


class AMXInt8_SFT_MOE(AMXBF16_SFT_MOE):  # noqa: N801 - the predecessor's name
    """One layer with int8 base weights (spec section 5); runs on any x86-64 CPU.

    ``config.gate_proj``/``up_proj``/``down_proj`` point at bf16 weights, quantized by
    :meth:`~AMXBF16_SFT_MOE.load_weights_task` (one scale per output row) into the only copy
    the engine keeps; the backward reads the same int8 bytes. Everything else as
    :class:`AMXBF16_SFT_MOE`.
    """

    _quant = "int8"


class AMXFP8_SFT_MOE(AMXBF16_SFT_MOE):  # noqa: N801 - named like the predecessor's classes
    """One layer with fp8 (e4m3) base weights and 128 x 128 block scales (spec section 5.1).

    ``config.gate_proj``/``up_proj``/``down_proj`` point at bf16 weights, quantized by
    :meth:`~AMXBF16_SFT_MOE.load_weights_task` into the only copy the engine keeps (to load an
    fp8 checkpoint as it ships, use :class:`ktsft.MoESFT` or :class:`ktsft.torch.MoELoRA`).
    Everything else as :class:`AMXBF16_SFT_MOE`.
    """

    _quant = "fp8"


moe = types.SimpleNamespace(
    MOESFTConfig=MOESFTConfig,
    AMXBF16_SFT_MOE=AMXBF16_SFT_MOE,
    AMXInt8_SFT_MOE=AMXInt8_SFT_MOE,
    AMXFP8_SFT_MOE=AMXFP8_SFT_MOE,
)
"""The predecessor's ``kt_kernel_ext.moe`` namespace."""
