"""The seed document's tests (its section 2.3) rewritten for ktsft's seed-compatible API.

Exactly the predecessor's usage (seed section 4): ``kt_kernel_ext = ktsft.kt_kernel_ext``, torch
tensors, ``tensor.data_ptr()`` pointers, ``CPUInfer.submit(task)`` + ``CPUInfer.sync()``. The
references are written here in PyTorch float64 from spec section 3 (autograd for the backward),
independent of ktsft.reference. Thresholds: spec section 4 (bf16: forward 0.01, backward 0.02),
tighter than the seed's 0.05 / 0.10.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import ktsft  # noqa: E402

kt_kernel_ext = ktsft.kt_kernel_ext  # the only change a predecessor user makes

EXPERT_NUM, HIDDEN, INTER, TOPK, RANK, ALPHA = 8, 96, 80, 3, 4, 16.0
QLEN, NUM_THREADS, MAX_LEN = 5, 2, 64
FWD_TOL, BWD_TOL = 0.01, 0.02
LORA = ("gate_lora_a", "gate_lora_b", "up_lora_a", "up_lora_b", "down_lora_a", "down_lora_b")


# ---- the float64 PyTorch reference (spec section 3) --------------------------------------------


def torch_moe_forward(x, expert_ids, weights, base, lora, alpha=ALPHA):
    """out_t = sum_j w[t, j] * y_tj in float64, one einsum per product over all routes (t, j);
    differentiable in x, weights and the LoRA tensors. expert_ids == -1 contributes nothing."""
    s = alpha / lora["gate_lora_a"].shape[1]
    k = expert_ids.shape[1]
    e = expert_ids.clamp(min=0)

    def linear(W, A, B, v):  # v [T, k, in] -> W[e] v + s * B[e] (A[e] v), per route
        a = torch.einsum("tkri,tki->tkr", A[e], v)
        return torch.einsum("tkoi,tki->tko", W[e], v) + s * torch.einsum("tkor,tkr->tko", B[e], a)

    xv = x[:, None, :].expand(-1, k, -1)
    g = linear(base["gate_proj"], lora["gate_lora_a"], lora["gate_lora_b"], xv)
    u = linear(base["up_proj"], lora["up_lora_a"], lora["up_lora_b"], xv)
    h = g * torch.sigmoid(g) * u
    y = linear(base["down_proj"], lora["down_lora_a"], lora["down_lora_b"], h)
    return torch.einsum("tk,tkh->th", weights * (expert_ids >= 0), y)


def f64(t):
    return t.detach().to(torch.float64)


def rel_err(ours, ref) -> float:
    ours, ref = f64(ours), f64(ref)
    return float((ours - ref).abs().mean() / (ref.abs().mean() + 1e-30))


# ---- the seed's setup (section 4.1 / 4.2), small ------------------------------------------------


def init_base(seed=0):
    g = torch.Generator().manual_seed(seed)
    E, I, H = EXPERT_NUM, INTER, HIDDEN
    return {
        "gate_proj": (torch.randn(E, I, H, generator=g) / H**0.5).to(torch.bfloat16).contiguous(),
        "up_proj": (torch.randn(E, I, H, generator=g) / H**0.5).to(torch.bfloat16).contiguous(),
        "down_proj": (torch.randn(E, H, I, generator=g) / I**0.5).to(torch.bfloat16).contiguous(),
    }


def init_lora(seed=1, b_zero=False):
    """LoRA as nn.Parameter (seed section 4.1); B nonzero unless b_zero (PEFT's init)."""
    g = torch.Generator().manual_seed(seed)
    E, I, H, r = EXPERT_NUM, INTER, HIDDEN, RANK
    shapes = {
        "gate_lora_a": (E, r, H),
        "gate_lora_b": (E, I, r),
        "up_lora_a": (E, r, H),
        "up_lora_b": (E, I, r),
        "down_lora_a": (E, r, I),
        "down_lora_b": (E, H, r),
    }
    out = {}
    for n, shape in shapes.items():
        if n.endswith("_b") and b_zero:
            t = torch.zeros(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=g) / shape[-1] ** 0.5).to(torch.bfloat16)
        out[n] = torch.nn.Parameter(t.contiguous())
    return out


