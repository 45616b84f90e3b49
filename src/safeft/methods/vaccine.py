"""Vaccine: perturbation-aware alignment (Huang et al., NeurIPS 2024).

Vaccine changes the alignment stage only: each alignment step first finds the perturbation of the hidden
embeddings that raises the alignment loss most, ``e_l = rho * g_l / ||g||`` with ``g_l`` the loss gradient at the
output of attention module ``l`` and ``||g||`` the norm over all of them together, then takes its weight update
from a second pass on the same batch with every ``e_l`` added to its module's output (a constant shift). The aligned
model so trained is meant to keep its alignment when fine-tuning later drifts its embeddings; fine-tuning is plain
SFT. ``safeft`` caches the Vaccine-aligned model beside the default one (its key holds ``rho``).

As in the authors' code the perturbed modules are the attention blocks' outputs, and the first pass's weight
gradients are discarded (here they are never formed: the first pass differentiates the hidden states only).
Departure, and why: the alignment data, schedule and stopping rule are safeft's alignment stage (SPEC §4), so
``vaccine`` differs from ``sft`` by the perturbation alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from safeft.errors import UserError
from safeft.methods.base import Method, RunContext


@dataclass
class VaccineOptions:
    """Args:
    rho: the norm of the hidden-embedding perturbation (over all perturbed modules together).
    """

    rho: float = 2.0

    def __post_init__(self) -> None:
        if self.rho <= 0:
            raise UserError(f"rho must be positive (the perturbation's norm), got {self.rho}")


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Return the self-attention module of every transformer block (its output is what Vaccine perturbs)."""
    from safeft.spf.targets import in_blocks

    found = [m for n, m in model.named_modules()
             if type(m).__name__.endswith("Attention") and in_blocks(n) and not n.endswith(("lora_A", "lora_B"))]
    if not found:
        raise UserError("vaccine found no attention module in the model's blocks (a class named *Attention)")
    return found


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


class PerturbedLoss:
    """The Vaccine objective of one micro-batch (a :data:`safeft.train.StepLoss`); ``last_norm`` is the norm of
    the last perturbation applied (``rho`` unless the gradient vanished)."""

    def __init__(self, model: nn.Module, rho: float):
        self.modules, self.rho = attention_modules(model), rho
        self.last_norm = 0.0

    def __call__(self, model, inputs, task_loss, share: float) -> torch.Tensor:
        captured: dict[nn.Module, torch.Tensor] = {}

        def capture(module, args, output):
            captured[module] = _hidden(output)

        handles = [m.register_forward_hook(capture) for m in self.modules]
        try:
            first = task_loss()
        finally:
            for h in handles:
                h.remove()
        grads = torch.autograd.grad(first, [captured[m] for m in self.modules], allow_unused=True)
        grads = [torch.zeros_like(captured[m]) if g is None else g for m, g in zip(self.modules, grads, strict=True)]
        norm = torch.sqrt(sum(g.double().pow(2).sum() for g in grads))
        shifts = {m: (self.rho * g / (norm + 1e-7)).to(g.dtype).detach()
                  for m, g in zip(self.modules, grads, strict=True)}
        self.last_norm = float(torch.sqrt(sum(s.double().pow(2).sum() for s in shifts.values())))

        def perturb(module, args, output):
            if isinstance(output, tuple):
                return (output[0] + shifts[module], *output[1:])
            return output + shifts[module]

        handles = [m.register_forward_hook(perturb) for m in self.modules]
        try:
            return task_loss()
        finally:
            for h in handles:
                h.remove()


class Vaccine(Method):
    """Align with hidden-embedding perturbations (own aligned model), then fine-tune with plain SFT."""

    Config = VaccineOptions

    def alignment_key(self) -> dict | None:
        return {"rho": self.config.rho}

    def alignment_loss(self, model, tokenizer, run: RunContext):
        return PerturbedLoss(model, self.config.rho)
