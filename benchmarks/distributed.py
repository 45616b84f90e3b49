"""SPF under FSDP2: its communication per optimizer step against the gradient reduce-scatter, and its memory.

    python benchmarks/distributed.py --out benchmarks/results/distributed

Two parts, written to OUT.json and OUT.md:

- **Measured** on the default model (SmolLM2-135M-Instruct, real weights) with 2 CPU processes (gloo), every block
  and the root wrapped by ``fully_shard``: the subspace is estimated on the sharded model (every process factors the
  same samples), then a few SPF steps run per side; SPF's own all-reduces are counted by
  :class:`safeft.distributed.Collectives`, FSDP2's reduce-scatters by wrapping ``reduce_scatter_tensor``.
- **Computed** from the shapes of Llama-2-7B and Llama-3-70B (every linear layer of the blocks guarded at the default
  rank): SPF's numbers per step against the gradients' for full fine-tuning and LoRA r = 8, and SPF's state per
  process (U's rows, V, S and update mode's sketch; fp32) at a given number of processes.

On the wire a ring all-reduce of N numbers sends ``2 (W-1)/W N`` per process and a reduce-scatter of N sends
``(W-1)/W N``, so the byte ratio is twice the ratio of numbers (both in fp32 here; FSDP2 often reduces bf16, which
halves its side).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

SIDES = (("right", "always"), ("right", "conflict"), ("left", "always"), ("two_sided", "always"))

# (hidden, intermediate, layers, attention heads, key/value heads); head_dim = hidden / heads
SHAPES = {"Llama-2-7B": (4096, 11008, 32, 32, 32), "Llama-3-70B": (8192, 28672, 80, 64, 8)}


def block_linears(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int) -> list[tuple[int, int]]:
    """Return the ``(m, n)`` (out, in) shapes of every linear layer in the blocks of a Llama-style model."""
    kv = hidden // heads * kv_heads
    per_layer = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden),  # q, k, v, o
                 (intermediate, hidden), (intermediate, hidden), (hidden, intermediate)]  # gate, up, down
    return per_layer * layers


def spf_numbers(shapes, rank: int, side: str, mode: str, lora_r: int = 0) -> int:
    """Return the numbers SPF all-reduces per optimizer step under FSDP2 for these targets (see safeft.spf)."""
    total = 0
    for m, n in shapes:
        r = min(rank, m, n)
        if lora_r:  # B's sketch where the side projects B; the four r x k sketches for the conflict tests
            total += 4 * r * lora_r if mode != "always" else (r * lora_r if side != "right" else 0)
        elif side == "left":
            total += r * n
        elif side == "two_sided":
            total += r * r
        else:
            total += 0 if mode == "always" else r
    return total


def spf_state_bytes(shapes, rank: int, side: str, world: int, update: bool = True) -> int:
    """Return the bytes of SPF's state per process: U's rows, V, S and (update mode) the pre-step sketch, fp32."""
    total = 0
    for m, n in shapes:
        r = min(rank, m, n)
        rows = -(-m // world)
        total += rows * r + n * r + r
        if update:
            total += {"left": r * n, "right": rows * r, "two_sided": r * r}[side]
    return 4 * total


def computed(rank: int, world: int) -> dict:
    """Return the analytic table for the shapes of :data:`SHAPES`."""
    out = {}
    for name, dims in SHAPES.items():
        shapes = block_linears(*dims)
        weights = sum(m * n for m, n in shapes)
        lora_grads = sum((m + n) * 8 for m, n in shapes)
        rows = {}
        for side, mode in SIDES:
            spf = spf_numbers(shapes, rank, side, mode)
            rows[f"{side}/{mode}"] = {"spf_numbers": spf, "grad_numbers": weights, "numbers_ratio": spf / weights,
                                      "bytes_ratio": 2 * spf / weights,
                                      "state_gib_per_process": spf_state_bytes(shapes, rank, side, world) / 2**30}
        lora = {}
        for side, mode in SIDES:
            spf = spf_numbers(shapes, rank, side, mode, lora_r=8)
            lora[f"{side}/{mode}"] = {"spf_numbers": spf, "grad_numbers": lora_grads,
                                      "numbers_ratio": spf / lora_grads, "bytes_ratio": 2 * spf / lora_grads}
        out[name] = {"targets": len(shapes), "guarded_weights": weights, "world": world, "full": rows,
                     "lora8": lora}
    return out


def _worker(rank: int, world: int, workdir: str, steps: int, samples: int, spf_rank: int) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from safeft import SafetySubspace, SPFConfig, attach_spf
    from safeft.config import TrainConfig
    from safeft.data import builtin_safety_samples
    from safeft.distributed import local
    from safeft.models import load_model
    from safeft.spf import freeze_unguarded
    from safeft.train import prepare_model

    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{workdir}/rendezvous", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=1800))
    scattered: list[int] = []
    original = dist.reduce_scatter_single  # what FSDP2 reduce-scatters the gradients with

    def counting(*args, **kwargs):
        scattered.append((kwargs["input"] if "input" in kwargs else args[1]).numel())
        return original(*args, **kwargs)

    dist.reduce_scatter_single = counting
    try:
        mesh = init_device_mesh("cpu", (world,))
        results = {}
        base, tokenizer = load_model("default")
        base = prepare_model(base, TrainConfig())  # the blocks train, as in a fine-tuning run
        for layer in base.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(base, mesh=mesh)
        subspace = SafetySubspace.estimate(base, tokenizer, builtin_safety_samples(samples), SPFConfig(rank=spf_rank),
                                           show_progress=False)
        freeze_unguarded(base, subspace)
        start = [local(p).detach().clone() for p in base.parameters()]
        torch.manual_seed(0)
        ids = torch.randint(0, base.config.vocab_size, (2, 128))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        for side, mode in SIDES:
            with torch.no_grad():  # every side starts from the weights the subspace was estimated at
                for p, value in zip(base.parameters(), start):
                    local(p).copy_(value)
            optimizer = torch.optim.AdamW([p for p in base.parameters() if p.requires_grad], lr=1e-6)
            handle = attach_spf(optimizer, base, subspace, SPFConfig(rank=spf_rank, side=side, mode=mode))
            spf_counts, scatter_counts = [], []
            for _ in range(steps):
                handle.projector.collectives.reset()
                scattered.clear()
                base(**batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                spf_counts.append(sum(handle.projector.collectives.elements))
                scatter_counts.append(sum(scattered))
            handle.detach()
            results[f"{side}/{mode}"] = {"spf_numbers_per_step": spf_counts, "reduce_scatter_numbers_per_step":
                                         scatter_counts, "spf_calls_last_step": handle.projector.collectives.calls}
        if rank == 0:
            Path(workdir, "measured.json").write_text(json.dumps({"targets": len(subspace), "results": results}))
    finally:
        dist.reduce_scatter_single = original
        dist.destroy_process_group()


def measured(steps: int, samples: int, rank: int) -> dict:
    """Run :func:`_worker` on 2 processes and return what rank 0 measured."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as workdir:
        mp.spawn(_worker, args=(2, workdir, steps, samples, rank), nprocs=2, join=True)
        return json.loads(Path(workdir, "measured.json").read_text())


