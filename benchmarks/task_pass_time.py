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

import shlex
import statistics
import sys

from eval_time import model_and_task, task_timing_parser, timed, write_result
from safeft.data.examples import SafetySample
from safeft.evaluate.generation import answer_and_loss, generate
from safeft.losses import safety_loss
from safeft.recipes.bench import machine_info

BATCH_SIZE = 48  # evaluate_model's


def separate_passes(model, tokenizer, task, max_new_tokens: int) -> tuple[list[str], float]:
    """The task's replies and loss as an evaluation computed them before: two passes over the prompts."""
    replies = generate(model, tokenizer, [e.prompt_messages() for e in task.test], max_new_tokens=max_new_tokens,
                       batch_size=BATCH_SIZE, desc="replies")
    return replies, safety_loss(model, tokenizer, [SafetySample(e.prompt, e.response) for e in task.test])


def one_pass(model, tokenizer, task, max_new_tokens: int) -> tuple[list[str], float]:
    return answer_and_loss(model, tokenizer, task.test, max_new_tokens=max_new_tokens, batch_size=BATCH_SIZE)


def main() -> None:
    parser = task_timing_parser(__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=64, help="the evaluation's (a task may cap it)")
    args = parser.parse_args()
    model, tokenizer, task = model_and_task(args)
    tokens = min(args.max_new_tokens, task.answer_tokens or args.max_new_tokens)
    before, after, checks = [], [], []
    for _ in range(args.repeats):  # alternating, so that a busy moment of the machine hits both
        seconds, (replies, loss) = timed(separate_passes, model, tokenizer, task, tokens)
        before.append(seconds)
        seconds, (replies_now, loss_now) = timed(one_pass, model, tokenizer, task, tokens)
        after.append(seconds)
        checks.append({"replies_differing": sum(a != b for a, b in zip(replies, replies_now, strict=True)),
                       "loss_before": loss, "loss_after": loss_now})
        print(f"two passes {before[-1]:.1f} s, one pass {after[-1]:.1f} s, {checks[-1]}", flush=True)
    result = {"command": "python benchmarks/task_pass_time.py " + shlex.join(sys.argv[1:]), "model": args.model,
              "task": args.task, "examples": len(task.test), "max_new_tokens": tokens, "batch_size": BATCH_SIZE,
              **machine_info(), "before_seconds": statistics.median(before),
              "after_seconds": statistics.median(after),
              "ratio": statistics.median(a / b for a, b in zip(after, before)), "checks": checks}
    write_result(args.out, "task_pass_time", result, markdown)


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
