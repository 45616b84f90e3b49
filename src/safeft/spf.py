"""Attach SPF to training: a projector driven by optimizer hooks (plain PyTorch) or by a TrainerCallback (HF / TRL).

Both paths call the same two methods of :class:`SPFProjector` around every optimizer step:

- ``before_step``: with ``project="grad"``, project each target's gradient (SPEC §2); with ``project="update"``,
  remember each target's sketch (``U^T W``, ``W V`` or ``U^T W V``; for LoRA ``U^T B`` and ``A V``).
- ``after_step``: with ``project="update"``, remove the conflicting part of the weight change the optimizer
  actually made, computed from the new sketch minus the old one; refresh the subspace when due.

Under LoRA (``dW = s (B A - B_0 A_0)``) the side chooses the factor: ``right`` keeps the rows of A orthogonal to V
(A's initial value is projected when SPF is attached), so ``dW V = 0`` whatever B does; ``left`` keeps the columns
of B orthogonal to U (B starts at zero), so ``U^T dW = 0``; ``two_sided`` projects both factors' changes, which
keeps the core ``U^T dW V = 0`` from any start (and, with B starting at zero and ``mode="always"``, ``U^T dW = 0``
too). With ``project="update"`` and ``mode="always"`` these hold for the merged weight under any optimizer.

Under DDP the gradients are already all-reduced when the optimizer steps, so the projection runs locally on
identical tensors and every rank makes the same update as one process with the global batch.

Under FSDP2 (``fully_shard``: parameters and gradients are DTensors sharded on dim 0) each process projects the
rows it holds, with ``U`` cut to those rows and ``V`` whole. ``G V`` is per row, so ``right`` needs no
communication (``mode="always"``) or only the core diagonal ``(r,)`` per target (the conflict tests); ``U^T G``
and ``U^T G V`` are sums over the row shards, summed for all targets in one flat all-reduce per optimizer step
(:class:`safeft.distributed.Collectives`). Under LoRA the factors' sketches ``U^T B`` and ``A V`` (with their
gradients' or updates') travel in the same single all-reduce: ``4 r k`` numbers per target. The monitor
(:meth:`SPFProjector.metrics`) sums each process's share once more, on the steps it reports, so every process
must call it.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import TrainerCallback

from safeft import projection as P
from safeft.config import SPFConfig
from safeft.distributed import Collectives, local, shard_rows
from safeft.subspace import Basis, SafetySubspace, safety_loss
from safeft.targets import Target
from safeft.train import add_to_log

METRIC_PREFIX = "spf/"
STATE_FILE = "spf_state.json"  # SPF's part of a Trainer checkpoint


@dataclass
class _Guard:
    """One target with its basis on the target's device (fp32) and the state of the current step."""

    target: Target
    U: Tensor  # (m, r), or (m, 0) where nothing reads it (right side, always, update, full fine-tuning)
    S: Tensor
    V: Tensor
    start_core: Tensor  # U^T W_eff V when SPF was attached or last refreshed, (r, r); (0, 0) without U
    before: tuple[Tensor, ...] = ()  # sketches taken before the optimizer step (update mode)
    corrected: tuple[Tensor, ...] = ()  # sketches right after the last correction (update mode)
    versions: tuple[int, ...] = ()  # the weights' in-place version counters at that moment
    rows: slice | None = None  # under FSDP2: the rows of W (and lora_B) this process holds; U holds only those
    rows_A: slice | None = None  # under FSDP2 with LoRA: the rows of lora_A this process holds
    batched: bool = False  # corrected with others of its shapes in _Batch'es (its bases then views of theirs)

    @property
    def holds_U(self) -> bool:
        """Return True unless the rule needs no U: ``dW V = 0`` is kept with V alone, and keeps the core fixed."""
        return self.U.shape[1] == self.S.shape[0]

    @property
    def sharded(self) -> bool:
        """Return True when this process holds only some rows of the target's trained tensors (FSDP2)."""
        return self.rows is not None or self.rows_A is not None

    def __post_init__(self):
        t = self.target
        self._weights = (t.lora_B, t.lora_A) if t.is_lora else (t.base.weight,)

    def weights(self) -> tuple[Tensor, ...]:
        """Return the tensors the optimizer changes for this target (the parameters SPF was attached to)."""
        return self._weights


@dataclass
class _Batch:
    """One trained tensor (the weight, or one LoRA factor) of guards of equal shapes, dtype and device, whose changes
    are corrected together in batched products. Used with ``always`` and ``project="update"`` where every trained
    tensor is projected (full fine-tuning on one side; LoRA with ``two_sided``), on an accelerator, where the
    hooks' time is per-target kernel launches and Python rather than arithmetic."""

    guards: list[_Guard]
    factor: int  # which of each guard's weights(): the weight or lora_B (0), lora_A (1)
    side: str  # "left": sketches U^T X, basis U; "right": sketches X V, basis V
    basis: Tensor  # (L, m, r) U's or (L, n, r) V's stacked, fp32; each guard's U or V is a view of its slice
    basis_mm: Tensor  # the basis in the dtype the sketches use (a full weight's on CUDA bf16/fp16, else basis itself)
    before: Tensor | None = None  # fp32 sketches before the optimizer step, (L, r, n) or (L, m, r)
    corrected: Tensor | None = None  # the sketches right after the last correction
    versions: tuple[int, ...] = ()  # the tensors' in-place version counters at that moment

    def tensors(self) -> list[Tensor]:
        return [g.weights()[self.factor] for g in self.guards]

    def sketches(self) -> Tensor:
        """Return the fp32 sketches of the tensors as they are now."""
        stacked = torch.stack([x.detach() for x in self.tensors()])
        if self.guards[0].target.is_lora:  # thin factors: sketched in fp32, as the per-target path sketches them
            stacked = stacked.float()
        return P.sketch_batched(stacked, self.basis_mm, self.side)


