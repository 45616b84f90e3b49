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

from safeft.errors import UserError

Factors = tuple[Tensor, Tensor]  # (L: (m, t), R: (n, t)) with G = L @ R.T
_DENSE_SVD_LIMIT = 1024  # cores larger than this on both sides use a randomized SVD


class LowRankSum:
    """A running sum of ``L_i R_i^T`` (``L_i: (m, t)``, ``R_i: (n, t)``, fp32), exact.

    Kept as factors ``L: (m, k)``, ``R: (n, k)`` while they are smaller than the ``(m, n)`` matrix, and as that
    matrix once they are not (``k (m + n) >= m n``): never more memory than an fp32 ``(m, n)`` matrix.

    Why no truncation to the top directions along the way: on a 1B-parameter Llama's shapes (H100, bf16, 20
    samples) cutting each partial sum to 256 directions took 4.7 s of a 5.7 s gradient sum and factorisation and
    moved the final rank-64 bases (overlap with the exact sums' as low as 0.60); exact sums took 1.06 s in all, for
    a peak of 10.2 GiB instead of 5.1 (benchmarks/results/overhead_cuda/h100_exact_sums).
    """

    def __init__(self):
        self.left: Tensor | None = None
        self.right: Tensor | None = None
        self.dense: Tensor | None = None  # (m, n), once the factors would be larger

    @property
    def empty(self) -> bool:
        """Return True if nothing was added."""
        return self.left is None and self.dense is None

    def add(self, left: Tensor, right: Tensor) -> None:
        """Add ``left @ right.T`` with ``left: (m, t)``, ``right: (n, t)``."""
        if self.dense is not None:
            self.dense.addmm_(left, right.T)
            return
        if self.left is None:
            self.left, self.right = left, right
        else:
            self.left, self.right = torch.cat([self.left, left], 1), torch.cat([self.right, right], 1)
        (m, k), n = self.left.shape, self.right.shape[0]
        if k * (m + n) >= m * n:
            self.dense, self.left, self.right = self.left @ self.right.T, None, None

    def factors(self) -> Factors:
        """Return factors ``(L, R)`` of the sum; once it is held as the matrix ``G``, ``G`` and an identity on its
        smaller side (``(G, I_n)`` or ``(I_m, G^T)``)."""
        if self.dense is not None:
            m, n = self.dense.shape
            eye = torch.eye(min(m, n), dtype=self.dense.dtype, device=self.dense.device)
            return (self.dense, eye) if n <= m else (eye, self.dense.T)
        return self.left, self.right

    def svd(self, max_rank: int) -> tuple[Tensor, Tensor, Tensor]:
        """Return the top ``max_rank`` singular triplets ``U: (m, q)``, ``S: (q,)``, ``V: (n, q)`` of the sum."""
        if self.dense is not None:
            return dense_svd(self.dense, max_rank)
        return factor_svd(self.left, self.right, max_rank)


def dense_svd(G: Tensor, max_rank: int, *, oversample: int = 16, power_iterations: int = 4
              ) -> tuple[Tensor, Tensor, Tensor]:
    """Return the top ``q = min(max_rank, m, n)`` singular triplets of ``G: (m, n)`` (fp32).

    When ``q`` is under a quarter of the smaller side: a randomized SVD (Halko, Martinsson & Tropp 2011: a
    Gaussian sketch of ``q + oversample`` columns from a fixed seed, so the result is deterministic and the global
    RNG is untouched, then ``power_iterations`` orthonormalised passes through ``G`` and ``G^T``); else
    :func:`small_svd`'s.
    On the default model's 210 safety gradients (rank 64 of 192-1536; spectra decaying to 0.4-6% of the first
    value) its subspaces overlap LAPACK's by at least 0.9997 (mean 0.99998), singular values within 3e-5 of the
    first, at about a third of the time (benchmarks/results/estimation_accuracy.md). Where the spectrum is flat
    around ``q`` the trailing directions are approximate, as is the top-``q`` span itself.
    """
    G = G.float()
    m, n = G.shape
    q = min(max_rank, m, n)
    if q >= min(m, n) // 4:
        return small_svd(G, q)
    generator = torch.Generator(device=G.device).manual_seed(0)
    sketch = torch.randn(n, min(q + oversample, m, n), generator=generator, device=G.device, dtype=G.dtype)
    Q = torch.linalg.qr(G @ sketch)[0]  # (m, k): an orthonormal basis of G's range, roughly
    for _ in range(power_iterations):  # each pass sharpens it by the ratio of the spectrum beyond k to within
        Q = torch.linalg.qr(G @ torch.linalg.qr(G.T @ Q)[0])[0]
    u, S, v = small_svd(Q.T @ G, q)  # (k, q), (q,), (n, q)
    return Q @ u, S, v


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
        u, s, v = small_svd(small, q)
    return q_left @ u[:, :q], s[:q], q_right @ v[:, :q]


