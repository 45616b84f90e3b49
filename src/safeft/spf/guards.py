"""One guard per target matrix: its basis on the target's device and what SPF remembers of it between the hooks.

Also what a guard needs around it: which trainable parameters no guard covers (and freezing them), putting a LoRA
factor into its side's invariant when SPF is attached, the sketches of a guard's weights and the effective cores
``U^T W_eff V`` whose change is the predicted safety drift.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from safeft.distributed import Collectives, local, shard_rows
from safeft.errors import UserError
from safeft.spf import projection as P
from safeft.spf.config import SPFConfig
from safeft.spf.estimate import Basis
from safeft.spf.targets import Target

if TYPE_CHECKING:
    from safeft.spf.subspace import SafetySubspace


@dataclass
class Guard:
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
    batched: bool = False  # corrected with others of its shapes in a Batch (its bases then views of the batch's)

    @property
    def holds_U(self) -> bool:
        """Return True unless the rule needs no U: ``dW V = 0`` is kept with V alone, and keeps the core fixed."""
        return self.U.shape[1] == self.S.shape[0]

    @property
    def sharded(self) -> bool:
        """Return True when this process holds only some rows of the target's trained tensors (FSDP2)."""
        return self.rows is not None or self.rows_A is not None

    def weights(self) -> tuple[Tensor, ...]:
        """Return the tensors the optimizer changes for this target: ``(W,)``, or ``(lora_B, lora_A)``."""
        t = self.target
        return (t.lora_B, t.lora_A) if t.is_lora else (t.base.weight,)

    def grads(self) -> tuple[Tensor | None, ...]:
        """Return the gradients of :meth:`weights` (None where a tensor has none yet)."""
        return tuple(w.grad for w in self.weights())

    def state_tensors(self) -> list[Tensor]:
        """Return every tensor SPF holds for this guard (bases and remembered sketches)."""
        return [self.U, self.S, self.V, self.start_core, *self.before, *self.corrected]


