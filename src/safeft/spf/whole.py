"""SPF on the targets a process holds whole (one process, DDP, LoRA): gradients projected in place, or each
optimizer step's weight change corrected from the target's sketches before and after it (SPEC §2).

The FSDP2 counterpart, for row shards, is :mod:`safeft.spf.sharded`; equal-shape batches are
:mod:`safeft.spf.batched`'s. These functions change the weights and the guards' remembered sketches, and count what
they remove in the monitor; the projector decides which guards each one gets.
"""

from __future__ import annotations

import torch
from torch import Tensor

from safeft.spf import projection as P
from safeft.spf.batched import Batch
from safeft.spf.config import SPFConfig
from safeft.spf.guards import Guard, non_finite_message, sketches
from safeft.spf.monitor import Monitor


def project_gradients(guards: list[Guard], config: SPFConfig, monitor: Monitor, measure: bool) -> None:
    """Project the gradient of every guard this process holds whole, in place; ``measure``: also count the
    gradients' squared norms (the monitor's reporting step). Raise ``FloatingPointError`` naming a target whose
    gradient is not finite (one host sync for all)."""
    check_finite([project_gradient(g, config, monitor, measure) for g in guards])


def project_gradient(guard: Guard, config: SPFConfig, monitor: Monitor, measure: bool
                     ) -> tuple[str, Tensor] | None:
    """Project one guard's gradient in place; return its name and conflict inner product for the caller's
    finiteness test (None when it has no gradient)."""
    t, cfg = guard.target, config
    grads = guard.grads()
    if any(g is None for g in grads):
        return None
    grad_sq = sum(torch.linalg.vector_norm(g, dtype=torch.float32) ** 2 for g in grads) if measure else None
    try:
        if t.is_lora:
            stats = P.project_lora_(*grads, t.lora_B, t.lora_A, guard.U, guard.S, guard.V, side=cfg.side,
                                    mode=cfg.mode, check=False)
        else:
            stats = P.project_(grads[0], guard.U, guard.S, guard.V, side=cfg.side, mode=cfg.mode, check=False)
    except FloatingPointError:
        raise FloatingPointError(non_finite_message(t.name)) from None
    monitor.count(stats.fired, stats.removed_sq, grad_sq)
    return t.name, stats.inner_before


def check_finite(inner_products: list[tuple[str, Tensor] | None]) -> None:
    """Raise a clear error if any target's conflict inner product (non-finite whenever its gradient is) is not
    finite: one host sync for all targets."""
    named = [x for x in inner_products if x is not None]
    if named and not torch.isfinite(torch.stack([inner.to(named[0][1].device) for _, inner in named]).sum()):
        raise FloatingPointError(non_finite_message(next(
            (name for name, inner in named if not torch.isfinite(inner)), "(one of them)")))