def make_batch(seed, qlen=QLEN, unused_expert=None):
    g = torch.Generator().manual_seed(seed)
    pool = [e for e in range(EXPERT_NUM) if e != unused_expert]
    expert_ids = (
        torch.stack(
            [torch.tensor(pool)[torch.randperm(len(pool), generator=g)[:TOPK]] for _ in range(qlen)]
        )
        .to(torch.int64)
        .contiguous()
    )
    weights = torch.rand(qlen, TOPK, generator=g, dtype=torch.float32)
    weights = (weights / weights.sum(dim=-1, keepdim=True)).contiguous()
    input_data = torch.randn(qlen, HIDDEN, generator=g).to(torch.bfloat16).contiguous()
    grad_output = torch.randn(qlen, HIDDEN, generator=g).to(torch.bfloat16).contiguous()
    return expert_ids, weights, input_data, grad_output


class SeedLayer:
    """CPUInfer + MOESFTConfig + AMXBF16_SFT_MOE exactly as seed section 4.2."""

    def __init__(self, base, lora, max_cache_depth=1, cls=None):
        self.base, self.lora = base, lora
        self.CPUInfer = kt_kernel_ext.CPUInfer(NUM_THREADS)
        config = kt_kernel_ext.moe.MOESFTConfig()
        config.expert_num = EXPERT_NUM
        config.num_experts_per_tok = TOPK
        config.hidden_size = HIDDEN
        config.intermediate_size = INTER
        config.lora_rank = RANK
        config.lora_alpha = ALPHA
        config.max_cache_depth = max_cache_depth
        config.max_len = MAX_LEN
        config.layer_idx = 0
        config.gate_proj = base["gate_proj"].data_ptr()
        config.up_proj = base["up_proj"].data_ptr()
        config.down_proj = base["down_proj"].data_ptr()
        config.gate_lora_a = lora["gate_lora_a"].data.data_ptr()
        config.gate_lora_b = lora["gate_lora_b"].data.data_ptr()
        config.up_lora_a = lora["up_lora_a"].data.data_ptr()
        config.up_lora_b = lora["up_lora_b"].data.data_ptr()
        config.down_lora_a = lora["down_lora_a"].data.data_ptr()
        config.down_lora_b = lora["down_lora_b"].data.data_ptr()
        config.pool = self.CPUInfer.backend_
        self.config = config
        self.moe = (cls or kt_kernel_ext.moe.AMXBF16_SFT_MOE)(config)
        self.CPUInfer.submit(self.moe.load_weights_task())
        self.CPUInfer.sync()

    def forward(self, expert_ids, weights, input_data, save_for_backward=False, output=None):
        qlen = input_data.shape[0]
        bsz_tensor = torch.tensor([qlen])
        if output is None:
            output = torch.zeros(qlen, HIDDEN, dtype=torch.float32).contiguous()
        self.CPUInfer.submit(
            self.moe.forward_sft_task(
                bsz_tensor.data_ptr(),
                TOPK,
                expert_ids.data_ptr(),
                weights.data_ptr(),
                input_data.data_ptr(),
                output.data_ptr(),
                save_for_backward,
            )
        )
        self.CPUInfer.sync()
        return output

    def backward(self, grad_output, grads=None, grad_weights=True):
        """grads: dict of preallocated buffers (input, six LoRA, weights) or None for zeros."""
        qlen = grad_output.shape[0]
        if grads is None:
            grads = {"input": torch.zeros(qlen, HIDDEN, dtype=torch.bfloat16)}
            grads.update({n: torch.zeros_like(self.lora[n].data) for n in LORA})
            grads["weights"] = torch.zeros(qlen, TOPK, dtype=torch.float32)
        gw_ptr = grads["weights"].data_ptr() if grad_weights else 0
        self.CPUInfer.submit(
            self.moe.backward_task(
                grad_output.data_ptr(),
                grads["input"].data_ptr(),
                *(grads[n].data_ptr() for n in LORA),
                gw_ptr,
            )
        )
        self.CPUInfer.sync()
        return grads


