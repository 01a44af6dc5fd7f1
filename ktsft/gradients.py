"""The container that backward passes return."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LORA_NAMES = (
    "gate_lora_a",
    "gate_lora_b",
    "up_lora_a",
    "up_lora_b",
    "down_lora_a",
    "down_lora_b",
)
"""The six LoRA tensor names, in the order every API uses."""

BASE_NAMES = ("gate_proj", "up_proj", "down_proj")
"""The three frozen base weight names."""


@dataclass
class Gradients:
    """Gradients of one backward pass.

    Attributes
    ----------
    input : array, shape [T, H]
        dL/dx (bf16 from the engine, float64 from :mod:`ktsft.reference`).
    gate_lora_a, up_lora_a : array, shape [E, r, H]
    gate_lora_b, up_lora_b : array, shape [E, I, r]
    down_lora_a : array, shape [E, r, I]
    down_lora_b : array, shape [E, H, r]
        Gradients of the six LoRA tensors (bf16 from the engine).
    weights : array, shape [T, k], or None
        dL/d routing weight (float32 from the engine), None when not requested.
    """

    input: Any
    gate_lora_a: Any
    gate_lora_b: Any
    up_lora_a: Any
    up_lora_b: Any
    down_lora_a: Any
    down_lora_b: Any
    weights: Any = None

    def lora(self) -> dict:
        """The six LoRA gradients as a dict keyed by :data:`~ktsft.gradients.LORA_NAMES`."""
        return {name: getattr(self, name) for name in LORA_NAMES}
