"""ktsft.hf: ktsft as the experts backend of Hugging Face transformers 5 (spec section 8.4).

Every model is a tiny randomly initialised config built here and saved to a temporary directory
(no download). References: the same checkpoint loaded by transformers with its own "eager"
experts, and a float64 copy of the model whose experts run the LoRA math of spec section 3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conftest import BWD_TOL, FWD_TOL, LORA_NAMES, assert_close, rel_err

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers", minversion="5.0")
peft = pytest.importorskip("peft")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS  # noqa: E402

import ktsft.hf as kh  # noqa: E402

pytestmark = pytest.mark.filterwarnings(  # torch is imported first here (tested below)
    "ignore:torch runs .* intra-op threads:RuntimeWarning"
)
ROOT = Path(__file__).resolve().parents[1]
INT8_FWD_TOL = 0.04  # spec section 4, int8 forward

H, V, R, ALPHA = 64, 128, 4, 8.0
_COMMON = dict(
    vocab_size=V,
    hidden_size=H,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    initializer_range=0.125,  # ~1/sqrt(H): the experts' share of the logits is O(1)
    tie_word_embeddings=False,
)
_GROUPED = dict(n_group=2, topk_group=1, first_k_dense_replace=0, routed_scaling_factor=2.5)
FAMILIES = {
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(head_dim=16, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
             num_experts_per_tok=2, norm_topk_prob=True),
    ),
    "qwen2_moe": (  # with its shared expert and shared-expert gate
        "Qwen2MoeConfig",
        dict(intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
             num_experts=8, num_experts_per_tok=2),
    ),
    "deepseek_v3": (  # sigmoid router with groups and a bias, shared experts, MLA
        "DeepseekV3Config",
        dict(intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
             n_shared_experts=1, num_experts_per_tok=2, q_lora_rank=32, kv_lora_rank=16,
             num_key_value_heads=4, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
             norm_topk_prob=True, **_GROUPED),
    ),
    "mixtral": (
        "MixtralConfig",
        dict(head_dim=16, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2),
    ),
    "glm4_moe": (
        "Glm4MoeConfig",
        dict(head_dim=16, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
             n_shared_experts=1, num_experts_per_tok=2, partial_rotary_factor=0.5,
             norm_topk_prob=True, **_GROUPED),
    ),
}  # fmt: skip


def make_config(family: str, **overrides):
    cls, kw = FAMILIES[family]
    return getattr(transformers, cls)(**{**_COMMON, **kw, **overrides})


def save_model(config, path, seed=0, dtype=torch.bfloat16, **save_kwargs) -> str:
    """A randomly initialised model of ``config`` saved by transformers (per-expert Hub keys)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(path, **save_kwargs)
    return str(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One saved bf16 checkpoint per family, made on first use."""
    made = {}

    def get(family: str) -> str:
        if family not in made:
            made[family] = save_model(make_config(family), tmp_path_factory.mktemp(family))
        return made[family]

    return get


TOKENS = torch.tensor([[3, 17, 99, 5, 64, 2, 120, 41, 8, 77, 13, 56, 90, 31, 7, 101]])


def eager(path, dtype=torch.bfloat16):
    """The checkpoint in transformers with its own eager experts."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, experts_implementation="eager")


def logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens).logits.float()


# ---- forward: logits equal eager transformers -------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_equal_eager_with_lora_b_zero(checkpoints, family, dtype):
    """bf16: both models round everything to bf16 (eager bf16 itself is ~0.9 % off float64
    here); float32: the non-expert part in fp32 on both sides, so this measures the experts."""
    path = checkpoints(family)
    ours = kh.from_pretrained(path, lora_rank=R, lora_alpha=ALPHA, dtype=dtype)
    assert ours.config._experts_implementation == "ktsft"
    ref = logits(eager(path, dtype=dtype))
    assert_close(logits(ours), ref, FWD_TOL, f"{family} logits")
    # The metric sees the experts: nonzero LoRA moves the logits well past the tolerance.
    for _, m in kh.experts_modules(ours):
        m.__dict__["_ktsft_layer"].reset_lora_parameters(False)
    assert rel_err(logits(ours), ref) > 5 * FWD_TOL


def test_dense_layers_before_the_moe_layers(tmp_path):
    """DeepSeek-V3's first_k_dense_replace: dense MLP layers stay transformers', the MoE layers
    after them run on ktsft."""
    path = save_model(
        make_config("deepseek_v3", first_k_dense_replace=1, num_hidden_layers=3), tmp_path
    )
    ours = kh.from_pretrained(path, lora_rank=R, lora_alpha=ALPHA, dtype=torch.float32)
    assert [n for n, _ in kh.experts_modules(ours)] == [
        "model.layers.1.mlp.experts",
        "model.layers.2.mlp.experts",
    ]
    assert_close(logits(ours), logits(eager(path, dtype=torch.float32)), FWD_TOL, "logits")


