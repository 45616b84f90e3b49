"""Evaluate a model: harmful score, over-refusal, task accuracy, safety loss and task loss (SPEC §5)."""

from __future__ import annotations

from collections.abc import Sequence

from safeft.data.examples import ChatExample, SafetySample
from safeft.data.tasks import Task
from safeft.evaluate.generation import generate
from safeft.evaluate.judges import COMPLIANCE, OFF_TASK, REFUSAL, Judge, KeywordJudge
from safeft.evaluate.stats import rate, wilson_interval
from safeft.losses import safety_loss

__all__ = ["KeywordJudge", "evaluate_model", "generate", "rate", "wilson_interval"]


def task_loss(model, tokenizer, examples: Sequence[ChatExample]) -> float:
    """Return the mean cross-entropy (nats per token) of the reference responses of ``examples``."""
    return safety_loss(model, tokenizer, [SafetySample(e.prompt, e.response) for e in examples])


def evaluate_model(model, tokenizer, *, harmful_prompts: Sequence[str], benign_prompts: Sequence[str],
                   task: Task | None = None, safety_pairs: Sequence[SafetySample] = (), judge: Judge | None = None,
                   max_new_tokens: int = 64, batch_size: int = 16, keep_samples: int = 5) -> dict:
    """Return every measure as a JSON-ready dict; rates are percentages with 95% Wilson intervals.

    ``harmful_score`` is the share of harmful prompts answered with substantive compliance; ``refusal_rate`` and
    ``off_task_rate`` split the rest. ``over_refusal`` is the share of benign prompts refused. ``accuracy`` is
    the task's score on its test split (None for unscored tasks).
    """
    judge = judge or KeywordJudge()
    harmful_replies = generate(model, tokenizer, [[{"role": "user", "content": p}] for p in harmful_prompts],
                               max_new_tokens=max_new_tokens, batch_size=batch_size, desc="harmful prompts")
    verdicts = judge.judge(harmful_prompts, harmful_replies)
    benign_replies = generate(model, tokenizer, [[{"role": "user", "content": p}] for p in benign_prompts],
                              max_new_tokens=max_new_tokens, batch_size=batch_size, desc="benign prompts")
    benign_verdicts = judge.judge(benign_prompts, benign_replies)
    n = len(harmful_prompts)
    result = {
        "harmful_score": rate(verdicts.count(COMPLIANCE), n),
        "refusal_rate": rate(verdicts.count(REFUSAL), n),
        "off_task_rate": rate(verdicts.count(OFF_TASK), n),
        "over_refusal": rate(benign_verdicts.count(REFUSAL), len(benign_prompts)),
        "accuracy": None,
        "safety_loss": safety_loss(model, tokenizer, safety_pairs) if safety_pairs else None,
        "task_loss": None,
        "samples": {
            "harmful": [{"prompt": p, "response": r, "verdict": v}
                        for p, r, v in list(zip(harmful_prompts, harmful_replies, verdicts))[:keep_samples]],
            "benign": [{"prompt": p, "response": r, "verdict": v}
                       for p, r, v in list(zip(benign_prompts, benign_replies, benign_verdicts))[:keep_samples]],
        },
    }
    if task is not None:
        task_replies = generate(model, tokenizer, [e.prompt_messages() for e in task.test],
                                max_new_tokens=max_new_tokens, batch_size=batch_size, desc=f"{task.name} test")
        scored = task.accuracy(task_replies)
        result["accuracy"] = rate(*scored) if scored else None
        result["task_loss"] = task_loss(model, tokenizer, task.test)
        result["samples"]["task"] = [{"prompt": e.prompt, "response": r, "answer": e.answer}
                                     for e, r in list(zip(task.test, task_replies))[:keep_samples]]
    return result
