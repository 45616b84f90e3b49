"""What several defences share: their safety and harmful data, seeded batches of it, and a batch's loss.

Every defence draws its data from outside the fine-tuning data (``run.task_prompts``) and outside the evaluation
split, so no method is defended, or scored, by the requests it is attacked or evaluated with.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torch import nn

from safeft.chat import EncodedChat, collate, encode_messages
from safeft.data.examples import ChatExample
from safeft.errors import UserError
from safeft.methods.base import Method, RunContext


def refusal_examples(run: RunContext, safety_data: str | None = None, count: int | None = None
                     ) -> list[ChatExample]:
    """Return (harmful request -> refusal) examples: the rows of ``safety_data`` (JSONL ``{prompt, refusal}``) or the
    built-in alignment-split ones, minus any request in the fine-tuning data; the first ``count`` if given.

    Raises:
        ValueError: if none remain, or fewer than ``count``.
    """
    from safeft.data import builtin_safety_samples, load_safety_samples

    if safety_data:
        samples = [s for s in load_safety_samples(safety_data) if s.prompt not in run.task_prompts]
    else:
        samples = builtin_safety_samples(None, exclude=run.task_prompts)
    if not samples or (count is not None and count > len(samples)):
        raise UserError(f"{count or 1} safety samples needed, {len(samples)} available outside the fine-tuning "
                         f"data{' in ' + safety_data if safety_data else ''}; lower the count or pass a JSONL file "
                         "with more rows (safety_data)")
    samples = samples[:count] if count is not None else samples
    return [ChatExample.from_pair(s.prompt, s.refusal, harmful=True) for s in samples]


def harmful_examples(run: RunContext, harmful_data: str | None = None, count: int | None = None
                     ) -> list[ChatExample]:
    """Return (harmful request -> compliant answer) examples a defender holds: the rows of ``harmful_data`` (JSONL
    ``{prompt, response}``) or the unaligned base model's own compliant answers to the alignment-split requests,
    minus any request in the fine-tuning data; the first ``count`` if given.

    Raises:
        ValueError: if none remain, or fewer than ``count``.
    """
    from safeft.answers import compliant_examples
    from safeft.data.loaders import load_jsonl

    if harmful_data:
        pool = load_jsonl(harmful_data)
    else:
        pool = compliant_examples(run.base_model, None, run.cache)
    pool = [e for e in pool if e.prompt not in run.task_prompts]
    if not pool or (count is not None and count > len(pool)):
        source = harmful_data or f"the answers of {run.base_model} judged compliant"
        raise UserError(f"{count or 1} harmful examples needed, {len(pool)} available outside the fine-tuning "
                         f"data in {source}; lower the count or pass harmful_data (JSONL with prompt, response)")
    return pool[:count] if count is not None else pool


def encode_all(tokenizer, examples: Sequence[ChatExample]) -> list[EncodedChat]:
    """Return ``examples`` under the chat template, labels on the assistant turns."""
    return [encode_messages(tokenizer, e.messages) for e in examples]


class BatchStream:
    """Endless seeded batches of encoded examples: each pass over them is a fresh shuffle, as a data loader's epoch.

    ``next(device)`` returns a collated batch (``input_ids``, ``attention_mask``, ``labels``; ``(B, T)`` int64).
    """

    def __init__(self, encoded: Sequence[EncodedChat], batch_size: int, pad_token_id: int, seed: int = 0):
        if not encoded:
            raise UserError("no examples to draw batches from")
        self.encoded, self.batch_size, self.pad = list(encoded), min(batch_size, len(encoded)), pad_token_id
        self.rng = random.Random(seed)
        self.order: list[int] = []

    def next_indices(self) -> list[int]:
        """Return the indices (into the encoded examples) of the next batch."""
        if len(self.order) < self.batch_size:
            fresh = list(range(len(self.encoded)))
            self.rng.shuffle(fresh)
            self.order += fresh
        chosen, self.order = self.order[:self.batch_size], self.order[self.batch_size:]
        return chosen

    def collate(self, indices: Sequence[int], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Return the examples ``indices`` as one padded batch on ``device``."""
        batch = collate([self.encoded[i] for i in indices], self.pad)
        return {k: v.to(device) for k, v in batch.items()}

    def next(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Return the next batch."""
        return self.collate(self.next_indices(), device)


def batch_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Return the mean next-token cross-entropy over the labelled (response) tokens of ``batch`` (a scalar)."""
    return model(**batch).loss


class PostHocMethod(Method):
    """A method that acts on the fine-tuning update after training: it keeps the aligned weights of the trained
    block matrices (``self.aligned``, by target name) before training, since full fine-tuning overwrites them
    (LoRA keeps them in its base layers, so nothing is copied for LoRA targets)."""

    def __init__(self, config=None, name: str | None = None):
        super().__init__(config, name)
        self.aligned: dict[str, torch.Tensor] = {}

    def before_training(self, model, tokenizer, run: RunContext) -> None:
        from safeft.spf.targets import find_targets

        self.aligned = {name: t.base.weight.detach().clone() for name, t in find_targets(model).items()
                        if not t.is_lora and t.base.weight.requires_grad}


def load_base_linears(base_model: str, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Return the weights ``(m, n)`` of the linear layers ``names`` (canonical module names) of ``base_model``.

    Raises:
        ValueError: if the model lacks a layer or a shape differs (another architecture).
    """
    from safeft.models import load_model
    from safeft.spf.targets import canonical_name

    model, _ = load_model(base_model)
    modules = {canonical_name(n): m for n, m in model.named_modules()}
    missing = [n for n in names if n not in modules or not hasattr(modules[n], "weight")]
    if missing:
        raise UserError(f"the base model {base_model} has no layer {missing[0]}: it is not the model this one was "
                         "aligned from; pass the unaligned model of the same architecture (base_model)")
    return {n: modules[n].weight.detach().clone() for n in names}