def project_updates(guards: list[Guard], batches: list[Batch], config: SPFConfig, monitor: Monitor) -> None:
    """Correct the weight change of every (unsharded) guard and batch from its sketches before and after the step.

    Two passes with one host sync between them, not one per target: the first sketches every change (and
    tests for conflicts), one fused norm over all of them tests finiteness before any weight is touched, the
    second removes; on an accelerator the per-target work is then a few kernel launches, and a batch's a few
    for all its targets."""
    if not guards and not batches:
        return
    afters = [sketches(g, config.side) for g in guards]
    flat = list(torch._foreach_sub([a for after in afters for a in after], [b for g in guards for b in g.before]))
    deltas, i = [], 0  # the sketches of the weight change the optimizer made, per guard
    for after in afters:
        deltas.append(flat[i:i + len(after)])
        i += len(after)
    batch_deltas = [b.sketches() - b.before for b in batches]
    delta_norm = torch.nn.utils.get_total_norm(flat + batch_deltas)
    alone = [(g.target.name, x) for b in batches for g, x in zip(b.guards, b.unprojected_tensors())]
    # a factor a batch leaves alone is tested whole (the per-target path tests its sketches): small, LoRA's; its
    # norm in fp32, where a finite fp16 factor's cannot overflow
    finite = delta_norm if not alone else torch.nn.utils.get_total_norm(
        [delta_norm] + [torch.linalg.vector_norm(x, dtype=torch.float32) for _, x in alone])
    if not torch.isfinite(finite):
        named = [(g.target.name, d) for g, d in zip(guards, deltas)]
        named += [(g.target.name, [d[j]]) for b, d in zip(batches, batch_deltas) for j, g in enumerate(b.guards)]
        named += [(name, [x]) for name, x in alone]
        bad = (name for name, d in named if not all(torch.isfinite(x).all() for x in d))
        raise FloatingPointError(non_finite_message(next(bad, "(one of them)")))
    removed = []
    for guard, after, delta in zip(guards, afters, deltas):
        removed += _remove_update(guard, after, delta, *_removal_mask(guard, after, delta, config), config, monitor)
    for batch, delta in zip(batches, batch_deltas):  # "always": each change is removed whole
        batch.remove(delta)
    removed += batch_deltas
    whole = flat + batch_deltas
    if len(removed) == len(whole) and all(r is d for r, d in zip(removed, whole)):
        removed_sq = delta_norm ** 2  # every change removed whole (mode "always", every factor projected)
    else:
        removed_sq = torch.nn.utils.get_total_norm(removed) ** 2 if removed else torch.zeros(())
    corrected = len(guards) + len({id(g) for b in batches for g in b.guards})
    monitor.checked += corrected
    monitor.add("removed_sq", removed_sq)
    if config.mode == "always":
        monitor.add("fired", float(corrected))

def _removal_mask(guard: Guard, after: tuple[Tensor, ...], deltas: list[Tensor], config: SPFConfig
                  ) -> tuple[Tensor | None, Tensor | None]:
    """Return the mask of the directions to remove from one guard's change (None: every direction, mode
    "always") and whether any is removed (a 0-d tensor; None under "always", counted by the caller)."""
    t, cfg = guard.target, config
    if cfg.mode == "always":  # every direction goes: no conflict test to make, no mask to apply
        return None, None
    if t.is_lora:
        (ub_old, av_old), (ub_new, av_new) = guard.before, after  # diag(U^T dW V):
        diag = t.scaling * (P.factor_core_diagonal(ub_new, av_new) - P.factor_core_diagonal(ub_old, av_old))
    else:
        diag = P.core_diagonal(deltas[0], guard.U, guard.V, cfg.side)
    mask = P.removal_mask(-diag, guard.S, cfg.mode)  # a weight change dW acts like a step along -dW
    return mask, (mask.sum() > 0).float()

def _remove_update(guard: Guard, after: tuple[Tensor, ...], deltas: list[Tensor], mask: Tensor | None,
                   fired: Tensor | None, config: SPFConfig, monitor: Monitor) -> list[Tensor]:
    """Remove the masked part of one guard's (finite) weight change from its weights; remember the corrected
    sketches for the next step; count it. Return the removed parts' sketches (projected factors only)."""
    t, cfg = guard.target, config
    sides, projected = (("left", "right"), P.lora_projected_factors(cfg.side)) if t.is_lora else (
        (cfg.side,), (True,))  # under LoRA B is sketched left, A right
    removed = [P.masked_sketch(d, mask, side) if on else None for d, side, on in zip(deltas, sides, projected)]
    for weight, delta, side, on in zip(guard.weights(), deltas, sides, projected):
        if on:
            P.subtract_(weight.data, delta, guard.U, guard.V, mask, side)  # .data: no version bump, no autograd
    # the sketches now; a projected factor's whole change is removed under "always", so it is back where it was
    guard.corrected = tuple(a if r is None else b if mask is None else a - r
                            for a, b, r in zip(after, guard.before, removed))
    guard.versions = tuple(w._version for w in guard.weights())
    if fired is not None:
        monitor.add("fired", fired)  # per guard: on the guard's own device, no sync
    return [r for r in removed if r is not None]