def test_experts_modules_hold_only_lora(checkpoints):
    model = kh.from_pretrained(checkpoints("qwen3_moe"), lora_rank=R, lora_alpha=ALPHA)
    names = [n for n, _ in model.named_parameters() if ".experts." in n]
    assert names == [f"model.layers.{i}.mlp.experts.{n}" for i in range(2) for n in LORA_NAMES]
    assert [n for n, _ in kh.lora_parameters(model)] == names
    m = model.model.layers[0].mlp.experts
    assert m.gate_up_proj is None and m.down_proj is None
    assert m.gate_lora_a.shape == (8, R, H) and m.gate_lora_a.dtype == torch.bfloat16
    assert m.down_lora_b.shape == (8, H, R) and not m.down_lora_b.any()  # PEFT init: B = 0
    assert "model.layers.0.mlp.experts.gate_up_proj" not in model.state_dict()


def test_replaced_lora_parameters_are_used(checkpoints):
    """A LoRA parameter replaced by a new object (load_state_dict(assign=True), a user's
    assignment) is what the next forward reads, as an in-place update is."""
    path = checkpoints("qwen3_moe")
    a = kh.from_pretrained(path, lora_rank=R, lora_alpha=ALPHA)
    b = kh.from_pretrained(path, lora_rank=R, lora_alpha=ALPHA)
    before = logits(b)
    state = {k: v for k, v in a.state_dict().items() if k.rsplit(".", 1)[-1] in LORA_NAMES}
    torch.manual_seed(5)
    new = {k: torch.rand_like(v) for k, v in state.items()}
    with torch.no_grad():
        for k, v in new.items():
            a.get_parameter(k).copy_(v)
    b.load_state_dict(new, strict=False, assign=True)
    assert b.get_parameter(next(iter(new))).data_ptr() == new[next(iter(new))].data_ptr()
    assert torch.equal(logits(a), logits(b)) and not torch.equal(logits(b), before)


# ---- backward: a float64 reference with the LoRA math of spec section 3 ------------------------


def _ref_experts_f64(module, hidden_states, top_k_index, top_k_weights):
    """Spec section 3 in float64 on the module's base weights and its six LoRA parameters."""
    gate_up, down, s = module.gate_up_proj, module.down_proj, module.lora_scale
    I = gate_up.shape[1] // 2
    out = torch.zeros_like(hidden_states)
    for e in range(gate_up.shape[0]):
        tok, slot = torch.where(top_k_index == e)
        if tok.numel() == 0:
            continue
        x = hidden_states[tok]
        g = x @ gate_up[e, :I].T + s * (x @ module.gate_lora_a[e].T) @ module.gate_lora_b[e].T
        u = x @ gate_up[e, I:].T + s * (x @ module.up_lora_a[e].T) @ module.up_lora_b[e].T
        h = torch.nn.functional.silu(g) * u
        y = h @ down[e].T + s * (h @ module.down_lora_a[e].T) @ module.down_lora_b[e].T
        out = out.index_add(0, tok, y * top_k_weights[tok, slot, None])
    return out


def _float64_reference(path, ours):
    """The checkpoint in float64 whose experts run spec section 3 with ``ours``' LoRA values."""
    ALL_EXPERTS_FUNCTIONS.register("ktsft_test_f64", _ref_experts_f64)
    ref = eager(path, dtype=torch.float64)
    ref.set_experts_implementation("ktsft_test_f64")
    mods = dict(kh.experts_modules(ours))
    for name, m in kh.experts_modules(ref):
        m.lora_scale = ALPHA / R
        for n in LORA_NAMES:
            m.register_parameter(n, torch.nn.Parameter(getattr(mods[name], n).detach().double()))
    return ref


