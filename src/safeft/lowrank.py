"""Low-rank factor math shared by subspace estimation and gradient analysis.

A weight gradient ``G = dL/dy^T x`` of an ``(m, n)`` matrix is kept as thin factors ``G = L R^T`` with
``L: (m, t)``, ``R: (n, t)`` (t tokens or directions). Everything here works on the factors: running sums, the
top singular triplets of a sum, inner products and cosines, and subspace overlaps; no ``(m, n)`` matrix is formed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

Factors = tuple[Tensor, Tensor]  # (L: (m, t), R: (n, t)) with G = L @ R.T
_DENSE_SVD_LIMIT = 1024  # cores larger than this on both sides use a randomized SVD


class LowRankSum:
    """A running sum of ``L_i R_i^T`` kept as factors ``L: (m, k)``, ``R: (n, k)``; exact until k exceeds
    ``2 * width``, then cut to the top ``width`` directions of the partial sum."""

    def __init__(self, width: int):
        self.width = width
        self.left: Tensor | None = None
        self.right: Tensor | None = None

    def add(self, left: Tensor, right: Tensor) -> None:
        """Add ``left @ right.T`` with ``left: (m, t)``, ``right: (n, t)``."""
        if self.left is None:
            self.left, self.right = left, right
        else:
            self.left, self.right = torch.cat([self.left, left], 1), torch.cat([self.right, right], 1)
        if self.left.shape[1] > 2 * self.width:  # keep the top `width` directions of the partial sum; waiting
            U, S, V = factor_svd(self.left, self.right, self.width)  # until 2x amortises the SVDs over batches
            self.left, self.right = U * S, V

    def svd(self, max_rank: int) -> tuple[Tensor, Tensor, Tensor]:
        """Return the top ``max_rank`` singular triplets ``U: (m, q)``, ``S: (q,)``, ``V: (n, q)`` of the sum."""
        return factor_svd(self.left, self.right, max_rank)


def factor_svd(left: Tensor, right: Tensor, max_rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Return the top ``q <= max_rank`` singular triplets of ``left @ right.T`` without forming it.

    ``left: (m, t)`` and ``right: (n, t)`` in fp32; both are reduced by QR to a core of at most ``(t, t)``, which
    gets an exact SVD when small and a randomized one (``torch.svd_lowrank``) when large.
    """
    q_left, r_left = torch.linalg.qr(left)  # (m, a), (a, t)
    q_right, r_right = torch.linalg.qr(right)  # (n, b), (b, t)
    small = r_left @ r_right.T  # (a, b)
    q = min(max_rank, *small.shape)
    if min(small.shape) > _DENSE_SVD_LIMIT and q < min(small.shape) // 4:
        u, s, v = torch.svd_lowrank(small, q=q + 8, niter=4)
    else:
        u, s, vh = torch.linalg.svd(small, full_matrices=False)
        v = vh.T
    return q_left @ u[:, :q], s[:q], q_right @ v[:, :q]


def energy_rank(S: Tensor, fraction: float) -> int:
    """Return the number of leading singular values holding ``fraction`` of the squared spectrum (0 for zero)."""
    energy = S.double() ** 2
    if energy.sum() <= 0:
        return 0
    cumulative = torch.cumsum(energy, 0) / energy.sum()
    return int((cumulative < fraction - 1e-12).sum()) + 1


def factored_inner(a: Factors, b: Factors) -> float:
    """Return ``<L_a R_a^T, L_b R_b^T>`` through ``(t_a, t_b)`` products."""
    return float(((a[0].T @ b[0]) * (a[1].T @ b[1])).sum())


def factored_cosine(a: Factors, b: Factors) -> float:
    """Return the cosine between two factored matrices (0 if either is zero)."""
    norms = math.sqrt(max(factored_inner(a, a), 0.0) * max(factored_inner(b, b), 0.0))
    return factored_inner(a, b) / norms if norms > 0 else 0.0


def subspace_overlap(a: Tensor, b: Tensor) -> float:
    """Return the mean squared cosine of the principal angles between the column spans of ``a`` and ``b``.

    Assumes orthonormal columns. 1 for identical spans, 0 for orthogonal ones; with different widths the mean runs
    over the smaller one.
    """
    k = min(a.shape[1], b.shape[1])
    if k == 0:
        return 0.0
    return float(torch.linalg.svdvals(a.T @ b).pow(2).sum() / k)


def concat(factors: Sequence[Factors], scale: float = 1.0) -> Factors:
    """Return the factors of ``scale * sum_i L_i R_i^T``."""
    return torch.cat([f[0] for f in factors], 1) * scale, torch.cat([f[1] for f in factors], 1)
