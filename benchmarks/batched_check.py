"""SPF's batched update correction against its per-matrix correction: same model, data and steps.

    python benchmarks/batched_check.py --model random:576,1536,30,9,3,49152 --dtype bfloat16 --out DIR

Two copies of one random-weight model (every block matrix trained, AdamW lr 1e-4, one sequence of random tokens per
step) train with SPF at the library defaults (rank 128, ``right``, ``always``, ``update``), estimated once from 20
built-in samples: one corrects matrices of equal shape in batched products (``attach_spf(..., batched=True)``
naming the device), the other one matrix at a time. Written to ``DIR/batched_check.json`` and printed: the
batches formed, the share of weight entries where the two runs differ and the largest difference (in units of
the weights' largest entry), and for each run the largest ``||dW V|| / ||dW||`` over targets (what the correction
keeps at zero up to the weights' rounding) and the median time inside SPF's hooks per step (the first two steps
dropped; host time, which on CUDA includes waiting at the step's one sync).
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import statistics
import sys
from pathlib import Path

import torch

from overhead import random_llama
from safeft import SPFConfig, attach_spf
from safeft.data import builtin_safety_samples
from safeft.spf import SPFProjector
from safeft.spf.subspace import SafetySubspace


def train(model, subspace, batched: bool, steps: int, batch: dict) -> tuple[torch.nn.Module, SPFProjector]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    projector = attach_spf(optimizer, model, subspace, SPFConfig(monitor_every=0), batched=batched).projector
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, projector


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="random:576,1536,30,9,3,49152")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        base, tokenizer = random_llama(args.model, getattr(torch, args.dtype))
    for name, p in base.named_parameters():
        p.requires_grad_("layers." in name and "norm" not in name)
    subspace = SafetySubspace.estimate(base, tokenizer, builtin_safety_samples(20), SPFConfig(), show_progress=False)
    batch = {"input_ids": torch.randint(0, 256, (1, args.tokens), device=device)}
    batch["labels"] = batch["input_ids"]
    start = {n: p.detach().clone() for n, p in base.named_parameters() if p.requires_grad}
    runs = {k: train(copy.deepcopy(base), subspace, k == "batched", args.steps, batch) for k in ("batched", "plain")}
    batched, plain = (dict(runs[k][0].named_parameters()) for k in ("batched", "plain"))
    differ = sum(int((batched[n] != plain[n]).sum()) for n in start)
    largest = max(float((batched[n].float() - plain[n].float()).abs().max() / plain[n].float().abs().max())
                  for n in start)
    kept = {}
    for key, (_, projector) in runs.items():
        params = dict(runs[key][0].named_parameters())
        ratios = []
        for target in projector.stats().targets:
            n = target.name + ".weight"
            dW = params[n].detach().float() - start[n].float()
            V = subspace[target.name].V.to(dW.device)
            ratios.append(float((dW @ V).norm() / dW.norm()))
        kept[key] = max(ratios)
    result = {
        "command": "python " + shlex.join(sys.argv),
        "device": torch.cuda.get_device_name() if device == "cuda" else "CPU",
        "torch": torch.__version__,
        "model": f"{args.model} ({args.dtype})",
        "steps": args.steps,
        "batches": sorted(runs["batched"][1].stats().batches),
        "guards": len(runs["batched"][1].stats().targets),
        "entries_differing": differ / sum(p.numel() for p in start.values()),
        "largest_difference_over_largest_weight": largest,
        "max_dW_V_over_dW": kept,
        "hooks_median_s": {k: statistics.median(projector.stats().hook_seconds[2:] or projector.stats().hook_seconds)
                           for k, (_, projector) in runs.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "batched_check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