def _with_attention_lora_and_router(model):
    """PEFT LoRA on o_proj (random A and B), and the routers trainable."""
    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["o_proj"], init_lora_weights=False)
    model = peft.get_peft_model(model, cfg)
    for n, p in model.named_parameters():  # PEFT froze the experts' LoRA too
        if n.endswith("mlp.gate.weight") or n.rsplit(".", 1)[-1] in LORA_NAMES:
            p.requires_grad_(True)
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_loss_and_gradients_equal_float64_reference(checkpoints, family):
    """Nonzero LoRA everywhere; the non-expert part of ours runs in fp32 (bf16-exact weights)
    so the comparison measures the experts on ktsft against float64, at the bf16 goals."""
    path = checkpoints(family)
    torch.manual_seed(2)
    ours = kh.from_pretrained(
        path, lora_rank=R, lora_alpha=ALPHA, init_lora_weights=False, dtype=torch.float32
    )
    ref = _float64_reference(path, ours)
    routes = ([], [])
    ours, ref = _with_attention_lora_and_router(ours), _with_attention_lora_and_router(ref)
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "lora_" in n and ".experts." not in n:
                ref_params[n].copy_(p.double())
    losses = []
    for model, seen in zip((ours, ref), routes):
        model.train()
        for _, m in kh.experts_modules(model):
            m.register_forward_hook(
                lambda mod, args, out, seen=seen: seen.append(args[1].sort(-1).values)
            )
        loss = model(TOKENS, labels=TOKENS).loss
        loss.backward()
        losses.append(loss.item())
    # The comparison needs the same discrete routing: a near tie in a router's top k that
    # rounding flips moves whole gradients (seen with other seeds for Mixtral).
    assert len(routes[0]) == len(routes[1]) == 2
    for a, b in zip(*routes):
        assert torch.equal(a, b), f"{(a != b).any(-1).sum()} token(s) routed differently"
    assert abs(losses[0] - losses[1]) / abs(losses[1]) < FWD_TOL, losses
    checked = 0
    for n, p in ours.named_parameters():
        if not p.requires_grad:
            continue
        assert p.grad is not None, n
        assert_close(p.grad, ref_params[n].grad, BWD_TOL, f"{family} grad {n}")
        checked += 1
    # 6 LoRA tensors x 2 layers, 2 routers, 2 attention LoRA pairs
    assert checked == 12 + 2 + 4, checked


# ---- inputs the experts function receives ----------------------------------------------------


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32])
def test_routing_weight_dtypes_and_sentinel_ids(checkpoints, wdtype):
    """bf16 and fp32 routing weights; ids outside [0, E) (expert-parallel sentinels) add nothing."""
    model = kh.from_pretrained(
        checkpoints("qwen3_moe"), lora_rank=R, lora_alpha=ALPHA, init_lora_weights=False
    )
    m = model.model.layers[0].mlp.experts
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(10, H, generator=gen).bfloat16().requires_grad_(True)
    ids = torch.randint(0, 8, (10, 2), generator=gen)
    w = torch.rand(10, 2, generator=gen).to(wdtype).requires_grad_(True)
    sentinel = ids.clone()
    sentinel[::2, 1] = 8  # == E
    sentinel[1::3, 0] = 1000
    padded = sentinel.masked_fill(sentinel >= 8, -1)
    out = kh.experts_forward(m, x, sentinel, w)
    want = m.__dict__["_ktsft_layer"](x, padded, w)
    assert out.dtype == x.dtype and torch.equal(out, want)
    out.float().square().sum().backward()
    assert w.grad.dtype == wdtype
    assert not w.grad[sentinel >= 8].any()  # no expert, no weight gradient
    assert w.grad[sentinel < 8].abs().min() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (hybrid setup)")
def test_hidden_states_on_a_gpu_round_trip(checkpoints):
    """Attention etc. on the GPU, routed experts on the CPU: results and gradients come back."""
    model = kh.from_pretrained(
        checkpoints("qwen3_moe"), lora_rank=R, lora_alpha=ALPHA, init_lora_weights=False
    )
    m = model.model.layers[0].mlp.experts
    x = torch.randn(6, H).bfloat16()
    ids, w = torch.randint(0, 8, (6, 2)), torch.rand(6, 2)
    want = kh.experts_forward(m, x, ids, w)
    xg = x.cuda().requires_grad_(True)
    out = kh.experts_forward(m, xg, ids.cuda(), w.cuda())
    assert out.device == xg.device and torch.equal(out.cpu(), want)
    out.float().sum().backward()
    assert xg.grad.device == xg.device


# ---- training -------------------------------------------------------------------------------


