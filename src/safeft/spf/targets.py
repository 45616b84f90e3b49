"""Find the weight matrices SPF guards, in plain, peft-LoRA and DDP-wrapped models, under one canonical name each."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import torch
from torch import nn

from safeft.distributed import Collectives, local, shard_rows
from safeft.errors import UserError

_BLOCK_SEGMENT = re.compile(r"(^|\.)\d+\.")  # a numbered segment: `layers.3.`, `h.0.`, `blocks.11.`
_WRAPPER_PREFIXES = ("module.", "base_model.model.", "_orig_mod.")


@dataclass
class Target:
    """One guarded matrix: the base ``nn.Linear`` (weight ``W: (m, n)``) and, under peft LoRA, its trainable factors.

    With LoRA the effective weight is ``W + scaling * lora_B @ lora_A`` with ``lora_B: (m, k)``, ``lora_A: (k, n)``.
    """

    name: str
    base: nn.Linear
    lora_A: nn.Parameter | None = None
    lora_B: nn.Parameter | None = None
    scaling: float = 1.0

    @property
    def shape(self) -> tuple[int, int]:
        """Return ``(m, n)``, the shape of the base weight."""
        return tuple(self.base.weight.shape)

    @property
    def is_lora(self) -> bool:
        """Return True when the target is trained through LoRA factors."""
        return self.lora_A is not None


def canonical_name(name: str) -> str:
    """Return a module name without DDP / peft / torch.compile wrappers, so a subspace fits every wrapping."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name.removesuffix(".base_layer")


def in_blocks(name: str) -> bool:
    """Return True if the module or parameter ``name`` lies inside the transformer blocks (a numbered module list:
    ``model.layers.3.mlp``, ``transformer.h.0.attn``); embeddings, the final norm and the LM head do not."""
    return bool(_BLOCK_SEGMENT.search(name))


def matches(name: str, patterns: list[str] | None) -> bool:
    """Return True if ``name`` is a target under ``patterns`` (see ``SPFConfig.target_modules``)."""
    if patterns is None:
        return in_blocks(name)
    return any(name == p or name.endswith("." + p) or re.fullmatch(p, name) for p in patterns)


def find_targets(model: nn.Module, patterns: list[str] | None = None) -> dict[str, Target]:
    """Return the targets of ``model`` matching ``patterns``, keyed by canonical name, in module order.

    A peft LoRA layer counts once, as its base linear plus its active adapter's factors; the adapter's own
    ``lora_A`` / ``lora_B`` linears are never targets.
    """
    targets: dict[str, Target] = {}
    lora_parts: set[int] = set()
    for raw_name, module in model.named_modules():
        if id(module) in lora_parts:
            continue
        name = canonical_name(raw_name)
        if hasattr(module, "base_layer") and not hasattr(module, "lora_A") and matches(name, patterns):
            raise UserError(f"{name}: SPF supports plain LoRA adapters only, this layer is a "
                             f"{type(module).__module__}.{type(module).__name__}; use peft's LoraConfig")
        if hasattr(module, "base_layer") and hasattr(module, "lora_A"):
            lora_parts.update(id(m) for m in module.modules() if m is not module)
            base = module.get_base_layer()
            if isinstance(base, nn.Linear) and matches(name, patterns):
                targets[name] = _lora_target(name, module, base)
        elif isinstance(module, nn.Linear) and matches(name, patterns):
            targets[name] = Target(name=name, base=module)
    return targets


def _lora_target(name: str, module: nn.Module, base: nn.Linear) -> Target:
    active = [a for a in module.active_adapters if a in module.lora_A]
    if not active:
        return Target(name=name, base=base)
    if len(active) > 1:
        raise UserError(f"{name}: SPF supports one active LoRA adapter per layer, found {active}; "
                         "merge or disable the others")
    adapter = active[0]
    if getattr(module, "use_dora", {}).get(adapter, False):
        raise UserError(f"{name}: DoRA adapters are not supported by SPF; use plain LoRA (use_dora=False)")
    variant = getattr(module, "lora_variant", {}).get(adapter)
    if variant is not None or hasattr(module, "lora_E"):
        kind = type(variant).__name__ if variant is not None else type(module).__name__
        raise UserError(f"{name}: SPF supports plain LoRA (dW = scaling * B A) only, this adapter is a {kind}; "
                         "use a plain LoraConfig (no use_dora, AdaLoRA or other LoRA variant)")
    return Target(name=name, base=base, lora_A=module.lora_A[adapter].weight, lora_B=module.lora_B[adapter].weight,
                  scaling=float(module.scaling[adapter]))


def weights_fingerprint(targets: dict[str, Target]) -> str:
    """Return a content fingerprint of the targets' base weights: a hash of each one's name, shape and a strided
    sample of 4096 of its values (fp32). Weights trained or swapped for another checkpoint's differ in it; it costs
    a few reads per matrix, not a pass over the model."""
    samples, sharded = {}, []
    for name, t in sorted(targets.items()):
        weight = t.base.weight.detach()
        step = max(1, weight.numel() // 4096)
        rows = shard_rows(weight)
        if rows is None:
            samples[name] = weight.reshape(-1)[::step][:4096].float().cpu()
            continue
        # FSDP2: this process's rows fill in their sampled entries; the sum over the processes is the whole sample
        index = torch.arange(0, weight.numel(), step)[:4096]
        n = weight.shape[1]
        held = (index // n >= rows.start) & (index // n < rows.stop)
        values = torch.zeros(len(index))
        values[held] = local(weight).reshape(-1)[(index[held] - rows.start * n).to(local(weight).device)].float().cpu()
        samples[name] = values
        sharded.append(name)
    for name, whole in zip(sharded, Collectives().sum([samples[n] for n in sharded])):
        samples[name] = whole
    digest = hashlib.sha256()
    for name, t in sorted(targets.items()):
        digest.update(f"{name}:{tuple(t.shape)}".encode())
        digest.update(samples[name].numpy().tobytes())
    return digest.hexdigest()[:16]
