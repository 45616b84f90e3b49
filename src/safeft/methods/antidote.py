"""Antidote: post-fine-tuning one-shot pruning of the weights that harmful outputs rely on (Huang et al., 2025).

After fine-tuning, each trained matrix is scored on harmful data (request + compliant answer, every token) with the
Wanda score ``S_ij = |W_ij| * ||X_j||_2`` (``X_j``: input feature ``j`` of the matrix; its squared norm summed over
tokens, averaged over samples) and, in every output row, the ``prune_ratio`` share of entries with the highest
score are removed. As in the authors' code the pruned matrices are the fine-tuning adapter's (``lora_A`` and
``lora_B``, each on its own inputs), the selection is per output row, and the scores are taken in one pass with no
mask applied.

Departures, and why: under full fine-tuning there is no adapter, so the same rule prunes the weight *change*
``dW = W - W_aligned`` (the chosen entries go back to their aligned values), which is what removing adapter weights
does under LoRA; the harmful data are the unaligned model's own compliant answers to alignment-split requests
outside the fine-tuning data (or ``harmful_data``), not BeaverTails (no hub).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from safeft.config import check_positive
from safeft.errors import UserError
from safeft.methods.base import RunContext
from safeft.methods.common import PostHocMethod


@dataclass
class AntidoteOptions:
    """Args:
    prune_ratio: share of each output row's entries removed (the highest-scoring on harmful data).
    harmful_samples: harmful (request, answer) pairs the scores are computed on.
    harmful_data: a JSONL file of ``{prompt, response}`` harmful pairs instead of the base model's own answers.
    """

    prune_ratio: float = 0.1
    harmful_samples: int = 20
    harmful_data: str | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.prune_ratio < 1.0:
            raise UserError(f"prune_ratio must be in (0, 1), got {self.prune_ratio}")
        check_positive(self, "harmful_samples")


def wanda_scores(weight: Tensor, input_sq_norms: Tensor) -> Tensor:
    """Return ``|W| * sqrt(x_sq)`` for ``weight`` ``(m, n)`` and per-input squared norms ``(n,)``: ``(m, n)``."""
    return weight.abs() * input_sq_norms.sqrt().to(weight.dtype)[None, :]


def row_prune_mask(scores: Tensor, ratio: float) -> Tensor:
    """Return a boolean ``(m, n)`` mask of the ``round(ratio * n)`` highest scores of every row."""
    count = round(ratio * scores.shape[1])
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if count:
        mask.scatter_(1, scores.topk(count, dim=1).indices, True)
    return mask


class InputNorms:
    """Forward hooks that accumulate, per linear module, the squared norm of each input feature over a sample's
    tokens, averaged over samples (batch size 1, so padding never counts)."""

    def __init__(self, modules: dict[str, nn.Linear]):
        self.sums = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in modules.items()}
        self.samples = 0
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name):
        def record(module, args, output):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])  # (tokens, n)
            self.sums[name] += x.pow(2).sum(0).cpu()
        return record

    def mean(self) -> dict[str, Tensor]:
        """Return the per-feature squared norms averaged over the samples seen."""
        return {name: s / max(self.samples, 1) for name, s in self.sums.items()}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class Antidote(PostHocMethod):
    """After training, prune the update's weights that score highest (Wanda) on harmful data, row by row.

    ``out/antidote.json`` gives the number of entries pruned per matrix."""

    Config = AntidoteOptions

    def __init__(self, config=None, name: str | None = None):
        super().__init__(config, name or "antidote")

    def pruned_matrices(self, model) -> dict[str, tuple[nn.Linear, Tensor | None]]:
        """Return ``name -> (linear module, aligned weight or None)``: the adapter's factors under LoRA (pruned
        as they are), else the trained block linears (their change from the aligned weight is pruned)."""
        from safeft.spf.targets import find_targets

        targets = find_targets(model)
        factors = {id(p) for t in targets.values() if t.is_lora for p in (t.lora_A, t.lora_B)}
        if factors:
            return {name: (m, None) for name, m in model.named_modules()
                    if isinstance(m, nn.Linear) and id(m.weight) in factors}
        modules = {name: t.base for name, t in targets.items() if name in self.aligned}
        return {name: (m, self.aligned[name]) for name, m in modules.items()}

    def after_training(self, model, tokenizer, run: RunContext):
        from safeft.chat import pad_id
        from safeft.distributed import is_main_process
        from safeft.io import write_json
        from safeft.losses import device_of
        from safeft.methods.common import encode_all, harmful_examples

        matrices = self.pruned_matrices(model)
        if not matrices:
            raise UserError("antidote found no trained linear layer to prune (LoRA factors or block weights)")
        examples = harmful_examples(run, self.config.harmful_data, self.config.harmful_samples)
        norms = InputNorms({name: m for name, (m, _) in matrices.items()})
        was_training = model.training
        model.eval()
        try:
            from safeft.chat import collate

            with torch.no_grad():
                for encoded in encode_all(tokenizer, examples):  # one sample per pass, as the authors do
                    batch = collate([encoded], pad_id(tokenizer))
                    model(input_ids=batch["input_ids"].to(device_of(model)))
                    norms.samples += 1
        finally:
            norms.remove()
            model.train(was_training)
        report = {}
        with torch.no_grad():
            for name, sq in norms.mean().items():
                module, aligned = matrices[name]
                change = module.weight if aligned is None else module.weight - aligned
                mask = row_prune_mask(wanda_scores(change, sq), self.config.prune_ratio)
                if aligned is None:
                    module.weight.masked_fill_(mask, 0.0)
                else:
                    module.weight.copy_(torch.where(mask, aligned, module.weight))
                report[name] = int(mask.sum())
        if is_main_process():
            write_json(run.out / "antidote.json", {"prune_ratio": self.config.prune_ratio, "samples": len(examples),
                                                  "pruned": report})
        self.aligned = {}
        return model