def small_svd(M: Tensor, q: int) -> tuple[Tensor, Tensor, Tensor]:
    """Return the top ``q`` singular triplets ``u: (a, q)``, ``s: (q,)``, ``v: (b, q)`` of a small ``M: (a, b)``
    (fp32), ``q <= min(a, b)``: :func:`gram_svd` on CUDA, LAPACK's SVD elsewhere."""
    if q > min(M.shape):
        raise UserError(f"asked for {q} singular triplets of a {tuple(M.shape)} matrix")
    if M.device.type != "cuda":
        u, s, vh = torch.linalg.svd(M, full_matrices=False)
        return u[:, :q], s[:q], vh[:q].T
    return gram_svd(M, q)


def gram_svd(M: Tensor, q: int) -> tuple[Tensor, Tensor, Tensor]:
    """Return the top ``q <= min(a, b)`` singular triplets of ``M: (a, b)`` from the eigendecomposition of its
    fp64 Gram matrix on the smaller side, in ``M``'s dtype.

    Why: on CUDA, cuSOLVER's SVD of the estimation's cores (a few hundred square) is slow and often falls back to
    its slowest driver for lack of convergence; the fp64 eigendecomposition was 2-3x faster per core on an H100 and
    cut a 1B-shape model's estimation from 21 s to 5.5 s with the same subspace (overlap >= 0.99999). In fp64 a
    singular value ``s_i`` keeps about ``16 - 2 log10(s_1 / s_i)`` digits, so fp32 results are exact to rounding
    for ``s_i > 1e-4 s_1``. Directions whose singular value is zero get an arbitrary orthonormal completion, as
    from an SVD.
    """
    wide = M.shape[0] <= M.shape[1]
    A = (M if wide else M.T).double()  # (a, b) with a <= b
    w, u = torch.linalg.eigh(A @ A.T)  # ascending
    w, u = w.flip(0)[:q].clamp_min(0), u.flip(1)[:, :q]
    # A^T u_i = s_i v_i: orthogonal columns, which QR normalises (and completes where s_i = 0) without dividing
    v, r = torch.linalg.qr(A.T @ u)  # (b, q)
    v = v * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)
    u, s, v = (t.to(M.dtype) for t in (u, w.sqrt(), v))
    return (u, s, v) if wide else (v, s, u)


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


def weighted_span(blocks: Sequence[tuple[Tensor, Tensor]], k: int) -> tuple[Tensor, Tensor]:
    """Return the top ``k`` directions of the union of weighted bases: ``Q: (d, q)`` orthonormal and ``s: (q,)``, the
    leading left singular vectors and values of ``[X_1 diag(S_1), X_2 diag(S_2), ...]``, ``q = min(k, d, sum r_i)``.

    Each block is ``(X: (d, r_i), S: (r_i,))`` with orthonormal columns. A direction held by several blocks keeps the
    root of its summed squared weights; numerically zero directions are dropped."""
    stacked = torch.cat([X.float() * S.float() for X, S in blocks], dim=1)  # (d, sum r_i)
    if stacked.shape[1] == 0:
        return stacked[:, :0], stacked.new_zeros(0)
    Q, s, _ = torch.linalg.svd(stacked, full_matrices=False)
    q = min(k, int((s > s[0] * 1e-6).sum()) if s[0] > 0 else 0)
    return Q[:, :q].contiguous(), s[:q].contiguous()


def complete_columns(X: Tensor, q: int) -> Tensor:
    """Return ``q`` orthonormal columns ``(d, q)`` whose first ones span ``X`` (``(d, p)``, orthonormal, ``p <= q
    <= d``), completed with directions orthogonal to it (from a fixed seed, so the result is deterministic)."""
    if X.shape[1] >= q:
        return X[:, :q].contiguous()
    R = torch.randn(X.shape[0], q - X.shape[1], generator=torch.Generator().manual_seed(0), dtype=X.dtype)
    R = R - X @ (X.T @ R)
    return torch.cat([X, torch.linalg.qr(R)[0]], dim=1).contiguous()
