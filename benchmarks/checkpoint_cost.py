"""Cost of a checkpoint: seconds and bytes per Trainer checkpoint (manifest included), as a share of a training step.

    python benchmarks/checkpoint_cost.py --out /tmp/checkpoint-cost                  # the tiny random model, seconds
    python benchmarks/checkpoint_cost.py --model default --out benchmarks/results/checkpoint_cost/full
    python benchmarks/checkpoint_cost.py --model default --lora-r 8 --out benchmarks/results/checkpoint_cost/lora8

Trains ``--steps`` steps twice with the training recipe's own ``train()``: once without checkpoints (the step time,
median) and once saving every ``--save-every`` steps, timing each save (the Trainer's files, then the manifest that
is written last, see ``safeft.checkpoints``) and measuring each checkpoint's bytes. Writes ``checkpoint_cost.json``
and ``checkpoint_cost.md`` under ``--out``: the cost of one checkpoint in steps, what it adds to a run for a few
``--save-every`` values, and the smallest of those that keeps the added time under 1%.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import safeft.checkpoints
from safeft.config import DataConfig, TrainConfig
from safeft.recipes.bench import machine_info
from safeft.recipes.finetune import task_of
from safeft.train import prepare_model, train

EVERY = (5, 10, 20, 50, 100, 200, 500)  # --save-every values the table prices


def load(name: str):
    """Return ``(model, tokenizer)``: ``tiny`` (a random 2-layer Llama, offline), ``default`` or any model path/id."""
    if name == "tiny":
        from safeft.testing import byte_tokenizer, tiny_llama

        return tiny_llama(seed=0), byte_tokenizer()
    from safeft.models import load_model

    return load_model(name)


def timed(owner, name: str, seconds: list[float]):
    """Replace ``owner.name`` by a wrapper that appends each call's wall time to ``seconds``; return the original."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    setattr(owner, name, wrapper)
    return original


def measure(args) -> dict:
    from transformers import Trainer, TrainerCallback

    examples = task_of(DataConfig(task="sentiment", max_train=args.max_train)).train
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lora_r=args.lora_r, save_every=0,
                         logging_steps=args.steps, report_to="none")
    with tempfile.TemporaryDirectory() as scratch:
        model, tokenizer = load(args.model)
        plain = train(prepare_model(model, config), tokenizer, examples, config, output_dir=f"{scratch}/plain")
        model, tokenizer = load(args.model)
        saves, manifests, sizes = [], [], []
        originals = [(Trainer, "_save_checkpoint", timed(Trainer, "_save_checkpoint", saves)),
                     (safeft.checkpoints, "write_manifest", timed(safeft.checkpoints, "write_manifest", manifests))]
        watch = Path(scratch, "saving")

        class Sizes(TrainerCallback):  # each checkpoint's bytes, once the Trainer has written its files
            def on_save(self, args_, state_, control, **kwargs):
                folder = watch / f"checkpoint-{state_.global_step}"
                sizes.append(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()))

        try:
            saving = TrainConfig(**{**config.to_dict(), "save_every": args.save_every})
            train(prepare_model(model, saving), tokenizer, examples, saving, output_dir=str(watch),
                  callbacks=[Sizes()])
        finally:
            for owner, name, original in originals:
                setattr(owner, name, original)
    step = plain["step_seconds_median"]
    save = statistics.median(s + m for s, m in zip(saves, manifests, strict=True))
    added = {k: save / (k * step) for k in EVERY}
    return {
        "model": args.model, "lora_r": args.lora_r, "batch_size": args.batch_size, "steps": args.steps,
        "save_every": args.save_every, "checkpoints": len(saves), "step_seconds_median": step,
        "checkpoint_seconds_median": save, "trainer_save_seconds_median": statistics.median(saves),
        "manifest_seconds_median": statistics.median(manifests), "checkpoint_bytes": max(sizes),
        "disk_bytes_kept": safeft.checkpoints.KEEP * max(sizes), "checkpoint_in_steps": save / step,
        "added_time_share": {str(k): v for k, v in added.items()},
        "suggested_save_every": next((k for k in EVERY if added[k] <= 0.01), None),
        "device": "cuda" if torch.cuda.is_available() else "cpu", **machine_info(),
        "command": "python benchmarks/checkpoint_cost.py " + shlex.join(sys.argv[1:]),
    }


def markdown(result: dict) -> str:
    lines = [f"# Checkpoint cost: {result['model']}" + (f", LoRA r={result['lora_r']}" if result["lora_r"] else ""),
             "", f"`{result.get('command', 'python benchmarks/checkpoint_cost.py')}` ({result.get('machine', '?')}, "
             f"{result.get('threads', '?')} threads, torch {result.get('torch', '?')})", "",
             f"One checkpoint ({result['checkpoint_bytes'] / 2**20:.1f} MiB, {result['disk_bytes_kept'] / 2**20:.1f} "
             f"MiB on disk with {safeft.checkpoints.KEEP} kept) takes {result['checkpoint_seconds_median']:.3f} s "
             f"(manifest {result['manifest_seconds_median']:.3f} s), {result['checkpoint_in_steps']:.2f} training "
             f"steps of {result['step_seconds_median']:.3f} s (batch {result['batch_size']}, {result['device']}; "
             f"medians of {result['checkpoints']} checkpoints).", "",
             "| --save-every | added time |", "|---:|---:|"]
    lines += [f"| {k} | {100 * v:.2f}% |" for k, v in result["added_time_share"].items()]
    lines += ["", f"Smallest --save-every with at most 1% added: {result['suggested_save_every']}", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="'tiny' (random, offline), 'default', or a model path")
    parser.add_argument("--out", required=True, help="directory for checkpoint_cost.json and checkpoint_cost.md")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--save-every", type=int, default=2, help="save this often while measuring (>= 1)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lora-r", type=int, default=0)
    parser.add_argument("--max-train", type=int, default=64)
    args = parser.parse_args()
    result = measure(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "checkpoint_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "checkpoint_cost.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
