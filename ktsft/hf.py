"""Hugging Face transformers: ktsft as the experts backend of a transformers 5 model.

transformers 5 decorates every routed-experts class (Qwen2/3-MoE, DeepSeek-V2/V3, GLM-4.5 MoE,
Mixtral, ...) with ``@use_experts_implementation`` and dispatches its forward through
``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS`` by the name in
``config._experts_implementation``. This module registers ``"ktsft"`` there
(:func:`experts_forward`) and gives each experts module a :class:`~ktsft.torch.MoELoRA` engine
layer (spec section 8.4): the module's ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I]
are packed into the engine and set to ``None``, and the module gets the six LoRA tensors as bf16
``nn.Parameter`` objects with the spec section 2 names (``gate_lora_a`` ... ``down_lora_b``).
The router, shared experts, attention and everything else stay transformers'.

- :func:`from_pretrained` loads a model without ever holding its experts in torch memory: the
  model is built without expert tensors, transformers loads the rest, and each layer's experts
  stream from the safetensors shards into the engine one expert at a time.
- :func:`patch` does the same for a model already in memory.
- :func:`save_adapter` / :func:`load_adapter`: a PEFT adapter directory with per-expert keys (the
  layout vLLM and SGLang load and PEFT converts for transformers 5), plus any attention LoRA
  the user added with ``peft.get_peft_model``.
- :func:`save_merged`: a full checkpoint with the LoRA folded into the expert weights, for
  serving stacks without LoRA.

Threads: the engine runs on its own native pool (:func:`~ktsft.torch.default_pool`, one thread
per CPU this process may use, unless ``num_threads`` is given); torch's intra-op threads run
the rest of the model. Each experts call is synchronous, so the two take turns, and neither is
resized here. But torch's OpenMP workers busy-wait for a while after each parallel region
(libgomp's default), right when the engine's threads start: on 2 cores that made a training
step 2 to 10 times slower, at random. So importing this module before torch sets
``OMP_WAIT_POLICY=PASSIVE`` (unless the environment sets it), which OpenMP reads when torch
loads it; :func:`patch` and :func:`from_pretrained` warn when torch was imported first without
it and runs more than one thread.

Needs ``transformers>=5`` (and ``peft`` for attention LoRA; ``pip install ktsft[hf]``).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any

# isort: off
if "torch" not in sys.modules:  # OpenMP reads this once, when torch loads it (see above)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402
from torch import nn  # noqa: E402
# isort: on

from .checkpoint import (  # noqa: E402
    MIXTRAL_PROJ_NAMES,
    SafetensorsIndex,
    find_module_experts,
)
from .config import MoESFTConfig  # noqa: E402
from .gradients import LORA_NAMES  # noqa: E402
from .pool import ThreadPool  # noqa: E402
from .torch import MoELoRA, _layer_group_size, default_pool  # noqa: E402

try:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, _default_apply_gate
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "ktsft.hf needs transformers >= 5 (transformers.integrations.moe); "
        "install it with `pip install ktsft[hf]`"
    ) from e

__all__ = [
    "EXPERTS_IMPLEMENTATION",
    "experts_forward",
    "experts_modules",
    "from_pretrained",
    "load_adapter",
    "lora_parameters",
    "patch",
    "register",
    "save_adapter",
    "save_merged",
]

EXPERTS_IMPLEMENTATION = "ktsft"
"""The name ktsft registers in ``ALL_EXPERTS_FUNCTIONS`` (``config._experts_implementation``)."""

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_LAYER = "_ktsft_layer"  # the experts module's MoELoRA, kept outside the module tree
_PEFT_PREFIX = "base_model.model."
# (name of the projection in adapters and checkpoints, LoRA parameter of its A, of its B)
_PROJ_LORA = (
    ("gate_proj", "gate_lora_a", "gate_lora_b"),
    ("up_proj", "up_lora_a", "up_lora_b"),
    ("down_proj", "down_lora_a", "down_lora_b"),
)


def register() -> None:
    """Registers :func:`experts_forward` as ``"ktsft"`` in transformers'
    ``ALL_EXPERTS_FUNCTIONS`` (idempotent; :func:`patch` and :func:`from_pretrained` call it)."""
    ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, experts_forward)


# ---- the experts function ---------------------------------------------------------------------


def experts_forward(
    module: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The ``"ktsft"`` experts implementation: the routed experts of ``module`` on the engine.

    Parameters
    ----------
    module : nn.Module
        An experts module prepared by :func:`patch` or :func:`from_pretrained`.
    hidden_states : torch.Tensor, floating, shape [T, H]
        On any device; moved to the CPU for the engine (and the result, and in backward its
        gradient, back to this device).
    top_k_index : torch.Tensor, integer, shape [T, k]
        Routed experts; ids outside [0, E) (transformers' expert-parallel sentinels) mean "no
        expert".
    top_k_weights : torch.Tensor, floating (bf16 or fp32), shape [T, k]
        Routing weights; they receive a gradient, so the router trains.

    Returns
    -------
    torch.Tensor, shape [T, H], dtype and device of ``hidden_states``
    """
    layer = module.__dict__.get(_LAYER)
    if layer is None:
        raise RuntimeError(
            f"{type(module).__name__} runs with experts_implementation={EXPERTS_IMPLEMENTATION!r} "
            "but holds no ktsft engine; prepare the model with ktsft.hf.patch(model) or load it "
            "with ktsft.hf.from_pretrained"
        )
    for n in LORA_NAMES:  # the module's parameters are the truth (load_state_dict may replace)
        p = module._parameters.get(n)
        if p is not layer._parameters[n]:
            layer._parameters[n] = p
    device = hidden_states.device
    if device.type != "cpu":
        hidden_states = hidden_states.to("cpu")
        top_k_index = top_k_index.to("cpu")
        top_k_weights = top_k_weights.to("cpu")
    E = layer.expert_num
    ids = top_k_index.masked_fill((top_k_index < 0) | (top_k_index >= E), -1)
    out = layer(hidden_states, ids, top_k_weights)
    return out.to(device) if device.type != "cpu" else out