def markdown(result: dict) -> str:
    """Return the report's tables."""
    m = result["measured"]
    lines = ["# SPF under FSDP2: communication and memory", "", f"Command: `{result['command']}`", "",
             f"## Measured: default model, 2 CPU processes (gloo), rank {result['rank']}, {m['targets']} targets", "",
             "| side / mode | SPF numbers per step | FSDP2 reduce-scatter numbers per step | bytes on the wire, SPF / "
             "reduce-scatter | SPF all-reduces per step |", "|---|---|---|---|---|"]
    for key, r in m["results"].items():
        spf, scatter = r["spf_numbers_per_step"][-1], r["reduce_scatter_numbers_per_step"][-1]
        lines.append(f"| {key} | {spf:,} | {scatter:,} | {2 * spf / scatter:.2e} | {r['spf_calls_last_step']} |")
    lines += ["", f"## Computed: every block linear guarded at rank {result['rank']}, full fine-tuning "
              f"(state at {result['world']} processes)", "",
              "| model | side / mode | SPF numbers per step | gradient numbers | bytes on the wire, SPF / "
              "reduce-scatter | SPF state per process |", "|---|---|---|---|---|---|"]
    for name, c in result["computed"].items():
        for key, r in c["full"].items():
            lines.append(f"| {name} | {key} | {r['spf_numbers']:,} | {r['grad_numbers']:,} | "
                         f"{r['bytes_ratio']:.2e} | {r['state_gib_per_process']:.2f} GiB |")
    lines += ["", "LoRA r = 8 on the same layers:", "",
              "| model | side / mode | SPF numbers per step | LoRA gradient numbers | bytes on the wire, SPF / "
              "reduce-scatter |", "|---|---|---|---|---|"]
    for name, c in result["computed"].items():
        for key, r in c["lora8"].items():
            lines.append(f"| {name} | {key} | {r['spf_numbers']:,} | {r['grad_numbers']:,} | {r['bytes_ratio']:.2e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from safeft.spf.config import DEFAULT_RANK

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/distributed", help="output path without extension")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--rank", type=int, default=DEFAULT_RANK)
    parser.add_argument("--world", type=int, default=8, help="processes for the computed state per process")
    args = parser.parse_args()
    result = {"command": "python " + shlex.join(sys.argv), "rank": args.rank, "world": args.world,
              "computed": computed(args.rank, args.world), "measured": measured(args.steps, args.samples, args.rank)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
