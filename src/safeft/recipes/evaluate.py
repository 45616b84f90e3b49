"""Evaluate a model on the built-in held-out prompts (or given harmful prompts) and a task (SPEC §5)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from safeft.data import builtin
from safeft.data.tasks import Task
from safeft.errors import UserError


def scored_requests(split: str = "eval") -> dict:
    """Return ``{"harmful": n, "benign": n, "hash": h}`` naming the built-in requests :func:`evaluate` scores on
    ``split`` (the harmful ones and the benign ones of over-refusal; ``h`` hashes both lists), so that a result
    scored on other requests (an older split) can be told apart from today's."""
    harmful = [p for _, p in builtin.harmful_requests(split)]
    benign = [p for _, p in builtin.over_refusal_requests(split)]
    digest = hashlib.sha256(json.dumps([harmful, benign]).encode()).hexdigest()[:8]
    return {"harmful": len(harmful), "benign": len(benign), "hash": digest}


def evaluate(model, tokenizer, task: Task | None, *, max_new_tokens: int = 64, judge=None,
             harmful_prompts: Sequence[str] | None = None, split: str = "eval", jailbreaks: Sequence | None = None,
             jailbreak_requests: int | None = None, suffixes: Sequence | None = None) -> dict:
    """Return every measure of ``model`` (see :func:`safeft.evaluate.evaluate_model`): harmful score on the
    built-in harmful requests of ``split`` (``"eval"``, or ``"val"`` to choose hyper-parameters; or
    ``harmful_prompts``), over-refusal on the built-in benign requests of that split (split by kind), safety loss
    on those harmful requests with varied refusals, and the task's accuracy and loss.

    With ``jailbreaks`` (templates), ``result["jailbreaks"]`` is their ASR (:func:`template_attack`) on the harmful
    requests, or on ``jailbreak_requests`` of them spread evenly over the list; with ``suffixes`` (GCG results),
    ``result["gcg_transfer"]`` is the ASR of those suffixes on this model (:func:`safeft.evaluate.gcg.transfer`).
    """
    from safeft.data.examples import SafetySample
    from safeft.evaluate import evaluate_model

    harmful = list(harmful_prompts) if harmful_prompts else [p for _, p in builtin.harmful_requests(split)]
    benign = builtin.over_refusal_requests(split)
    result = evaluate_model(model, tokenizer, harmful_prompts=harmful, benign_prompts=[p for _, p in benign],
                            benign_kinds=[k for k, _ in benign], task=task,
                            safety_pairs=[SafetySample(p, builtin.refusal_for(p)) for p in harmful], judge=judge,
                            max_new_tokens=max_new_tokens)
    if jailbreaks:
        from safeft.evaluate.jailbreaks import template_attack

        requests = spread(harmful, jailbreak_requests) if jailbreak_requests else harmful
        result["jailbreaks"] = template_attack(model, tokenizer, requests, jailbreaks, judge,
                                               max_new_tokens=max_new_tokens)
    if suffixes:
        from safeft.evaluate.gcg import transfer

        result["gcg_transfer"] = transfer(model, tokenizer, suffixes, judge, max_new_tokens=max_new_tokens)
    return result


def spread(items: Sequence, count: int) -> list:
    """Return ``count`` items taken evenly across ``items`` (all of them if there are no more than ``count``)."""
    if count >= len(items):
        return list(items)
    return [items[i * len(items) // count] for i in range(count)]


def evaluate_dir(model_dir: str | Path, task: Task | None, **kwargs) -> dict:
    """Load the model in ``model_dir`` (a model directory or a fine-tuning output; ``chat_template=`` a template
    file for a tokenizer without one) and :func:`evaluate` it; refuse a model with non-finite weights."""
    from safeft.recipes.finetune import load_finetuned
    from safeft.train import first_non_finite

    model, tokenizer = load_finetuned(model_dir, chat_template=kwargs.pop("chat_template", None))
    bad = first_non_finite(model)
    if bad:
        raise UserError(f"the model at {model_dir} has non-finite weights (first in {bad}): its training diverged, "
                         "so any score would be meaningless. Re-train it with a lower learning rate")
    return evaluate(model, tokenizer, task, **kwargs)


def headline(metrics: dict) -> dict:
    """Return the headline numbers of an evaluation as flat keys (rates in percent with their intervals)."""
    out = {"harmful_score": metrics["harmful_score"]["rate"], "harmful_score_ci": metrics["harmful_score"]["ci"],
           "refusal_rate": metrics["refusal_rate"]["rate"], "off_task_rate": metrics["off_task_rate"]["rate"],
           "over_refusal": metrics["over_refusal"]["rate"], "over_refusal_ci": metrics["over_refusal"]["ci"],
           "safety_loss": metrics["safety_loss"], "task_loss": metrics["task_loss"]}
    accuracy = metrics.get("accuracy")
    out["accuracy"] = accuracy["rate"] if accuracy else None
    out["accuracy_ci"] = accuracy["ci"] if accuracy else None
    if metrics.get("jailbreaks"):
        out["jailbreak_asr"] = metrics["jailbreaks"]["overall"]["rate"]
        out["jailbreak_asr_ci"] = metrics["jailbreaks"]["overall"]["ci"]
    return out