# ---- finding and preparing experts modules ----------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a ``peft.PeftModel`` (or ``model`` itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _is_experts_module(m: nn.Module) -> bool:
    return (
        "down_proj" in m._parameters
        and ("gate_up_proj" in m._parameters or "up_proj" in m._parameters)
    ) or _LAYER in m.__dict__


def experts_modules(model: nn.Module) -> Iterator:
    """``(name, module)`` of every routed-experts module of ``model`` (names relative to the
    transformers model, also inside a ``peft.PeftModel``): modules holding 3-d ``down_proj`` and
    ``gate_up_proj`` parameters, or already prepared by ktsft."""
    for name, m in _unwrap(model).named_modules():
        if _is_experts_module(m):
            p = m._parameters.get("down_proj")
            if p is None or p.dim() == 3:
                yield name, m


def lora_parameters(model: nn.Module) -> Iterator:
    """``(name, parameter)`` of the six LoRA tensors of every experts module on ktsft.

    ``peft.get_peft_model`` freezes every parameter outside its own adapters, these included;
    turn them back on after it::

        for _, p in ktsft.hf.lora_parameters(model):
            p.requires_grad_(True)
    """
    for name, m in experts_modules(model):
        if _LAYER in m.__dict__:
            for n in LORA_NAMES:
                yield f"{name}.{n}", m._parameters[n]