def nan_buffers(qlen):
    lora_shapes = {n: p.shape for n, p in init_lora(b_zero=True).items()}
    bufs = {"input": torch.full((qlen, HIDDEN), float("nan"), dtype=torch.bfloat16)}
    bufs.update(
        {n: torch.full(s, float("nan"), dtype=torch.bfloat16) for n, s in lora_shapes.items()}
    )
    bufs["weights"] = torch.full((qlen, TOPK), float("nan"), dtype=torch.float32)
    return bufs


def float64_forward(base, lora, expert_ids, weights, input_data):
    """The layer's output in float64 (spec section 3) on the current values of the tensors."""
    return torch_moe_forward(
        f64(input_data),
        expert_ids,
        f64(weights),
        {n: f64(b) for n, b in base.items()},
        {n: f64(p) for n, p in lora.items()},
    )


def autograd_reference(base, lora, expert_ids, weights, input_data, grad_output):
    """(out, grads) in float64 via torch autograd: grads of input, six LoRA, routing weights."""
    x = f64(input_data).requires_grad_(True)
    w = f64(weights).requires_grad_(True)
    lo = {n: f64(p).requires_grad_(True) for n, p in lora.items()}
    out = torch_moe_forward(x, expert_ids, w, {n: f64(b) for n, b in base.items()}, lo)
    (out * f64(grad_output)).sum().backward()
    grads = {"input": x.grad, "weights": w.grad, **{n: lo[n].grad for n in LORA}}
    return out.detach(), grads


# ---- seed 2.3: test_moe_sft_forward("bf16" / "int8"; and "fp8") -------------------------------
# Against the float64 math of the unquantized model; spec section 4's goals per mode.

MODES = {  # quant: (layer class name, forward tolerance, backward tolerance)
    "bf16": ("AMXBF16_SFT_MOE", FWD_TOL, BWD_TOL),
    "int8": ("AMXInt8_SFT_MOE", 0.04, 0.06),
    "fp8": ("AMXFP8_SFT_MOE", 0.06, 0.075),  # a bf16 model converted to fp8 (spec 5.1)
}


@pytest.mark.parametrize("quant", list(MODES))
@pytest.mark.parametrize("qlen", [QLEN, 1, 33])
def test_moe_sft_forward(quant, qlen):
    cls_name, fwd_tol, _ = MODES[quant]
    base, lora = init_base(), init_lora()
    layer = SeedLayer(base, lora, cls=getattr(kt_kernel_ext.moe, cls_name))
    expert_ids, weights, input_data, _ = make_batch(seed=2, qlen=qlen)
    output = layer.forward(expert_ids, weights, input_data)
    assert output.dtype == torch.float32 and output.shape == (qlen, HIDDEN)
    ref = float64_forward(base, lora, expert_ids, weights, input_data)
    diff = rel_err(output, ref)
    assert diff < fwd_tol, f"forward relative difference {diff:.6f}"
    if quant != "bf16":
        bf16 = SeedLayer(base, lora).forward(expert_ids, weights, input_data)
        assert not torch.equal(output, bf16), f"the {quant} layer gave the bf16 layer's numbers"


def test_forward_output_is_overwritten():
    base, lora = init_base(), init_lora()
    layer = SeedLayer(base, lora)
    expert_ids, weights, input_data, _ = make_batch(seed=3)
    out = torch.full((QLEN, HIDDEN), float("nan"), dtype=torch.float32)
    layer.forward(expert_ids, weights, input_data, output=out)
    assert torch.isfinite(out).all()
    again = layer.forward(expert_ids, weights, input_data, output=out.clone().fill_(7.0))
    assert torch.equal(again, out)


