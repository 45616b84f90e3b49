"""Rates with 95% Wilson score intervals, in percent."""

from __future__ import annotations

import math


def wilson_interval(successes: int, total: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Return the Wilson score interval of ``successes / total`` as ``(low, high)`` in percent (0..100).

    Assumes ``0 <= successes <= total``; ``total == 0`` gives ``(0, 100)`` (nothing is known).
    """
    if not 0 <= successes <= total:
        raise ValueError(f"need 0 <= successes <= total, got {successes} of {total}")
    if total == 0:
        return 0.0, 100.0
    p = successes / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return 100 * max(0.0, centre - half), 100 * min(1.0, centre + half)


def rate(successes: int, total: int) -> dict:
    """Return ``{"rate", "ci", "k", "n"}``: the rate in percent with its 95% Wilson interval."""
    return {"rate": 100 * successes / total if total else float("nan"), "ci": list(wilson_interval(successes, total)),
            "k": successes, "n": total}
