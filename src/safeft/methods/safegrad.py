"""SafeGrad: per-step gradient surgery against a safety gradient (PCGrad-style; SafeGrad, 2025).

Every optimizer step, the gradient of a safety objective is computed on a batch of (harmful request -> refusal)
pairs. If the task gradient ``g`` conflicts with it (``<g, s> < 0``), its component along ``s`` is removed,
``g <- g - (<g, s> / |s|^2) s``, so the step no longer increases the safety loss to first order; otherwise ``g`` is
left alone. The inner products are taken over all trainable parameters at once (one global projection).

The safety objective is the refusal cross-entropy, plus, with ``kl_weight > 0``, the KL divergence from the aligned
model's next-token distribution on the same responses (its log-probabilities are recorded once, before training,
when the model still has its aligned weights), which keeps the whole distribution there rather than one refusal.

Departures from the paper, and why: the safety batch comes from built-in refusals (or ``safety_data``) rather than
a safety dataset of the paper's; the KL term is optional and off by default so that the plain surgery can be
measured on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import TrainerCallback

from safeft.chat import IGNORE_INDEX
from safeft.config import check_positive
from safeft.data import DEFAULT_SAFETY_SAMPLES
from safeft.errors import UserError
from safeft.methods.base import Method, RunContext


@dataclass
class SafeGradOptions:
    """Args:
    safety_samples: how many refusal pairs (outside the fine-tuning data) the safety batches are drawn from.
    safety_data: a JSONL file of ``{prompt, refusal}`` to draw them from instead of the built-in ones.
    safety_batch_size: refusal pairs per safety gradient (one per optimizer step).
    kl_weight: weight of the KL divergence to the aligned model's outputs in the safety objective (0: off).
    """

    safety_samples: int = DEFAULT_SAFETY_SAMPLES
    safety_data: str | None = None
    safety_batch_size: int = 4
    kl_weight: float = 0.0

    def __post_init__(self) -> None:
        check_positive(self, "safety_samples", "safety_batch_size")
        if self.kl_weight < 0:
            raise UserError(f"kl_weight must be >= 0, got {self.kl_weight}")


def remove_conflict(task: list[torch.Tensor], safety: list[torch.Tensor]) -> tuple[list[torch.Tensor], float]:
    """Return the task gradient with its component along the safety gradient removed where they conflict, and the
    cosine between them before surgery. Both are lists of same-shape tensors (one per parameter)."""
    dot = sum((t.double() * s.double()).sum() for t, s in zip(task, safety, strict=True))
    task_sq = sum(t.double().pow(2).sum() for t in task)
    safety_sq = sum(s.double().pow(2).sum() for s in safety)
    if safety_sq == 0 or task_sq == 0:
        return task, 0.0
    cosine = float(dot / (task_sq.sqrt() * safety_sq.sqrt()))
    if dot >= 0:
        return task, cosine
    coefficient = float(dot / safety_sq)
    return [t - coefficient * s.to(t.dtype) for t, s in zip(task, safety, strict=True)], cosine


def response_log_probs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Return the next-token log-probabilities at the labelled positions of ``batch``: ``(N, vocab)`` for the N
    response tokens, in batch order."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = batch["labels"][:, 1:] != IGNORE_INDEX  # (B, T-1)
    return torch.log_softmax(logits[mask].float(), dim=-1)


class SafeGradCallback(TrainerCallback):
    """Before each optimizer step, remove the trainable gradient's conflict with the safety gradient."""

    def __init__(self, method: SafeGrad, stream, reference: list[torch.Tensor] | None):
        self.method, self.stream, self.reference = method, stream, reference
        self.cosines: list[float] = []
        self.conflicts = 0

    def safety_objective(self, model, batch, indices) -> torch.Tensor:
        from safeft.methods.common import batch_loss

        loss = batch_loss(model, batch)
        if self.reference is not None and self.method.config.kl_weight > 0:
            current = response_log_probs(model, batch)  # (N, vocab)
            aligned = torch.cat([self.reference[i] for i in indices]).to(current)
            kl = torch.nn.functional.kl_div(current, aligned, log_target=True, reduction="batchmean")
            loss = loss + self.method.config.kl_weight * kl
        return loss

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        from safeft.losses import device_of

        params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
        if not params:
            return
        indices = self.stream.next_indices()
        batch = self.stream.collate(indices, device_of(model))
        with torch.enable_grad():
            safety = torch.autograd.grad(self.safety_objective(model, batch, indices), params, allow_unused=True)
        safety = [torch.zeros_like(p) if s is None else s for p, s in zip(params, safety, strict=True)]
        task = [p.grad for p in params]
        surgered, cosine = remove_conflict(task, safety)
        self.cosines.append(cosine)
        self.conflicts += cosine < 0
        for p, g in zip(params, surgered, strict=True):
            p.grad.copy_(g)

    def on_log(self, args, state, control, logs=None, **kwargs):
        from safeft.callbacks import add_to_log

        if self.cosines:
            add_to_log(state, logs, {"safegrad/cosine": self.cosines[-1],
                                     "safegrad/conflict_share": self.conflicts / len(self.cosines)})


class SafeGrad(Method):
    """Project the task gradient off the safety gradient whenever the two conflict, every optimizer step."""

    Config = SafeGradOptions

    def callbacks(self, model, tokenizer, run: RunContext) -> list:
        from safeft.chat import pad_id
        from safeft.losses import device_of
        from safeft.methods.common import BatchStream, encode_all, refusal_examples

        examples = refusal_examples(run, self.config.safety_data, None if self.config.safety_data
                                    else self.config.safety_samples)
        stream = BatchStream(encode_all(tokenizer, examples), self.config.safety_batch_size, pad_id(tokenizer),
                             seed=run.seed)
        reference = None
        if self.config.kl_weight > 0:  # the aligned model's distribution, recorded before any step changes it
            was_training = model.training
            model.eval()
            with torch.no_grad():
                reference = [response_log_probs(model, stream.collate([i], device_of(model))).cpu()
                             for i in range(len(examples))]
            model.train(was_training)
        return [SafeGradCallback(self, stream, reference)]