def _check_experts_class(name: str, m: nn.Module) -> None:
    """Refuses experts modules whose math is not the engine's, naming the class."""
    cls = type(m).__qualname__
    if not (hasattr(m, "has_gate") and hasattr(m, "_is_expert_parallel")):
        raise TypeError(
            f"{cls} (at {name!r}) holds routed experts but lacks transformers' "
            "@use_experts_implementation decorator, so its forward cannot be dispatched to "
            "ktsft; supported: decorated classes such as Qwen3MoeExperts, DeepseekV3Experts, "
            "MixtralExperts"
        )
    unsupported = {
        "has_gate=False (no gate projection)": not m.has_gate,
        "has_bias=True (expert biases)": m.has_bias,
        "is_transposed=True (weights stored [E, H, 2I])": m.is_transposed,
        "is_concatenated=False (gate and up interleaved)": not m.is_concatenated,
        "has_post_expert_norm=True": m.has_post_expert_norm,
        "a custom _apply_gate": type(m)._apply_gate is not _default_apply_gate,
    }
    bad = [k for k, v in unsupported.items() if v]
    act = getattr(m, "act_fn", None)
    if not isinstance(act, nn.SiLU) and type(act).__name__ != "SiLUActivation":
        bad.append(f"activation {type(act).__name__} (ktsft runs SwiGLU: silu)")
    if bad:
        raise TypeError(
            f"{cls} (at {name!r}) is not supported by ktsft: {', '.join(bad)}; ktsft runs "
            "gate_up_proj [E, 2I, H] (gate rows first) and down_proj [E, H, I] with silu, no bias"
        )


def _experts_k(name: str, m: nn.Module) -> int:
    k = getattr(m.config, "num_experts_per_tok", None)
    if not isinstance(k, int) or k < 1:
        raise ValueError(
            f"the config of {name!r} must give num_experts_per_tok (the router's top k) as an "
            f"int >= 1, got {k!r}"
        )
    return k


def _check_options(
    lora_rank: Any, lora_alpha: Any, quant: Any, max_len: Any, group_size: Any = 32
) -> None:
    """Validates the engine options before any loading work (MoESFTConfig's own checks)."""
    MoESFTConfig(
        1,
        1,
        1,
        1,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        max_len=max_len,
        quant=quant,
        group_size=32 if group_size is None else group_size,
    )


def _warn_openmp_spin() -> None:
    """Warns when torch's OpenMP workers may busy-wait while the engine runs (module docs)."""
    if torch.get_num_threads() > 1 and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        warnings.warn(
            f"torch runs {torch.get_num_threads()} intra-op threads whose OpenMP workers "
            "busy-wait after each operation, competing with ktsft's engine threads (training "
            "steps 2-10x slower measured); set OMP_WAIT_POLICY=PASSIVE before starting Python "
            "(or import ktsft.hf before torch), or torch.set_num_threads(1)",
            RuntimeWarning,
            stacklevel=3,
        )


def _pool(num_threads: int | None, pool: ThreadPool | None) -> ThreadPool:
    if pool is not None:
        if num_threads is not None:
            raise ValueError("give num_threads or pool, not both")
        return pool
    return default_pool() if num_threads is None else ThreadPool(num_threads)


def _attach(module: nn.Module, layer: MoELoRA) -> None:
    """Makes ``layer`` the engine of ``module``: frees the module's base tensors and registers
    the layer's six LoRA parameters on the module."""
    module.register_parameter("gate_up_proj", None)
    module.register_parameter("down_proj", None)
    object.__setattr__(module, _LAYER, layer)  # not a child module: its parameters are ours
    for n in LORA_NAMES:
        module.register_parameter(n, getattr(layer, n))


def _use_ktsft(model: nn.Module, modules: list) -> None:
    """Sets the model (and each experts module's config) to the "ktsft" implementation."""
    register()
    base = _unwrap(model)
    if hasattr(base, "set_experts_implementation"):
        base.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    for _, m in modules:
        if m.config._experts_implementation != EXPERTS_IMPLEMENTATION:
            m.config._experts_implementation_internal = EXPERTS_IMPLEMENTATION