def unwrap(model: nn.Module) -> nn.Module:
    """Return the model inside a DDP wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def pad_rows(held: Tensor, rows: slice | None, total: int) -> Tensor:
    """Return ``held`` (the rows ``rows`` of a ``(total, c)`` matrix) in a zero ``(total, c)`` matrix, so that a sum
    over the processes assembles the whole matrix; ``held`` itself when it is whole."""
    if rows is None:
        return held
    full = held.new_zeros(total, held.shape[1])
    full[rows] = held
    return full


def non_finite_message(name: str) -> str:
    """Return the error message for a NaN/inf gradient or update at target ``name``."""
    return (f"non-finite gradient or update at SPF target {name!r}: training diverged (NaN/inf). Lower the "
            "learning rate, enable gradient clipping, or train in float32/bfloat16 instead of float16.")


def unguarded_parameters(model: nn.Module, subspace: SafetySubspace) -> dict[str, nn.Parameter]:
    """Return the trainable parameters of ``model`` that SPF does not project, by name: everything with
    ``requires_grad`` except the subspace's target weights (or, under LoRA, their factors). Typical members under
    full fine-tuning are norm weights and biases; training them can move the refusals with nothing to stop it."""
    model = unwrap(model)
    guarded = {id(w) for t in subspace.check_model(model).values()
               for w in ((t.lora_A, t.lora_B) if t.is_lora else (t.base.weight,))}
    return {name: p for name, p in model.named_parameters() if p.requires_grad and id(p) not in guarded}


def freeze_unguarded(model: nn.Module, subspace: SafetySubspace, keep: Sequence[str] = ()) -> list[str]:
    """Freeze (``requires_grad_(False)``) every trainable parameter SPF does not project; return their names.

    Call it before building the optimizer. ``keep``: regular expressions; an unguarded parameter whose name one of
    them matches (``re.search``, e.g. ``"norm"``) stays trainable on purpose. On the testbed, leaving the blocks'
    norm weights trainable raised the harmful-mix score by 0-6 points per seed (README, "Unguarded parameters")."""
    frozen = []
    for name, p in unguarded_parameters(model, subspace).items():
        if any(re.search(k, name) for k in keep):
            continue
        p.requires_grad_(False)
        frozen.append(name)
    return frozen


def build_guards(model: nn.Module, subspace: SafetySubspace, config: SPFConfig) -> list[Guard]:
    """Return a guard for every target of ``subspace`` in ``model`` that is trained and has a non-empty basis.

    ``config.side`` must be the side in force (not None). Raises ``ValueError`` for a LoRA layer with one factor
    frozen (LoRA-FA style) and for a LoRA layer whose base and ``lora_B`` are sharded over different rows.
    """
    guards = []
    for name, target in subspace.check_model(model).items():
        basis: Basis = subspace[name]
        if target.is_lora and target.lora_A.requires_grad != target.lora_B.requires_grad:
            frozen = "lora_A" if target.lora_B.requires_grad else "lora_B"
            raise UserError(f"{name}: {frozen} is frozen and the other LoRA factor is trained (LoRA-FA style); "
                             "SPF's LoRA guard corrects both factors and would leave this adapter unguarded. "
                             f"Train both factors (unfreeze {frozen}) or neither.")
        trained = target.base.weight.requires_grad or (target.is_lora and target.lora_A.requires_grad)
        if basis.rank == 0 or not trained:
            continue
        device = local(target.base.weight).device
        if (not target.is_lora and config.side == "right" and config.mode == "always"
                and config.project == "update"):  # dW V = 0 for the actual step: U is never read
            basis = Basis(basis.U[:, :0], basis.S, basis.V)
        U, S, V = (t.to(device=device, dtype=torch.float32) for t in (basis.U, basis.S, basis.V))
        rows = shard_rows(target.lora_B if target.is_lora else target.base.weight)
        rows_A = shard_rows(target.lora_A) if target.is_lora else None
        if target.is_lora and shard_rows(target.base.weight) not in (None, rows):
            raise UserError(f"{name}: the base weight and lora_B are sharded over different rows")
        guards.append(Guard(target, U if rows is None else U[rows], S, V, start_core=torch.zeros(0), rows=rows,
                            rows_A=rows_A))
    return guards


@torch.no_grad()
def start_lora_side(guard: Guard, side: str, collectives: Collectives) -> None:
    """Put the factor ``side`` projects into its invariant (right: ``A V = 0``; left: ``U^T B = 0``), or refuse.

    Projecting A when B is zero leaves the model's function unchanged; with B non-zero (an adapter trained without
    this side, or a PiSSA-style initialisation) it would not, so that is an error."""
    t = guard.target
    if side == "two_sided":
        return
    A, B = local(t.lora_A), local(t.lora_B)
    if side == "right":
        factor, sk = A, A.float() @ guard.V  # (k, r); under FSDP2 this process's rows of it
    else:
        factor, sk = B, guard.U.T @ B.float()  # (r, k); under FSDP2 a sum over the row shards
    tolerance = torch.finfo(factor.dtype).eps ** 0.5
    if guard.sharded and side == "left":
        sk = collectives.sum([sk])[0]
    sketch_sq, factor_sq, b_nonzero = sk.pow(2).sum(), factor.float().pow(2).sum(), (B != 0).sum().float()
    if guard.sharded:  # the norms and B's non-zeros of the whole tensors
        right_sq, factor_sq, b_nonzero = collectives.sum(
            [sketch_sq if side == "right" else torch.zeros_like(sketch_sq), factor_sq, b_nonzero])
        sketch_sq = right_sq if side == "right" else sketch_sq
    if float(sketch_sq) ** 0.5 <= tolerance * float(factor_sq) ** 0.5:
        return
    if side == "right" and not float(b_nonzero):
        P.subtract_(A.data, sk, guard.U, guard.V, torch.ones_like(guard.S), "right")
        return
    what = "rows of lora_A orthogonal to V" if side == "right" else "columns of lora_B orthogonal to U"
    raise UserError(f"{t.name}: SPF side={side!r} under LoRA keeps the {what}, but this adapter's lora_B is "
                     "already non-zero and not so (trained without this side, or a PiSSA/OLoRA-style "
                     "initialisation), so enforcing it would change the model. Start from a fresh adapter "
                     "(peft's default init, lora_B = 0) or use side='two_sided'.")


def sketches(guard: Guard, side: str) -> tuple[Tensor, ...]:
    """Return the sketches of a guard's weights: ``(sketch(W),)`` for ``side``, or ``(U^T B, A V)`` under LoRA; under
    FSDP2 this process's part of them (summed over the shards, or its rows)."""
    weights = tuple(local(w) for w in guard.weights()) if guard.sharded else guard.weights()
    if guard.target.is_lora:
        B, A = weights
        return guard.U.T @ B.float(), A.float() @ guard.V  # (r, k), (k, r)
    return (P.sketch(weights[0], guard.U, guard.V, side),)


@torch.no_grad()
def effective_cores(guards: list[Guard], collectives: Collectives) -> list[Tensor]:
    """Return ``U^T W_eff V`` (r, r) per guard, with ``W_eff = W + s B A`` under LoRA, never forming ``B A``; a
    ``(0, 0)`` tensor for a guard without U. Under FSDP2 the shards' parts are summed in one all-reduce."""
    parts = []
    for g in guards:
        t = g.target
        if not g.holds_U:  # right, always, update: dW V = 0 keeps U^T W V where it started; nothing to measure
            parts.append([g.S.new_zeros(0, 0)])
            continue
        core = P.core(local(t.base.weight), g.U, g.V)
        if not t.is_lora:
            parts.append([core])
            continue
        ub, av = g.U.T @ local(t.lora_B).float(), local(t.lora_A).float() @ g.V  # (r, k), (k, r)
        parts.append([core, ub, pad_rows(av, g.rows_A, t.lora_A.shape[0])])
    sharded = [i for i, g in enumerate(guards) if g.sharded and g.holds_U]
    summed = iter(collectives.sum([x for i in sharded for x in parts[i]]))
    for i in sharded:
        parts[i] = [next(summed) for _ in parts[i]]
    return [p[0] if len(p) == 1 else p[0] + g.target.scaling * p[1] @ p[2] for g, p in zip(guards, parts)]
