"""Fine-tune the routed experts of one MoE layer with LoRA, PyTorch style (ktsft.torch).

A self-contained example: it writes a small Hugging Face style checkpoint first (per-expert
``mlp.experts.{e}.gate_proj.weight`` keys, as Qwen3-MoE and DeepSeek store them), then loads the
layer from it, trains a router and the experts' LoRA adapters with AdamW, gradient accumulation
and activation checkpointing, saves the adapter, loads it into a fresh layer and merges it.
"""

import os
import tempfile

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from ktsft.torch import MoELoRA

E, K, H, I = 8, 2, 128, 64  # experts, experts per token, hidden size, expert intermediate size
PREFIX = "model.layers.0.mlp.experts"
torch.manual_seed(0)

# ---- 0. a stand-in for a downloaded checkpoint ---------------------------------------------
workdir = tempfile.mkdtemp()
checkpoint_file = os.path.join(workdir, "model-00001-of-00001.safetensors")
tensors = {}
for e in range(E):
    tensors[f"{PREFIX}.{e}.gate_proj.weight"] = (torch.randn(I, H) / H**0.5).bfloat16()
    tensors[f"{PREFIX}.{e}.up_proj.weight"] = (torch.randn(I, H) / H**0.5).bfloat16()
    tensors[f"{PREFIX}.{e}.down_proj.weight"] = (torch.randn(H, I) / I**0.5).bfloat16()
save_file(tensors, checkpoint_file)
del tensors


# ---- 1. the model: a trainable router in front of the CPU experts -------------------------
class MoEBlock(nn.Module):
    def __init__(self, experts: MoELoRA):
        super().__init__()
        self.router = nn.Linear(H, E, bias=False)  # trains through the routing weights' grads
        self.experts = experts

    def forward(self, h):  # h: [batch, seq, H] bf16
        probs = torch.softmax(self.router(h.float()), dim=-1)
        weights, ids = torch.topk(probs, K, dim=-1)  # [batch, seq, K]
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return h + self.experts(h, ids, weights)


# streamed expert by expert; quant="int8" would store the base weights as int8
experts = MoELoRA.from_safetensors(
    checkpoint_file, PREFIX, E, lora_rank=8, lora_alpha=16.0, num_experts_per_tok=K
)
model = MoEBlock(experts)
optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
teacher = torch.randn(H, H) / H**0.5 * 0.1  # what the block should learn to add


def batch():
    h = torch.randn(4, 16, H).bfloat16()  # [batch, seq, H]
    return h, h.float() + torch.tanh(h.float() @ teacher)


# ---- 2. training: gradient accumulation and activation checkpointing ----------------------
accumulation = 2
for step in range(30):
    for _ in range(accumulation):  # .grad sums over the micro-batches
        h, target = batch()
        y = checkpoint(model, h, use_reentrant=False)  # the experts' state is recomputed
        loss = nn.functional.mse_loss(y.float(), target) / accumulation
        loss.backward()
    optimizer.step()  # in place: the engine reads the new LoRA values at the next call
    optimizer.zero_grad(set_to_none=True)
    if step % 10 == 0 or step == 29:
        print(f"step {step:2d}  loss {accumulation * loss.item():.5f}")

# ---- 3. adapters: save, load elsewhere, merge for serving ---------------------------------
adapter_file = os.path.join(workdir, "layer0_experts_adapter.safetensors")
experts.save_adapter(adapter_file)  # keys gate_lora_a ... down_lora_b, bf16

fresh = MoELoRA.from_safetensors(checkpoint_file, PREFIX, E, lora_rank=8, lora_alpha=16.0)
fresh.load_adapter(adapter_file)
h, _ = batch()
ids = torch.randint(0, E, (4, 16, K))
w = torch.full((4, 16, K), 1.0 / K)
with torch.no_grad():  # inference: nothing is saved for backward
    assert torch.equal(fresh(h, ids, w), experts(h, ids, w))

merged = fresh.merged_weights()  # W + (alpha / r) * B @ A, bf16, for stacks without LoRA
print({name: tuple(t.shape) for name, t in merged.items()})