def _no_experts_error(model: nn.Module) -> ValueError:
    cfg = getattr(model, "config", None)
    moe_fields = [
        f for f in ("num_experts", "num_local_experts", "n_routed_experts") if getattr(cfg, f, None)
    ]
    what = type(model).__name__
    if moe_fields:
        return ValueError(
            f"{what} has MoE config fields {moe_fields} but no experts module with 3-d "
            "gate_up_proj and down_proj parameters: its family is not supported by ktsft.hf "
            "(supported: transformers 5 families whose experts use @use_experts_implementation)"
        )
    return ValueError(f"{what} is not a MoE model: it has no routed-experts module")


def patch(
    model: nn.Module,
    *,
    lora_rank: int = 16,
    lora_alpha: float = 32.0,
    quant: str = "bf16",
    num_threads: int | None = None,
    max_len: int = 4096,
    pool: ThreadPool | None = None,
    init_lora_weights: bool | str = True,
    isa: str | None = None,
    group_size: int = 32,
) -> nn.Module:
    """Runs the routed experts of a transformers model already in memory on ktsft.

    Each experts module's ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I] (any float
    dtype, any device) are packed into an engine layer expert by expert (quantized with
    ``quant="int8"``) and the module's tensors are released (set to ``None``); the module gets
    the six LoRA parameters (bf16, spec section 2 names and shapes, PEFT init: B = 0) and the
    model is set to ``experts_implementation="ktsft"``.

    Parameters
    ----------
    model : transformers.PreTrainedModel or peft.PeftModel
    lora_rank : int, default 16
    lora_alpha : float, default 32.0
    quant : str, default "bf16"
        How the engine stores the base weights (any mode :class:`~ktsft.MoESFTConfig` accepts).
    num_threads : int, optional
        Threads of a new engine pool for this model; default: the shared
        :func:`~ktsft.torch.default_pool` (one thread per CPU this process may use).
    max_len : int, default 4096
        Most tokens per engine call (longer calls are split).
    pool : ThreadPool, optional
        An engine pool to use instead (not with ``num_threads``).
    init_lora_weights : {True, "gaussian", False}, default True
        As in :class:`~ktsft.torch.MoELoRA`.
    isa : str, optional
        Kernel family (default ``KTSFT_ISA`` or "auto").
    group_size : {32, 64, 128}, default 32
        Columns per scale with ``quant="int4"``.

    Returns
    -------
    nn.Module
        ``model``, changed in place.
    """
    _check_options(lora_rank, lora_alpha, quant, max_len, group_size)
    modules = [(n, m) for n, m in experts_modules(model) if _LAYER not in m.__dict__]
    if not modules:
        if any(True for _ in experts_modules(model)):
            raise ValueError("the model's experts already run on ktsft (patched before)")
        raise _no_experts_error(_unwrap(model))
    for name, m in modules:
        _check_experts_class(name, m)
        for p in ("gate_up_proj", "down_proj"):
            if m._parameters[p].device.type == "meta":
                raise ValueError(
                    f"{name}.{p} is on the meta device (no data); load the model with "
                    "ktsft.hf.from_pretrained, which streams the experts from the checkpoint"
                )
    _warn_openmp_spin()
    pool = _pool(num_threads, pool)
    for name, m in modules:
        gate_up, down = m.gate_up_proj.detach(), m.down_proj.detach()
        I = gate_up.shape[1] // 2
        layer = MoELoRA(
            gate_up[:, :I],
            gate_up[:, I:],
            down,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            quant=quant,
            max_len=max_len,
            pool=pool,
            num_experts_per_tok=_experts_k(name, m),
            init_lora_weights=init_lora_weights,
            isa=isa,
            group_size=group_size,
        )
        del gate_up, down
        _attach(m, layer)
    _use_ktsft(model, modules)
    return model


# ---- from_pretrained --------------------------------------------------------------------------


