"""NumPy / PyTorch arrays to (address, shape, dtype) without copies, and back.

bf16 arrays are accepted as ``ml_dtypes.bfloat16``, as raw ``uint16`` bits, or as torch
``bfloat16`` tensors. Torch stays optional: it is only looked at when a tensor is passed.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)


def is_torch(a: Any) -> bool:
    """True for a ``torch.Tensor`` (without importing torch)."""
    return type(a).__module__.startswith("torch") and hasattr(a, "data_ptr")


@dataclass(frozen=True)
class View:
    """What the engine needs of an array: where it is and what it holds."""

    ptr: int
    shape: tuple
    dtype: str  # "bfloat16", "float32", "int64", "int32", ...
    contiguous: bool
    kind: str  # "numpy", "numpy-bits" (uint16 holding bf16) or "torch"


def view(a: Any, name: str) -> View:
    """Describes ``a`` without copying; TypeError for anything but a CPU ndarray or tensor."""
    if isinstance(a, np.ndarray):
        if a.dtype == BF16:
            dtype, kind = "bfloat16", "numpy"
        elif a.dtype == np.uint16:
            dtype, kind = "bfloat16", "numpy-bits"
        else:
            dtype, kind = a.dtype.name, "numpy"
        contiguous = a.flags.c_contiguous
        return View(a.ctypes.data if a.size else 0, a.shape, dtype, contiguous, kind)
    if is_torch(a):
        if a.device.type != "cpu":
            raise TypeError(f"{name} must be a CPU tensor, got a tensor on {a.device}")
        dtype = str(a.dtype).replace("torch.", "")
        return View(a.data_ptr(), tuple(a.shape), dtype, a.is_contiguous(), "torch")
    raise TypeError(
        f"{name} must be a numpy.ndarray or a torch.Tensor, got {type(a).__module__}."
        f"{type(a).__qualname__}"
    )


def checked(a: Any, name: str, shape: tuple, dtypes: tuple, *, contiguous: bool = True) -> View:
    """``view(a)`` after checking dtype, shape and layout; the message names the argument."""
    v = view(a, name)
    if v.dtype not in dtypes:
        expected = " or ".join(dtypes)
        raise TypeError(f"{name} must have dtype {expected}, got {v.dtype}")
    if tuple(v.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(v.shape)}")
    if contiguous and not v.contiguous:
        raise ValueError(
            f"{name} must be C-contiguous (the engine reads it in place, without a copy); "
            "pass .contiguous() / np.ascontiguousarray(...)"
        )
    return v


def empty(kind: str, shape: tuple, dtype: str, *, zero: bool = False) -> Any:
    """A new array of the caller's kind: ``kind`` as in :class:`View`, dtype a View dtype."""
    if kind == "torch":
        import torch

        make = torch.zeros if zero else torch.empty
        return make(shape, dtype=getattr(torch, dtype))
    return (np.zeros if zero else np.empty)(shape, dtype=_numpy_dtype(kind, dtype))


def _numpy_dtype(kind: str, dtype: str) -> np.dtype:
    """The NumPy dtype of a new array of the caller's kind (bf16 as raw bits for "numpy-bits")."""
    if dtype == "bfloat16" and kind == "numpy-bits":
        return np.dtype(np.uint16)
    return np.dtype({"bfloat16": BF16, "float32": np.float32}[dtype])


def zeros_mapped(kind: str, shape: tuple, dtype: str, huge: bool = False) -> Any:
    """A new zero array on fresh anonymous pages of its own mapping.

    The operating system hands such pages out zeroed, and only when first written: a gradient
    buffer of which backward writes only the experts that got tokens costs no time and no memory
    for the others (a zero-filled ``empty`` buffer would touch every page). The mapping is
    private (a shared anonymous one is shmem: its page faults and its release cost about twice
    as much). It asks for small pages unless ``huge``: a huge page zeroes 2 MB at once, at memory
    speed, which pays when (nearly) every expert gets a token and every page is written anyway,
    and wastes time when only a few are (each expert's slice written zeroes its 2 MB). The
    mapping is released with the array.
    """
    np_dtype = _numpy_dtype(kind, dtype)
    nbytes = math.prod(shape) * np_dtype.itemsize
    if nbytes == 0:
        return empty(kind, shape, dtype, zero=True)
    if hasattr(mmap, "MAP_PRIVATE"):
        pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        advice = getattr(mmap, "MADV_HUGEPAGE" if huge else "MADV_NOHUGEPAGE", None)
        if advice is not None:
            pages.madvise(advice)
    else:
        pages = mmap.mmap(-1, nbytes)
    if kind == "torch":
        import torch

        return torch.frombuffer(pages, dtype=getattr(torch, dtype)).view(shape)
    return np.frombuffer(pages, dtype=np_dtype).reshape(shape)


def as_int64_ids(a: Any, name: str, shape: tuple) -> tuple:
    """expert_ids as a C-contiguous int64 array (int32 is converted; the result keeps it alive).

    Returns (array, address).
    """
    v = view(a, name)
    if v.dtype not in ("int64", "int32"):
        raise TypeError(f"{name} must have dtype int64 or int32, got {v.dtype}")
    if tuple(v.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(v.shape)}")
    if v.dtype == "int64" and v.contiguous:
        return a, v.ptr
    if is_torch(a):
        a = a.detach().to(dtype=__import__("torch").int64).contiguous()
        return a, a.data_ptr()
    a = np.ascontiguousarray(a, dtype=np.int64)
    return a, a.ctypes.data
