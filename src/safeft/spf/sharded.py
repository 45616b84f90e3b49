"""SPF under FSDP2: each process projects the rows it holds, with one all-reduce per optimizer step for all targets.

FSDP2 (``fully_shard``) shards parameters and gradients as DTensors on dim 0. A guard then holds ``U`` cut to its
rows and ``V`` whole. ``G V`` is per row, so ``right`` needs no communication (``mode="always"``) or only the core
diagonal ``(r,)`` per target (the conflict tests); ``U^T G`` and ``U^T G V`` are sums over the row shards, summed
for all targets in one flat all-reduce (:class:`safeft.distributed.Collectives`). Under LoRA the factors' sketches
``U^T B`` and ``A V`` (with their gradients' or updates') travel in the same single all-reduce: ``4 r k`` numbers per
target. Metrics are kept as this process's shares (:func:`share`), summed when the monitor reports.
"""

from __future__ import annotations

import torch
from torch import Tensor

from safeft.distributed import Collectives, local
from safeft.spf import projection as P
from safeft.spf.config import SPFConfig
from safeft.spf.guards import Guard, non_finite_message, pad_rows, sketches
from safeft.spf.monitor import Monitor


def share(value: Tensor, whole: bool) -> Tensor:
    """Return this process's share of a metric: all of a per-row part, ``1 / world`` of a value every process holds
    whole, so that summing the shares over the processes counts it once."""
    import torch.distributed as dist

    return value / dist.get_world_size() if whole and dist.is_initialized() else value


def project_gradients(guards: list[Guard], config: SPFConfig, collectives: Collectives, monitor: Monitor,
                      measure: bool) -> None:
    """Project the gradient rows of every sharded guard in place: local sketches, one all-reduce of the summed
    parts, then removal; ``measure``: also count the gradients' squared norms (the monitor's reporting step)."""
    plans, pieces = [], []
    for g in guards:
        t = g.target
        if any(x is None for x in g.grads()):
            continue
        grads = tuple(local(x) for x in g.grads())
        if t.is_lora:
            sk_B, sk_A = g.U.T @ grads[0].float(), grads[1].float() @ g.V  # (r, k) summed, (k, r) by rows
            if config.mode == "always":  # no conflict test: only B's sketch (left, two_sided) is a sum over rows
                own = [sk_B] if P.lora_projected_factors(config.side)[0] else []
            else:  # the test needs diag(U^T (grad_B A + B grad_A) V): the four r x k sketches, whole
                ub, av = g.U.T @ local(t.lora_B).float(), local(t.lora_A).float() @ g.V
                k = t.lora_A.shape[0]
                own = [sk_B, ub, pad_rows(sk_A, g.rows_A, k), pad_rows(av, g.rows_A, k)]
        else:
            sk_A = P.sketch(grads[0], g.U, g.V, config.side)  # the rows' sketch (right) or their part of it
            if config.side != "right":
                own = [sk_A]
            else:  # G V is per row: only the conflict tests need the core diagonal, a sum over rows
                own = [P.core_diagonal(sk_A, g.U, g.V, "right")] if config.mode != "always" else []
        plans.append((g, grads, len(own), sk_A))
        pieces += own
    summed = iter(collectives.sum(pieces))
    for g, grads, count, held in plans:
        parts = [next(summed) for _ in range(count)]
        grad_sq = (sum(torch.linalg.vector_norm(x, dtype=torch.float32) ** 2 for x in grads)
                   if measure else None)  # this process's rows
        try:
            if g.target.is_lora:
                fired, removed_sq = _remove_lora_gradients(g, grads, parts, held, config)
            else:
                if config.side == "right":
                    sk, diag = held, parts[0] if parts else torch.zeros_like(g.S)
                else:
                    sk = parts[0]
                    diag = P.core_diagonal(sk, g.U, g.V, config.side)
                stats = P.project_sketched_(grads[0], sk, diag, g.U, g.S, g.V, side=config.side, mode=config.mode)
                fired, removed_sq = stats.fired, share(stats.removed_sq, config.side != "right")
        except FloatingPointError:
            raise FloatingPointError(non_finite_message(g.target.name)) from None
        monitor.count(fired, removed_sq, grad_sq, shard=True)


