"""Rates with 95% Wilson score intervals, in percent, and paired differences with seed-aware intervals."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from safeft.errors import UserError


def wilson_interval(successes: int, total: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Return the Wilson score interval of ``successes / total`` as ``(low, high)`` in percent (0..100).

    Assumes ``0 <= successes <= total``; ``total == 0`` gives ``(0, 100)`` (nothing is known).
    """
    if not 0 <= successes <= total:
        raise UserError(f"need 0 <= successes <= total, got {successes} of {total}")
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


# t quantiles q(0.975, df) for a 95% two-sided interval over a few seeds
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def paired_difference(a: Mapping[int, Sequence[float]], b: Mapping[int, Sequence[float]], *, reps: int = 4000,
                      seed: int = 0) -> dict:
    """Return the paired difference ``a - b`` in points, with a 95% interval that respects how it was measured.

    ``a`` and ``b`` map a training seed to that run's outcomes on the same items (0/1 per prompt or test example, in
    the same order for both), or to a one-element list holding the run's rate in [0, 1] when the items were not
    kept. Only seeds in both count. The difference is the mean over seeds of ``mean(a_s) - mean(b_s)``. Its
    interval is a bootstrap over seeds and items (seeds drawn with replacement, then items drawn with replacement
    within each drawn seed, the same items for both methods) when every seed has item outcomes; else a t-interval
    over the per-seed differences (two seeds or more); else none.

    Returns:
        ``{"diff": points, "ci": [low, high] or None, "seeds": [...], "interval": "bootstrap" | "t" | None}``;
        ``diff`` is None when no seed is shared.
    """
    import numpy as np

    seeds = sorted(set(a) & set(b))
    if not seeds:
        return {"diff": None, "ci": None, "seeds": [], "interval": None}
    pairs = [(np.asarray(a[s], dtype=float), np.asarray(b[s], dtype=float)) for s in seeds]
    per_seed = [100 * (x.mean() - y.mean()) for x, y in pairs]
    diff = float(np.mean(per_seed))
    itemised = all(len(x) > 1 and len(x) == len(y) for x, y in pairs)
    if itemised:
        rng = np.random.default_rng(seed)
        deltas = [x - y for x, y in pairs]  # (n_s,) each: the paired item differences of one seed
        chosen = rng.integers(0, len(seeds), size=(reps, len(seeds)))
        draws = np.zeros((reps, len(seeds)))
        for s, delta in enumerate(deltas):  # a fresh item resample for every (replicate, slot) that draws seed s
            mask = chosen == s
            if mask.any():
                index = rng.integers(0, len(delta), size=(int(mask.sum()), len(delta)))
                draws[mask] = delta[index].mean(axis=1)
        means = 100 * draws.mean(axis=1)
        low, high = np.percentile(means, [2.5, 97.5])
        return {"diff": diff, "ci": [float(low), float(high)], "seeds": seeds, "interval": "bootstrap"}
    if len(seeds) > 1:
        spread = float(np.std(per_seed, ddof=1)) / len(seeds) ** 0.5
        t = _T975.get(len(seeds) - 1, 1.96)
        return {"diff": diff, "ci": [diff - t * spread, diff + t * spread], "seeds": seeds, "interval": "t"}
    return {"diff": diff, "ci": None, "seeds": seeds, "interval": None}
