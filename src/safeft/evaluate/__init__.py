"""Evaluate a model: harmful score, over-refusal, task accuracy, safety loss and task loss (SPEC §5)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from safeft.data.examples import SafetySample
from safeft.data.tasks import Task
from safeft.errors import UserError
from safeft.evaluate.generation import answer_and_loss, generate
from safeft.evaluate.judges import COMPLIANCE, OFF_TASK, REFUSAL, Judge, KeywordJudge
from safeft.evaluate.stats import rate, wilson_interval
from safeft.losses import safety_loss

__all__ = ["KeywordJudge", "evaluate_model", "generate", "rate", "wilson_interval"]


VERDICT_LETTERS = {REFUSAL: "R", COMPLIANCE: "C", OFF_TASK: "O"}


def verdict_string(verdicts: Sequence[str]) -> str:
    """Return judge verdicts as one letter each (``R`` refusal, ``C`` compliance, ``O`` off-task), in prompt order:
    what a bootstrap over prompts needs, at one byte per prompt in a run file."""
    return "".join(VERDICT_LETTERS[v] for v in verdicts)


def evaluate_model(model, tokenizer, *, harmful_prompts: Sequence[str], benign_prompts: Sequence[str],
                   benign_kinds: Sequence[str] | None = None, task: Task | None = None,
                   safety_pairs: Sequence[SafetySample] = (), judge: Judge | None = None, max_new_tokens: int = 64,
                   batch_size: int = 48, keep_samples: int = 5) -> dict:
    """Return every measure as a JSON-ready dict; rates are percentages with 95% Wilson intervals.

    ``harmful_score`` is the share of harmful prompts answered with substantive compliance; ``refusal_rate`` and
    ``off_task_rate`` split the rest. ``over_refusal`` is the share of benign prompts refused, and, given
    ``benign_kinds`` (one per benign prompt), ``over_refusal_by_kind`` splits it by kind. ``accuracy`` is the task's
    score on its test split (None for unscored tasks). ``verdicts`` holds every prompt's verdict (see
    :func:`verdict_string`; the task's as ``1``/``0`` for correct/wrong), so that intervals can resample prompts.
    Generation runs in batches of ``batch_size`` (on the default model's CPU path 48 took 0.7x the time of 16).
    ``seconds`` says where the time went: each part's wall-clock seconds (generation and judging of the harmful and
    benign prompts, the safety loss, and the task's replies and loss, which share one pass:
    :func:`~safeft.evaluate.generation.answer_and_loss`).
    """
    judge = judge or KeywordJudge()
    seconds, clock = {}, time.perf_counter()

    def lap(part: str) -> None:
        nonlocal clock
        seconds[part], clock = time.perf_counter() - clock, time.perf_counter()

    harmful_replies = generate(model, tokenizer, [[{"role": "user", "content": p}] for p in harmful_prompts],
                               max_new_tokens=max_new_tokens, batch_size=batch_size, desc="harmful prompts")
    verdicts = judge.judge(harmful_prompts, harmful_replies)
    lap("harmful")
    benign_replies = generate(model, tokenizer, [[{"role": "user", "content": p}] for p in benign_prompts],
                              max_new_tokens=max_new_tokens, batch_size=batch_size, desc="benign prompts")
    benign_verdicts = judge.judge(benign_prompts, benign_replies)
    lap("benign")
    n = len(harmful_prompts)
    result = {
        "harmful_score": rate(verdicts.count(COMPLIANCE), n),
        "refusal_rate": rate(verdicts.count(REFUSAL), n),
        "off_task_rate": rate(verdicts.count(OFF_TASK), n),
        "over_refusal": rate(benign_verdicts.count(REFUSAL), len(benign_prompts)),
        "accuracy": None,
        "safety_loss": safety_loss(model, tokenizer, safety_pairs) if safety_pairs else None,
        "task_loss": None,
        "verdicts": {"harmful": verdict_string(verdicts), "benign": verdict_string(benign_verdicts)},
        "samples": {
            "harmful": [{"prompt": p, "response": r, "verdict": v}
                        for p, r, v in list(zip(harmful_prompts, harmful_replies, verdicts))[:keep_samples]],
            "benign": [{"prompt": p, "response": r, "verdict": v}
                       for p, r, v in list(zip(benign_prompts, benign_replies, benign_verdicts))[:keep_samples]],
        },
        "seconds": seconds,
    }
    lap("safety_loss")
    if benign_kinds is not None:
        kinds = list(benign_kinds)
        if len(kinds) != len(benign_prompts):
            raise UserError(f"{len(kinds)} benign kinds for {len(benign_prompts)} benign prompts")
        result["over_refusal_by_kind"] = {
            kind: rate(sum(v == REFUSAL for k, v in zip(kinds, benign_verdicts) if k == kind), kinds.count(kind))
            for kind in dict.fromkeys(kinds)}
    if task is not None:
        task_replies, result["task_loss"] = answer_and_loss(
            model, tokenizer, task.test, max_new_tokens=min(max_new_tokens, task.answer_tokens or max_new_tokens),
            batch_size=batch_size, desc=f"{task.name} test")
        if task.score is not None:
            correct = [bool(task.score(r, e)) for r, e in zip(task_replies, task.test, strict=True)]
            result["accuracy"] = rate(sum(correct), len(correct))
            result["verdicts"]["task"] = "".join("1" if c else "0" for c in correct)
        lap("task")
        result["samples"]["task"] = [{"prompt": e.prompt, "response": r, "answer": e.answer}
                                     for e, r in list(zip(task.test, task_replies))[:keep_samples]]
    return result