def test_padding_id_contributes_nothing():
    base, lora = init_base(), init_lora()
    layer = SeedLayer(base, lora)
    expert_ids, weights, input_data, _ = make_batch(seed=4)
    expert_ids[:, 1] = -1
    output = layer.forward(expert_ids, weights, input_data)
    ref = float64_forward(base, lora, expert_ids, weights, input_data)
    assert rel_err(output, ref) < FWD_TOL


# ---- seed 2.3: test_moe_sft_backward("bf16" / "int8") ------------------------------------------


@pytest.mark.parametrize("quant", list(MODES))
@pytest.mark.parametrize("qlen", [QLEN, 2, 40])
def test_moe_sft_backward(quant, qlen):
    cls_name, fwd_tol, bwd_tol = MODES[quant]
    base, lora = init_base(), init_lora()
    layer = SeedLayer(base, lora, cls=getattr(kt_kernel_ext.moe, cls_name))
    # expert 7 gets no token: its LoRA grads must be written as exact zeros
    expert_ids, weights, input_data, grad_output = make_batch(seed=5, qlen=qlen, unused_expert=7)
    output = layer.forward(expert_ids, weights, input_data, save_for_backward=True)
    grads = layer.backward(grad_output, grads=nan_buffers(qlen))
    ref_out, ref = autograd_reference(base, lora, expert_ids, weights, input_data, grad_output)
    assert rel_err(output, ref_out) < fwd_tol
    assert grads["input"].dtype == torch.bfloat16 and grads["weights"].dtype == torch.float32
    for name in ("input", *LORA, "weights"):
        assert torch.isfinite(grads[name]).all(), f"{name} not fully written"
        diff = rel_err(grads[name], ref[name])
        assert diff < bwd_tol, f"{name} diff {diff:.6f}"
    for name in LORA:
        assert (grads[name][7] == 0).all(), f"{name}: unrouted expert not zeroed"


def test_backward_grad_weights_ptr_zero_means_not_wanted():
    base, lora = init_base(), init_lora()
    layer = SeedLayer(base, lora)
    expert_ids, weights, input_data, grad_output = make_batch(seed=6)
    layer.forward(expert_ids, weights, input_data, save_for_backward=True)
    with_gw = layer.backward(grad_output)
    layer.forward(expert_ids, weights, input_data, save_for_backward=True)
    bufs = nan_buffers(QLEN)
    without = layer.backward(grad_output, grads=bufs, grad_weights=False)
    assert torch.isnan(without["weights"]).all()  # not touched
    for name in ("input", *LORA):
        assert torch.equal(with_gw[name], without[name]), name


def test_backward_overwrites_not_accumulates():
    base, lora = init_base(), init_lora()
    layer = SeedLayer(base, lora)
    expert_ids, weights, input_data, grad_output = make_batch(seed=7)
    layer.forward(expert_ids, weights, input_data, save_for_backward=True)
    first = layer.backward(grad_output)
    kept = {n: t.clone() for n, t in first.items()}
    layer.forward(expert_ids, weights, input_data, save_for_backward=True)
    second = layer.backward(grad_output, grads=first)  # same buffers again
    for name in kept:
        assert torch.equal(second[name], kept[name]), name


def test_saved_state_does_not_alias_input():
    """The caller may overwrite x after forward(save=True) (spec section 6)."""
    base, lora = init_base(), init_lora()
    layer = SeedLayer(base, lora)
    expert_ids, weights, input_data, grad_output = make_batch(seed=8)
    saved = [t.clone() for t in (expert_ids, weights, input_data)]
    layer.forward(expert_ids, weights, input_data, save_for_backward=True)
    input_data.fill_(3.0)
    expert_ids.fill_(0)
    weights.fill_(0.0)
    grads = layer.backward(grad_output)
    _, ref = autograd_reference(base, lora, *saved, grad_output)
    for name in ("input", *LORA, "weights"):
        assert rel_err(grads[name], ref[name]) < BWD_TOL, name