def _remove_lora_gradients(g: Guard, grads: tuple[Tensor, Tensor], parts: list[Tensor], sk_A_rows: Tensor,
                           config: SPFConfig) -> tuple[Tensor, Tensor]:
    """Remove the conflicting part of LoRA gradient rows; return ``(fired, this process's removed_sq share)``."""
    if config.mode == "always":
        sk_B = parts[0] if parts else None
        mask = torch.ones_like(g.S)
    else:
        sk_B, ub, sk_A, av = parts  # diag(U^T (grad_B A + B grad_A) V):
        diag = P.factor_core_diagonal(sk_B, av) + P.factor_core_diagonal(ub, sk_A)
        mask = P.removal_mask(diag, g.S, config.mode)
    if not ((sk_B is None or torch.isfinite(sk_B).all()) and torch.isfinite(sk_A_rows).all()):
        raise FloatingPointError("non-finite LoRA gradient")
    on_B, on_A = P.lora_projected_factors(config.side)
    removed = torch.zeros((), device=mask.device)
    if on_B:
        P.subtract_(grads[0], sk_B, g.U, g.V, mask, "left")
        removed = removed + share(P.removed_energy(sk_B, mask, "left"), True)
    if on_A:
        P.subtract_(grads[1], sk_A_rows, g.U, g.V, mask, "right")
        removed = removed + P.removed_energy(sk_A_rows, mask, "right")
    return (mask.sum() > 0).float(), removed


def project_updates(guards: list[Guard], config: SPFConfig, collectives: Collectives, monitor: Monitor) -> None:
    """Correct every sharded guard's weight change from its sketches before and after the step (``g.before``), with
    one all-reduce for all of them."""
    plans, pieces = [], []
    for g in guards:
        after = sketches(g, config.side)
        if g.target.is_lora:
            (ub_old, av_old), (ub_new, av_new) = g.before, after
            k = g.target.lora_A.shape[0]
            if config.mode == "always":  # B's change's sketch is a sum over rows; A's is per row
                own = [ub_new - ub_old] if P.lora_projected_factors(config.side)[0] else []
            else:  # the test needs diag(U^T dW V) from the whole sketches before and after
                own = [ub_old, ub_new, pad_rows(av_old, g.rows_A, k), pad_rows(av_new, g.rows_A, k)]
            plans.append((g, len(own), av_new - av_old))
        else:
            delta = after[0] - g.before[0]  # this process's part of the change's sketch
            if config.side != "right":
                own = [delta]
            else:
                own = [P.core_diagonal(delta, g.U, g.V, "right")] if config.mode != "always" else []
            plans.append((g, len(own), delta))
        pieces += own
    summed = iter(collectives.sum(pieces))
    for g, count, held in plans:
        parts = [next(summed) for _ in range(count)]
        t = g.target
        if t.is_lora and config.mode == "always":
            diag = torch.zeros_like(g.S)  # every direction goes: the test is not needed
            deltas, sides = (parts[0] if parts else None, held), ("left", "right")
            projected, whole = P.lora_projected_factors(config.side), (True, False)
        elif t.is_lora:
            ub_old, ub_new, av_old, av_new = parts
            diag = t.scaling * (P.factor_core_diagonal(ub_new, av_new) - P.factor_core_diagonal(ub_old, av_old))
            deltas, sides = (ub_new - ub_old, held), ("left", "right")
            projected, whole = P.lora_projected_factors(config.side), (True, False)
        else:
            if config.side == "right":
                delta, diag = held, parts[0] if parts else torch.zeros_like(g.S)
            else:
                delta = parts[0]
                diag = P.core_diagonal(delta, g.U, g.V, config.side)
            deltas, sides, projected, whole = (delta,), (config.side,), (True,), (config.side != "right",)
        if not all(torch.isfinite(d).all() for d in deltas if d is not None):
            raise FloatingPointError(non_finite_message(t.name))
        mask = P.removal_mask(-diag, g.S, config.mode)  # a weight change dW acts like a step along -dW
        removed = torch.zeros((), device=diag.device)
        for weight, delta, side, on, is_whole in zip(g.weights(), deltas, sides, projected, whole):
            if on:
                P.subtract_(local(weight).data, delta, g.U, g.V, mask, side)
                removed = removed + share(P.removed_energy(delta, mask, side), is_whole)
        g.corrected = ()  # a shard's sketch after the correction is not its part of the corrected sketch
        monitor.count((mask.sum() > 0).float(), removed, None, shard=True)
