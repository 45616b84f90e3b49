"""Pure tensor math of SPF (SPEC §2): the core, the conflict test, removal by side and mode, the LoRA rule.

No Hugging Face imports here. Every function takes one target matrix and its rank-r safety basis:

    G: (m, n)  a gradient (or a weight change) of the target ``W: (m, n)``
    U: (m, r)  left singular vectors of the safety gradient, orthonormal columns
    S: (r,)    its singular values (non-negative)
    V: (n, r)  right singular vectors, orthonormal columns

so that ``U diag(S) V^T`` is the rank-r safety gradient ``G_s``. A step ``W <- W - eta * G`` changes the safety
loss by ``-eta * <G_s, G> = -eta * sum_i S_i C_ii`` to first order, with the core ``C = U^T G V``. The step
conflicts with safety when that inner product is negative.

Removal is an orthogonal projection (in the Frobenius inner product) onto the part of G that the chosen side can
see, restricted to the directions the chosen mode selects:

    left       G - U_D U_D^T G                 output space
    right      G - G V_D V_D^T                 input space
    two_sided  G - U_D U_D^T G V_D V_D^T       only the r x r core

with ``D`` every direction (``always``), every direction when the conflict test fires (``conflict``), or the
directions with ``C_ii < 0`` (``directional``). All math runs in fp32 (products with a bf16/fp16 G on CUDA run
in its dtype with fp32 accumulation and output); results are cast back to G's dtype.

Work is organised around a *sketch* of G, the only part of G the removal needs: ``U^T G`` (r, n) for ``left``,
``G V`` (m, r) for ``right``, ``U^T G V`` (r, r) for ``two_sided``. Sketches are linear in G, which is what lets
``project="update"`` correct a weight change from ``sketch(W_new) - sketch(W_old)`` without copying the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from safeft.errors import UserError

Side = Literal["left", "right", "two_sided"]
Mode = Literal["conflict", "always", "directional"]
SIDES: tuple[str, ...] = ("left", "right", "two_sided")
MODES: tuple[str, ...] = ("conflict", "always", "directional")


def core(G: Tensor, U: Tensor, V: Tensor) -> Tensor:
    """Return the core ``C = U^T G V`` as fp32 ``(r, r)``. Assumes ``G: (m, n)``, ``U: (m, r)``, ``V: (n, r)``."""
    return U.float().T @ G.float() @ V.float()


def safety_inner(G: Tensor, U: Tensor, S: Tensor, V: Tensor) -> Tensor:
    """Return ``<G, U diag(S) V^T> = sum_i S_i C_ii`` as an fp32 scalar; negative means a step ``-G`` conflicts."""
    return (S.float() * torch.diagonal(core(G, U, V))).sum()


def sketch(G: Tensor, U: Tensor, V: Tensor, side: Side) -> Tensor:
    """Return the fp32 sketch of G that ``side`` needs: ``U^T G`` (r, n), ``G V`` (m, r) or ``U^T G V`` (r, r)."""
    if side == "left":
        return _mm_fp32(U.T, G)
    if side == "right":
        return _mm_fp32(G, V)
    if side == "two_sided":
        return _mm_fp32(U.T, G) @ V.float()
    raise UserError(f"side must be one of {SIDES}, got {side!r}")


def _low_precision_cuda(X: Tensor) -> bool:
    """Return True for a bf16/fp16 tensor on CUDA, where cuBLAS multiplies in that dtype with fp32 accumulation, so
    the fp32 copy of X (a pass over the whole matrix) is not needed."""
    return X.is_cuda and X.dtype in (torch.bfloat16, torch.float16)


def _mm_fp32(A: Tensor, B: Tensor) -> Tensor:
    """Return ``A @ B`` as fp32 for 2-D operands. When one is a low-precision CUDA matrix the other (the fp32 basis)
    is rounded to its dtype and the product is accumulated and returned in fp32 (``torch.mm(..., out_dtype=)``)."""
    low = next((X for X in (A, B) if _low_precision_cuda(X)), None)
    if low is not None:
        return torch.mm(A.to(low.dtype), B.to(low.dtype), out_dtype=torch.float32)
    return A.float() @ B.float()


def core_diagonal(sk: Tensor, U: Tensor, V: Tensor, side: Side) -> Tensor:
    """Return ``diag(U^T G V)`` (r,) from a sketch of G made by :func:`sketch` with the same ``side``."""
    if side == "left":  # (U^T G) V, diagonal only
        return (sk * V.float().T).sum(dim=1)
    if side == "right":  # U^T (G V), diagonal only
        return (U.float() * sk).sum(dim=0)
    return torch.diagonal(sk)


def removal_mask(diag: Tensor, S: Tensor, mode: Mode) -> Tensor:
    """Return the fp32 0/1 mask ``(r,)`` of directions to remove, given ``diag = diag(C)`` of a gradient.

    ``conflict`` selects all directions when ``sum_i S_i C_ii < 0`` and none otherwise; ``always`` selects all;
    ``directional`` selects the directions with ``C_ii < 0``.
    """
    if mode == "always":
        return torch.ones_like(diag)
    if mode == "conflict":
        fired = (S.float() * diag).sum() < 0
        return fired.to(diag.dtype).expand_as(diag).clone()
    if mode == "directional":
        return (diag < 0).to(diag.dtype)
    raise UserError(f"mode must be one of {MODES}, got {mode!r}")


def removed_part(sk: Tensor, U: Tensor, V: Tensor, mask: Tensor | None, side: Side) -> Tensor:
    """Return the fp32 ``(m, n)`` component of G to subtract, from its sketch and a direction mask ``(r,)`` (None:
    every direction)."""
    left, right = _removal_factors(sk, U, V, mask, side)
    return left @ right


def masked_sketch(sk: Tensor, mask: Tensor | None, side: Side) -> Tensor:
    """Return the sketch of the part to remove: ``sk`` with the unselected directions zeroed (rows, columns or both);
    ``sk`` itself when ``mask`` is None (every direction, ``mode="always"``: no pass over the sketch).

    Because the bases are orthonormal this is also the removed part's own sketch, so after ``X -= removal``
    the sketch of X is ``sk - masked_sketch(sk, mask, side)``.
    """
    if mask is None:
        return sk
    if side == "left":
        return mask[:, None] * sk  # (r, n)
    if side == "right":
        return sk * mask  # (m, r)
    return mask[:, None] * sk * mask[None, :]  # (r, r)


def _removal_factors(sk: Tensor, U: Tensor, V: Tensor, mask: Tensor | None, side: Side) -> tuple[Tensor, Tensor]:
    """Return thin fp32 factors ``(m, q) @ (q, n)`` of the part to remove."""
    kept = masked_sketch(sk, mask, side)
    if side == "left":
        return U.float(), kept  # (m, r), (r, n)
    if side == "right":
        return kept, V.float().T  # (m, r), (r, n)
    return U.float() @ kept, V.float().T  # (m, r), (r, n)


def removed_energy(sk: Tensor, mask: Tensor | None, side: Side) -> Tensor:
    """Return ``||removed part||^2`` from the sketch alone (the bases are orthonormal), as an fp32 scalar."""
    return masked_sketch(sk, mask, side).pow(2).sum()


def subtract_(X: Tensor, sk: Tensor, U: Tensor, V: Tensor, mask: Tensor | None, side: Side) -> None:
    """Subtract the masked removal of sketch ``sk`` from ``X: (m, n)`` in place (``mask=None``: every direction).

    Used on gradients and on weights (``project="update"``). One fused ``addmm`` pass for fp32 tensors and for bf16
    tensors on CUDA (the thin factors rounded to bf16, fp32 accumulation, the result rounded once: a few entries
    land one bf16 step away from the fp32 path's); elsewhere (fp16 too, whose range the rounded factors could
    exceed) fp32 math, cast back.
    """
    left, right = _removal_factors(sk, U, V, mask, side)
    if X.dtype == torch.float32:
        X.addmm_(left, right, alpha=-1.0)
    elif X.is_cuda and X.dtype == torch.bfloat16:
        X.addmm_(left.to(X.dtype), right.to(X.dtype), alpha=-1.0)
    else:
        X.copy_((X.float() - left @ right).to(X.dtype))


def sketch_batched(X: Tensor, B: Tensor, side: Side) -> Tensor:
    """Return the fp32 one-sided sketches of stacked matrices ``X: (L, m, n)`` in one batched product: ``U_i^T X_i``
    (L, r, n) for ``side="left"`` with ``B`` the stacked ``U: (L, m, r)``, ``X_i V_i`` (L, m, r) for ``"right"`` with
    ``B`` the stacked ``V: (L, n, r)``; rounded as :func:`sketch` rounds each (on CUDA a bf16/fp16 X meets the basis
    in its own dtype with fp32 accumulation)."""
    if side not in ("left", "right"):
        raise UserError(f"batched sketches are one-sided, got side={side!r}")
    if _low_precision_cuda(X):
        B = B.to(X.dtype)
        return torch.bmm(B.transpose(1, 2), X, out_dtype=torch.float32) if side == "left" else torch.bmm(
            X, B, out_dtype=torch.float32)
    return torch.bmm(B.float().transpose(1, 2), X.float()) if side == "left" else torch.bmm(X.float(), B.float())


def subtract_batched_(Xs: list[Tensor], sk: Tensor, B: Tensor, side: Side) -> None:
    """Subtract each sketch's whole removal from ``Xs[i]: (m, n)`` in place: ``U_i sk_i`` (``side="left"``, ``sk:
    (L, r, n)``, ``B`` the stacked U) or ``sk_i V_i^T`` (``"right"``, ``sk: (L, m, r)``, ``B`` the stacked V).

    One batched product into an fp32 ``(L, m, n)`` removal, then one multi-tensor subtraction that rounds each entry
    once into X's dtype, as :func:`subtract_` does (bf16 on CUDA: the thin factors rounded to bf16, fp32
    accumulation; elsewhere fp32 factors)."""
    if Xs[0].is_cuda and Xs[0].dtype == torch.bfloat16:
        sk, B = sk.to(torch.bfloat16), B.to(torch.bfloat16)
        removal = torch.bmm(B, sk, out_dtype=torch.float32) if side == "left" else torch.bmm(
            sk, B.transpose(1, 2), out_dtype=torch.float32)
    else:
        removal = torch.bmm(B.float(), sk) if side == "left" else torch.bmm(sk, B.float().transpose(1, 2))
    torch._foreach_sub_(Xs, list(removal.unbind(0)))


def project(G: Tensor, U: Tensor, S: Tensor, V: Tensor, *, side: Side = "left", mode: Mode = "conflict") -> Tensor:
    """Remove from G the parts that conflict with the safety subspace (SPEC §2).

    Args:
        G: ``(m, n)`` gradient of one target matrix, any float dtype.
        U: ``(m, r)`` left safety basis, orthonormal columns.
        S: ``(r,)`` safety singular values.
        V: ``(n, r)`` right safety basis, orthonormal columns.
        side: ``"left"``, ``"right"`` or ``"two_sided"``.
        mode: ``"conflict"``, ``"always"`` or ``"directional"``.

    Returns:
        A new tensor of G's shape and dtype (G is not modified; :func:`project_` works in place). After it,
        ``<G', U S V^T> >= 0``, ``<G', G> = ||G'||^2`` and ``||G'|| <= ||G||``; projecting again changes nothing.
    """
    projected = G.clone()
    project_(projected, U, S, V, side=side, mode=mode)
    return projected


@dataclass(frozen=True)
class ProjectionStats:
    """What the monitor logs about one projection (fp32 scalar tensors, no host sync)."""

    inner_before: Tensor  # <G, U S V^T> before removal
    fired: Tensor  # 1.0 if any direction was removed
    removed_sq: Tensor  # ||G - G'||^2


def project_(G: Tensor, U: Tensor, S: Tensor, V: Tensor, *, side: Side = "left", mode: Mode = "conflict",
             check: bool = True) -> ProjectionStats:
    """Project G in place like :func:`project` and return the conflict inner product and what was removed.

    ``check=False`` skips the finiteness test (a host sync on an accelerator): a caller projecting many matrices
    tests the returned ``inner_before`` of all of them at once instead, which is non-finite whenever G is.

    Raises:
        FloatingPointError: if G holds NaN or inf (seen through its sketch, which any non-finite entry reaches).
    """
    _check_shapes(G, U, S, V)
    sk = sketch(G, U, V, side)
    return project_sketched_(G, sk, core_diagonal(sk, U, V, side), U, S, V, side=side, mode=mode, check=check)


def project_sketched_(G: Tensor, sk: Tensor, diag: Tensor, U: Tensor, S: Tensor, V: Tensor, *, side: Side,
                      mode: Mode, check: bool = True) -> ProjectionStats:
    """Project G in place given its sketch ``sk`` (:func:`sketch`) and core diagonal ``diag`` ``(r,)``.

    The split lets a caller assemble ``sk`` and ``diag`` itself: under row sharding (FSDP), ``G`` and ``U`` are a
    shard's rows, ``U^T G`` and ``U^T G V`` are sums over shards, while ``G V`` is per row (see
    :mod:`safeft.spf.sharded`). ``removed_sq`` is then this shard's share for ``right`` and the whole for the other
    sides. ``check=False`` skips the finiteness test, as in :func:`project_`.

    Raises:
        FloatingPointError: if ``sk`` holds NaN or inf.
    """
    if check and not torch.isfinite(sk).all():
        raise FloatingPointError("non-finite gradient (NaN/inf) given to the SPF projection")
    mask = removal_mask(diag, S, mode)
    fired = (mask.sum() > 0).float()
    # on the CPU skipping a no-op removal saves a pass over G; on an accelerator the check would cost a sync
    if G.device.type != "cpu" or bool(fired):
        subtract_(G, sk, U, V, mask, side)
    return ProjectionStats(inner_before=(S.float() * diag).sum(), fired=fired,
                           removed_sq=removed_energy(sk, mask, side))


def _check_shapes(G: Tensor, U: Tensor, S: Tensor, V: Tensor) -> None:
    m, n = G.shape
    r = S.shape[0]
    if U.shape != (m, r) or V.shape != (n, r):
        raise UserError(
            f"safety basis does not fit the gradient: G is {tuple(G.shape)}, so U must be ({m}, {r}) and "
            f"V ({n}, {r}); "
            f"got U {tuple(U.shape)} and V {tuple(V.shape)}. Was the subspace estimated on another model?"
        )


# --- LoRA: dW = s * (B A - B_0 A_0) with B: (m, k), A: (k, n); the subspace belongs to the frozen base W ---------


def lora_projected_factors(side: Side) -> tuple[bool, bool]:
    """Return which LoRA factors ``side`` projects, as ``(B, A)``.

    ``left`` projects B's changes on the left, which keeps ``U^T dW = 0`` while ``U^T B_0 = 0`` (peft starts B at
    zero); ``right`` projects A's changes on the right, which keeps ``dW V = 0`` while ``A_0 V = 0`` (the caller
    projects A's initial value); ``two_sided`` projects both, which keeps the core ``U^T dW V = 0`` from any start.
    """
    if side not in SIDES:
        raise UserError(f"side must be one of {SIDES}, got {side!r}")
    return side in ("left", "two_sided"), side in ("right", "two_sided")


def lora_core_diagonal(grad_B: Tensor, grad_A: Tensor, B: Tensor, A: Tensor, U: Tensor, V: Tensor) -> Tensor:
    """Return ``diag(U^T (grad_B A + B grad_A) V)`` (r,) in fp32 through ``(r, k)`` products, never ``(m, n)``."""
    return _lora_diag(U.float().T @ grad_B.float(), grad_A.float() @ V.float(), B, A, U, V)


def factor_core_diagonal(ub: Tensor, av: Tensor) -> Tensor:
    """Return ``diag(ub @ av)`` (r,) for ``ub = U^T B: (r, k)`` and ``av = A V: (k, r)``: the core diagonal
    ``diag(U^T B A V)`` of a product of LoRA factors, without forming the ``(r, r)`` product."""
    return (ub * av.T).sum(dim=1)


def _lora_diag(sk_B: Tensor, sk_A: Tensor, B: Tensor, A: Tensor, U: Tensor, V: Tensor) -> Tensor:
    # sk_B = U^T grad_B: (r, k); sk_A = grad_A V: (k, r)
    return factor_core_diagonal(sk_B, A.float() @ V.float()) + factor_core_diagonal(U.float().T @ B.float(), sk_A)


def project_lora(grad_B: Tensor, grad_A: Tensor, B: Tensor, A: Tensor, U: Tensor, S: Tensor, V: Tensor, *,
                 side: Side = "two_sided", mode: Mode = "conflict") -> tuple[Tensor, Tensor]:
    """Project the gradients of LoRA factors so the induced weight change stays out of the side's safety space.

    Args:
        grad_B, B: ``(m, k)`` gradient and value of the LoRA up-projection.
        grad_A, A: ``(k, n)`` gradient and value of the LoRA down-projection.
        U, S, V: the base matrix's safety basis, as in :func:`project`.
        side: which factors to project (:func:`lora_projected_factors`).
        mode: which directions to remove; the conflict test is ``<U S V^T, grad_B A + B grad_A> < 0`` for every side.

    Returns:
        New tensors ``(grad_B', grad_A')`` in the input dtypes, with ``grad_B' = grad_B - U_D U_D^T grad_B`` where
        ``side`` projects B and ``grad_A' = grad_A - grad_A V_D V_D^T`` where it projects A (D the removed
        directions). With ``mode="always"`` the side's invariant holds for the step: ``U^T grad_B' = 0`` (left),
        ``grad_A' V = 0`` (right), both (two_sided). With ``conflict``/``directional`` a left or right projection
        removes the conflicting directions from its own factor's term only; the other factor's term
        (``B grad_A`` for left, ``grad_B A`` for right) keeps whatever ``U^T B`` or ``A V`` earlier unprojected
        steps let in. :func:`project_lora_` works in place.
    """
    new_B, new_A = grad_B.clone(), grad_A.clone()
    project_lora_(new_B, new_A, B, A, U, S, V, side=side, mode=mode)
    return new_B, new_A


def project_lora_(grad_B: Tensor, grad_A: Tensor, B: Tensor, A: Tensor, U: Tensor, S: Tensor, V: Tensor, *,
                  side: Side = "two_sided", mode: Mode = "conflict", check: bool = True) -> ProjectionStats:
    """Project LoRA factor gradients in place like :func:`project_lora`; return the conflict statistics.
    ``check=False`` skips the finiteness test, as in :func:`project_`."""
    on_B, on_A = lora_projected_factors(side)
    sk_B = U.float().T @ grad_B.float()  # (r, k)
    sk_A = grad_A.float() @ V.float()  # (k, r)
    if check and not (torch.isfinite(sk_B).all() and torch.isfinite(sk_A).all()):
        raise FloatingPointError("non-finite LoRA gradient (NaN/inf) given to the SPF projection")
    diag = _lora_diag(sk_B, sk_A, B, A, U, V)
    mask = removal_mask(diag, S, mode)
    removed_sq = torch.zeros((), device=diag.device)
    if on_B:
        subtract_(grad_B, sk_B, U, V, mask, "left")
        removed_sq = removed_sq + removed_energy(sk_B, mask, "left")
    if on_A:
        subtract_(grad_A, sk_A, U, V, mask, "right")
        removed_sq = removed_sq + removed_energy(sk_A, mask, "right")
    return ProjectionStats(inner_before=(S.float() * diag).sum(), fired=(mask.sum() > 0).float(),
                           removed_sq=removed_sq)