# ---- seed 2.3: test_moe_sft_lora_weight_sync() -------------------------------------------------


def test_moe_sft_lora_weight_sync():
    base, lora = init_base(), init_lora()
    layer = SeedLayer(base, lora)
    expert_ids, weights, input_data, _ = make_batch(seed=9)
    ptrs = {n: p.data.data_ptr() for n, p in lora.items()}

    def ref_forward():  # reads the LoRA tensors as they are now
        return float64_forward(base, lora, expert_ids, weights, input_data)

    output_before = layer.forward(expert_ids, weights, input_data)
    assert rel_err(output_before, ref_forward()) < FWD_TOL

    optimizer = torch.optim.SGD(list(lora.values()), lr=0.5)
    g = torch.Generator().manual_seed(10)
    for p in lora.values():
        p.grad = torch.randn(p.shape, generator=g).to(torch.bfloat16) * p.detach().abs().mean()
    before = {n: p.data.clone() for n, p in lora.items()}
    optimizer.step()  # in place: zero copy, no sync or update call
    assert {n: p.data.data_ptr() for n, p in lora.items()} == ptrs
    assert not any(torch.equal(before[n], lora[n].data) for n in LORA)

    output_after = layer.forward(expert_ids, weights, input_data)
    assert not torch.allclose(output_before, output_after)
    assert rel_err(output_after, ref_forward()) < FWD_TOL

    # Each tensor is read at every call: a plain in-place write to one of them is seen too.
    with torch.no_grad():
        lora["down_lora_b"].mul_(-1.0)
    assert rel_err(layer.forward(expert_ids, weights, input_data), ref_forward()) < FWD_TOL


def test_update_lora_weights_task_repoints_to_new_allocations():
    base, lora = init_base(), init_lora()
    layer = SeedLayer(base, lora)
    expert_ids, weights, input_data, grad_output = make_batch(seed=11)
    new = init_lora(seed=12)  # new allocations, different values
    layer.CPUInfer.submit(
        layer.moe.update_lora_weights_task(*(new[n].data.data_ptr() for n in LORA))
    )
    layer.CPUInfer.sync()
    layer.lora = new
    out = layer.forward(expert_ids, weights, input_data, save_for_backward=True)
    ref_out, ref = autograd_reference(base, new, expert_ids, weights, input_data, grad_output)
    assert rel_err(out, ref_out) < FWD_TOL
    grads = layer.backward(grad_output)
    for name in ("input", *LORA, "weights"):
        assert rel_err(grads[name], ref[name]) < BWD_TOL, name
    # The old tensors are no longer read; the new ones are, zero copy.
    with torch.no_grad():
        for p in lora.values():
            p.zero_()
    assert torch.equal(layer.forward(expert_ids, weights, input_data), out)
    with torch.no_grad():
        new["up_lora_b"].mul_(2.0)
    changed = layer.forward(expert_ids, weights, input_data)
    assert not torch.equal(changed, out)


# ---- seed 2.3: test_moe_sft_training_loop() ----------------------------------------------------


