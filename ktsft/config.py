"""The layer's sizes and options."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

QUANT_MODES = ("bf16", "int8", "fp8", "int4")
GROUP_SIZES = (32, 64, 128)
"""The int4 group sizes (columns per scale) the engine takes."""
SIZE_FIELDS = (
    "expert_num",
    "num_experts_per_tok",
    "hidden_size",
    "intermediate_size",
    "lora_rank",
    "max_len",
    "max_cache_depth",
)
"""The integer sizes of a layer, each checked to be in [1, 2**31)."""


@dataclass(frozen=True)
class MoESFTConfig:
    """Sizes and options of one MoE layer (spec section 8.2).

    Parameters
    ----------
    expert_num : int
        E, the number of routed experts.
    num_experts_per_tok : int
        k, the experts each token is routed to (columns of ``expert_ids``).
    hidden_size : int
        H, the model width (rows of ``down_proj``, columns of ``gate_proj``/``up_proj``).
    intermediate_size : int
        I, each expert's intermediate size.
    lora_rank : int, default 16
        r, the LoRA rank.
    lora_alpha : float, default 32.0
        LoRA scale numerator; the adapters are scaled by ``lora_alpha / lora_rank``.
    max_len : int, default 4096
        The most tokens one forward may take.
    max_cache_depth : int, default 1
        How many forwards saved for backward may be pending at once.
    quant : {"bf16", "int8", "fp8", "int4"}, default "bf16"
        Storage of the frozen base weights: as given, int8 with one scale per row (spec
        section 5), e4m3 with one scale per 128 x 128 block (spec section 5.1), or signed
        4-bit with one scale per row and group of ``group_size`` columns (spec section 5.2).
    group_size : {32, 64, 128}, default 32
        Columns per scale of int4 base weights (used with ``quant="int4"`` only).
    """

    expert_num: int
    num_experts_per_tok: int
    hidden_size: int
    intermediate_size: int
    lora_rank: int = 16
    lora_alpha: float = 32.0
    max_len: int = 4096
    max_cache_depth: int = 1
    quant: str = "bf16"
    group_size: int = 32

    def __post_init__(self):
        for name in SIZE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            value = int(value)  # NumPy integers too
            object.__setattr__(self, name, value)
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
            if value >= 2**31:
                raise ValueError(f"{name} must be < 2**31, got {value}")
        alpha = self.lora_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or alpha != alpha:
            raise TypeError(f"lora_alpha must be a number, got {alpha!r}")
        object.__setattr__(self, "lora_alpha", float(alpha))
        if self.quant not in QUANT_MODES:
            raise ValueError(f"quant must be one of {QUANT_MODES}, got {self.quant!r}")
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, numbers.Integral) or int(g) not in GROUP_SIZES:
            raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {g!r}")
        object.__setattr__(self, "group_size", int(g))

    @property
    def scale(self) -> float:
        """The LoRA scale ``lora_alpha / lora_rank``."""
        return self.lora_alpha / self.lora_rank

    def shapes(self) -> dict:
        """Expected shape of each base weight and LoRA tensor, keyed by name."""
        E, H, I, r = self.expert_num, self.hidden_size, self.intermediate_size, self.lora_rank
        return {
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
