"""Validated configuration of SPF: one dataclass for estimation and for training."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from safeft.projection import MODES, SIDES

PROJECT_ON = ("grad", "update")


@dataclass
class SPFConfig:
    """How the safety subspace is estimated and how SPF removes conflicting updates (SPEC §2).

    The defaults are the variant measured best on the testbed (README, benchmarks/results/spf_ablation*): remove
    every update's action on the top-64 input directions of the refusal-onset gradient (the first 4 tokens of each
    refusal; ``side="right"``, ``mode="always"``, ``onset_tokens=4``), applied to the weight change the optimizer
    made (``project="update"``). The paper's reading is
    ``SPFConfig(rank=8, side="left", mode="conflict", project="grad", onset_tokens=None)``.

    Args:
        rank: fixed rank r per target. Set ``energy`` instead to choose r per target.
        energy: keep the smallest r whose singular values hold this fraction of the squared spectrum, in (0, 1].
        max_rank: cap on r when ``energy`` is set (a fixed ``rank`` needs no cap).
        target_modules: names or regexes of the ``nn.Linear`` modules to guard (peft-style: a name matches when it
            equals a pattern, ends with ``"." + pattern`` or fully matches it as a regex). ``None``: every linear
            layer inside the transformer blocks (a numbered module list), embeddings and LM head excluded.
        side: ``"left"``, ``"right"`` or ``"two_sided"`` removal. LoRA factors always use the factor rule.
        mode: ``"conflict"`` (remove only when the step raises the safety loss), ``"always"`` or ``"directional"``.
        project: ``"grad"`` projects the gradient before the optimizer step; ``"update"`` projects the weight change
            the optimizer made, so the guarantee holds for Adam and any other optimizer.
        refresh_every: re-estimate the subspace at the current weights every this many optimizer steps; 0 = never.
        onset_tokens: estimate from the loss on only the first this many tokens of each refusal (and compliance),
            where the model decides whether to refuse; ``None``: every response token.
        monitor_every: log the monitor metrics (and measure the safety loss) every this many steps; 0 = never.
        batch_size: safety samples per forward pass during estimation.
    """

    rank: int | None = 64
    energy: float | None = None
    max_rank: int = 64
    target_modules: list[str] | None = None
    side: str = "right"
    mode: str = "always"
    project: str = "update"
    refresh_every: int = 0
    onset_tokens: int | None = 4
    monitor_every: int = 10
    batch_size: int = 8

    def __post_init__(self) -> None:
        if (self.rank is None) == (self.energy is None):
            raise ValueError("SPFConfig: set exactly one of `rank` (fixed rank) or `energy` (fraction of spectrum)")
        if self.rank is not None and self.rank <= 0:
            raise ValueError(f"SPFConfig.rank must be a positive integer, got {self.rank}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise ValueError(f"SPFConfig.energy must be in (0, 1], got {self.energy}")
        if self.max_rank <= 0:
            raise ValueError(f"SPFConfig.max_rank must be positive, got {self.max_rank}")
        for name, value, allowed in (("side", self.side, SIDES), ("mode", self.mode, MODES),
                                     ("project", self.project, PROJECT_ON)):
            if value not in allowed:
                raise ValueError(f"SPFConfig.{name} must be one of {allowed}, got {value!r}")
        for name in ("refresh_every", "monitor_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"SPFConfig.{name} must be >= 0 (0 = never), got {getattr(self, name)}")
        if self.onset_tokens is not None and self.onset_tokens <= 0:
            raise ValueError(f"SPFConfig.onset_tokens must be positive (or None for every token), got "
                             f"{self.onset_tokens}")
        if self.batch_size <= 0:
            raise ValueError(f"SPFConfig.batch_size must be positive, got {self.batch_size}")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]

    def rank_policy(self) -> dict[str, Any]:
        """Return the estimation settings that decide the subspace, as stored in a saved subspace's metadata."""
        return {"rank": self.rank, "energy": self.energy, "max_rank": self.max_rank,
                "target_modules": self.target_modules, "onset_tokens": self.onset_tokens}

    def to_dict(self) -> dict[str, Any]:
        """Return the config as a plain dict (for JSON / YAML)."""
        return asdict(self)