def test_thirty_adamw_steps_lower_the_loss(checkpoints):
    model = kh.from_pretrained(checkpoints("qwen3_moe"), lora_rank=R, lora_alpha=ALPHA)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    for n, p in model.named_parameters():
        p.requires_grad_(n.rsplit(".", 1)[-1] in LORA_NAMES)
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 12
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model(TOKENS, labels=TOKENS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(
        m.__dict__["_ktsft_layer"].live_saved_states == 0 for _, m in kh.experts_modules(model)
    )


def test_gradient_checkpointing_and_no_grad_generation(checkpoints):
    path = checkpoints("qwen3_moe")
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(3)
        model = kh.from_pretrained(path, lora_rank=R, lora_alpha=ALPHA, init_lora_weights=False)
        model.train()
        if ckpt:
            model.gradient_checkpointing_enable()
        model(TOKENS, labels=TOKENS).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 12
    for n in grads[0]:
        assert torch.equal(grads[0][n], grads[1][n]), n
    model.eval()
    with torch.no_grad():
        out = model.generate(TOKENS[:, :4], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)
    assert all(
        m.__dict__["_ktsft_layer"].live_saved_states == 0 for _, m in kh.experts_modules(model)
    )


_DDP_WORKER = """
import sys, torch, torch.distributed as dist
import ktsft.hf
rank, path, init, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
torch.manual_seed(7)
model = ktsft.hf.from_pretrained(path, lora_rank=4, lora_alpha=8.0, init_lora_weights=False,
                                 num_threads=1)
for n, p in model.named_parameters():
    p.requires_grad_(n.rsplit(".", 1)[-1] in ktsft.gradients.LORA_NAMES)
ddp = torch.nn.parallel.DistributedDataParallel(model)
tokens = torch.load(sys.argv[5])[rank : rank + 1]
ddp(tokens, labels=tokens).loss.backward()
if rank == 0:
    torch.save({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, out)
dist.barrier()  # neither rank tears gloo down while the other still uses it (that aborts)
dist.destroy_process_group()
"""


def test_distributed_data_parallel_gloo(checkpoints, tmp_path):
    """Two gloo processes each take one sequence; DDP's averaged LoRA gradients equal one
    process's on both sequences (bf16 gradients are rounded before the all-reduce)."""
    import socket

    path = checkpoints("qwen3_moe")
    batch = torch.cat([TOKENS, TOKENS.flip(1)])
    torch.save(batch, tmp_path / "tokens.pt")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        init = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    out = tmp_path / "grads.pt"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _DDP_WORKER,
                str(r),
                path,
                init,
                str(out),
                str(tmp_path / "tokens.pt"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for r in range(2)
    ]
    for proc in procs:
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, log[-3000:]
    got = torch.load(out)
    torch.manual_seed(7)
    model = kh.from_pretrained(path, lora_rank=R, lora_alpha=ALPHA, init_lora_weights=False)
    model(batch, labels=batch).loss.backward()
    want = {n: p.grad for n, p in kh.lora_parameters(model)}
    assert got.keys() == want.keys()
    for n in want:
        assert_close(got[n], want[n], BWD_TOL, f"DDP grad {n}")


# ---- adapters -----------------------------------------------------------------------------------


_PEFT_QWEN2 = pytest.mark.xfail(
    strict=True,
    reason="PEFT 0.21.2 converts per-expert adapters only for model types that transformers maps "
    "onto the qwen2_moe or mixtral conversion (qwen3_moe, deepseek_v3, glm4_moe, ..., mixtral); "
    "qwen2_moe itself is not in that map, so its expert LoRA is not loaded",
)


@pytest.mark.parametrize(
    "family", [pytest.param(f, marks=_PEFT_QWEN2) if f == "qwen2_moe" else f for f in FAMILIES]
)
def test_adapter_loads_into_eager_transformers_with_peft(checkpoints, family, tmp_path):
    """save_adapter -> peft.PeftModel.from_pretrained on the eager model (PEFT converts the
    per-expert keys to transformers 5's fused experts) -> the same logits."""
    path = checkpoints(family)
    torch.manual_seed(2)
    ours = kh.from_pretrained(
        path, lora_rank=R, lora_alpha=ALPHA, init_lora_weights=False, dtype=torch.float32
    )
    ours = _with_attention_lora_and_router(ours)
    kh.save_adapter(ours, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    names = ["w1", "w2", "w3"] if family == "mixtral" else ["down_proj", "gate_proj", "up_proj"]
    assert cfg["target_modules"] == sorted(names + ["o_proj"])
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (R, ALPHA, 0.0)
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    layer = "block_sparse_moe" if family == "mixtral" else "mlp"
    proj = "w1" if family == "mixtral" else "gate_proj"
    key = f"base_model.model.model.layers.1.{layer}.experts.7.{proj}"
    m = ours.get_base_model().model.layers[1].mlp.experts
    assert torch.equal(saved[f"{key}.lora_A.weight"], m.gate_lora_a[7].detach())
    assert torch.equal(saved[f"{key}.lora_B.weight"], m.gate_lora_b[7].detach())
    assert len(saved) == 2 * 3 * 2 * 8 + 2 * 2
    served = peft.PeftModel.from_pretrained(eager(path, dtype=torch.float32), tmp_path / "adapter")
    want = logits(ours)
    assert_close(logits(served), want, FWD_TOL, f"{family} logits through PEFT")
    assert rel_err(logits(eager(path, dtype=torch.float32)), want) > 5 * FWD_TOL

    # load_adapter into a fresh ktsft model with the same attention targets
    fresh = _with_attention_lora_and_router(
        kh.from_pretrained(path, lora_rank=R, lora_alpha=ALPHA, dtype=torch.float32)
    )
    kh.load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(logits(fresh), want)


def test_load_adapter_errors_change_nothing(checkpoints, tmp_path):
    path = checkpoints("qwen3_moe")
    model = kh.from_pretrained(path, lora_rank=R, lora_alpha=ALPHA, init_lora_weights=False)
    kh.save_adapter(model, tmp_path / "a")
    other = kh.from_pretrained(path, lora_rank=2, lora_alpha=ALPHA)
    with pytest.raises(
        ValueError, match=r"r = 4, lora_alpha = 8.0; the model's experts have r = 2"
    ):
        kh.load_adapter(other, tmp_path / "a")
    t = load_file(tmp_path / "a" / "adapter_model.safetensors")
    del t["base_model.model.model.layers.1.mlp.experts.3.down_proj.lora_B.weight"]
    save_file(t, tmp_path / "a" / "adapter_model.safetensors")
    fresh = kh.from_pretrained(path, lora_rank=R, lora_alpha=ALPHA)
    before = {n: p.clone() for n, p in fresh.named_parameters()}
    with pytest.raises(KeyError, match=r"layers\.1\.mlp\.experts\.3\.down_proj\.lora_B\.weight"):
        kh.load_adapter(fresh, tmp_path / "a")
    assert all(torch.equal(p, before[n]) for n, p in fresh.named_parameters())


def test_save_merged_serves_without_lora(checkpoints, tmp_path):
    path = checkpoints("mixtral")
    model = kh.from_pretrained(path, lora_rank=R, lora_alpha=ALPHA, init_lora_weights=False)
    kh.save_merged(model, tmp_path / "merged")
    with safe_open(tmp_path / "merged" / "model-00001-of-00003.safetensors", "pt") as f:
        assert "model.layers.0.block_sparse_moe.experts.5.w3.weight" in f.keys()
    merged = eager(tmp_path / "merged")
    assert_close(logits(merged), logits(model), FWD_TOL, "merged logits")


# ---- checkpoint formats -----------------------------------------------------------------------


def _fused_checkpoint(src, dst, dtype):
    """The model's own state dict (fused ``mlp.experts.gate_up_proj`` / ``down_proj`` keys) in
    ``dtype``, as a transformers 5 save without reverse conversion would write it."""
    model = eager(src)
    state = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}
    os.makedirs(dst, exist_ok=True)
    save_file(state, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(dst)
    return str(dst)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fused_keys_and_other_source_dtypes(checkpoints, tmp_path, dtype):
    path = checkpoints("qwen3_moe")
    fused = _fused_checkpoint(path, tmp_path / "fused", dtype)
    with safe_open(os.path.join(fused, "model.safetensors"), "pt") as f:
        assert "model.layers.0.mlp.experts.gate_up_proj" in f.keys()
    ours = kh.from_pretrained(fused, lora_rank=R, lora_alpha=ALPHA, dtype=torch.bfloat16)
    assert_close(logits(ours), logits(eager(path)), FWD_TOL, f"fused {dtype}")


def test_int8_quantizes_while_streaming(checkpoints):
    """Each experts call of the int8 model against float64 eager experts of the bf16 checkpoint
    on the same inputs (the spec's int8 forward goal is per layer)."""
    path = checkpoints("deepseek_v3")
    ours = kh.from_pretrained(path, lora_rank=R, lora_alpha=ALPHA, quant="int8")
    assert ours.model.layers[0].mlp.experts.__dict__["_ktsft_layer"].quant == "int8"
    calls = []
    for name, m in kh.experts_modules(ours):
        m.register_forward_hook(lambda mod, args, out, name=name: calls.append((name, args, out)))
    logits(ours)
    ref = dict(eager(path, dtype=torch.float64).named_modules())
    assert len(calls) == 2
    for name, (x, ids, w), out in calls:
        want = ref[name](x.double(), ids, w.double())
        assert_close(out, want, INT8_FWD_TOL, f"int8 {name}")


def _fp8_checkpoint(src, dst, dequantized):
    """``src`` with its routed experts in DeepSeek-V3's fp8 layout (``...{proj}.weight`` e4m3 +
    ``...{proj}.weight_scale_inv``) in ``dst``, and the same model with those experts
    dequantized to float32 in ``dequantized``."""
    import numpy as np

    from ktsft import reference

    state = load_file(os.path.join(src, "model.safetensors"))
    fp8, deq = {}, {}
    for k, v in state.items():
        if ".mlp.experts." in k and k.endswith("_proj.weight"):
            q, scale = reference.quantize_fp8(v.float().numpy())
            fp8[k] = torch.from_numpy(q.view(np.uint8)).view(torch.float8_e4m3fn)
            fp8[k + "_scale_inv"] = torch.from_numpy(scale)
            deq[k] = torch.from_numpy(reference.dequantize_fp8(q, scale)).float()
        else:
            fp8[k], deq[k] = v, v.float()
    config = transformers.AutoConfig.from_pretrained(src)
    for path, tensors in ((dst, fp8), (dequantized, deq)):
        os.makedirs(path, exist_ok=True)
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(path)
    return fp8


def test_fp8_checkpoint_loads_as_it_ships(checkpoints, tmp_path):
    """A DeepSeek-V3 checkpoint with fp8 experts: quant="fp8" packs the file's e4m3 bytes and
    block scales as they are, and each experts call matches float64 eager experts of the
    dequantized weights to the bf16 goal (fp8 storage adds no kernel error)."""
    path = checkpoints("deepseek_v3")
    fp8 = _fp8_checkpoint(path, tmp_path / "fp8", tmp_path / "deq")
    ours = kh.from_pretrained(tmp_path / "fp8", lora_rank=R, lora_alpha=ALPHA, quant="fp8")
    layer = ours.model.layers[1].mlp.experts.__dict__["_ktsft_layer"]
    packed = layer.moe.base_weights(3, 1)
    key = "model.layers.1.mlp.experts.3.up_proj.weight"
    assert packed["up_proj"][0].tobytes() == fp8[key].view(torch.uint8).numpy().tobytes()
    assert packed["up_scale_inv"][0].tobytes() == fp8[key + "_scale_inv"].numpy().tobytes()
    calls = []
    for name, m in kh.experts_modules(ours):
        m.register_forward_hook(lambda mod, args, out, name=name: calls.append((name, args, out)))
    logits(ours)
    ref = dict(eager(tmp_path / "deq", dtype=torch.float64).named_modules())
    assert len(calls) == 2
    for name, (x, ids, w), out in calls:
        want = ref[name](x.double(), ids, w.double())
        assert_close(out, want, FWD_TOL, f"fp8 {name}")


def test_compressed_tensors_int4_checkpoint_loads_as_it_ships(checkpoints, tmp_path):
    """A DeepSeek-V3 checkpoint whose routed experts are compressed-tensors pack-quantized int4
    (``weight_packed`` / ``weight_scale`` bf16 / ``weight_shape``, Kimi-K2-Thinking's layout):
    quant="int4" holds the file's values and scales exactly with its group size, and each
    experts call matches the float64 model of those weights (W4A8, as the engine computes) to
    the bf16 goal."""
    import numpy as np

    from ktsft import reference

    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    src = checkpoints("deepseek_v3")
    state = load_file(os.path.join(src, "model.safetensors"))
    out = {}
    for k, v in state.items():
        if ".mlp.experts." in k and k.endswith("_proj.weight"):
            b, s = reference.quantize_int4(v.float().numpy(), 32)
            q = reference.unpack_int4(b, v.shape[1])
            out[k + "_packed"] = ct.pack_to_int32(torch.from_numpy(q), 4)
            out[k + "_scale"] = torch.from_numpy(s).to(torch.bfloat16)
            out[k + "_shape"] = torch.tensor(list(v.shape))
        else:
            out[k] = v
    dst = tmp_path / "int4"
    os.makedirs(dst)
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    transformers.AutoConfig.from_pretrained(src).save_pretrained(dst)
    with pytest.raises(ValueError, match="group_size=64 was asked for"):
        kh.from_pretrained(dst, lora_rank=R, lora_alpha=ALPHA, quant="int4", group_size=64)
    ours = kh.from_pretrained(
        dst, lora_rank=R, lora_alpha=ALPHA, quant="int4", init_lora_weights=False
    )
    layer = ours.model.layers[1].mlp.experts.__dict__["_ktsft_layer"]
    assert layer.moe.config.group_size == 32
    key = "model.layers.1.mlp.experts.3.up_proj.weight"
    packed = layer.moe.base_weights(3, 1)
    q = ct.unpack_from_int32(out[key + "_packed"], 4, out[key + "_shape"].tolist()).numpy()
    assert packed["up_proj"][0].tobytes() == reference.pack_int4(q).tobytes()
    assert np.array_equal(packed["up_scale"][0], out[key + "_scale"].float().numpy())
    calls = []
    for name, m in kh.experts_modules(ours):
        m.register_forward_hook(lambda mod, args, out, name=name: calls.append((name, args, out)))
    logits(ours)
    assert len(calls) == 2
    for name, (x, ids, w), y in calls:
        lay = dict(kh.experts_modules(ours))[name].__dict__["_ktsft_layer"]
        lora = {n: getattr(lay, n).detach() for n in LORA_NAMES}
        want = reference.forward(
            x, ids, w, **lay.moe.dequantized_weights(), **lora, lora_alpha=ALPHA,
            quant="int4", base_quantized=True,
        )  # fmt: skip
        assert_close(y, want, FWD_TOL, f"int4 {name}")


def test_patch_a_model_in_memory(checkpoints):
    path = checkpoints("glm4_moe")
    model = eager(path)
    ref = logits(model)
    kh.patch(model, lora_rank=R, lora_alpha=ALPHA)
    m = model.model.layers[1].mlp.experts
    assert m.gate_up_proj is None and m.down_proj is None
    assert model.config._experts_implementation == "ktsft"
    assert_close(logits(model), ref, FWD_TOL, "patched logits")
    with pytest.raises(ValueError, match="already run on ktsft"):
        kh.patch(model)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
@pytest.mark.parametrize("quant, bound", [("bf16", 1.3), ("int8", 0.8)])
def test_loading_peak_memory(tmp_path_factory, quant, bound):
    """Peak RSS growth of from_pretrained stays below ``bound`` x the checkpoint size (experts
    >= 80 % of its bytes). Growth = VmHWM minus the RSS of a fresh process that has imported
    torch, ktsft.hf, transformers and the model's modeling code (~340 MiB here, which would
    otherwise dwarf a checkpoint small enough for a test)."""
    path = _big_checkpoint(tmp_path_factory)
    size = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    script = (
        "import sys, torch, ktsft.hf, transformers\n"
        "transformers.Qwen3MoeForCausalLM, transformers.AutoConfig.from_pretrained(sys.argv[1])\n"
        "def kib(f): return int(next(l for l in open('/proc/self/status') if l.startswith(f))"
        ".split()[1]) * 1024\n"
        "base = kib('VmRSS:')\n"
        f"m = ktsft.hf.from_pretrained(sys.argv[1], lora_rank=8, quant={quant!r})\n"
        "packed = sum(x.__dict__['_ktsft_layer'].moe.packed_bytes for _, x in "
        "ktsft.hf.experts_modules(m))\n"
        "print(base, kib('VmHWM:'), packed)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-c", script, path], capture_output=True, text=True, timeout=600, env=env
    )
    assert res.returncode == 0, res.stderr[-3000:]
    base, peak, packed = map(int, res.stdout.split()[-3:])
    growth = peak - base
    mib = {k: f"{v / 2**20:.0f} MiB" for k, v in dict(size=size, packed=packed, peak=peak).items()}
    print(
        f"{quant}: checkpoint {mib['size']}, packed experts {mib['packed']}, peak RSS "
        f"{mib['peak']}, growth {growth / 2**20:.0f} MiB = {growth / size:.2f}x checkpoint"
    )
    assert growth < bound * size, (growth, size)


_BIG: dict = {}


def _big_checkpoint(tmp_path_factory) -> str:
    """~200 MiB bf16 Qwen3-MoE checkpoint in 5 shards, experts ~96 % of its bytes."""
    if "path" not in _BIG:
        cfg = make_config(
            "qwen3_moe",
            hidden_size=512,
            head_dim=64,
            num_attention_heads=8,
            num_key_value_heads=2,
            num_hidden_layers=4,
            num_experts=64,
            num_experts_per_tok=4,
            moe_intermediate_size=256,
            vocab_size=1024,
        )
        path = tmp_path_factory.mktemp("big")
        _BIG["path"] = save_model(cfg, path, max_shard_size="50MB")
        experts = sum(
            f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] * 2
            for p in Path(path).glob("*.safetensors")
            for f in [safe_open(p, "pt")]
            for k in f.keys()
            if ".experts." in k
        )
        total = sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))
        assert experts >= 0.8 * total, (experts, total)
    return _BIG["path"]


