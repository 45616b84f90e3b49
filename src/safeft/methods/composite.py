"""Methods combined: ``spf+mix`` runs SPF's projection on data with a small refusal replay, ``spf+lisa`` SPF with
Lisa's alternating alignment steps. Every stage hook of every part runs, in the order the name gives.

The parts must not compete for one stage: at most one may change the training objective and at most one may
bring an alignment stage of its own. Each option goes to every part that has an option of that name.
"""

from __future__ import annotations

from safeft.config import TrainConfig
from safeft.data.examples import ChatExample
from safeft.errors import UserError
from safeft.methods.base import Method, RunContext


class Composite(Method):
    """Two or more registered methods acting together (see the module docstring)."""

    def __init__(self, parts: list[Method], name: str):
        if len(parts) < 2:
            raise UserError(f"a combined method needs two parts or more, got {name!r}")
        owners = [p.name for p in parts if p.alignment_key() is not None]
        if len(owners) > 1:
            raise UserError(f"{name}: {' and '.join(owners)} both bring an alignment stage of their own; combine at "
                             "most one of them")
        self.parts = parts
        self.config = tuple(p.config for p in parts)
        self.name = name

    def __repr__(self) -> str:
        return f"Composite({', '.join(map(repr, self.parts))})"

    def options(self, train: TrainConfig) -> dict:
        """Return each part's options under its name."""
        return {p.name: p.options(train) for p in self.parts}

    def alignment_key(self) -> dict | None:
        return next((key for p in self.parts if (key := p.alignment_key()) is not None), None)

    def _aligner(self) -> Method:
        return next((p for p in self.parts if p.alignment_key() is not None), self.parts[0])

    def alignment_callbacks(self, model, tokenizer) -> list:
        return self._aligner().alignment_callbacks(model, tokenizer)

    def alignment_loss(self, model, tokenizer, run: RunContext):
        return self._aligner().alignment_loss(model, tokenizer, run)

    def training_data(self, examples: list[ChatExample], run: RunContext) -> list[ChatExample]:
        for part in self.parts:
            examples = part.training_data(examples, run)
        return examples

    def before_training(self, model, tokenizer, run: RunContext) -> None:
        for part in self.parts:
            part.before_training(model, tokenizer, run)

    def callbacks(self, model, tokenizer, run: RunContext) -> list:
        return [c for part in self.parts for c in part.callbacks(model, tokenizer, run)]

    def training_loss(self, model, tokenizer, run: RunContext):
        losses = [(p.name, loss) for p in self.parts if (loss := p.training_loss(model, tokenizer, run)) is not None]
        if len(losses) > 1:
            raise UserError(f"{self.name}: {' and '.join(n for n, _ in losses)} both change the training objective; "
                             "combine at most one such method")
        return losses[0][1] if losses else None

    def after_training(self, model, tokenizer, run: RunContext):
        for part in self.parts:
            model = part.after_training(model, tokenizer, run)
        return model

    def facts(self, model) -> dict:
        return {k: v for part in self.parts for k, v in part.facts(model).items()}
