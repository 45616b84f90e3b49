"""SafeLoRA: post-hoc projection of fine-tuning updates onto the alignment direction (Hsu et al., NeurIPS 2024).

For every guarded linear layer, the alignment matrix ``V = W_aligned - W_base`` (the aligned model minus the
unaligned model it was aligned from) defines ``C = V V^T / ||V||_F``. A layer whose update ``dW`` has a low cosine
similarity with its projection ``C dW`` (below ``threshold``) is replaced by ``C dW``; the others are kept.

Departures from the paper, and why:
- Full fine-tuning is supported by the same rule on the weight change ``dW = W - W_aligned`` (the paper defines it
  for LoRA only; nothing in the rule needs the low-rank form). Norm weights are left as trained.
- The unaligned model is the fine-tuning setting's ``base_model`` (on the testbed: SmolLM2-135M-Instruct before
  safeft's alignment stage), where the paper uses a base / chat pair of the same model family.
- Layers are chosen by the similarity threshold only (the paper also offers "the k least similar layers").
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
from torch import Tensor

from safeft.errors import UserError
from safeft.methods.base import RunContext
from safeft.methods.common import PostHocMethod


@dataclass
class SafeLoRAOptions:
    """Args:
    threshold: project a layer whose cosine similarity between ``dW`` and ``C dW`` is below this (in [-1, 1]).
    """

    threshold: float = 0.5

    def __post_init__(self) -> None:
        if not -1.0 <= self.threshold <= 1.0:
            raise UserError(f"threshold must be a cosine similarity in [-1, 1], got {self.threshold}")


def alignment_projector(aligned: Tensor, base: Tensor) -> Tensor:
    """Return ``C = V V^T / ||V||_F`` for ``V = aligned - base`` (both ``(m, n)``): an ``(m, m)`` matrix."""
    v = (aligned - base).double()  # (m, n)
    norm = torch.linalg.matrix_norm(v)
    if norm == 0:
        raise UserError("the aligned and base weights are equal: there is no alignment direction to project on")
    return (v @ v.T / norm).to(aligned.dtype)  # (m, m)


def similarity(update: Tensor, projected: Tensor) -> float:
    """Return the cosine similarity of ``update`` and its projection (``(m, n)`` each, Frobenius inner product):
    1.0 for a zero update (nothing to project), 0.0 for an update the projection maps to zero."""
    a, b = update.double().flatten(), projected.double().flatten()
    if a.norm() == 0:
        return 1.0
    if b.norm() == 0:
        return 0.0
    return float(a @ b / (a.norm() * b.norm()))


class SafeLoRA(PostHocMethod):
    """After training, project the updates of the layers least similar to the alignment direction onto it.

    A layer is projected when the cosine of its update and the update's projection is below ``threshold``;
    ``out/safelora.json`` lists every layer's similarity and whether it was projected."""

    Config = SafeLoRAOptions

    def __init__(self, config=None, name: str | None = None):
        super().__init__(config, name or "safelora")
        self.layers: dict[str, dict] = {}  # after training: name -> {similarity, projected}

    def after_training(self, model, tokenizer, run: RunContext):
        from safeft.distributed import is_main_process
        from safeft.io import write_json
        from safeft.methods.common import load_base_linears
        from safeft.spf.targets import find_targets

        targets = {n: t for n, t in find_targets(model).items() if t.is_lora or n in self.aligned}
        if not targets:
            raise UserError("safelora found no trained linear layer to project (LoRA factors or block weights)")
        base = load_base_linears(run.base_model, list(targets))
        if all(torch.equal(base[name].to(t.base.weight), t.base.weight if t.is_lora else self.aligned[name])
               for name, t in targets.items()):
            raise UserError(f"safelora found no alignment direction: {run.base_model} has the same weights as the "
                            "model being fine-tuned. Pass the unaligned one it was aligned from as --base-model PATH")
        layers = {}
        with torch.no_grad():
            for name, t in targets.items():
                aligned = t.base.weight if t.is_lora else self.aligned[name]
                if base[name].shape != aligned.shape:
                    raise UserError(f"{name}: the base model's weight is {tuple(base[name].shape)}, the aligned "
                                     f"model's {tuple(aligned.shape)}; pass the model this one was aligned from")
                c = alignment_projector(aligned, base[name].to(aligned))  # (m, m)
                update = t.scaling * t.lora_B @ t.lora_A if t.is_lora else t.base.weight - aligned  # (m, n)
                cos = similarity(update, c @ update)
                project = cos < self.config.threshold
                if project and t.is_lora:
                    t.lora_B.copy_(c @ t.lora_B)  # C (s B A) = s (C B) A
                elif project:
                    t.base.weight.copy_(aligned + c @ update)
                layers[name] = {"similarity": cos, "projected": project}
        if is_main_process():
            write_json(run.out / "safelora.json", {"threshold": self.config.threshold, "base_model": run.base_model,
                                                  "projected": sum(v["projected"] for v in layers.values()),
                                                  "layers": layers})
        self.aligned, self.layers = {}, layers
        return model

    def facts(self, model) -> dict:
        """Return how many layers were projected (``projected_layers`` of ``layers``) and the layers' similarities
        (``similarity_min``, ``similarity_median``, ``similarity_max``), to read a threshold against."""
        if not self.layers:
            return {}
        sims = [v["similarity"] for v in self.layers.values()]
        return {"projected_layers": sum(v["projected"] for v in self.layers.values()), "layers": len(sims),
                "similarity_min": min(sims), "similarity_median": statistics.median(sims),
                "similarity_max": max(sims)}