def _without_experts(cls: type) -> type:
    """A subclass of the transformers model class ``cls`` whose instances are built without
    expert tensors: each experts module's ``gate_up_proj``/``down_proj`` are unregistered right
    after construction (so transformers neither loads nor initializes them) and their shapes
    are kept in ``model._ktsft_experts``."""

    def __init__(self, config, *args, **kwargs):
        cls.__init__(self, config, *args, **kwargs)
        found = {}
        for name, m in experts_modules(self):
            _check_experts_class(name, m)
            gate_up, down = m._parameters["gate_up_proj"], m._parameters["down_proj"]
            E, I2, H = gate_up.shape
            if tuple(down.shape) != (E, H, I2 // 2):
                raise ValueError(
                    f"{name}: down_proj must have shape {[E, H, I2 // 2]} (from gate_up_proj "
                    f"{list(gate_up.shape)}), got {list(down.shape)}"
                )
            found[name] = (E, H, I2 // 2, _experts_k(name, m))
            m.register_parameter("gate_up_proj", None)
            m.register_parameter("down_proj", None)
            m._is_hf_initialized = True  # nothing left for transformers to initialize
        if not found:
            raise _no_experts_error(self)
        object.__setattr__(self, "_ktsft_experts", found)
        # The checkpoint's expert keys are ours to read, not unexpected.
        self._keys_to_ignore_on_load_unexpected = set(
            self._keys_to_ignore_on_load_unexpected or ()
        ) | {r"\.experts\.(\d+\.)?(gate_proj|up_proj|down_proj|w1|w2|w3|gate_up_proj)"}

    # Same name and module as cls: transformers reads the module's source to decide whether
    # the experts implementation may be set, and writes the class name into saved configs.
    return type(
        cls.__name__,
        (cls,),
        {"__init__": __init__, "__module__": cls.__module__, "__qualname__": cls.__qualname__},
    )


def from_pretrained(
    model_dir: str | os.PathLike,
    *,
    lora_rank: int = 16,
    lora_alpha: float = 32.0,
    quant: str = "bf16",
    num_threads: int | None = None,
    max_len: int = 4096,
    pool: ThreadPool | None = None,
    init_lora_weights: bool | str = True,
    isa: str | None = None,
    group_size: int | None = None,
    **hf_kwargs: Any,
) -> nn.Module:
    """A transformers causal LM whose routed experts run on ktsft, loaded from a local directory.

    The model is built without expert tensors, transformers loads every other weight as usual
    (``hf_kwargs`` such as ``dtype`` or ``device_map`` go to its ``from_pretrained``), and each
    layer's experts stream from the directory's safetensors shards into the engine one expert
    at a time (packed, or quantized with ``quant="int8"``): peak memory is the non-expert
    weights + the packed experts + a few experts' worth. Checkpoint layouts (per-expert Hub
    keys, Mixtral's ``block_sparse_moe.experts.{e}.w1/w3/w2``, fused transformers 5 keys) and
    dtypes (bf16, fp16, fp32, DeepSeek fp8, compressed-tensors int4): :mod:`ktsft.checkpoint`.
    Compressed-tensors int4 experts load into ``quant="int4"`` layers as they ship, with the
    checkpoint's group size.

    Parameters
    ----------
    model_dir : str or os.PathLike
        A local model directory (``config.json`` + safetensors shards).
    lora_rank, lora_alpha, quant, num_threads, max_len, pool, init_lora_weights, isa
        As in :func:`patch`.
    group_size : {32, 64, 128}, optional
        Columns per scale with ``quant="int4"``: default the checkpoint's for an int4
        checkpoint (given, it must be that), else 32.
    **hf_kwargs
        Passed to ``transformers.AutoModelForCausalLM``'s model class ``from_pretrained``.

    Returns
    -------
    transformers.PreTrainedModel
        In eval mode, as transformers returns it (call ``model.train()`` to train).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    _check_options(lora_rank, lora_alpha, quant, max_len, group_size)
    _warn_openmp_spin()
    model_dir = os.fspath(model_dir)
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(
            f"{model_dir!r} is not a Hugging Face model directory: it has no config.json"
        )
    trust = {k: hf_kwargs[k] for k in ("trust_remote_code",) if k in hf_kwargs}
    config = AutoConfig.from_pretrained(model_dir, **trust)
    try:
        cls = AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        raise ValueError(
            f"{model_dir!r} holds a {type(config).__name__} (model_type "
            f"{config.model_type!r}), which has no causal-LM class in transformers"
        ) from None
    index = SafetensorsIndex.from_dir(model_dir)
    model = _without_experts(cls).from_pretrained(model_dir, config=config, **hf_kwargs)
    model.__class__ = cls  # back to the plain transformers class
    shapes = model.__dict__.pop("_ktsft_experts")
    pool = _pool(num_threads, pool)
    modules = []
    for name, m in experts_modules(model):
        E, H, I, k = shapes[name]
        layout = find_module_experts(index, name, E)
        if (layout.hidden_size, layout.intermediate_size) != (H, I):
            raise ValueError(
                f"the checkpoint's experts at {layout.prefix!r} have (H, I) = "
                f"{(layout.hidden_size, layout.intermediate_size)}, the model's config says "
                f"{(H, I)}"
            )
        layer = MoELoRA.__new__(MoELoRA)
        nn.Module.__init__(layer)
        g = _layer_group_size(
            layout.int4_group_size, quant, group_size, f"the int4 checkpoint at {layout.prefix!r}"
        )
        layer._setup(E, H, I, lora_rank, lora_alpha, quant, max_len, pool, k, isa, group_size=g)
        layer.load_experts_from(index, layout)
        layer.reset_lora_parameters(init_lora_weights)
        _attach(m, layer)
        modules.append((name, m))
    _use_ktsft(model, modules)
    return model


# ---- adapters ---------------------------------------------------------------------------------


def _adapter_names(model: nn.Module, name: str) -> tuple:
    """(key prefix, projection names) of the per-expert adapter keys of experts module ``name``:
    the Hub's layout of the model's family (Mixtral: ``block_sparse_moe`` and w1/w3/w2)."""
    from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN

    model_type = getattr(_unwrap(model).config, "model_type", None)
    if _MODEL_TO_CONVERSION_PATTERN.get(model_type, model_type) == "mixtral":
        return _PEFT_PREFIX + name.replace(".mlp.", ".block_sparse_moe."), MIXTRAL_PROJ_NAMES
    return _PEFT_PREFIX + name, {p: p for p, _, _ in _PROJ_LORA}


def _prepared(model: nn.Module) -> list:
    modules = [(n, m) for n, m in experts_modules(model) if _LAYER in m.__dict__]
    if not modules:
        raise ValueError(
            f"{type(model).__name__} has no experts prepared by ktsft.hf (use patch or "
            "from_pretrained first)"
        )
    return modules


def _peft_lora(model: nn.Module) -> tuple:
    """(the ``peft.PeftModel``'s LoRA config or None, its LoRA tensors keyed as PEFT saves them)."""
    cfgs = getattr(model, "peft_config", None)
    if not cfgs:
        return None, {}
    from peft import get_peft_model_state_dict

    if len(cfgs) != 1:
        raise ValueError(f"save_adapter writes one adapter; the model has {sorted(cfgs)}")
    ((adapter_name, cfg),) = cfgs.items()
    kind = str(getattr(cfg.peft_type, "value", cfg.peft_type))
    if kind != "LORA":
        raise ValueError(f"the model's PEFT adapter is {kind}, not LORA")
    return cfg, get_peft_model_state_dict(model, adapter_name=adapter_name)


def save_adapter(model: nn.Module, out_dir: str | os.PathLike) -> None:
    """Writes the LoRA adapters as a standard PEFT adapter directory.

    ``adapter_model.safetensors`` holds, per experts module and expert e,
    ``base_model.model.{module}.{e}.{gate_proj,up_proj,down_proj}.lora_A.weight`` (``*_lora_a[e]``,
    [r, in]) and ``.lora_B.weight`` (``*_lora_b[e]``, [out, r]) in bf16 (Mixtral: its Hub names
    ``...block_sparse_moe.experts.{e}.{w1,w3,w2}``), plus the attention (or other) LoRA of a
    ``peft.PeftModel`` as PEFT saves it. ``adapter_config.json``: r, lora_alpha,
    ``target_modules`` a plain list of the projection names, ``lora_dropout`` 0 (the layout vLLM
    and SGLang load; PEFT converts it for transformers 5 models).

    Parameters
    ----------
    model : transformers.PreTrainedModel or peft.PeftModel
        Prepared by :func:`patch` or :func:`from_pretrained`.
    out_dir : str or os.PathLike
        Created if needed; existing adapter files are overwritten.
    """
    from safetensors.torch import save_file

    modules = _prepared(model)
    layer0 = modules[0][1].__dict__[_LAYER]
    r, alpha = layer0.lora_rank, float(layer0.lora_alpha)
    peft_cfg, tensors = _peft_lora(model)
    if peft_cfg is not None and (peft_cfg.r != r or float(peft_cfg.lora_alpha) != alpha):
        raise ValueError(
            f"the PEFT LoRA has r = {peft_cfg.r}, lora_alpha = {peft_cfg.lora_alpha}; the experts' "
            f"LoRA has r = {r}, lora_alpha = {alpha}: one adapter directory needs the same values"
        )
    projs = set()
    for name, m in modules:
        layer = m.__dict__[_LAYER]
        if (layer.lora_rank, float(layer.lora_alpha)) != (r, alpha):
            raise ValueError(f"{name}: LoRA r / alpha differ from those of {modules[0][0]}")
        prefix, names = _adapter_names(model, name)
        for proj, a, b in _PROJ_LORA:
            A, B = getattr(m, a).detach(), getattr(m, b).detach()
            projs.add(names[proj])
            for e in range(layer.expert_num):
                key = f"{prefix}.{e}.{names[proj]}"
                tensors[f"{key}.lora_A.weight"] = A[e].clone()
                tensors[f"{key}.lora_B.weight"] = B[e].clone()
    targets = sorted(projs)
    if peft_cfg is not None:
        targets = sorted(projs | set(peft_cfg.target_modules or ()))
    base = _unwrap(model)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": getattr(base.config, "_name_or_path", None) or None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        os.path.join(out_dir, ADAPTER_WEIGHTS),
        metadata={"format": "pt"},
    )
    with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2)


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> None:
    """Reads a directory written by :func:`save_adapter` back into the model, in place.

    The experts' LoRA parameters stay the same objects (optimizers keep working). Attention
    LoRA keys need a ``peft.PeftModel`` with those targets (``get_peft_model`` first). Every
    key is checked before anything is copied: a bad directory changes nothing.

    Parameters
    ----------
    model : transformers.PreTrainedModel or peft.PeftModel
        Prepared by :func:`patch` or :func:`from_pretrained`, with the directory's r and alpha.
    adapter_dir : str or os.PathLike
    """
    from safetensors.torch import load_file

    adapter_dir = os.fspath(adapter_dir)
    with open(os.path.join(adapter_dir, ADAPTER_CONFIG)) as f:
        cfg = json.load(f)
    tensors = load_file(os.path.join(adapter_dir, ADAPTER_WEIGHTS))
    modules = _prepared(model)
    copies = []
    for name, m in modules:
        layer = m.__dict__[_LAYER]
        if cfg.get("r") != layer.lora_rank or float(cfg.get("lora_alpha")) != layer.lora_alpha:
            raise ValueError(
                f"{adapter_dir}: r = {cfg.get('r')}, lora_alpha = {cfg.get('lora_alpha')}; the "
                f"model's experts have r = {layer.lora_rank}, lora_alpha = {layer.lora_alpha}"
            )
        prefix, names = _adapter_names(model, name)
        for proj, a, b in _PROJ_LORA:
            for part, pname in (("lora_A", a), ("lora_B", b)):
                p = getattr(m, pname)
                rows = []
                for e in range(layer.expert_num):
                    key = f"{prefix}.{e}.{names[proj]}.{part}.weight"
                    t = tensors.pop(key, None)
                    if t is None:
                        raise KeyError(f"{adapter_dir}: {key} is missing")
                    if tuple(t.shape) != tuple(p.shape[1:]):
                        raise ValueError(
                            f"{adapter_dir}: {key} must have shape {list(p.shape[1:])}, got "
                            f"{list(t.shape)}"
                        )
                    rows.append(t)
                copies.append((p, torch.stack(rows)))
    if tensors:  # attention (or other) PEFT LoRA
        peft_cfgs = getattr(model, "peft_config", None)
        if not peft_cfgs:
            raise ValueError(
                f"{adapter_dir} holds LoRA tensors outside the experts (first "
                f"{sorted(tensors)[0]!r}); wrap the model with peft.get_peft_model using those "
                "targets before load_adapter"
            )
        from peft import set_peft_model_state_dict

        (adapter_name,) = peft_cfgs
        own = model.state_dict()
        for k, t in tensors.items():
            want = k.replace(".lora_A.weight", f".lora_A.{adapter_name}.weight").replace(
                ".lora_B.weight", f".lora_B.{adapter_name}.weight"
            )
            if want not in own:
                raise KeyError(f"{adapter_dir}: {k} matches no LoRA tensor of the model")
            if tuple(own[want].shape) != tuple(t.shape):
                raise ValueError(
                    f"{adapter_dir}: {k} must have shape {list(own[want].shape)}, got "
                    f"{list(t.shape)}"
                )
    with torch.no_grad():
        for p, t in copies:
            p.copy_(t)
    if tensors:
        set_peft_model_state_dict(model, tensors, adapter_name=adapter_name)


# ---- merged export ----------------------------------------------------------------------------


def save_merged(model: nn.Module, out_dir: str | os.PathLike) -> None:
    """Writes a full checkpoint with the experts' LoRA folded into the expert weights.

    For serving stacks without LoRA: ``config.json`` and one safetensors file per experts
    module (``W + s * B @ A``, bf16, per-expert Hub keys as in :func:`save_adapter` without the
    ``base_model.model.`` prefix) plus one with every other weight of the model, and a
    ``model.safetensors.index.json``. Built one experts module at a time. A ``peft.PeftModel``
    must be merged first (``model = model.merge_and_unload()``): attention LoRA is not folded
    here.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        Prepared by :func:`patch` or :func:`from_pretrained`.
    out_dir : str or os.PathLike
    """
    from safetensors.torch import save_file

    if getattr(model, "peft_config", None):
        raise ValueError(
            "save_merged needs a plain transformers model: merge the PEFT LoRA first with "
            "model = model.merge_and_unload()"
        )
    modules = _prepared(model)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    weight_map = {}
    n_files = len(modules) + 1
    for i, (name, m) in enumerate(modules):
        fname = f"model-{i + 1:05d}-of-{n_files:05d}.safetensors"
        prefix, names = _adapter_names(model, name)
        prefix = prefix[len(_PEFT_PREFIX) :]
        merged = m.__dict__[_LAYER].merged_weights()
        tensors = {}
        for proj, _, _ in _PROJ_LORA:
            for e in range(merged[proj].shape[0]):
                tensors[f"{prefix}.{e}.{names[proj]}.weight"] = merged[proj][e]
        del merged
        save_file(tensors, os.path.join(out_dir, fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
        del tensors
    rest = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    for k in [k for k in rest if k.rsplit(".", 1)[-1] in LORA_NAMES]:
        del rest[k]
    _drop_tied(model, rest)
    fname = f"model-{n_files:05d}-of-{n_files:05d}.safetensors"
    save_file(rest, os.path.join(out_dir, fname), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(rest, fname))
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
    model.config.save_pretrained(out_dir)


def _drop_tied(model: nn.Module, tensors: dict) -> None:
    """Removes the tied copies (e.g. ``lm_head.weight`` tied to the embeddings) that safetensors
    cannot store twice; transformers re-ties them at load."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for k in tied:
        tensors.pop(k, None)
