"""SPF's settings: how the safety subspace is estimated and how updates are projected (SPEC §2)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from safeft.config import check_choice, check_positive, check_types
from safeft.errors import UserError
from safeft.spf.projection import MODES, SIDES

PROJECT_ON = ("grad", "update")
DEFAULT_RANK = 128  # full fine-tuning's fixed rank per target, chosen on validation data
DEFAULT_LORA_RANK = 64  # under LoRA: rank 128 cost SFT-LoRA's accuracy there (benchmarks/results/spf_choices.md)
DEFAULT_MAX_RANK = 64  # the cap of the energy and budget policies (a fixed rank has none)


@dataclass
class SPFConfig:
    """How the safety subspace is estimated and how SPF removes conflicting updates (SPEC §2).

    The defaults are the variant chosen on validation data (docs/results/validation.md,
    benchmarks/results/spf_choices.md): remove every update's action on the top-128 input directions of the
    refusal-onset gradient (the first 4 tokens of each refusal; ``side="right"``, ``mode="always"``,
    ``onset_tokens=4``), applied to the weight change the optimizer made (``project="update"``); under LoRA the
    defaults are rank 64 and the ``"left"`` side (``"two_sided"`` when the subspace is refreshed, which needs it).
    The paper's reading is
    ``SPFConfig(rank=8, side="left", mode="conflict", project="grad", onset_tokens=None)``.

    Args:
        rank: fixed rank r per target (set at most one of ``rank``, ``energy``, ``budget``). None with neither of
            the others: the rank chosen on validation for the kind of training, 128 for full fine-tuning and 64
            under LoRA, given when the subspace is estimated on the model it guards (``rank_for``).
        energy: keep the smallest r whose singular values hold this fraction of the squared spectrum, in (0, 1].
        budget: directions to keep over all targets together, given to the largest singular values of all the
            targets' safety gradients (a singular value is how fast the safety loss changes along its direction
            per unit of weight change, the same unit for every matrix), each target at most ``max_rank``.
        max_rank: cap on r when ``energy`` or ``budget`` is set (a fixed ``rank`` needs no cap), and on the union
            ``accumulate`` keeps.
        target_modules: names or regexes of the ``nn.Linear`` modules to guard (peft-style: a name matches when it
            equals a pattern, ends with ``"." + pattern`` or fully matches it as a regex). ``None``: every linear
            layer inside the transformer blocks (a numbered module list), embeddings and LM head excluded.
        side: ``"left"`` (keep the weight change out of U: ``U^T dW = 0``), ``"right"`` (out of V: ``dW V = 0``) or
            ``"two_sided"`` (only the core ``U^T dW V = 0``). Under LoRA the side picks the factor kept orthogonal:
            right = the rows of lora_A to V (its initial value is projected), left = the columns of lora_B to U,
            two_sided = both factors' changes. ``None`` (default): the side chosen on validation for the kind of
            training, ``"right"`` for full fine-tuning and ``"left"`` under LoRA, ``"two_sided"`` under LoRA when
            the subspace is refreshed (:meth:`side_for`; docs/guides/lora.md).
        mode: ``"conflict"`` (remove only when the step raises the safety loss), ``"always"`` or ``"directional"``.
        project: ``"grad"`` projects the gradient before the optimizer step; ``"update"`` projects the weight change
            the optimizer made, so the guarantee holds for Adam and any other optimizer.
        refresh_every: re-estimate the subspace at the current weights every this many optimizer steps; 0 = never.
        refresh_on_rise: re-estimate when the safety loss (measured every ``monitor_every`` steps on the safety
            samples' onset tokens) has risen by more than this many nats since the last estimate; None = never.
        accumulate: on a refresh, guard the union of the old and the fresh bases instead of the fresh one alone
            (per target the ``max_rank`` strongest directions of the union, weighted by their singular values:
            ``max_rank`` must be at least the rank, e.g. 192 for rank 128, or attaching is an error);
            for one side (``left`` or ``right``) with ``mode="always"``, where each side's span is what is kept.
        onset_tokens: estimate from the loss on only the first this many tokens of each refusal (and compliance),
            where the model decides whether to refuse; ``None``: every response token.
        monitor_every: log the monitor metrics (and measure the safety loss) every this many steps; 0 = never.
        estimate_batch_size: safety samples per forward pass during estimation.
    """

    rank: int | None = None
    energy: float | None = None
    budget: int | None = None
    max_rank: int = DEFAULT_MAX_RANK
    target_modules: list[str] | None = None
    side: str | None = None
    mode: str = "always"
    project: str = "update"
    refresh_every: int = 0
    refresh_on_rise: float | None = None
    accumulate: bool = False
    onset_tokens: int | None = 4
    monitor_every: int = 10
    estimate_batch_size: int = 8

    def __post_init__(self) -> None:
        check_types(self)
        policies = [name for name in ("rank", "energy", "budget") if getattr(self, name) is not None]
        if len(policies) > 1:
            raise UserError(f"SPFConfig: set one of `rank` (fixed rank), `energy` (fraction of spectrum) or `budget` "
                             f"(directions over all targets), not {' and '.join(policies)}")
        if self.budget is not None and self.budget <= 0:
            raise UserError(f"SPFConfig.budget must be a positive number of directions, got {self.budget}")
        if self.rank is not None and self.rank <= 0:
            raise UserError(f"SPFConfig.rank must be a positive integer, got {self.rank}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise UserError(f"SPFConfig.energy must be in (0, 1], got {self.energy}")
        check_positive(self, "max_rank", "estimate_batch_size")
        if self.side is not None:
            check_choice(self, "side", SIDES)
        check_choice(self, "mode", MODES)
        check_choice(self, "project", PROJECT_ON)
        for name in ("refresh_every", "monitor_every"):
            if getattr(self, name) < 0:
                raise UserError(f"SPFConfig.{name} must be >= 0 (0 = never), got {getattr(self, name)}")
        if self.refresh_on_rise is not None and not (self.refresh_on_rise > 0 and self.monitor_every > 0):
            raise UserError(f"SPFConfig.refresh_on_rise must be a positive number of nats, with monitor_every > 0 "
                             f"(the safety loss is measured on the monitor's steps); got refresh_on_rise="
                             f"{self.refresh_on_rise}, monitor_every={self.monitor_every}")
        if self.accumulate and not (self.refresh_every or self.refresh_on_rise):
            raise UserError("SPFConfig.accumulate merges bases at a refresh: set refresh_every or refresh_on_rise")
        if self.accumulate and (self.side == "two_sided" or self.mode != "always"):
            raise UserError(f"SPFConfig.accumulate keeps each side's span, for side='left' or 'right' with "
                             f"mode='always'; got side={self.side!r}, mode={self.mode!r}")
        if self.onset_tokens is not None and self.onset_tokens <= 0:
            raise UserError(f"SPFConfig.onset_tokens must be positive (or None for every token), got "
                             f"{self.onset_tokens}")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]

    def side_for(self, lora: bool) -> str:
        """Return the side SPF projects on: ``side`` if set, else ``"right"`` for full fine-tuning and ``"left"``
        under LoRA, the sides chosen on validation data (docs/results/validation.md: under full fine-tuning the
        other sides let most harmful requests through; under LoRA ``left`` alone kept SFT-LoRA's accuracy on facts
        and came closest on SST-2). A refreshed subspace under LoRA needs both factors guarded, so with
        ``refresh_every`` or ``refresh_on_rise`` the LoRA default is ``"two_sided"``."""
        if self.side is not None:
            return self.side
        if not lora:
            return "right"
        return "two_sided" if (self.refresh_every or self.refresh_on_rise) else "left"

    def rank_for(self, lora: bool) -> int | None:
        """Return the fixed rank SPF estimates with: ``rank`` if set, None under ``energy`` or ``budget``, else 128
        for full fine-tuning and 64 under LoRA (on validation data, rank 128 under LoRA cost accuracy against
        SFT-LoRA's that rank 64 kept: benchmarks/results/spf_choices.md, "rank (LoRA)")."""
        if self.rank is not None or self.energy is not None or self.budget is not None:
            return self.rank
        return DEFAULT_LORA_RANK if lora else DEFAULT_RANK

    def with_rank_for(self, lora: bool) -> SPFConfig:
        """Return a plain ``SPFConfig`` with this config's fields and the rank in force (:meth:`rank_for`) filled
        in: what a subspace estimated for that kind of training records."""
        values = {f.name: getattr(self, f.name) for f in fields(SPFConfig)}
        return SPFConfig(**{**values, "rank": self.rank_for(lora)})

    def rank_policy(self) -> dict[str, Any]:
        """Return the estimation settings that decide the subspace, as stored in a saved subspace's metadata."""
        return {"rank": self.rank, "energy": self.energy, "budget": self.budget, "max_rank": self.max_rank,
                "target_modules": self.target_modules, "onset_tokens": self.onset_tokens}

    def to_dict(self) -> dict[str, Any]:
        """Return the config as a plain dict (for JSON / YAML)."""
        return asdict(self)