def _pad_rows(held: Tensor, rows: slice | None, total: int) -> Tensor:
    """Return ``held`` (the rows ``rows`` of a ``(total, c)`` matrix) in a zero ``(total, c)`` matrix, so that a sum
    over the processes assembles the whole matrix; ``held`` itself when it is whole."""
    if rows is None:
        return held
    full = held.new_zeros(total, held.shape[1])
    full[rows] = held
    return full


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def unguarded_parameters(model: nn.Module, subspace: SafetySubspace) -> dict[str, nn.Parameter]:
    """Return the trainable parameters of ``model`` that SPF does not project, by name: everything with
    ``requires_grad`` except the subspace's target weights (or, under LoRA, their factors). Typical members under
    full fine-tuning are norm weights and biases; training them can move the refusals with nothing to stop it."""
    model = _unwrap(model)
    guarded = {id(w) for t in subspace.check_model(model).values()
               for w in ((t.lora_A, t.lora_B) if t.is_lora else (t.base.weight,))}
    return {name: p for name, p in model.named_parameters() if p.requires_grad and id(p) not in guarded}


def freeze_unguarded(model: nn.Module, subspace: SafetySubspace) -> list[str]:
    """Freeze (``requires_grad_(False)``) every trainable parameter SPF does not project; return their names.

    Call it before building the optimizer. The pipeline's SPF runs do; on the testbed, leaving the blocks' norm
    weights trainable raised the harmful-mix score by 0-6 points per seed (README, "Unguarded parameters")."""
    unguarded = unguarded_parameters(model, subspace)
    for p in unguarded.values():
        p.requires_grad_(False)
    return list(unguarded)


