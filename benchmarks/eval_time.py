"""What batching an evaluation's losses by length saves: the safety loss and the task loss, before and after.

    python benchmarks/eval_time.py --model default --task agnews --task-train ../shared/data/agnews/train.csv \
        --task-test ../shared/data/agnews/test.csv --max-test 300 --out benchmarks/results/eval_time

An evaluation (``safeft.evaluate.evaluate_model``) spends its time on generation (harmful, benign and task prompts)
and on two loss passes: the safety loss over the harmful requests' refusals and the task loss over the task's test
examples (a bench run's file records each part's seconds under ``metrics.seconds``). This script times the two loss
passes on one loaded model, alternately in the order given (how ``safeft.losses.safety_loss`` batched them before)
and batched by length (now), ``--repeats`` times each, and checks that both orders give the same loss. Writes
``eval_time.json`` and ``eval_time.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from safeft.chat import encode_response
from safeft.config import DataConfig
from safeft.data import builtin
from safeft.data.examples import SafetySample
from safeft.losses import batches, eval_without_param_grads, response_loss_sum, safety_loss
from safeft.recipes.bench import machine_info
from safeft.recipes.finetune import task_of


def loss_in_given_order(model, tokenizer, samples, batch_size: int = 8) -> float:
    """The safety loss as safeft computed it before: batches in the order given (the mean is the same)."""
    encoded = [encode_response(tokenizer, s.prompt, s.refusal) for s in samples]
    total, count = 0.0, 0
    with eval_without_param_grads(model), torch.no_grad():
        for batch in batches(encoded, batch_size, tokenizer):
            loss, n = response_loss_sum(model, batch)
            total, count = total + float(loss), count + n
    return total / max(count, 1)


def timed(function, *args):
    """Return the wall-clock seconds of ``function(*args)`` and its value."""
    start = time.perf_counter()
    value = function(*args)
    return time.perf_counter() - start, value


def task_timing_parser(description: str) -> argparse.ArgumentParser:
    """Return the arguments an evaluation timing takes: the model, the task's data, repeats and where to write."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="default")
    parser.add_argument("--task", default="agnews")
    parser.add_argument("--task-train")
    parser.add_argument("--task-test")
    parser.add_argument("--max-test", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", required=True)
    return parser


def model_and_task(args):
    """Return the loaded model, its tokenizer and the task that ``args`` (from :func:`task_timing_parser`) name."""
    from safeft.models import load_model

    model, tokenizer = load_model(args.model)
    task = task_of(DataConfig(task=args.task, task_train=args.task_train, task_test=args.task_test,
                              max_test=args.max_test))
    return model, tokenizer, task


def write_result(out: str, stem: str, result: dict, markdown) -> None:
    """Write ``result`` as ``OUT/STEM.json`` and its ``markdown(result)`` as ``OUT/STEM.md``, and print the table."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (folder / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))


def main() -> None:
    args = task_timing_parser(__doc__.splitlines()[0]).parse_args()
    model, tokenizer, task = model_and_task(args)
    parts = {"safety_loss": [SafetySample(p, builtin.refusal_for(p)) for _, p in builtin.harmful_requests("eval")],
             "task_loss": [SafetySample(e.prompt, e.response) for e in task.test]}
    result = {"command": "python benchmarks/eval_time.py " + shlex.join(sys.argv[1:]), "model": args.model,
              "task": args.task, "examples": {k: len(v) for k, v in parts.items()}, **machine_info(), "parts": {}}
    for part, samples in parts.items():
        before, after, losses = [], [], set()
        for _ in range(args.repeats):  # alternating, so that a busy moment of the machine hits both
            seconds, loss = timed(loss_in_given_order, model, tokenizer, samples)
            before.append(seconds)
            seconds, loss_now = timed(safety_loss, model, tokenizer, samples)
            after.append(seconds)
            losses.add(round(loss, 5) == round(loss_now, 5))
            print(f"{part}: given order {before[-1]:.1f} s, by length {after[-1]:.1f} s", flush=True)
        result["parts"][part] = {"before_seconds": statistics.median(before),
                                 "after_seconds": statistics.median(after),
                                 "ratio": statistics.median(a / b for a, b in zip(after, before)),
                                 "same_loss": losses == {True}}
    write_result(args.out, "eval_time", result, markdown)


def markdown(result: dict) -> str:
    lines = ["# Loss passes of an evaluation, batched by length", "",
             f"`{result['command']}` ({result['machine']}, {result['threads']} threads, torch {result['torch']}); "
             f"medians of paired, alternating timings", "",
             "| part | examples | given order (s) | by length (s) | ratio | same loss |",
             "|---|---:|---:|---:|---:|---|"]
    for part, r in result["parts"].items():
        lines.append(f"| {part} | {result['examples'][part]} | {r['before_seconds']:.1f} | {r['after_seconds']:.1f} | "
                     f"{r['ratio']:.2f} | {'yes' if r['same_loss'] else 'NO'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
