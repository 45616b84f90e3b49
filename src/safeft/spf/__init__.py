"""Safety-Preserving Fine-Tuning (SPF, SPEC §2): one package, layered from the pure math up to the training hooks.

    projection, lowrank   pure tensor math (no Hugging Face imports)
    config                SPFConfig and its vocabulary
    targets               the matrices SPF guards, in plain, LoRA and wrapped models
    estimate              safety gradients by hooks, factored; rank selection and allocation
    files, card           the artifact's files (names, manifest, checks); its Hub card and Hub errors
    subspace              the artifact: bases + metadata, save / load / check, Hub save / load / push
    guards, monitor       per-target state; the monitor's running sums
    whole, batched,       projecting targets held whole; equal-shape batches (CUDA); FSDP2 row shards
      sharded
    stats                 what a projector guards, holds and has spent (SPFProjector.stats())
    projector             SPFProjector: the two calls around every optimizer step, refresh and state
    hooks                 attach_spf (plain loops) and SPFCallback (Trainer / SFTTrainer)
"""

from importlib import import_module

_EXPORTS = {
    "SPFConfig": "safeft.spf.config",
    "Basis": "safeft.spf.estimate",
    "SafetySubspace": "safeft.spf.subspace",
    "freeze_unguarded": "safeft.spf.guards",
    "unguarded_parameters": "safeft.spf.guards",
    "SPFProjector": "safeft.spf.projector",
    "ProjectorStats": "safeft.spf.stats",
    "STATE_FILE": "safeft.spf.projector",
    "METRIC_PREFIX": "safeft.spf.monitor",
    "SPFHandle": "safeft.spf.hooks",
    "SPFCallback": "safeft.spf.hooks",
    "attach_spf": "safeft.spf.hooks",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    # lazy: importing the math (safeft.spf.projection) must not pull in transformers
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'safeft.spf' has no attribute {name!r}")