class SPFProjector:
    """Removes the conflicting part of every optimizer step from a model's target matrices.

    On the device types in ``BATCHED_DEVICES`` the update correction with ``always`` (full fine-tuning on one side,
    LoRA with ``two_sided``) handles targets of equal shapes in batched products, a few kernels per shape instead
    of a few per target; it makes the same correction (each entry rounded once, as the per-target path rounds it).

    Args:
        model: the model being trained (plain, peft LoRA or DDP-wrapped).
        subspace: its safety subspace; checked against the model's targets and shapes.
        config: side, mode, project, refresh and monitor settings; defaults to ``SPFConfig()``. ``self.config`` is
            a copy with the side in force (``config.side_for(lora)`` when the side is left to the default).
        tokenizer: needed only to refresh the subspace or measure the safety loss on its samples.
    """

    BATCHED_DEVICES: tuple[str, ...] = ("cuda",)  # on a CPU the stacked copies cost more than the loop (2x)
    BATCH_BYTES = 256 * 2**20  # at most this much fp32 removal (L x m x n) per batched product

    def __init__(self, model: nn.Module, subspace: SafetySubspace, config: SPFConfig | None = None, tokenizer=None):
        self.model = _unwrap(model)
        config = config or SPFConfig()
        lora = any(t.is_lora for t in subspace.check_model(self.model, warn_other_weights=True).values())
        self.config = replace(config, side=config.side_for(lora))  # the side in force, never None
        self.tokenizer = tokenizer
        self.step = 0
        self.drift_before_refresh = 0.0
        self.hook_seconds: list[float] = []  # wall time spent in before_step + after_step, per optimizer step
        self._before_seconds = 0.0
        self.collectives = Collectives()  # SPF's own all-reduces under FSDP2, counted
        self._reset_counters()
        self._use(subspace)
        if self.config.refresh_every and self.config.side != "two_sided" and lora:
            raise ValueError(f"refresh_every under LoRA needs side='two_sided': side={self.config.side!r} keeps one "
                             "LoRA factor orthogonal to the basis, and a new basis would break that without changing "
                             "the model. Drop refresh_every or use side='two_sided'.")
        unguarded = unguarded_parameters(self.model, subspace)
        if unguarded:
            names = ", ".join(list(unguarded)[:3])
            warnings.warn(f"SPF guards {len(self.guards)} matrices, but {len(unguarded)} other trainable tensors "
                          f"({sum(p.numel() for p in unguarded.values())} parameters, e.g. {names}) are not guarded "
                          "and can still erode the refusals. Freeze them before building the optimizer "
                          "(safeft.spf.freeze_unguarded) unless you mean to train them.", stacklevel=2)

    # --- state -------------------------------------------------------------------------------------------------

    def _use(self, subspace: SafetySubspace) -> None:
        self.subspace = subspace
        targets = subspace.check_model(self.model)
        self.guards: list[_Guard] = []
        for name, target in targets.items():
            basis: Basis = subspace[name]
            if target.is_lora and target.lora_A.requires_grad != target.lora_B.requires_grad:
                frozen = "lora_A" if target.lora_B.requires_grad else "lora_B"
                raise ValueError(f"{name}: {frozen} is frozen and the other LoRA factor is trained (LoRA-FA style); "
                                 "SPF's LoRA guard corrects both factors and would leave this adapter unguarded. "
                                 f"Train both factors (unfreeze {frozen}) or neither.")
            trained = target.base.weight.requires_grad or (target.is_lora and target.lora_A.requires_grad)
            if basis.rank == 0 or not trained:
                continue
            device = local(target.base.weight).device
            if (not target.is_lora and self.config.side == "right" and self.config.mode == "always"
                    and self.config.project == "update"):  # dW V = 0 for the actual step: U is never read
                basis = Basis(basis.U[:, :0], basis.S, basis.V)
            U, S, V = (t.to(device=device, dtype=torch.float32) for t in (basis.U, basis.S, basis.V))
            rows = shard_rows(target.lora_B if target.is_lora else target.base.weight)
            rows_A = shard_rows(target.lora_A) if target.is_lora else None
            if target.is_lora and shard_rows(target.base.weight) not in (None, rows):
                raise ValueError(f"{name}: the base weight and lora_B are sharded over different rows")
            self.guards.append(_Guard(target, U if rows is None else U[rows], S, V, start_core=torch.zeros(0),
                                      rows=rows, rows_A=rows_A))
        self.sharded = any(g.sharded for g in self.guards)
        self.batches = self._batch_guards()
        for guard in self.guards:
            if guard.target.is_lora:
                self._start_lora_side(guard)
        for guard, core in zip(self.guards, self._effective_cores()):
            guard.start_core = core

    def _batch_guards(self) -> list[_Batch]:
        """Group the guards whose update correction can run batched by shapes, dtype and device, in batches of at
        most ``BATCH_BYTES`` of fp32 removal; a guard left alone keeps the per-target path."""
        cfg = self.config
        if (cfg.project, cfg.mode) != ("update", "always"):
            return []
        groups: dict[tuple, list[_Guard]] = {}
        for g in self.guards:
            every_tensor_projected = cfg.side == "two_sided" if g.target.is_lora else cfg.side != "two_sided"
            device = g.weights()[0].device
            if every_tensor_projected and not g.sharded and device.type in self.BATCHED_DEVICES:
                shapes = tuple((tuple(w.shape), w.dtype) for w in g.weights())
                key = (shapes, tuple(g.U.shape), tuple(g.V.shape), device)
                groups.setdefault(key, []).append(g)
        batches = []
        for members in groups.values():
            size = max(1, self.BATCH_BYTES // (4 * max(w.numel() for w in members[0].weights())))
            for i in range(0, len(members), size):
                part = members[i:i + size]
                if len(part) < 2:
                    continue
                for factor, side in ((0, "left"), (1, "right")) if part[0].target.is_lora else ((0, cfg.side),):
                    basis = torch.stack([g.U if side == "left" else g.V for g in part])
                    for j, g in enumerate(part):
                        setattr(g, "U" if side == "left" else "V", basis[j])
                        g.batched = True
                    x = part[0].weights()[factor]
                    low = (not part[0].target.is_lora and x.device.type == "cuda"
                           and x.dtype in (torch.bfloat16, torch.float16))
                    batches.append(_Batch(part, factor, side, basis, basis.to(x.dtype) if low else basis))
        return batches

    @torch.no_grad()
    def _start_lora_side(self, guard: _Guard) -> None:
        """Put the factor the side projects into its invariant (right: ``A V = 0``; left: ``U^T B = 0``), or refuse.

        Projecting A when B is zero leaves the model's function unchanged; with B non-zero (an adapter trained
        without this side, or a PiSSA-style initialisation) it would not, so that is an error."""
        t, side = guard.target, self.config.side
        if side == "two_sided":
            return
        A, B = local(t.lora_A), local(t.lora_B)
        if side == "right":
            factor, sk = A, A.float() @ guard.V  # (k, r); under FSDP2 this process's rows of it
        else:
            factor, sk = B, guard.U.T @ B.float()  # (r, k); under FSDP2 a sum over the row shards
        tolerance = torch.finfo(factor.dtype).eps ** 0.5
        if guard.sharded and side == "left":
            sk = self.collectives.sum([sk])[0]
        sketch_sq, factor_sq, b_nonzero = sk.pow(2).sum(), factor.float().pow(2).sum(), (B != 0).sum().float()
        if guard.sharded:  # the norms and B's non-zeros of the whole tensors
            right_sq, factor_sq, b_nonzero = self.collectives.sum(
                [sketch_sq if side == "right" else torch.zeros_like(sketch_sq), factor_sq, b_nonzero])
            sketch_sq = right_sq if side == "right" else sketch_sq
        if float(sketch_sq) ** 0.5 <= tolerance * float(factor_sq) ** 0.5:
            return
        if side == "right" and not float(b_nonzero):
            P.subtract_(A.data, sk, guard.U, guard.V, torch.ones_like(guard.S), "right")
            return
        what = "rows of lora_A orthogonal to V" if side == "right" else "columns of lora_B orthogonal to U"
        raise ValueError(f"{t.name}: SPF side={side!r} under LoRA keeps the {what}, but this adapter's lora_B is "
                         "already non-zero and not so (trained without this side, or a PiSSA/OLoRA-style "
                         "initialisation), so enforcing it would change the model. Start from a fresh adapter "
                         "(peft's default init, lora_B = 0) or use side='two_sided'.")

    @torch.no_grad()
    def _effective_cores(self) -> list[Tensor]:
        """Return ``U^T W_eff V`` (r, r) per guard, with ``W_eff = W + s B A`` under LoRA, never forming ``B A``.

        Under FSDP2 the shards' parts are summed in one all-reduce for all guards."""
        parts = []
        for g in self.guards:
            t = g.target
            if not g.holds_U:  # right, always, update: dW V = 0 keeps U^T W V where it started; nothing to measure
                parts.append([g.S.new_zeros(0, 0)])
                continue
            core = P.core(local(t.base.weight), g.U, g.V)
            if not t.is_lora:
                parts.append([core])
                continue
            ub, av = g.U.T @ local(t.lora_B).float(), local(t.lora_A).float() @ g.V  # (r, k), (k, r)
            parts.append([core, ub, _pad_rows(av, g.rows_A, t.lora_A.shape[0])])
        sharded = [i for i, g in enumerate(self.guards) if g.sharded and g.holds_U]
        summed = iter(self.collectives.sum([x for i in sharded for x in parts[i]]))
        for i in sharded:
            parts[i] = [next(summed) for _ in parts[i]]
        return [p[0] if len(p) == 1 else p[0] + g.target.scaling * p[1] @ p[2] for g, p in zip(self.guards, parts)]

    def _reset_counters(self) -> None:
        self._steps = 0
        self._checked = 0
        # sums per (metric, device): adding on the tensors' own device avoids a host sync per target and step
        self._sums: dict[tuple[str, torch.device | None], Tensor | float] = {}

    # --- the two hooks around optimizer.step() -------------------------------------------------------------------

    @torch.no_grad()
    def before_step(self) -> None:
        """Project gradients (``project="grad"``) or remember the pre-step sketches (``project="update"``)."""
        start = time.perf_counter()
        # the gradient norm costs a pass over every gradient: measure it only on the step the monitor reports
        measure = bool(self.config.monitor_every) and (self.step + 1) % self.config.monitor_every == 0
        if self.config.project == "grad" and self.sharded:
            self._project_gradients_sharded(measure)
            self._before_seconds = time.perf_counter() - start
            return
        if self.config.project == "grad":
            self._check_finite([self._project_gradient(g, measure) for g in self.guards])
        else:
            for batch in self.batches:
                fresh = batch.corrected is None or batch.versions != tuple(x._version for x in batch.tensors())
                batch.before = batch.sketches() if fresh else batch.corrected
            for guard in self.guards:
                if guard.batched:
                    continue
                if guard.sharded:
                    guard.before = self._sketches(guard)  # this process's parts, summed after the step
                elif guard.corrected and guard.versions == tuple(w._version for w in guard.weights()):
                    guard.before = guard.corrected  # nothing wrote to the weights since the last correction
                else:
                    guard.before = self._sketches(guard)
        self._before_seconds = time.perf_counter() - start

    @torch.no_grad()
    def after_step(self) -> None:
        """Correct the weight change (``project="update"``); count the step; refresh the subspace when due."""
        start = time.perf_counter()
        if self.config.project == "update":
            if self.sharded:
                self._project_updates_sharded()
            self._project_updates([g for g in self.guards if not g.sharded and not g.batched], self.batches)
            for guard in self.guards:
                guard.before = ()
            for batch in self.batches:
                batch.before = None
        self.step += 1
        self._steps += 1
        if self.config.refresh_every and self.step % self.config.refresh_every == 0:
            self.refresh()
        self.hook_seconds.append(self._before_seconds + time.perf_counter() - start)

    def _check_finite(self, inner_products: list[tuple[str, Tensor] | None]) -> None:
        """Raise a clear error if any target's conflict inner product (non-finite whenever its gradient is) is not
        finite: one host sync for all targets."""
        named = [x for x in inner_products if x is not None]
        if named and not torch.isfinite(torch.stack([inner.to(named[0][1].device) for _, inner in named]).sum()):
            raise FloatingPointError(self._non_finite_message(next(
                (name for name, inner in named if not torch.isfinite(inner)), "(one of them)")))

    def _project_gradient(self, guard: _Guard, measure: bool) -> tuple[str, Tensor] | None:
        """Project one guard's gradient in place; return its name and conflict inner product for the caller's
        finiteness test (None when it has no gradient)."""
        t, cfg = guard.target, self.config
        grads = (t.lora_B.grad, t.lora_A.grad) if t.is_lora else (t.base.weight.grad,)
        if any(g is None for g in grads):
            return None
        grad_sq = sum(torch.linalg.vector_norm(g, dtype=torch.float32) ** 2 for g in grads) if measure else None
        try:
            if t.is_lora:
                stats = P.project_lora_(*grads, t.lora_B, t.lora_A, guard.U, guard.S, guard.V, side=cfg.side,
                                        mode=cfg.mode, check=False)
            elif not guard.holds_U:  # (not reached in grad mode today) the sketch G V is all the removal needs
                stats = P.project_sketched_(grads[0], P.sketch(grads[0], guard.U, guard.V, "right"),
                                            torch.zeros_like(guard.S), guard.U, guard.S, guard.V, side="right",
                                            mode="always")
            else:
                stats = P.project_(grads[0], guard.U, guard.S, guard.V, side=cfg.side, mode=cfg.mode, check=False)
        except FloatingPointError:
            raise FloatingPointError(self._non_finite_message(t.name)) from None
        self._count(stats.fired, stats.removed_sq, grad_sq)
        return t.name, stats.inner_before

    def _sketches(self, guard: _Guard) -> tuple[Tensor, ...]:
        """Return the weights' sketches; under FSDP2 this process's part of them (summed over shards, or its rows)."""
        weights = tuple(local(w) for w in guard.weights()) if guard.sharded else guard.weights()
        if guard.target.is_lora:
            B, A = weights
            return guard.U.T @ B.float(), A.float() @ guard.V  # (r, k), (k, r)
        return (P.sketch(weights[0], guard.U, guard.V, self.config.side),)

    def _project_updates(self, guards: list[_Guard], batches: list[_Batch]) -> None:
        """Correct the weight change of every (unsharded) guard and batch from its sketches before and after the step.

        Two passes with one host sync between them, not one per target: the first sketches every change (and
        tests for conflicts), one fused norm over all of them tests finiteness before any weight is touched, the
        second removes; on an accelerator the per-target work is then a few kernel launches, and a batch's a few
        for all its targets."""
        if not guards and not batches:
            return
        afters = [self._sketches(g) for g in guards]
        flat = list(torch._foreach_sub([a for after in afters for a in after], [b for g in guards for b in g.before]))
        deltas, i = [], 0  # the sketches of the weight change the optimizer made, per guard
        for after in afters:
            deltas.append(flat[i:i + len(after)])
            i += len(after)
        batch_deltas = [b.sketches() - b.before for b in batches]
        delta_norm = torch.nn.utils.get_total_norm(flat + batch_deltas)
        if not torch.isfinite(delta_norm):
            named = [(g.target.name, d) for g, d in zip(guards, deltas)]
            named += [(g.target.name, [d[j]]) for b, d in zip(batches, batch_deltas) for j, g in enumerate(b.guards)]
            bad = (name for name, d in named if not all(torch.isfinite(x).all() for x in d))
            raise FloatingPointError(self._non_finite_message(next(bad, "(one of them)")))
        removed = []
        for guard, after, delta in zip(guards, afters, deltas):
            removed += self._remove_update(guard, after, delta, *self._removal_mask(guard, after, delta))
        for batch, delta in zip(batches, batch_deltas):  # "always": each change is removed whole
            P.subtract_batched_([x.data for x in batch.tensors()], delta, batch.basis, batch.side)
            batch.corrected = batch.before  # the whole change is removed: the sketches are back where they were
            batch.versions = tuple(x._version for x in batch.tensors())
        removed += batch_deltas
        whole = flat + batch_deltas
        if len(removed) == len(whole) and all(r is d for r, d in zip(removed, whole)):
            removed_sq = delta_norm ** 2  # every change removed whole (mode "always", every factor projected)
        else:
            removed_sq = torch.nn.utils.get_total_norm(removed) ** 2 if removed else torch.zeros(())
        corrected = len(guards) + len({id(g) for b in batches for g in b.guards})
        self._checked += corrected
        self._add("removed_sq", removed_sq)
        if self.config.mode == "always":
            self._add("fired", float(corrected))

    def _removal_mask(self, guard: _Guard, after: tuple[Tensor, ...], deltas: list[Tensor]
                      ) -> tuple[Tensor | None, Tensor | None]:
        """Return the mask of the directions to remove from one guard's change (None: every direction, mode
        "always") and whether any is removed (a 0-d tensor; None under "always", counted by the caller)."""
        t, cfg = guard.target, self.config
        if cfg.mode == "always":  # every direction goes: no conflict test to make, no mask to apply
            return None, None
        if t.is_lora:
            (ub_old, av_old), (ub_new, av_new) = guard.before, after
            diag = t.scaling * torch.diagonal(ub_new @ av_new - ub_old @ av_old)  # diag(U^T dW V)
        else:
            diag = P.core_diagonal(deltas[0], guard.U, guard.V, cfg.side)
        mask = P.removal_mask(-diag, guard.S, cfg.mode)  # a weight change dW acts like a step along -dW
        return mask, (mask.sum() > 0).float()

    def _remove_update(self, guard: _Guard, after: tuple[Tensor, ...], deltas: list[Tensor], mask: Tensor | None,
                       fired: Tensor | None) -> list[Tensor]:
        """Remove the masked part of one guard's (finite) weight change from its weights; remember the corrected
        sketches for the next step; count it. Return the removed parts' sketches (projected factors only)."""
        t, cfg = guard.target, self.config
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
            self._add("fired", fired)  # per guard: on the guard's own device, no sync
        return [r for r in removed if r is not None]

    # --- FSDP2: this process's rows, one all-reduce per step for every target ----------------------------------

    def _project_gradients_sharded(self, measure: bool) -> None:
        """Project every guard's gradient rows: local sketches, one all-reduce of the summed parts, then removal."""
        cfg, plans, pieces, whole = self.config, [], [], []
        for g in self.guards:
            t = g.target
            grads = (t.lora_B.grad, t.lora_A.grad) if t.is_lora else (t.base.weight.grad,)
            if any(x is None for x in grads):
                continue
            if not g.sharded:
                whole.append(self._project_gradient(g, measure))
                continue
            grads = tuple(local(x) for x in grads)
            if t.is_lora:
                sk_B, sk_A = g.U.T @ grads[0].float(), grads[1].float() @ g.V  # (r, k) summed, (k, r) by rows
                if cfg.mode == "always":  # no conflict test: only B's sketch (left, two_sided) is a sum over rows
                    own = [sk_B] if P.lora_projected_factors(cfg.side)[0] else []
                else:  # the test needs diag(U^T (grad_B A + B grad_A) V): the four r x k sketches, whole
                    ub, av = g.U.T @ local(t.lora_B).float(), local(t.lora_A).float() @ g.V
                    k = t.lora_A.shape[0]
                    own = [sk_B, ub, _pad_rows(sk_A, g.rows_A, k), _pad_rows(av, g.rows_A, k)]
            else:
                sk_A = P.sketch(grads[0], g.U, g.V, cfg.side)  # the rows' sketch (right) or their part of it
                if cfg.side != "right":
                    own = [sk_A]
                else:  # G V is per row: only the conflict tests need the core diagonal, a sum over rows
                    own = [P.core_diagonal(sk_A, g.U, g.V, "right")] if cfg.mode != "always" else []
            plans.append((g, grads, len(own), sk_A))
            pieces += own
        summed = iter(self.collectives.sum(pieces))
        for g, grads, count, held in plans:
            parts = [next(summed) for _ in range(count)]
            grad_sq = (sum(torch.linalg.vector_norm(x, dtype=torch.float32) ** 2 for x in grads)
                       if measure else None)  # this process's rows
            try:
                if g.target.is_lora:
                    fired, removed_sq = self._remove_lora_gradients(g, grads, parts, held)
                else:
                    if cfg.side == "right":
                        sk, diag = held, parts[0] if parts else torch.zeros_like(g.S)
                    else:
                        sk = parts[0]
                        diag = P.core_diagonal(sk, g.U, g.V, cfg.side)
                    stats = P.project_sketched_(grads[0], sk, diag, g.U, g.S, g.V, side=cfg.side, mode=cfg.mode)
                    fired, removed_sq = stats.fired, self._share(stats.removed_sq, cfg.side != "right")
            except FloatingPointError:
                raise FloatingPointError(self._non_finite_message(g.target.name)) from None
            self._count(fired, removed_sq, grad_sq, shard=True)
        self._check_finite(whole)

    def _remove_lora_gradients(self, g: _Guard, grads: tuple[Tensor, Tensor], parts: list[Tensor],
                               sk_A_rows: Tensor) -> tuple[Tensor, Tensor]:
        """Remove the conflicting part of LoRA gradient rows; return ``(fired, this process's removed_sq share)``."""
        if self.config.mode == "always":
            sk_B = parts[0] if parts else None
            mask = torch.ones_like(g.S)
        else:
            sk_B, ub, sk_A, av = parts
            diag = (sk_B * av.T).sum(dim=1) + (ub * sk_A.T).sum(dim=1)  # diag(U^T (grad_B A + B grad_A) V)
            mask = P.removal_mask(diag, g.S, self.config.mode)
        if not ((sk_B is None or torch.isfinite(sk_B).all()) and torch.isfinite(sk_A_rows).all()):
            raise FloatingPointError("non-finite LoRA gradient")
        on_B, on_A = P.lora_projected_factors(self.config.side)
        removed = torch.zeros((), device=mask.device)
        if on_B:
            P.subtract_(grads[0], sk_B, g.U, g.V, mask, "left")
            removed = removed + self._share(P.removed_energy(sk_B, mask, "left"), True)
        if on_A:
            P.subtract_(grads[1], sk_A_rows, g.U, g.V, mask, "right")
            removed = removed + P.removed_energy(sk_A_rows, mask, "right")
        return (mask.sum() > 0).float(), removed

    def _project_updates_sharded(self) -> None:
        """Correct every sharded guard's weight change from its sketches, with one all-reduce for all of them."""
        cfg, plans, pieces = self.config, [], []
        for g in self.guards:
            if not g.sharded:
                continue
            after = self._sketches(g)
            if g.target.is_lora:
                (ub_old, av_old), (ub_new, av_new) = g.before, after
                k = g.target.lora_A.shape[0]
                if cfg.mode == "always":  # B's change's sketch is a sum over rows; A's is per row
                    own = [ub_new - ub_old] if P.lora_projected_factors(cfg.side)[0] else []
                else:  # the test needs diag(U^T dW V) from the whole sketches before and after
                    own = [ub_old, ub_new, _pad_rows(av_old, g.rows_A, k), _pad_rows(av_new, g.rows_A, k)]
                plans.append((g, len(own), av_new - av_old))
            else:
                delta = after[0] - g.before[0]  # this process's part of the change's sketch
                if cfg.side != "right":
                    own = [delta]
                else:
                    own = [P.core_diagonal(delta, g.U, g.V, "right")] if cfg.mode != "always" else []
                plans.append((g, len(own), delta))
            pieces += own
        summed = iter(self.collectives.sum(pieces))
        for g, count, held in plans:
            parts = [next(summed) for _ in range(count)]
            t = g.target
            if t.is_lora and cfg.mode == "always":
                diag = torch.zeros_like(g.S)  # every direction goes: the test is not needed
                deltas, sides = (parts[0] if parts else None, held), ("left", "right")
                projected, whole = P.lora_projected_factors(cfg.side), (True, False)
            elif t.is_lora:
                ub_old, ub_new, av_old, av_new = parts
                diag = t.scaling * torch.diagonal(ub_new @ av_new - ub_old @ av_old)
                deltas, sides = (ub_new - ub_old, held), ("left", "right")
                projected, whole = P.lora_projected_factors(cfg.side), (True, False)
            else:
                if cfg.side == "right":
                    delta, diag = held, parts[0] if parts else torch.zeros_like(g.S)
                else:
                    delta = parts[0]
                    diag = P.core_diagonal(delta, g.U, g.V, cfg.side)
                deltas, sides, projected, whole = (delta,), (cfg.side,), (True,), (cfg.side != "right",)
            if not all(torch.isfinite(d).all() for d in deltas if d is not None):
                raise FloatingPointError(self._non_finite_message(t.name))
            mask = P.removal_mask(-diag, g.S, cfg.mode)  # a weight change dW acts like a step along -dW
            removed = torch.zeros((), device=diag.device)
            for weight, delta, side, on, is_whole in zip(g.weights(), deltas, sides, projected, whole):
                if on:
                    P.subtract_(local(weight).data, delta, g.U, g.V, mask, side)
                    removed = removed + self._share(P.removed_energy(delta, mask, side), is_whole)
            g.corrected = ()  # a shard's sketch after the correction is not its part of the corrected sketch
            self._count((mask.sum() > 0).float(), removed, None, shard=True)

    @staticmethod
    def _share(value: Tensor, whole: bool) -> Tensor:
        """Return this process's share of a metric: all of a per-row part, ``1 / world`` of a value every process
        holds whole, so that summing the shares over the processes counts it once."""
        import torch.distributed as dist

        return value / dist.get_world_size() if whole and dist.is_initialized() else value

    def _count(self, fired: Tensor, removed_sq: Tensor, grad_sq: Tensor | None, shard: bool = False) -> None:
        suffix = "_share" if shard else ""  # shares are summed over the processes when the monitor reports
        self._checked += 1
        self._add("fired", fired)
        self._add("removed_sq" + suffix, removed_sq)
        if grad_sq is not None:  # sampled steps: the gradient norm was measured too
            self._add("sampled_removed_sq" + suffix, removed_sq)
            self._add("sampled_grad_sq" + suffix, grad_sq)

    def _add(self, metric: str, value: Tensor | float) -> None:
        """Add to a metric's running sum: a tensor on its own device (no host sync), a Python number on the host."""
        if not isinstance(value, Tensor):
            key = (metric, None)
            self._sums[key] = self._sums.get(key, 0.0) + float(value)
            return
        key = (metric, value.device)
        self._sums[key] = self._sums[key] + value if key in self._sums else value.detach().clone()

    def _total(self, metric: str) -> float:
        return sum(float(v) for (name, _), v in self._sums.items() if name == metric)

    @staticmethod
    def _non_finite_message(name: str) -> str:
        return (f"non-finite gradient or update at SPF target {name!r}: training diverged (NaN/inf). Lower the "
                "learning rate, enable gradient clipping, or train in float32/bfloat16 instead of float16.")

    # --- refresh and monitor -----------------------------------------------------------------------------------

    def safety_drift(self) -> float:
        """Return the predicted first-order change of the safety loss since SPF started: ``sum <U S V^T, W - W_0>``."""
        cores = self._effective_cores()
        drift = sum(float((g.S * torch.diagonal(c - g.start_core)).sum())
                    for g, c in zip(self.guards, cores) if g.holds_U)
        return self.drift_before_refresh + drift

    def refresh(self) -> None:
        """Re-estimate the subspace at the current weights from the same samples and rank policy."""
        if self.tokenizer is None:
            raise ValueError("refreshing the safety subspace needs the tokenizer: pass tokenizer= to attach_spf")
        if self.sharded:
            raise ValueError("refresh_every is not supported under FSDP2: estimate the subspace once before "
                             "training (every process from the same samples) and set refresh_every to 0")
        self.drift_before_refresh = self.safety_drift()
        policy = self.subspace.config
        fresh = SafetySubspace.estimate(self.model, self.tokenizer, self.subspace.samples, policy, show_progress=False)
        self._use(fresh)

    def metrics(self, measure_loss: bool = True) -> dict[str, float]:
        """Return the monitor metrics since the last call and reset the step counters.

        ``spf/conflict_rate``: fraction of (target, step) pairs where removal ran; ``spf/removed_norm``: norm of
        what was removed, per step; ``spf/removed_norm_frac`` (grad mode): that norm over the gradient norm, on the
        steps where the monitor reports (measuring it costs a pass over the gradients);
        ``spf/safety_drift``: predicted first-order safety-loss change so far (0 by construction for the right side
        with ``always`` and ``project="update"`` under full fine-tuning, where the step's ``dW V = 0`` fixes the
        core and no U is held; rounding of low-precision weights is not seen there);
        ``spf/safety_loss``: measured on the
        safety samples (needs the tokenizer), on the tokens the subspace was estimated from (with ``onset_tokens``,
        each refusal's first tokens), so that it is the loss whose change ``safety_drift`` predicts.
        """
        steps = max(self._steps, 1)
        totals = {k: self._total(k) for k in ("removed_sq", "sampled_removed_sq", "sampled_grad_sq")}
        if self.sharded:  # every process's shares, summed in one all-reduce: every process calls metrics()
            shares = [torch.tensor(self._total(k + "_share")) for k in totals]
            totals = {k: v + float(x) for (k, v), x in zip(totals.items(), self.collectives.sum(shares))}
        out = {
            f"{METRIC_PREFIX}conflict_rate": self._total("fired") / max(self._checked, 1),
            f"{METRIC_PREFIX}removed_norm": (totals["removed_sq"] / steps) ** 0.5,
            f"{METRIC_PREFIX}safety_drift": self.safety_drift(),
        }
        if self.config.project == "grad" and totals["sampled_grad_sq"] > 0:
            frac = totals["sampled_removed_sq"] / totals["sampled_grad_sq"]
            out[f"{METRIC_PREFIX}removed_norm_frac"] = frac ** 0.5
        if measure_loss and self.tokenizer is not None:
            out[f"{METRIC_PREFIX}safety_loss"] = safety_loss(self.model, self.tokenizer, self.subspace.samples,
                                                             onset_tokens=self.subspace.config.onset_tokens)
        self._reset_counters()
        return out

    def save_state(self, folder: str | Path) -> None:
        """Write what a resumed run needs to continue as this one would have into ``folder``: the step count, the
        safety drift so far and, once refreshed, the current subspace (``spf_state.json``, ``spf_subspace/``)."""
        folder = Path(folder)
        refreshed = bool(self.config.refresh_every) and self.step >= self.config.refresh_every
        if refreshed:
            self.subspace.save(folder / "spf_subspace", overwrite=True)
        (folder / STATE_FILE).write_text(json.dumps({"step": self.step, "safety_drift": self.safety_drift(),
                                                     "refreshed": refreshed}) + "\n")

    def load_state(self, folder: str | Path) -> None:
        """Continue from a state written by :meth:`save_state` (call it with the checkpoint's weights loaded)."""
        folder = Path(folder)
        state = json.loads((folder / STATE_FILE).read_text())
        if state["refreshed"]:
            self._use(SafetySubspace.load(folder / "spf_subspace", self.model))
        self.step = state["step"]
        self.drift_before_refresh = state["safety_drift"]
        for guard, core in zip(self.guards, self._effective_cores()):  # the drift so far is carried over
            guard.start_core = core

    def monitor_due(self) -> bool:
        """Return True when ``monitor_every`` says the metrics should be logged after the current step."""
        return bool(self.config.monitor_every) and self.step % self.config.monitor_every == 0


class SPFHandle:
    """What :func:`attach_spf` returns: the projector, and ``detach()`` to remove the optimizer hooks."""

    def __init__(self, projector: SPFProjector, hooks: list):
        self.projector = projector
        self._hooks = hooks

    def metrics(self) -> dict[str, float]:
        """Return the monitor metrics since the last call (see :meth:`SPFProjector.metrics`)."""
        return self.projector.metrics()

    def detach(self) -> None:
        """Stop projecting: remove the optimizer hooks."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


def attach_spf(optimizer: torch.optim.Optimizer, model: nn.Module, subspace: SafetySubspace,
               config: SPFConfig | None = None, tokenizer=None) -> SPFHandle:
    """Make every ``optimizer.step()`` SPF-projected, for a plain PyTorch training loop.

    Registers a step pre-hook (project the gradients, or remember sketches for ``project="update"``) and a step
    post-hook (correct the update). Gradients are taken as they are when ``step()`` is called: after backward,
    accumulation, DDP all-reduce and any clipping the loop does.

    Returns:
        An :class:`SPFHandle`; call ``handle.metrics()`` to read the monitor metrics, ``handle.detach()`` to stop.
    """
    projector = SPFProjector(model, subspace, config, tokenizer)
    hooks = [optimizer.register_step_pre_hook(lambda opt, args, kwargs: projector.before_step()),
             optimizer.register_step_post_hook(lambda opt, args, kwargs: projector.after_step())]
    return SPFHandle(projector, hooks)


class SPFCallback(TrainerCallback):
    """SPF for a transformers ``Trainer`` or TRL ``SFTTrainer``: ``Trainer(..., callbacks=[SPFCallback(subspace)])``
    or ``trainer.add_callback(SPFCallback(subspace))``.

    Projects in ``on_pre_optimizer_step`` (after gradient clipping; projection only shrinks the gradient, so the
    clipped norm still holds) and corrects the update in ``on_optimizer_step``. Every ``monitor_every`` steps and
    at the last step it asks the trainer to log and adds the ``spf/*`` metrics to that log entry. transformers runs
    user callbacks after its reporters, so the callback moves itself to the front of the trainer's list when the
    trainer starts: TensorBoard, W&B and every other reporter receive the metrics, however it was added. Its state
    (step count, drift, a refreshed subspace) is saved with each Trainer checkpoint and restored on resume.

    Args:
        subspace: the safety subspace of the model being trained.
        config: SPF settings; defaults to ``SPFConfig()``.
        tokenizer: for refresh and the safety-loss metric; defaults to the trainer's ``processing_class``.
    """

    def __init__(self, subspace: SafetySubspace, config: SPFConfig | None = None, tokenizer=None):
        self.subspace = subspace
        self.config = config or SPFConfig()
        self.tokenizer = tokenizer
        self.projector: SPFProjector | None = None
        self._pending: dict[str, float] = {}

    def _go_first(self) -> None:
        """Move this callback to the front of the calling ``CallbackHandler``'s list (ahead of the reporters).

        Only the handler knows the order, and it is the caller of the event (``call_event``, two frames up). Moving
        the current callback from position i to 0 during that loop leaves every later position as it was, so no
        callback is skipped or called twice."""
        handler = sys._getframe(2).f_locals.get("self")
        callbacks = getattr(handler, "callbacks", None)
        if isinstance(callbacks, list) and callbacks and callbacks[0] is not self and self in callbacks:
            callbacks.remove(self)
            callbacks.insert(0, self)

    def on_init_end(self, args, state, control, **kwargs):
        self._go_first()

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        self._go_first()
        tokenizer = self.tokenizer or getattr(processing_class, "tokenizer", processing_class)
        self.projector = SPFProjector(model, self.subspace, self.config, tokenizer)
        if state.global_step:  # resumed from a checkpoint: continue SPF's own state from it
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if (folder / STATE_FILE).exists():
                self.projector.load_state(folder)
            else:
                warnings.warn(f"resuming at step {state.global_step} without SPF's state ({folder / STATE_FILE} "
                              "is missing): the step count and safety drift restart from here", stacklevel=2)

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            self.projector.save_state(folder)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.projector.before_step()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.projector.after_step()

    def on_step_end(self, args, state, control, **kwargs):
        last = state.global_step >= state.max_steps and self.config.monitor_every > 0
        if self.projector.monitor_due() or last:
            self._pending = self.projector.metrics()
            control.should_log = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending and logs is not None:
            add_to_log(state, logs, self._pending)
            self._pending = {}
