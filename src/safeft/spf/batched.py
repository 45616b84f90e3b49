"""Equal-shape batching of the update correction: targets whose trained tensors share shapes, dtype and device are
corrected together in batched products, a few kernels per shape instead of a few per target.

Used with ``mode="always"`` and ``project="update"`` (full fine-tuning on one side; LoRA on any side: the projected
factor, or both under ``two_sided``), on an accelerator, where the hooks' time is per-target kernel launches and
Python rather than arithmetic. The correction is the same as the per-target path's (each entry rounded once).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from safeft.spf import projection as P
from safeft.spf.config import SPFConfig
from safeft.spf.guards import Guard

DEFAULT_BATCH_BYTES = 256 * 2**20  # at most this much fp32 removal (L x m x n) per batched product
DEFAULT_DEVICES = ("cuda",)  # on a CPU the stacked copies cost more than the per-target loop (2x, measured)


@dataclass
class Batch:
    """One trained tensor (the weight, or one LoRA factor) of guards of equal shapes, dtype and device."""

    guards: list[Guard]
    factor: int  # which of each guard's weights(): the weight or lora_B (0), lora_A (1)
    unprojected: int | None  # LoRA on one side: the other factor, whose finiteness the step still tests
    side: str  # "left": sketches U^T X, basis U; "right": sketches X V, basis V
    basis: Tensor  # (L, m, r) U's or (L, n, r) V's stacked, fp32; each guard's U or V is a view of its slice
    basis_mm: Tensor  # the basis in the dtype the sketches use (a full weight's on CUDA bf16/fp16, else basis itself)
    before: Tensor | None = None  # fp32 sketches before the optimizer step, (L, r, n) or (L, m, r)
    corrected: Tensor | None = None  # the sketches right after the last correction
    versions: tuple[int, ...] = ()  # the tensors' in-place version counters at that moment

    def tensors(self) -> list[Tensor]:
        """Return the batch's trained tensors, one per guard."""
        return [g.weights()[self.factor] for g in self.guards]

    def unprojected_tensors(self) -> list[Tensor]:
        """Return the guards' factors this batch leaves alone (LoRA on one side; none otherwise)."""
        return [] if self.unprojected is None else [g.weights()[self.unprojected] for g in self.guards]

    def sketches(self) -> Tensor:
        """Return the fp32 sketches of the tensors as they are now."""
        stacked = torch.stack([x.detach() for x in self.tensors()])
        if self.guards[0].target.is_lora:  # thin factors: sketched in fp32, as the per-target path sketches them
            stacked = stacked.float()
        return P.sketch_batched(stacked, self.basis_mm, self.side)

    def remember_before(self) -> None:
        """Keep the sketches before the optimizer step (the corrected ones, if nothing wrote to the tensors since)."""
        fresh = self.corrected is None or self.versions != tuple(x._version for x in self.tensors())
        self.before = self.sketches() if fresh else self.corrected

    def remove(self, delta: Tensor) -> None:
        """Remove the whole change whose sketches are ``delta`` (``sketches() - before``) from every tensor."""
        P.subtract_batched_([x.data for x in self.tensors()], delta, self.basis, self.side)
        self.corrected = self.before  # the whole change is removed: the sketches are back where they were
        self.versions = tuple(x._version for x in self.tensors())


def batch_guards(guards: list[Guard], config: SPFConfig, devices: tuple[str, ...] | None,
                 max_bytes: int = DEFAULT_BATCH_BYTES) -> list[Batch]:
    """Group the guards whose update correction can run batched by shapes, dtype and device, in batches of at most
    ``max_bytes`` of fp32 removal, and return the batches; a guard left alone keeps the per-target path.

    Only guards on a device type in ``devices`` are batched (None: every device). Each batched guard's ``U`` or
    ``V`` becomes a view of its batch's stacked basis, and its ``batched`` flag is set."""
    if (config.project, config.mode) != ("update", "always"):
        return []
    groups: dict[tuple, list[Guard]] = {}
    for g in guards:
        one_sided_weight = g.target.is_lora or config.side != "two_sided"  # a full weight corrected on one side
        device = g.weights()[0].device
        if one_sided_weight and not g.sharded and (devices is None or device.type in devices):
            shapes = tuple((tuple(w.shape), w.dtype) for w in g.weights())
            key = (shapes, tuple(g.U.shape), tuple(g.V.shape), device)
            groups.setdefault(key, []).append(g)
    batches = []
    for members in groups.values():
        size = max(1, max_bytes // (4 * max(w.numel() for w in members[0].weights())))
        for i in range(0, len(members), size):
            part = members[i:i + size]
            if len(part) < 2:
                continue
            for factor, side, unprojected in _batched_factors(part[0], config.side):
                basis = torch.stack([g.U if side == "left" else g.V for g in part])
                for j, g in enumerate(part):
                    setattr(g, "U" if side == "left" else "V", basis[j])
                    g.batched = True
                x = part[0].weights()[factor]
                low = (not part[0].target.is_lora and x.device.type == "cuda"
                       and x.dtype in (torch.bfloat16, torch.float16))
                batches.append(Batch(part, factor, unprojected, side, basis, basis.to(x.dtype) if low else basis))
    return batches


def _batched_factors(guard: Guard, side: str) -> list[tuple[int, str, int | None]]:
    """Return (factor, the side it is sketched on, the factor left alone or None) for each of a guard's projected
    tensors: a full weight on ``side``; under LoRA B on the left, A on the right, one or both of them."""
    if not guard.target.is_lora:
        return [(0, side, None)]
    on_b, on_a = P.lora_projected_factors(side)
    if on_b and on_a:
        return [(0, "left", None), (1, "right", None)]
    return [(0, "left", 1)] if on_b else [(1, "right", 0)]
