"""The monitor's running sums: how often removal ran and how much it removed, between two reports (SPEC §2).

Sums are kept per (metric, device): adding a tensor on its own device costs no host sync per target and step; the
sync happens once, when the monitor reports. Under FSDP2 a per-row quantity is a *share* of the whole; shares are
summed over the processes when the monitor reports.
"""

from __future__ import annotations

import torch
from torch import Tensor

from safeft.distributed import Collectives

METRIC_PREFIX = "spf/"


class Monitor:
    """Counts (target, step) checks, the ones where removal ran, and the removed and measured squared norms."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        """Start a new reporting interval."""
        self.steps = 0
        self.checked = 0
        self.sums: dict[tuple[str, torch.device | None], Tensor | float] = {}

    def state(self) -> dict:
        """Return the sums of the interval so far as JSON values (a checkpoint keeps them, so that a resumed run
        reports the interval whole)."""
        names = sorted({name for name, _ in self.sums})
        return {"steps": self.steps, "checked": self.checked, "sums": {name: self.total(name) for name in names}}

    def load_state(self, state: dict) -> None:
        """Continue the interval saved by :meth:`state`."""
        self.steps, self.checked = int(state["steps"]), int(state["checked"])
        self.sums = {(name, None): float(value) for name, value in state["sums"].items()}

    def add(self, metric: str, value: Tensor | float) -> None:
        """Add to a metric's running sum: a tensor on its own device (no host sync), a Python number on the host."""
        if not isinstance(value, Tensor):
            key = (metric, None)
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
            return
        key = (metric, value.device)
        self.sums[key] = self.sums[key] + value if key in self.sums else value.detach().clone()

    def total(self, metric: str) -> float:
        """Return a metric's sum over devices (one host sync per device)."""
        return sum(float(v) for (name, _), v in self.sums.items() if name == metric)

    def count(self, fired: Tensor, removed_sq: Tensor, grad_sq: Tensor | None, shard: bool = False) -> None:
        """Count one guard's check: ``fired`` (1.0 if removal ran), the removed squared norm and, on a step where
        the gradient was measured, its squared norm; ``shard``: the norms are this process's share."""
        suffix = "_share" if shard else ""
        self.checked += 1
        self.add("fired", fired)
        self.add("removed_sq" + suffix, removed_sq)
        if grad_sq is not None:
            self.add("sampled_removed_sq" + suffix, removed_sq)
            self.add("sampled_grad_sq" + suffix, grad_sq)

    def report(self, collectives: Collectives | None = None) -> dict[str, float]:
        """Return ``spf/conflict_rate``, ``spf/removed_norm`` (per step) and, where the gradient was measured,
        ``spf/removed_norm_frac``, for the interval so far; with ``collectives`` (FSDP2) the processes' shares are
        summed in one all-reduce, so every process must call it."""
        steps = max(self.steps, 1)
        totals = {k: self.total(k) for k in ("removed_sq", "sampled_removed_sq", "sampled_grad_sq")}
        if collectives is not None:
            shares = [torch.tensor(self.total(k + "_share")) for k in totals]
            totals = {k: v + float(x) for (k, v), x in zip(totals.items(), collectives.sum(shares))}
        out = {f"{METRIC_PREFIX}conflict_rate": self.total("fired") / max(self.checked, 1),
               f"{METRIC_PREFIX}removed_norm": (totals["removed_sq"] / steps) ** 0.5}
        if totals["sampled_grad_sq"] > 0:
            frac = totals["sampled_removed_sq"] / totals["sampled_grad_sq"]
            out[f"{METRIC_PREFIX}removed_norm_frac"] = frac ** 0.5
        return out
