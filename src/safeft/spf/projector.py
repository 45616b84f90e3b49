"""The projector: removes the conflicting part of every optimizer step from a model's target matrices (SPEC §2).

Two methods run around every ``optimizer.step()`` (called by :mod:`safeft.spf.hooks`):

- ``before_step``: with ``project="grad"``, project each target's gradient; with ``project="update"``, remember
  each target's sketch (``U^T W``, ``W V`` or ``U^T W V``; for LoRA ``U^T B`` and ``A V``).
- ``after_step``: with ``project="update"``, remove the conflicting part of the weight change the optimizer
  actually made, computed from the new sketch minus the old one; refresh the subspace when due.

Under LoRA (``dW = s (B A - B_0 A_0)``) the side chooses the factor: ``right`` keeps the rows of A orthogonal to V
(A's initial value is projected when SPF is attached), so ``dW V = 0`` whatever B does; ``left`` keeps the columns
of B orthogonal to U (B starts at zero), so ``U^T dW = 0``; ``two_sided`` projects both factors' changes, which
keeps the core ``U^T dW V = 0`` from any start. With ``project="update"`` and ``mode="always"`` these hold for the
merged weight under any optimizer. Under DDP the gradients are all-reduced before the step, so the projection runs
locally on identical tensors; under FSDP2 each process projects its rows (:mod:`safeft.spf.sharded`).
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import fields, replace
from pathlib import Path

import torch
from torch import nn

from safeft.distributed import Collectives
from safeft.errors import UserError
from safeft.losses import safety_loss
from safeft.spf import sharded, whole
from safeft.spf.batched import DEFAULT_BATCH_BYTES, DEFAULT_DEVICES, Batch, batch_guards
from safeft.spf.config import SPFConfig
from safeft.spf.guards import (
    Guard,
    build_guards,
    effective_cores,
    sketches,
    start_lora_side,
    unguarded_parameters,
    unwrap,
)
from safeft.spf.monitor import METRIC_PREFIX, Monitor
from safeft.spf.stats import ProjectorStats, TargetStats
from safeft.spf.subspace import SafetySubspace

STATE_FILE = "spf_state.json"  # SPF's part of a Trainer checkpoint
ESTIMATION_FIELDS = ("rank", "energy", "budget", "max_rank", "target_modules", "onset_tokens")
logger = logging.getLogger("safeft")


def resolve_config(subspace: SafetySubspace, config: SPFConfig | None) -> SPFConfig:
    """Return the SPF settings to project ``subspace`` with: the ones it was estimated with (``subspace.config``),
    where ``config`` is None or leaves a field at its default; ``config``'s own value where it sets one.

    Raises:
        ValueError: where ``config`` sets an estimation field (rank policy, targets, onset tokens) to another value
            than the subspace was estimated with: such a setting cannot apply to a subspace already made.
    """
    recorded = subspace.config
    if config is None:
        return recorded
    defaults, values, differ = SPFConfig(), {}, []
    for f in fields(SPFConfig):
        mine, theirs = getattr(config, f.name), getattr(recorded, f.name)
        if mine == getattr(defaults, f.name) or mine == theirs:
            values[f.name] = theirs
            continue
        if f.name in ESTIMATION_FIELDS and not (f.name == "max_rank" and config.accumulate):
            differ.append(f"{f.name}={mine!r} (the subspace has {theirs!r})")
        elif f.name not in ESTIMATION_FIELDS and theirs != getattr(defaults, f.name):
            logger.warning("SPF: the subspace was made for %s=%r; projecting with %s=%r as asked", f.name, theirs,
                           f.name, mine)
        values[f.name] = mine
    if differ:
        raise UserError(f"these settings differ from the ones the safety subspace was estimated with: "
                         f"{'; '.join(differ)}. They cannot apply to a subspace already made: estimate a new one "
                         "with them (safeft subspace estimate), or leave them out to use the subspace's")
    return SPFConfig(**values)


class SPFProjector:
    """Removes the conflicting part of every optimizer step from a model's target matrices.

    Args:
        model: the model being trained (plain, peft LoRA or DDP-wrapped).
        subspace: its safety subspace; checked against the model's targets and shapes.
        config: side, mode, project, refresh and monitor settings; by default the subspace's own
            (:func:`resolve_config`). ``self.config`` is the result with the side in force (``side_for(lora)``
            where the side is left to the default: ``right`` for full fine-tuning, ``left`` under LoRA).
        tokenizer: needed only to refresh the subspace or measure the safety loss on its samples.
        batched: correct the update of equal-shape targets in batched products (``mode="always"``,
            ``project="update"``; the same correction): True everywhere, False never, None on CUDA only (on a CPU
            the stacked copies cost more than the per-target loop).
        batch_bytes: at most this much fp32 removal per batched product.
        warn_unguarded: warn when trainable parameters SPF does not project remain (False where they were kept on
            purpose).
        check_weights: warn when the model's weights are not the ones the subspace was estimated at (False when
            resuming: the checkpoint's weights have trained since, by design).
    """

    def __init__(self, model: nn.Module, subspace: SafetySubspace, config: SPFConfig | None = None, tokenizer=None,
                 *, batched: bool | None = None, batch_bytes: int = DEFAULT_BATCH_BYTES, warn_unguarded: bool = True,
                 check_weights: bool = True):
        self.model = unwrap(model)
        config = resolve_config(subspace, config)
        lora = any(t.is_lora for t in subspace.check_model(self.model, warn_other_weights=check_weights).values())
        self.config = replace(config, side=config.side_for(lora))  # the side in force, never None
        if config.side is None:
            logger.info("SPF: side %r (the default for %s), mode %r, project %r", self.config.side,
                        "LoRA" if lora else "full fine-tuning", self.config.mode, self.config.project)
        self.tokenizer = tokenizer
        self.batch_devices = {True: None, False: (), None: DEFAULT_DEVICES}[batched]
        self.batch_bytes = batch_bytes
        self.step = 0
        self.drift_before_refresh = 0.0
        self.refreshes: list[int] = []  # the steps after which the subspace was re-estimated
        self.refresh_overlaps: list[float] = []  # per refresh: how much of the guarded span the fresh one keeps
        self.refresh_seconds = 0.0
        self._measured: tuple[int, float] | None = None  # (step, safety loss) last measured
        self.loss_at_estimate: float | None = None  # the safety loss when the subspace in force was estimated
        self.hook_seconds: list[float] = []
        self._before_seconds = 0.0
        self.collectives = Collectives()  # SPF's own all-reduces under FSDP2, counted
        self.monitor = Monitor()
        if self.config.accumulate and self.config.max_rank < (largest := max(b.rank for b in subspace.bases.values())):
            raise UserError(f"accumulate keeps at most max_rank={self.config.max_rank} directions per target, fewer "
                             f"than the subspace's {largest}: every refresh would drop directions it guards now. Set "
                             f"max_rank above the rank (e.g. max_rank={largest + largest // 2})")
        self._use(subspace)
        if self.config.refresh_on_rise is not None:
            if tokenizer is None:
                raise UserError("refresh_on_rise measures the safety loss: pass tokenizer= to attach_spf")
            self.loss_at_estimate = self.safety_loss()
        if (self.config.refresh_every or self.config.refresh_on_rise) and self.config.side != "two_sided" and lora:
            raise UserError(f"refreshing under LoRA needs side='two_sided': side={self.config.side!r} keeps one "
                             "LoRA factor orthogonal to the basis, and a new basis would break that without changing "
                             "the model. Drop refresh_every / refresh_on_rise or use side='two_sided'.")
        unguarded = unguarded_parameters(self.model, subspace)
        if unguarded and warn_unguarded:
            names = ", ".join(list(unguarded)[:3])
            warnings.warn(f"SPF guards {len(self.guards)} matrices, but {len(unguarded)} other trainable tensors "
                          f"({sum(p.numel() for p in unguarded.values())} parameters, e.g. {names}) are not guarded "
                          "and can still erode the refusals. Freeze them before building the optimizer "
                          "(safeft.spf.freeze_unguarded) unless you mean to train them.", stacklevel=2)

    def _use(self, subspace: SafetySubspace) -> None:
        """Guard the model with ``subspace`` from now on (at attachment and at every refresh)."""
        self.subspace = subspace
        self.guards: list[Guard] = build_guards(self.model, subspace, self.config)
        self.sharded = any(g.sharded for g in self.guards)
        self.batches: list[Batch] = batch_guards(self.guards, self.config, self.batch_devices, self.batch_bytes)
        for guard in self.guards:
            if guard.target.is_lora:
                start_lora_side(guard, self.config.side, self.collectives)
        for guard, core in zip(self.guards, effective_cores(self.guards, self.collectives)):
            guard.start_core = core

    def stats(self) -> ProjectorStats:
        """Return what this projector guards, holds and has spent so far."""
        held = [t for g in self.guards for t in g.state_tensors()] + [t for b in self.batches
                                                                       for t in (b.basis, b.basis_mm)]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held if t.numel()}
        return ProjectorStats(
            side=self.config.side, step=self.step,
            targets=tuple(TargetStats(g.target.name, g.target.shape, g.S.shape[0], g.holds_U, g.batched, g.sharded)
                         for g in self.guards),
            batches=tuple(len(b.guards) for b in self.batches),
            state_bytes=sum(storages.values()),
            hook_seconds=tuple(self.hook_seconds), refreshes=tuple(self.refreshes),
            refresh_seconds=self.refresh_seconds, refresh_overlaps=tuple(self.refresh_overlaps),
            collective_calls=self.collectives.calls,
            collective_elements=tuple(self.collectives.elements))

    # --- the two hooks around optimizer.step() -------------------------------------------------------------------

    @torch.no_grad()
    def before_step(self) -> None:
        """Project gradients (``project="grad"``) or remember the pre-step sketches (``project="update"``)."""
        start = time.perf_counter()
        # the gradient norm costs a pass over every gradient: measure it only on the step the monitor reports
        measure = bool(self.config.monitor_every) and (self.step + 1) % self.config.monitor_every == 0
        if self.config.project == "grad":
            if self.sharded:
                sharded.project_gradients([g for g in self.guards if g.sharded], self.config, self.collectives,
                                          self.monitor, measure)
            whole.project_gradients([g for g in self.guards if not g.sharded], self.config, self.monitor,
                                    measure)
        else:
            for batch in self.batches:
                batch.remember_before()
            for guard in self.guards:
                if guard.batched:
                    continue
                if not guard.sharded and guard.corrected and guard.versions == tuple(w._version
                                                                                     for w in guard.weights()):
                    guard.before = guard.corrected  # nothing wrote to the weights since the last correction
                else:
                    guard.before = sketches(guard, self.config.side)  # under FSDP2 this process's parts
        self._before_seconds = time.perf_counter() - start

    @torch.no_grad()
    def after_step(self) -> None:
        """Correct the weight change (``project="update"``); count the step; refresh the subspace when due."""
        start = time.perf_counter()
        if self.config.project == "update":
            if self.sharded:
                sharded.project_updates([g for g in self.guards if g.sharded], self.config, self.collectives,
                                        self.monitor)
            whole.project_updates([g for g in self.guards if not g.sharded and not g.batched], self.batches,
                                  self.config, self.monitor)
            for guard in self.guards:
                guard.before = ()
            for batch in self.batches:
                batch.before = None
        self.step += 1
        self.monitor.steps += 1
        if self.refresh_due():
            refresh_start = time.perf_counter()
            self.refresh()
            self.refresh_seconds += time.perf_counter() - refresh_start
        self.hook_seconds.append(self._before_seconds + time.perf_counter() - start)

    def refresh_due(self) -> bool:
        """Return True when the subspace should be re-estimated after the current step: every ``refresh_every``
        steps, or on a monitor step where the safety loss has risen by more than ``refresh_on_rise`` since the
        estimate in force."""
        cfg = self.config
        if cfg.refresh_every and self.step % cfg.refresh_every == 0:
            return True
        return (cfg.refresh_on_rise is not None and self.monitor_due()
                and self.safety_loss() - self.loss_at_estimate > cfg.refresh_on_rise)

    def safety_loss(self) -> float:
        """Return the safety loss on the subspace's samples and onset tokens at the current weights (measured once
        per step: the monitor and the refresh rule share it)."""
        if self._measured is None or self._measured[0] != self.step:
            loss = safety_loss(self.model, self.tokenizer, self.subspace.samples,
                               onset_tokens=self.subspace.config.onset_tokens)
            self._measured = (self.step, loss)
        return self._measured[1]

    # --- refresh, monitor and state ----------------------------------------------------------------------------

    def safety_drift(self) -> float:
        """Return the predicted first-order change of the safety loss since SPF started: ``sum <U S V^T, W - W_0>``."""
        cores = effective_cores(self.guards, self.collectives)
        drift = sum(float((g.S * torch.diagonal(c - g.start_core)).sum())
                    for g, c in zip(self.guards, cores) if g.holds_U)
        return self.drift_before_refresh + drift

    def refresh(self) -> None:
        """Re-estimate the subspace at the current weights from the same samples and rank policy."""
        if self.tokenizer is None:
            raise UserError("refreshing the safety subspace needs the tokenizer: pass tokenizer= to attach_spf")
        if self.sharded:
            raise UserError("refresh_every is not supported under FSDP2: estimate the subspace once before "
                             "training (every process from the same samples) and set refresh_every to 0")
        self.drift_before_refresh = self.safety_drift()
        policy = self.subspace.config
        fresh = SafetySubspace.estimate(self.model, self.tokenizer, self.subspace.samples, policy, show_progress=False)
        self.refresh_overlaps.append(self.subspace.overlap(fresh, self.config.side))
        if self.config.accumulate:
            fresh = self.subspace.union(fresh, self.config.side, self.config.max_rank)
        self._use(fresh)
        self.refreshes.append(self.step)
        if self.config.refresh_on_rise is not None:
            self.loss_at_estimate = self.safety_loss()  # a refresh changes no weight: the loss now is the estimate's

    def metrics(self, measure_loss: bool = True) -> dict[str, float]:
        """Return the monitor metrics since the last call and start a new interval.

        ``spf/conflict_rate``: fraction of (target, step) pairs where removal ran; ``spf/removed_norm``: norm of
        what was removed, per step; ``spf/removed_norm_frac`` (grad mode): that norm over the gradient norm, on the
        steps where the monitor reports (measuring it costs a pass over the gradients); ``spf/safety_drift``:
        predicted first-order safety-loss change so far (0 by construction for the right side with ``always`` and
        ``project="update"`` under full fine-tuning, where the step's ``dW V = 0`` fixes the core and no U is held;
        rounding of low-precision weights is not seen there); ``spf/safety_loss``: measured on the safety samples
        (needs the tokenizer), on the tokens the subspace was estimated from (with ``onset_tokens``, each refusal's
        first tokens), so that it is the loss whose change ``safety_drift`` predicts. Under FSDP2 every process
        must call it (the shares are summed in one all-reduce).
        """
        out = self.monitor.report(self.collectives if self.sharded else None)
        out[f"{METRIC_PREFIX}safety_drift"] = self.safety_drift()
        if measure_loss and self.tokenizer is not None:
            out[f"{METRIC_PREFIX}safety_loss"] = self.safety_loss()
        if self.config.refresh_every or self.config.refresh_on_rise is not None:
            out[f"{METRIC_PREFIX}refreshes"] = float(len(self.refreshes))
        self.monitor.reset()
        return out

    def save_state(self, folder: str | Path) -> None:
        """Write what a resumed run needs to continue as this one would have into ``folder``: the step count, the
        safety drift so far, the monitor's sums since its last report and, once refreshed, the current subspace
        (``spf_state.json``, ``spf_subspace/``)."""
        folder = Path(folder)
        refreshed = bool(self.refreshes)
        if refreshed:
            self.subspace.save(folder / "spf_subspace", overwrite=True)
        (folder / STATE_FILE).write_text(json.dumps({"step": self.step, "safety_drift": self.safety_drift(),
                                                     "refreshed": refreshed, "refreshes": self.refreshes,
                                                     "loss_at_estimate": self.loss_at_estimate,
                                                     "monitor": self.monitor.state()}) + "\n")

    def load_state(self, folder: str | Path) -> None:
        """Continue from a state written by :meth:`save_state` (call it with the checkpoint's weights loaded)."""
        folder = Path(folder)
        state = json.loads((folder / STATE_FILE).read_text())
        if state["refreshed"]:
            refreshed = SafetySubspace.load(folder / "spf_subspace")  # estimated at earlier weights, by design
            refreshed.check_model(self.model)
            self._use(refreshed)
        self.step = state["step"]
        self.drift_before_refresh = state["safety_drift"]
        self.refreshes = list(state.get("refreshes", []))
        self.loss_at_estimate = state.get("loss_at_estimate", self.loss_at_estimate)
        if "monitor" in state:
            self.monitor.load_state(state["monitor"])
        for guard, core in zip(self.guards, effective_cores(self.guards, self.collectives)):
            guard.start_core = core  # the drift so far is carried over

    def monitor_due(self) -> bool:
        """Return True when ``monitor_every`` says the metrics should be logged after the current step."""
        return bool(self.config.monitor_every) and self.step % self.config.monitor_every == 0