@pytest.mark.parametrize("moe_class", ["AMXBF16_SFT_MOE", "AMXInt8_SFT_MOE", "AMXFP8_SFT_MOE"])
def test_moe_sft_training_loop(moe_class):
    """Seed section 4 with only the import changed, small sizes, and a learnable target: a
    teacher (same base, LoRA with the student's A and its own nonzero B) instead of noise."""
    expert_num, hidden_size, intermediate_size = EXPERT_NUM, HIDDEN, INTER
    num_experts_per_tok, lora_rank, lora_alpha = TOPK, RANK, ALPHA
    qlen, num_threads = 64, NUM_THREADS
    torch.manual_seed(0)

    # 4.1: base weights (frozen), LoRA weights (trainable), 1/sqrt(fan_in) instead of /100
    base = init_base(seed=20)
    gate_proj, up_proj, down_proj = base["gate_proj"], base["up_proj"], base["down_proj"]
    student = init_lora(seed=21, b_zero=True)
    gate_lora_a_param, gate_lora_b_param = student["gate_lora_a"], student["gate_lora_b"]
    up_lora_a_param, up_lora_b_param = student["up_lora_a"], student["up_lora_b"]
    down_lora_a_param, down_lora_b_param = student["down_lora_a"], student["down_lora_b"]
    lora_params = [
        gate_lora_a_param,
        gate_lora_b_param,
        up_lora_a_param,
        up_lora_b_param,
        down_lora_a_param,
        down_lora_b_param,
    ]
    optimizer = torch.optim.AdamW(lora_params, lr=1e-2)

    teacher = {n: f64(p) for n, p in student.items()}
    g = torch.Generator().manual_seed(22)
    for n in ("gate_lora_b", "up_lora_b", "down_lora_b"):
        teacher[n] = torch.randn(teacher[n].shape, generator=g, dtype=torch.float64) * 0.1
    base64 = {n: f64(b) for n, b in base.items()}

    # 4.2
    CPUInfer = kt_kernel_ext.CPUInfer(num_threads)
    config = kt_kernel_ext.moe.MOESFTConfig()
    config.expert_num = expert_num
    config.num_experts_per_tok = num_experts_per_tok
    config.hidden_size = hidden_size
    config.intermediate_size = intermediate_size
    config.lora_rank = lora_rank
    config.lora_alpha = lora_alpha
    config.max_cache_depth = 1
    config.max_len = 25600
    config.layer_idx = 0
    config.gate_proj = gate_proj.data_ptr()
    config.up_proj = up_proj.data_ptr()
    config.down_proj = down_proj.data_ptr()
    config.gate_lora_a = gate_lora_a_param.data.data_ptr()
    config.gate_lora_b = gate_lora_b_param.data.data_ptr()
    config.up_lora_a = up_lora_a_param.data.data_ptr()
    config.up_lora_b = up_lora_b_param.data.data_ptr()
    config.down_lora_a = down_lora_a_param.data.data_ptr()
    config.down_lora_b = down_lora_b_param.data.data_ptr()
    config.pool = CPUInfer.backend_
    moe = getattr(kt_kernel_ext.moe, moe_class)(config)
    CPUInfer.submit(moe.load_weights_task())
    CPUInfer.sync()
    CPUInfer.submit(moe.warm_up_task())
    CPUInfer.sync()

    # 4.3
    losses = []
    for step in range(40):
        expert_ids = (
            torch.stack([torch.randperm(expert_num)[:num_experts_per_tok] for _ in range(qlen)])
            .to(torch.int64)
            .contiguous()
        )
        weights = torch.rand(qlen, num_experts_per_tok, dtype=torch.float32).contiguous()
        weights = weights / weights.sum(dim=-1, keepdim=True)
        input_data = torch.randn(qlen, hidden_size, dtype=torch.bfloat16).contiguous()
        target = torch_moe_forward(f64(input_data), expert_ids, f64(weights), base64, teacher)
        target = target.to(torch.bfloat16).contiguous()
        bsz_tensor = torch.tensor([qlen])

        output = torch.zeros(qlen, hidden_size, dtype=torch.float32).contiguous()
        CPUInfer.submit(
            moe.forward_sft_task(
                bsz_tensor.data_ptr(),
                num_experts_per_tok,
                expert_ids.data_ptr(),
                weights.data_ptr(),
                input_data.data_ptr(),
                output.data_ptr(),
                True,
            )
        )
        CPUInfer.sync()

        loss = torch.mean((output - target.float()) ** 2)
        grad_output = (2 * (output - target.float()) / output.numel()).to(torch.bfloat16)
        grad_output = grad_output.contiguous()

        grad_input = torch.zeros(qlen, hidden_size, dtype=torch.bfloat16).contiguous()
        grad_gate_lora_a = torch.zeros_like(gate_lora_a_param.data)
        grad_gate_lora_b = torch.zeros_like(gate_lora_b_param.data)
        grad_up_lora_a = torch.zeros_like(up_lora_a_param.data)
        grad_up_lora_b = torch.zeros_like(up_lora_b_param.data)
        grad_down_lora_a = torch.zeros_like(down_lora_a_param.data)
        grad_down_lora_b = torch.zeros_like(down_lora_b_param.data)

        CPUInfer.submit(
            moe.backward_task(
                grad_output.data_ptr(),
                grad_input.data_ptr(),
                grad_gate_lora_a.data_ptr(),
                grad_gate_lora_b.data_ptr(),
                grad_up_lora_a.data_ptr(),
                grad_up_lora_b.data_ptr(),
                grad_down_lora_a.data_ptr(),
                grad_down_lora_b.data_ptr(),
            )
        )
        CPUInfer.sync()

        gate_lora_a_param.grad = grad_gate_lora_a
        gate_lora_b_param.grad = grad_gate_lora_b
        up_lora_a_param.grad = grad_up_lora_a
        up_lora_b_param.grad = grad_up_lora_b
        down_lora_a_param.grad = grad_down_lora_a
        down_lora_b_param.grad = grad_down_lora_b

        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step % 10 == 0:
            print(f"Step {step}, Loss: {loss.item():.6f}")

    first, last = losses[0], sum(losses[-5:]) / 5
    assert all(torch.isfinite(torch.tensor(losses)))
    assert last < 0.5 * first, f"loss did not fall: {first:.4e} -> {last:.4e} ({losses})"


