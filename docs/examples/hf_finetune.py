"""Fine-tune a Hugging Face MoE model with ktsft running its routed experts (ktsft.hf).

Usage: OMP_WAIT_POLICY=PASSIVE python hf_finetune.py MODEL_DIR ADAPTER_DIR [--steps N]
       [--quant bf16|int8] [--check]

(OMP_WAIT_POLICY=PASSIVE: torch is imported before ktsft.hf here, so the environment must keep
torch's OpenMP workers from busy-waiting while ktsft's threads run; see docs/hf.rst, Threads.)

MODEL_DIR is a local transformers checkpoint (e.g. a downloaded Qwen3-30B-A3B). The experts
stream from its safetensors shards into ktsft's engine; attention gets a PEFT LoRA; a plain
AdamW loop trains both; the adapter is written in the PEFT layout that vLLM and SGLang load.
--check reloads the checkpoint in plain transformers, applies the adapter with PEFT and
compares the logits with the trained model's.
"""

import argparse
import os

import peft
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import ktsft.hf

parser = argparse.ArgumentParser()
parser.add_argument("model_dir")
parser.add_argument("adapter_dir")
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--quant", default="bf16")
parser.add_argument("--check", action="store_true")
args = parser.parse_args()
torch.manual_seed(0)

# ---- 1. load: experts on ktsft (LoRA r=8 on gate/up/down of every expert), the rest as usual
model = ktsft.hf.from_pretrained(
    args.model_dir, lora_rank=8, lora_alpha=16.0, quant=args.quant, dtype=torch.bfloat16
)

# ---- 2. LoRA on attention with PEFT; PEFT freezes everything else, so the experts' LoRA is
# switched back on
lora = peft.LoraConfig(
    r=8, lora_alpha=16.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
)
model = peft.get_peft_model(model, lora)
for _, p in ktsft.hf.lora_parameters(model):
    p.requires_grad_(True)

# ---- 3. data: a tokenizer's text when the checkpoint has one, else fixed token ids
text = "ktsft runs the routed experts of a Mixture-of-Experts model on the CPU. " * 8
if os.path.exists(os.path.join(args.model_dir, "tokenizer_config.json")):
    tokens = AutoTokenizer.from_pretrained(args.model_dir)(text, return_tensors="pt").input_ids
else:
    tokens = torch.arange(64).remainder(model.config.vocab_size - 1).add(1)[None]

# ---- 4. a plain training loop
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=2e-3)
model.train()
for step in range(args.steps):
    loss = model(tokens, labels=tokens).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad()
    print(f"step {step} loss {loss.item():.4f}")

# ---- 5. save the adapter: experts (per-expert keys) + attention, one PEFT directory
ktsft.hf.save_adapter(model, args.adapter_dir)
print("adapter written to", args.adapter_dir)

# ---- 6. optional check: plain transformers + PEFT computes what the trained model computes
if args.check:
    model.eval()
    with torch.no_grad():
        ours = model(tokens).logits.float()
        base = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16)
        served = peft.PeftModel.from_pretrained(base, args.adapter_dir)
        theirs = served(tokens).logits.float()
    err = ((ours - theirs).abs().mean() / theirs.abs().mean()).item()
    assert err < 0.01, err
    print(f"PEFT logits match (mean relative error {err:.4f})")

# ---- 7. serve it (GPU machines; see docs/hf.rst)
print(f"vllm serve {args.model_dir} --enable-lora --lora-modules sft={args.adapter_dir}")
print(
    f"python -m sglang.launch_server --model-path {args.model_dir} --enable-lora "
    f"--lora-paths sft={args.adapter_dir}"
)
