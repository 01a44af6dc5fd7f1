"""ktsft: CPU kernels for LoRA fine-tuning of Mixture-of-Experts layers.

Routed SwiGLU experts with LoRA on gate, up and down; frozen base weights packed once;
forward and backward (input, the six LoRA tensors, routing weights) on native threads.

Main entry points: :class:`MoESFT` with :class:`MoESFTConfig` and :class:`ThreadPool`;
:mod:`ktsft.reference` (NumPy float64 oracle); :mod:`ktsft.kt_kernel_ext` (the predecessor's
interface); :func:`runtime_info`.
"""

import importlib.machinery as _machinery
import importlib.util as _util
import os as _os
import sys as _sys


def _installed_package_dir(source_dir: str):
    """Another ``ktsft`` directory on sys.path that holds the compiled extension, or None."""
    for entry in _sys.path:
        candidate = _os.path.join(entry or _os.getcwd(), "ktsft")
        if _os.path.realpath(candidate) == _os.path.realpath(source_dir):
            continue
        if _os.path.isdir(candidate) and any(
            name.startswith("_core.") and name.endswith(tuple(_machinery.EXTENSION_SUFFIXES))
            for name in _os.listdir(candidate)
        ):
            return candidate
    return None


if _util.find_spec(__name__ + "._core") is None:
    # A source checkout without its compiled extension came first on sys.path (e.g.
    # ``python -m ktsft`` in the repository root after ``pip install .``): serve the package
    # from the installed build instead of failing.
    _installed = _installed_package_dir(__path__[0])
    if _installed is None:
        raise ImportError(
            f"ktsft's compiled extension (_core) is not built next to {__path__[0]} and no "
            "installed ktsft was found: run `pip install .` first"
        )
    __path__[:] = [_installed]

from . import kt_kernel_ext, reference  # noqa: E402
from ._core import EngineStateError, ISAUnavailableError, SavedState  # noqa: E402
from .config import MoESFTConfig  # noqa: E402
from .gradients import Gradients  # noqa: E402
from .moe import MoESFT  # noqa: E402
from .pool import ThreadPool  # noqa: E402
from .runtime import runtime_info  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "EngineStateError",
    "Gradients",
    "ISAUnavailableError",
    "MoESFT",
    "MoESFTConfig",
    "SavedState",
    "ThreadPool",
    "kt_kernel_ext",
    "reference",
    "runtime_info",
]
