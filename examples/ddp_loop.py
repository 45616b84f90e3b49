"""SPF under DDP, one process per device (CPU: gloo). SPF needs no communication of its own: the gradients are
all-reduced before the optimizer steps, so every rank projects the same tensors and makes the same update.

    torchrun --nproc_per_node 2 examples/ddp_loop.py --tiny     # two CPU processes, in seconds (what CI runs)
    torchrun --nproc_per_node 4 examples/ddp_loop.py --model PATH_TO_ALIGNED_MODEL
"""

import argparse

import torch
import torch.distributed as dist

from safeft import SafetySubspace, SPFConfig, attach_spf, freeze_unguarded
from safeft.chat import collate, encode_messages
from safeft.data import builtin_safety_samples
from safeft.data.tasks import load_task
from safeft.models import load_model
from safeft.testing import byte_tokenizer, tiny_llama

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="default")
parser.add_argument("--tiny", action="store_true")
args = parser.parse_args()

dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
model, tokenizer = (tiny_llama(), byte_tokenizer()) if args.tiny else load_model(args.model)
config = SPFConfig(rank=4) if args.tiny else SPFConfig()
subspace = SafetySubspace.estimate(model, tokenizer, builtin_safety_samples(20), config, show_progress=rank == 0)
freeze_unguarded(model, subspace)  # before wrapping: DDP registers only the parameters that train
ddp = torch.nn.parallel.DistributedDataParallel(model)
optimizer = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=5e-5)
attach_spf(optimizer, ddp, subspace, config)

examples = load_task("facts").train
for step in range(2 if args.tiny else 20):
    rows = [examples[(8 * step + 4 * rank + i) % len(examples)] for i in range(4)]  # each rank its own rows
    batch = collate([encode_messages(tokenizer, e.messages) for e in rows], tokenizer.pad_token_id)
    loss = ddp(**batch).loss
    loss.backward()  # DDP all-reduces the gradients here
    optimizer.step()  # SPF projects the (identical) update on every rank
    optimizer.zero_grad()
weights = torch.cat([p.detach().reshape(-1)[:1000] for p in model.parameters()])
gathered = [torch.zeros_like(weights) for _ in range(world)]
dist.all_gather(gathered, weights)
if rank == 0:
    print(f"{world} ranks, {step + 1} steps; ranks agree: {all(torch.equal(g, gathered[0]) for g in gathered)}")
# Release DDP (its reducer holds the process group) and wait for both ranks before tearing gloo down: otherwise
# one rank can abort at exit while the other still talks to it.
del optimizer, ddp
dist.barrier()
dist.destroy_process_group()
