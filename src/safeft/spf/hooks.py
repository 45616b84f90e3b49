"""Attach SPF to training: two optimizer hooks for a plain PyTorch loop (:func:`attach_spf`) or a TrainerCallback for
the transformers ``Trainer`` and TRL's ``SFTTrainer`` (:class:`SPFCallback`); both drive one :class:`SPFProjector`."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from safeft.callbacks import add_to_log
from safeft.errors import UserError
from safeft.spf.config import SPFConfig
from safeft.spf.guards import freeze_unguarded
from safeft.spf.projector import STATE_FILE, SPFProjector, resolve_config
from safeft.spf.subspace import SafetySubspace


def freeze_before_training(model: nn.Module, subspace: SafetySubspace, keep: Sequence[str]) -> list[str]:
    """Freeze what SPF cannot project (:func:`~safeft.spf.guards.freeze_unguarded`) and return the names; refuse
    (``ValueError``) where the model is already wrapped by DDP or sharded by FSDP2 and something is left to freeze:
    those register their parameters when they wrap, so freezing must come first."""
    import re

    from safeft.distributed import is_sharded
    from safeft.spf.guards import unguarded_parameters

    left = [n for n in unguarded_parameters(model, subspace) if not any(re.search(k, n) for k in keep)]
    wrapped = isinstance(model, nn.parallel.DistributedDataParallel) or any(is_sharded(p) for p in model.parameters())
    if left and wrapped:
        raise UserError(f"{len(left)} trainable parameters SPF cannot project (e.g. {', '.join(left[:3])}) would "
                         "have to be frozen, but the model is already wrapped for DDP/FSDP2, which registered them. "
                         "Call safeft.freeze_unguarded(model, subspace) before wrapping, or keep them trainable on "
                         "purpose with keep_trainable=[...]")
    return freeze_unguarded(model, subspace, keep)


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
               config: SPFConfig | None = None, tokenizer=None, *, keep_trainable: Sequence[str] = (),
               **projector_options) -> SPFHandle:
    """Make every ``optimizer.step()`` SPF-projected, for a plain PyTorch training loop.

    Freezes every trainable parameter SPF does not project (the blocks' norm weights under full fine-tuning:
    nothing would guard them) except those ``keep_trainable`` names (regular expressions; a frozen parameter gets
    no gradient, so the optimizer skips it). Then registers a step pre-hook (project the gradients, or remember
    sketches for ``project="update"``) and a step post-hook (correct the update). Gradients are taken as they are
    when ``step()`` is called: after backward, accumulation, DDP all-reduce and any clipping the loop does.

    ``config`` defaults to the settings the subspace was estimated with (see
    :func:`~safeft.spf.projector.resolve_config`); ``projector_options`` (``batched``, ``batch_bytes``) go to
    :class:`SPFProjector`.

    Returns:
        An :class:`SPFHandle`; call ``handle.metrics()`` to read the monitor metrics, ``handle.detach()`` to stop.
    """
    freeze_before_training(model, subspace, keep_trainable)
    projector = SPFProjector(model, subspace, config, tokenizer, warn_unguarded=not keep_trainable,
                             **projector_options)
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

    When training starts it freezes every trainable parameter SPF does not project (the blocks' norm weights under
    full fine-tuning), except those named in ``keep_trainable``: frozen, they get no gradient and the optimizer
    skips them.

    Args:
        subspace: the safety subspace of the model being trained.
        config: SPF settings; by default the ones the subspace was estimated with
            (:func:`~safeft.spf.projector.resolve_config`: a field left at its default takes the subspace's value).
        tokenizer: for refresh and the safety-loss metric; defaults to the trainer's ``processing_class``.
        keep_trainable: regular expressions of unguarded parameters to leave trainable on purpose.
    """

    def __init__(self, subspace: SafetySubspace, config: SPFConfig | None = None, tokenizer=None, *,
                 keep_trainable: Sequence[str] = ()):
        self.subspace = subspace
        self.config = resolve_config(subspace, config)
        self.tokenizer = tokenizer
        self.keep_trainable = tuple(keep_trainable)
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
        freeze_before_training(model, self.subspace, self.keep_trainable)
        self.projector = SPFProjector(model, self.subspace, self.config, tokenizer,
                                      warn_unguarded=not self.keep_trainable, check_weights=not state.global_step)
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


def add_spf_callback(trainer, subspace: SafetySubspace, config: SPFConfig | None = None, tokenizer=None
                     ) -> SPFCallback:
    """Deprecated: use ``trainer.add_callback(SPFCallback(subspace))`` (the callback now moves itself ahead of the
    reporters). Adds the callback and returns it."""
    warnings.warn("add_spf_callback is deprecated and will be removed: use "
                  "trainer.add_callback(SPFCallback(subspace))",
                  DeprecationWarning, stacklevel=2)
    callback = SPFCallback(subspace, config, tokenizer)
    trainer.add_callback(callback)
    return callback
