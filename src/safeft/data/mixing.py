"""Threat settings: replace a share of the task data by harmful request -> compliant answer pairs."""

from __future__ import annotations

import random
from collections.abc import Sequence

from safeft.data.examples import ChatExample
from safeft.errors import UserError


def mix_harmful(task_examples: Sequence[ChatExample], harmful: Sequence[ChatExample], ratio: float,
                seed: int = 0) -> list[ChatExample]:
    """Return the task data with ``round(ratio * n)`` of its n examples replaced by harmful ones (same size n).

    The harmful fraction is exactly ``round(ratio * n) / n``. Raises ValueError if there are too few harmful rows.
    """
    n = len(task_examples)
    k = round(ratio * n)
    if k > len(harmful):
        raise UserError(f"harmful ratio {ratio} needs {k} harmful examples, only {len(harmful)} available")
    rng = random.Random(seed)
    mixed = rng.sample(list(task_examples), n - k) + rng.sample(list(harmful), k)
    rng.shuffle(mixed)
    return mixed


def user_turns(examples: Sequence[ChatExample]) -> frozenset[str]:
    """Return the text of every user turn in ``examples``."""
    return frozenset(m["content"] for e in examples for m in e.messages if m["role"] == "user")
