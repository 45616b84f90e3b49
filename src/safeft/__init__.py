"""safeft: fine-tune safety-aligned LLMs without losing their safety (Safety-Preserving Fine-Tuning, SPF)."""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "SPFConfig": "safeft.spf.config",
    "SafetySample": "safeft.data.examples",
    "SafetySubspace": "safeft.spf.subspace",
    "SPFCallback": "safeft.spf.hooks",
    "SPFProjector": "safeft.spf.projector",
    "attach_spf": "safeft.spf.hooks",
    "add_spf_callback": "safeft.spf.hooks",  # deprecated
    "freeze_unguarded": "safeft.spf.guards",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    # lazy: `import safeft` stays quick; transformers loads only when the trainer glue is used
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'safeft' has no attribute {name!r}")
