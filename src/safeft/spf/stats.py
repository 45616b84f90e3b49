"""What an SPF projector guards, holds and has spent (:meth:`safeft.spf.SPFProjector.stats`): frozen records for
benchmarks and tests, so that they never read the projector's private state."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TargetStats:
    """One guarded target as the projector holds it."""

    name: str
    shape: tuple[int, int]  # (m, n) of the base weight
    rank: int
    holds_U: bool  # False where the rule needs only V (right, always, update, full fine-tuning)
    batched: bool  # corrected in an equal-shape batch
    sharded: bool  # this process holds some of its rows (FSDP2)


@dataclass(frozen=True)
class ProjectorStats:
    """What a projector holds and has spent, for benchmarks and tests (:meth:`SPFProjector.stats`)."""

    side: str  # the side in force
    step: int  # optimizer steps projected so far
    targets: tuple[TargetStats, ...]  # the guarded targets
    batches: tuple[int, ...]  # targets per equal-shape batch
    state_bytes: int  # bases, singular values and remembered sketches, all guards
    hook_seconds: tuple[float, ...]  # wall time of before_step + after_step, per optimizer step (refreshes included)
    refreshes: tuple[int, ...]  # the steps after which the subspace was re-estimated
    refresh_seconds: float  # wall time of those re-estimates
    # per refresh, the mean over targets of the guarded side's span overlap between the subspace in force and the
    # fresh estimate (mean squared cosine of their principal angles): 1 = the refresh changed nothing
    refresh_overlaps: tuple[float, ...]
    collective_calls: int  # SPF's own all-reduces since the counter's last reset (FSDP2)
    collective_elements: tuple[int, ...]  # numbers summed per call
