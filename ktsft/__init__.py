"""ktsft: CPU kernels for LoRA fine-tuning of Mixture-of-Experts layers.

Routed SwiGLU experts with LoRA on gate, up and down; frozen base weights packed once;
forward and backward (input, the six LoRA tensors, routing weights) on native threads.

Main entry points: :class:`MoESFT` with :class:`MoESFTConfig` and :class:`ThreadPool`;
:mod:`ktsft.reference` (NumPy float64 oracle); :mod:`ktsft.kt_kernel_ext` (the predecessor's
interface); :func:`runtime_info`.
"""

from . import kt_kernel_ext, reference
from ._core import EngineStateError, ISAUnavailableError
from .config import MoESFTConfig
from .gradients import Gradients
from .moe import MoESFT
from .pool import ThreadPool
from .runtime import runtime_info

__version__ = "0.1.0"

__all__ = [
    "EngineStateError",
    "Gradients",
    "ISAUnavailableError",
    "MoESFT",
    "MoESFTConfig",
    "ThreadPool",
    "kt_kernel_ext",
    "reference",
    "runtime_info",
]
