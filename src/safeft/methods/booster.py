"""Booster: alignment against simulated harmful perturbation (Huang et al., ICLR 2025).

Booster changes the alignment stage only. It minimises ``f(w) + lambda [h(w) - h(w - alpha g / ||g||)]``, with
``f`` the alignment loss, ``h`` the loss on harmful (request, compliant answer) pairs and ``g = grad h(w)``: the
aligned model is trained so that one normalised harmful step lowers the harmful loss as little as possible. As in
the authors' code the gradient is first-order (the normalised direction is a constant), both ``h`` terms use the
same harmful batch, and ``||g||`` is one norm over all trainable parameters. Fine-tuning is plain SFT.

Departures, and why: the harmful pairs are the unaligned model's own compliant answers to the alignment-split
requests (or ``harmful_data``), not BeaverTails (no hub); the alignment data, schedule and stopping rule are
safeft's alignment stage (SPEC §4), so ``booster`` differs from ``sft`` by the regulariser alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from safeft.config import check_positive
from safeft.errors import UserError
from safeft.methods.base import Method, RunContext


@dataclass
class BoosterOptions:
    """Args:
    harmful_weight: lambda, the weight of the regulariser.
    harmful_step: alpha, the length of the simulated (normalised) harmful step.
    harmful_batch_size: harmful pairs per alignment step.
    harmful_data: a JSONL file of ``{prompt, response}`` harmful pairs instead of the base model's own answers.
    """

    harmful_weight: float = 5.0
    harmful_step: float = 0.1
    harmful_batch_size: int = 8
    harmful_data: str | None = None

    def __post_init__(self) -> None:
        check_positive(self, "harmful_step", "harmful_batch_size")
        if self.harmful_weight < 0:
            raise UserError(f"harmful_weight must be >= 0, got {self.harmful_weight}")


class BoosterLoss:
    """The Booster objective of one micro-batch (a :data:`safeft.train.StepLoss`): returns the alignment loss and
    adds ``share * lambda * (grad h(w) - grad h(w'))`` to the parameters' gradients, ``w' = w - alpha g / ||g||``."""

    def __init__(self, config: BoosterOptions, stream):
        self.config, self.stream = config, stream
        self.last_gap = 0.0  # h(w) - h(w'), the harmful loss one simulated step removes

    def __call__(self, model, inputs, task_loss, share: float) -> torch.Tensor:
        from safeft.losses import device_of
        from safeft.methods.common import batch_loss

        params = [p for p in model.parameters() if p.requires_grad]
        batch = self.stream.next(device_of(model))
        harmful = batch_loss(model, batch)
        g = torch.autograd.grad(harmful, params, allow_unused=True)
        g = [torch.zeros_like(p) if x is None else x for p, x in zip(params, g, strict=True)]
        norm = torch.sqrt(sum(x.double().pow(2).sum() for x in g)).item() + 1e-7
        step = self.config.harmful_step / norm
        saved = [p.detach().clone() for p in params]  # restored exactly (w - a + a is not w in floating point)
        with torch.no_grad():
            for p, x in zip(params, g, strict=True):
                p.sub_(step * x)
        try:
            perturbed = batch_loss(model, batch)
            g_after = torch.autograd.grad(perturbed, params, allow_unused=True)
        finally:
            with torch.no_grad():
                for p, w in zip(params, saved, strict=True):
                    p.copy_(w)
        self.last_gap = float(harmful - perturbed)
        weight = share * self.config.harmful_weight
        with torch.no_grad():
            for p, before, after in zip(params, g, g_after, strict=True):
                extra = weight * (before - (torch.zeros_like(p) if after is None else after))
                p.grad = extra if p.grad is None else p.grad + extra
        return task_loss()


class Booster(Method):
    """Align with a regulariser against a simulated harmful step (own aligned model), then fine-tune with SFT."""

    Config = BoosterOptions

    def alignment_key(self) -> dict | None:
        return {"harmful_weight": self.config.harmful_weight, "harmful_step": self.config.harmful_step,
                "harmful_batch_size": self.config.harmful_batch_size, "harmful_data": self.config.harmful_data}

    def alignment_loss(self, model, tokenizer, run: RunContext):
        from safeft.chat import pad_id
        from safeft.methods.common import BatchStream, encode_all, harmful_examples

        examples = harmful_examples(run, self.config.harmful_data)
        stream = BatchStream(encode_all(tokenizer, examples), self.config.harmful_batch_size, pad_id(tokenizer),
                             seed=run.seed)
        return BoosterLoss(self.config, stream)
