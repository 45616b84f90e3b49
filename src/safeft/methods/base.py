"""The interface every defence implements: optional hooks at the stages where defences act.

A fine-tuning run (:func:`safeft.recipes.finetune.finetune`) calls them in this order::

    examples = method.training_data(examples, run)       # change the training data (mix in safety data)
    model = prepare_model(model, train_config)           # LoRA or full fine-tuning of the blocks
    method.before_training(model, tokenizer, run)        # change the model (SPF: estimate, freeze unguarded)
    train(..., callbacks=method.callbacks(model, tokenizer, run),   # act on every step (SPF, gradient surgery)
          loss=method.training_loss(model, tokenizer, run))        # change the objective (Lisa)
    model = method.after_training(model, tokenizer, run)  # post-hoc projection or pruning

and a method that changes the alignment stage returns its settings from :meth:`Method.alignment_key`, its
callbacks from :meth:`Method.alignment_callbacks` and its objective from :meth:`Method.alignment_loss`: it then
gets an aligned model of its own (cached by that key).
Every hook is optional; the base class does nothing at every stage (plain SFT).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

from safeft.config import TrainConfig
from safeft.data.examples import ChatExample


@dataclass
class NoOptions:
    """The configuration of a method without options."""


@dataclass
class RunContext:
    """What a method may need to know about the run it is part of.

    Args:
        out: the run's directory; a method may write its artefacts there (SPF: ``out/subspace``).
        cache: safeft's cache directory (base-model answers, aligned models).
        seed: the run's seed (data order, mixing, random bases).
        base_model: the unaligned model (whose answers make the default harmful mix, and from which SafeLoRA takes
            the alignment direction): :func:`safeft.recipes.finetune.harmful_source`.
        harmful_answers: BeaverTails-style JSONL of harmful answers, if the setting uses one.
        task_prompts: the user turns of the training data as the method receives it (before its own changes):
            safety data drawn by a method leaves these prompts out, so a defence never uses the attack's requests.
        resume: the run continues an interrupted one in ``out``; a method may reuse what it wrote there.
        examples: the training data as the method receives it (before its own changes), harmful rows included: a
            defender holds the data, not the knowledge of which rows were slipped in.
    """

    out: Path
    cache: Path
    seed: int = 0
    base_model: str = "default"
    harmful_answers: str | None = None
    task_prompts: frozenset[str] = field(default_factory=frozenset)
    resume: bool = False
    examples: tuple[ChatExample, ...] = ()


class Method:
    """A defence (or none): a validated options dataclass plus optional stage hooks.

    Subclasses set ``Config`` to their options dataclass and override the hooks they need. ``name`` is the
    registry name the method was built under (presets of one class differ only in their options).
    """

    Config: ClassVar[type] = NoOptions

    def __init__(self, config=None, name: str | None = None):
        self.config = config if config is not None else self.Config()
        if not isinstance(self.config, self.Config):
            raise TypeError(f"{type(self).__name__} takes a {self.Config.__name__}, got {type(self.config).__name__}")
        self.name = name or type(self).__name__.lower()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, {self.config!r})"

    def options(self, train: TrainConfig) -> dict:
        """Return the method's options as a plain dict (for JSON), as they apply to training with ``train`` (an
        option left to a default that depends on the training, like SPF's side, is given its value)."""
        return asdict(self.config)

    # --- the alignment stage ----------------------------------------------------------------------------------

    def alignment_key(self) -> dict | None:
        """Return the settings of this method's own alignment stage (part of its cache key), or None to fine-tune
        the shared aligned model."""
        return None

    def alignment_callbacks(self, model, tokenizer) -> list:
        """Return ``TrainerCallback`` objects that change alignment training (only used with an alignment key)."""
        return []

    def alignment_loss(self, model, tokenizer, run: RunContext):
        """Return the alignment objective (a :data:`safeft.train.StepLoss`), or None for plain SFT on the alignment
        data (only used with an alignment key). ``run.base_model`` is the model being aligned."""
        return None

    # --- the fine-tuning stages -------------------------------------------------------------------------------

    def training_data(self, examples: list[ChatExample], run: RunContext) -> list[ChatExample]:
        """Return the training data to use instead of ``examples`` (default: unchanged)."""
        return examples

    def before_training(self, model, tokenizer, run: RunContext) -> None:
        """Change the prepared model in place before the optimizer is built (default: nothing)."""

    def callbacks(self, model, tokenizer, run: RunContext) -> list:
        """Return ``TrainerCallback`` objects that act during training (default: none)."""
        return []

    def training_loss(self, model, tokenizer, run: RunContext):
        """Return the fine-tuning objective (a :data:`safeft.train.StepLoss`), or None for the task loss."""
        return None

    def after_training(self, model, tokenizer, run: RunContext):
        """Return the model to save and evaluate after training (default: the trained model)."""
        return model

    def facts(self, model) -> dict:
        """Return what this run's method built that a reader of the results needs (JSON-able; default: nothing)."""
        return {}
