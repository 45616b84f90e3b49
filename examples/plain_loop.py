"""SPF in a plain PyTorch loop: two optimizer hooks make every optimizer.step() projected.

    python examples/plain_loop.py --model PATH_TO_ALIGNED_MODEL
    python examples/plain_loop.py --tiny         # a tiny random model, in seconds (what CI runs)
"""

import argparse

import torch

from safeft import SafetySubspace, SPFConfig, attach_spf, freeze_unguarded
from safeft.chat import collate, encode_messages
from safeft.data import builtin_safety_samples
from safeft.data.tasks import load_task
from safeft.models import load_model
from safeft.testing import byte_tokenizer, tiny_llama

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="default", help="an aligned chat model (directory); default SmolLM2-135M")
parser.add_argument("--tiny", action="store_true", help="a tiny random model instead (a smoke test)")
parser.add_argument("--steps", type=int, default=20)
args = parser.parse_args()

model, tokenizer = (tiny_llama(), byte_tokenizer()) if args.tiny else load_model(args.model)
config = SPFConfig(rank=4) if args.tiny else SPFConfig()
subspace = SafetySubspace.estimate(model, tokenizer, builtin_safety_samples(20), config)
freeze_unguarded(model, subspace)

examples = load_task("facts").train
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5)
handle = attach_spf(optimizer, model, subspace, config, tokenizer)  # before_step / after_step around every step
model.train()
for step in range(2 if args.tiny else args.steps):
    rows = [examples[(4 * step + i) % len(examples)] for i in range(4)]
    batch = collate([encode_messages(tokenizer, e.messages) for e in rows], tokenizer.pad_token_id)
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    print(f"step {step + 1}: loss {loss.item():.3f}", handle.metrics())
handle.detach()