# ---- warm-up ---------------------------------------------------------------------------


def test_warm_up_task_runs_and_changes_nothing():
    base, lora = init_base(), init_lora()
    layer = SeedLayer(base, lora)
    expert_ids, weights, input_data, grad_output = make_batch(seed=30)
    before = layer.forward(expert_ids, weights, input_data, save_for_backward=True)
    layer.CPUInfer.submit(layer.moe.warm_up_task())
    layer.CPUInfer.sync()
    # warm-up saves nothing: the backward still pairs with the forward above
    grads = layer.backward(grad_output)
    _, ref = autograd_reference(base, lora, expert_ids, weights, input_data, grad_output)
    assert rel_err(grads["input"], ref["input"]) < BWD_TOL
    assert torch.equal(layer.forward(expert_ids, weights, input_data), before)


def test_config_attributes_of_the_seed():
    config = kt_kernel_ext.moe.MOESFTConfig()
    for name in (
        "expert_num",
        "num_experts_per_tok",
        "hidden_size",
        "intermediate_size",
        "lora_rank",
        "lora_alpha",
        "max_cache_depth",
        "max_len",
        "layer_idx",
        "pool",
        "gate_proj",
        "up_proj",
        "down_proj",
        *LORA,
    ):
        assert hasattr(config, name), name


def test_int8_seed_layer_matches_python_api_bit_for_bit():
    base, lora = init_base(), init_lora()
    layer = SeedLayer(base, lora, cls=kt_kernel_ext.moe.AMXInt8_SFT_MOE)
    expert_ids, weights, input_data, _ = make_batch(seed=9, qlen=12)
    out = layer.forward(expert_ids, weights, input_data)
    cfg = ktsft.MoESFTConfig(
        EXPERT_NUM, TOPK, HIDDEN, INTER, lora_rank=RANK, lora_alpha=ALPHA, quant="int8"
    )
    moe = ktsft.MoESFT(cfg, **base, **{n: p.data for n, p in lora.items()})
    assert torch.equal(moe.forward(input_data, expert_ids, weights), out)