# ---- bad input --------------------------------------------------------------------------------


def test_errors(checkpoints, tmp_path):
    path = checkpoints("qwen3_moe")
    with pytest.raises(ValueError, match="lora_rank must be > 0, got 0"):
        kh.from_pretrained(path, lora_rank=0)
    with pytest.raises(ValueError, match="lora_rank must be > 0, got -2"):
        kh.patch(eager(path), lora_rank=-2)
    with pytest.raises(ValueError, match="quant must be one of"):
        kh.from_pretrained(path, quant="int3")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        kh.from_pretrained(tmp_path)

    dense = transformers.Qwen3Config(**{**_COMMON, "intermediate_size": 64, "head_dim": 16})
    dense_dir = save_model(dense, tmp_path / "dense")
    with pytest.raises(ValueError, match="Qwen3ForCausalLM is not a MoE model"):
        kh.from_pretrained(dense_dir)
    with pytest.raises(ValueError, match="not a MoE model"):
        kh.patch(eager(dense_dir))

    # an expert missing from the checkpoint
    missing = tmp_path / "missing"
    missing.mkdir()
    for f in Path(path).iterdir():
        (missing / f.name).write_bytes(f.read_bytes())
    t = load_file(missing / "model.safetensors")
    del t["model.layers.1.mlp.experts.5.up_proj.weight"]
    save_file(t, missing / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(KeyError, match=r"1 expert weight.*layers\.1\.mlp\.experts\.5\.up_proj"):
        kh.from_pretrained(missing)

    # unsupported families: GPT-OSS (biases, transposed, interleaved), Llama 4 (no decorator)
    gpt_oss = transformers.GptOssConfig(
        **{**_COMMON, "intermediate_size": 32, "num_local_experts": 4, "head_dim": 16,
           "num_experts_per_tok": 2, "layer_types": ["full_attention"] * 2}
    )  # fmt: skip
    with pytest.raises(TypeError, match=r"GptOssExperts \(at 'model.layers.0.mlp.experts'\).*"
                       r"has_bias=True.*is_transposed=True"):  # fmt: skip
        kh.from_pretrained(save_model(gpt_oss, tmp_path / "gpt_oss"))
    llama4 = transformers.Llama4TextConfig(
        **{**_COMMON, "intermediate_size": 32, "intermediate_size_mlp": 64, "num_local_experts": 4,
           "head_dim": 16, "num_experts_per_tok": 1, "interleave_moe_layer_step": 1}
    )  # fmt: skip
    with pytest.raises(TypeError, match="Llama4TextExperts .* lacks transformers' "
                       "@use_experts_implementation decorator"):  # fmt: skip
        kh.patch(AutoModelForCausalLM.from_config(llama4))


# ---- threads ----------------------------------------------------------------------------------


def test_openmp_wait_policy_default_and_warning(checkpoints, monkeypatch):
    """Imported before torch, ktsft.hf makes torch's OpenMP workers sleep instead of spinning;
    imported after it (as here) with more than one torch thread, loading warns."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = "import os, ktsft.hf, torch; print(os.environ['OMP_WAIT_POLICY'])"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.stdout.split() == ["PASSIVE"], res.stderr
    code = "import os, torch, ktsft.hf; print(os.environ.get('OMP_WAIT_POLICY'))"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.stdout.split() == ["None"], res.stderr  # too late: left alone

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    with pytest.warns(RuntimeWarning, match="set OMP_WAIT_POLICY=PASSIVE before starting Python"):
        kh.from_pretrained(checkpoints("qwen3_moe"), lora_rank=R)
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        kh.from_pretrained(checkpoints("qwen3_moe"), lora_rank=R)


# ---- the docs example -------------------------------------------------------------------------


def test_docs_example_runs(checkpoints, tmp_path):
    """docs/examples/hf_finetune.py (shown in docs/hf.rst) on a tiny Qwen3-MoE: it trains,
    saves the adapter and checks that PEFT on eager transformers computes the same logits."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KTSFT_")}
    env["KTSFT_NUM_THREADS"] = "2"
    env["OMP_WAIT_POLICY"] = "PASSIVE"  # as the usage line says
    script = ROOT / "docs" / "examples" / "hf_finetune.py"
    res = subprocess.run(
        [sys.executable, str(script), checkpoints("qwen3_moe"), str(tmp_path / "adapter"),
         "--steps", "5", "--check"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert "step 4" in res.stdout and "PEFT logits match" in res.stdout, res.stdout
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
