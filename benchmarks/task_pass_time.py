"""What one pass over the task's test examples saves: the task's replies and loss, before and after.

    python benchmarks/task_pass_time.py --model default --task agnews --task-train ../shared/data/agnews/train.csv \
        --task-test ../shared/data/agnews/test.csv --max-test 300 --out benchmarks/results/task_pass_time

An evaluation scores the task twice over the same prompts: greedy replies for the accuracy, and the reference
replies' loss. Before, each was its own pass (``generate`` then ``safety_loss`` over the (prompt, reference) pairs);
now ``safeft.evaluate.generation.answer_and_loss`` runs each batch's prompts and reference replies through the
model once and starts the generation from that pass's cache. This script times both on one loaded model,
alternately, ``--repeats`` times each, and checks that they give the same replies (so the same accuracy) and the
same loss. Writes ``task_pass_time.json`` and ``task_pass_time.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

from safeft.config import DataConfig
from safeft.data.examples import SafetySample
from safeft.evaluate.generation import answer_and_loss, generate
from safeft.losses import safety_loss
from safeft.recipes.bench import machine_info
from safeft.recipes.finetune import task_of

BATCH_SIZE = 48  # evaluate_model's


def separate_passes(model, tokenizer, task, max_new_tokens: int) -> tuple[list[str], float]:
    """The task's replies and loss as an evaluation computed them before: two passes over the prompts."""
    replies = generate(model, tokenizer, [e.prompt_messages() for e in task.test], max_new_tokens=max_new_tokens,
                       batch_size=BATCH_SIZE, desc="replies")
    return replies, safety_loss(model, tokenizer, [SafetySample(e.prompt, e.response) for e in task.test])


def one_pass(model, tokenizer, task, max_new_tokens: int) -> tuple[list[str], float]:
    return answer_and_loss(model, tokenizer, task.test, max_new_tokens=max_new_tokens, batch_size=BATCH_SIZE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--task", default="agnews")
    parser.add_argument("--task-train")
    parser.add_argument("--task-test")
    parser.add_argument("--max-test", type=int, default=300)
    parser.add_argument("--max-new-tokens", type=int, default=64, help="the evaluation's (a task may cap it)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from safeft.models import load_model

    model, tokenizer = load_model(args.model)
    task = task_of(DataConfig(task=args.task, task_train=args.task_train, task_test=args.task_test,
                              max_test=args.max_test))
    tokens = min(args.max_new_tokens, task.answer_tokens or args.max_new_tokens)
    before, after, checks = [], [], []
    for _ in range(args.repeats):  # alternating, so that a busy moment of the machine hits both
        start = time.perf_counter()
        replies, loss = separate_passes(model, tokenizer, task, tokens)
        before.append(time.perf_counter() - start)
        start = time.perf_counter()
        replies_now, loss_now = one_pass(model, tokenizer, task, tokens)
        after.append(time.perf_counter() - start)
        checks.append({"replies_differing": sum(a != b for a, b in zip(replies, replies_now, strict=True)),
                       "loss_before": loss, "loss_after": loss_now})
        print(f"two passes {before[-1]:.1f} s, one pass {after[-1]:.1f} s, {checks[-1]}", flush=True)
    result = {"command": "python benchmarks/task_pass_time.py " + shlex.join(sys.argv[1:]), "model": args.model,
              "task": args.task, "examples": len(task.test), "max_new_tokens": tokens, "batch_size": BATCH_SIZE,
              **machine_info(), "before_seconds": statistics.median(before),
              "after_seconds": statistics.median(after),
              "ratio": statistics.median(a / b for a, b in zip(after, before)), "checks": checks}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "task_pass_time.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "task_pass_time.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    differing = max(c["replies_differing"] for c in result["checks"])
    gap = max(abs(c["loss_before"] - c["loss_after"]) for c in result["checks"])
    return "\n".join([
        "# The task's replies and loss in one pass", "",
        f"`{result['command']}` ({result['machine']}, {result['threads']} threads, torch {result['torch']}); "
        f"medians of paired, alternating timings; {result['examples']} {result['task']} test examples, "
        f"{result['max_new_tokens']} new tokens, batches of {result['batch_size']}", "",
        "| two passes (s) | one pass (s) | ratio | replies that differ | largest loss difference |",
        "|---:|---:|---:|---:|---:|",
        f"| {result['before_seconds']:.1f} | {result['after_seconds']:.1f} | {result['ratio']:.2f} | {differing} | "
        f"{gap:.1e} |"]) + "\n"


if __name__ == "__main__":
    main()
