"""The alignment stage (SPEC §4): SFT on harmful -> varied refusals plus benign -> the base model's own answers.

The default model is not safety-aligned, so every pipeline first aligns it, once, into the cache. A method that
changes the alignment stage (perturbation-aware alignment) gets an aligned model of its own, cached by its key.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from transformers import TrainerCallback

from safeft.answers import cached_answers, model_key
from safeft.checkpoints import MANIFEST, check_checkpoint, write_manifest
from safeft.config import AlignConfig, TrainConfig
from safeft.data import builtin
from safeft.data.examples import ChatExample
from safeft.io import write_json, writing
from safeft.methods.base import RunContext


def alignment_examples(base, tokenizer, model_name: str, cache: Path) -> list[ChatExample]:
    """Return the alignment data: 80 harmful requests with varied refusals and 60 benign requests with the base
    model's own greedy answers (self-distillation keeps its helpfulness)."""
    harmful = [ChatExample.from_pair(p, builtin.refusal_for(p), harmful=True, category=c)
               for c, p in builtin.harmful_requests("align")]
    benign_prompts = builtin.benign_requests("align")
    answers = cached_answers(base, tokenizer, benign_prompts, cache / f"benign_answers-{model_key(model_name)}.jsonl")
    benign = [ChatExample.from_pair(p, answers[p]) for p in benign_prompts if answers[p].strip()]
    examples = harmful + benign
    random.Random(0).shuffle(examples)
    return examples


def refusal_rate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32) -> float:
    """Return the fraction of ``prompts`` the model refuses (keyword judge on short greedy replies)."""
    from safeft.evaluate import generate
    from safeft.evaluate.judges import REFUSAL, KeywordJudge

    replies = generate(model, tokenizer, [[{"role": "user", "content": p}] for p in prompts],
                       max_new_tokens=max_new_tokens, desc="refusal check")
    return KeywordJudge().judge(prompts, replies).count(REFUSAL) / len(prompts)


class RefusalCheck(TrainerCallback):
    """Every ``every`` steps, measure the refusal rate on validation prompts; stop training once it hits ``target``."""

    def __init__(self, tokenizer, prompts: Sequence[str], every: int, target: float):
        self.tokenizer, self.prompts, self.every, self.target = tokenizer, prompts, every, target
        self.checks: list[dict] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            rate = refusal_rate(model, self.tokenizer, self.prompts)
            self.checks.append({"steps": state.global_step, "val_refusal": rate})
            print(f"alignment: {state.global_step} steps, validation refusal {100 * rate:.0f}%")
            if rate >= self.target:  # never reset the flag: the trainer also sets it at max_steps
                control.should_training_stop = True
        return control


def align(model_name: str, out: Path, config: AlignConfig, cache: Path, method=None, *, overwrite: bool = False,
          command: str = "", chat_template: str | None = None) -> dict:
    """Align ``model_name`` and save it to ``out`` (model, tokenizer, ``align.json``); return the report.

    With a ``method`` whose :meth:`~safeft.methods.Method.alignment_key` is set, its alignment callbacks act on
    every alignment step. ``out`` is written like every command's output (:func:`safeft.io.writing`):
    never over the input model, an existing ``out`` only with ``overwrite`` and only once alignment has finished.
    """
    from safeft.data.examples import SafetySample
    from safeft.losses import safety_loss
    from safeft.models import load_model
    from safeft.train import prepare_model, train

    with writing(out, overwrite=overwrite, inputs=[model_name], command=command) as tmp:
        base, tokenizer = load_model(model_name, chat_template=chat_template)
        start = time.perf_counter()
        examples = alignment_examples(base, tokenizer, model_name, cache)
        model = prepare_model(base, TrainConfig())
        val = [p for _, p in builtin.harmful_requests("check")]
        check = RefusalCheck(tokenizer, val, config.check_every, config.target_refusal)
        own = method is not None and method.alignment_key()
        extra = method.alignment_callbacks(model, tokenizer) if own else []
        run = RunContext(out=tmp, cache=cache, seed=config.seed, base_model=model_name)
        objective = method.alignment_loss(model, tokenizer, run) if own else None
        settings = TrainConfig(steps=config.max_steps, learning_rate=config.learning_rate,
                               batch_size=config.batch_size, seed=config.seed,
                               schedule="constant")  # the stopping step is not known in advance
        log = train(model, tokenizer, examples, settings, callbacks=[check, *extra], loss=objective,
                    output_dir=str(tmp / "trainer"))
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
        report = {
            "base_model": model_name, "config": asdict(config), "steps": log["steps"], "checks": check.checks,
            "examples": len(examples), "seconds": time.perf_counter() - start,
            "val_refusal_loss": safety_loss(model, tokenizer, [SafetySample(p, builtin.refusal_for(p)) for p in val]),
        }
        if own:
            report["method"] = {"name": method.name, **method.alignment_key()}
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "align.json", report)
        write_manifest(tmp)  # last: a damaged cached model is told apart and aligned again (ensure_aligned)
    return report


def aligned_model_dir(model_name: str, config: AlignConfig, cache: Path, method=None) -> Path:
    """Return the cache directory of the aligned model for these settings (it may not exist yet); a method with
    its own alignment stage gets a directory of its own."""
    parts: list = [model_name, asdict(config)]
    own = method.alignment_key() if method is not None else None
    if own:
        parts.append({"method": method.name, **own})
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:10]
    return cache / f"aligned-{model_key(model_name)}-{key}"


def ensure_aligned(model_name: str, config: AlignConfig, cache: Path, method=None, *,
                   chat_template: str | None = None) -> tuple[Path, dict, bool]:
    """Return ``(aligned model dir, alignment report, was cached)``, aligning ``model_name`` first if needed
    (``chat_template``: a template file for a tokenizer without one; the aligned model's tokenizer keeps it)."""
    target = aligned_model_dir(model_name, config, cache, method)
    if (target / "align.json").exists():
        try:
            report = json.loads((target / "align.json").read_text())
        except (ValueError, UnicodeDecodeError) as error:
            problems = [f"align.json is not valid JSON: {error}"]
        else:  # a cache written before aligned models had a manifest has nothing more to check
            problems = check_checkpoint(target) if (target / MANIFEST).exists() else []
        if not problems:
            return target, report, True
        print(f"safeft: the cached aligned model {target} is damaged ({'; '.join(problems)}); aligning again",
              flush=True)
    return target, align(model_name, target, config, cache, method, chat_template=chat_template,
                         overwrite=target.exists()), False
