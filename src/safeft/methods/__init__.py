"""The registry of defences: one file per method, one line here per name.

Adding a method is one file with a ``Method`` subclass (and its options dataclass) plus one ``register`` line
below. A name maps to a class and a preset of its options, so presets (``spf-paper``) need no class of their own.

    from safeft.methods import build_method
    method = build_method("spf", {"rank": 32})      # options are validated by the method's dataclass
    both = build_method("spf+mix", {"safety_ratio": 0.05})  # methods combined: each option goes to its owners
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from safeft.config import DataConfig, TrainConfig, from_dict, parse_pairs
from safeft.errors import UserError
from safeft.methods.antidote import Antidote
from safeft.methods.base import Method, NoOptions, RunContext
from safeft.methods.booster import Booster
from safeft.methods.lisa import Lisa
from safeft.methods.mix import Mix
from safeft.methods.safegrad import SafeGrad
from safeft.methods.safelora import SafeLoRA
from safeft.methods.sft import SFT
from safeft.methods.spf import PAPER_PRESET, SPF, SPFRandom
from safeft.methods.vaccine import Vaccine

__all__ = ["REGISTRY", "Method", "NoOptions", "RunContext", "build_method", "method_entry", "register"]

REGISTRY: dict[str, tuple[type[Method], dict[str, Any]]] = {}


# Keys of a fine-tuning run itself (`safeft finetune`): a method option of the same name could not be told apart.
RESERVED = {f.name for f in fields(DataConfig)} | {f.name for f in fields(TrainConfig)} | {
    "model", "out", "method", "cache", "overwrite", "config", "label"}


def register(name: str, cls: type[Method], preset: Mapping[str, Any] | None = None) -> None:
    """Register ``cls`` under ``name``, with ``preset`` option values (validated now).

    Raises:
        ValueError: if an option is named like a key of the run (``seed``, ``steps``, ...), or shares its name
            with another method's option of a different type: every option is also a ``safeft finetune`` flag.
    """
    from_dict(cls.Config, dict(preset or {}), f"method {name!r}")
    hints = typing.get_type_hints(cls.Config)
    for f in fields(cls.Config):
        if f.name in RESERVED:
            raise UserError(f"method {name!r}: option {f.name!r} is also a key of the run; rename it")
        for other, _ in REGISTRY.values():
            other_hints = typing.get_type_hints(other.Config)
            if f.name in other_hints and other_hints[f.name] != hints[f.name]:
                raise UserError(f"method {name!r}: option {f.name!r} has type {hints[f.name]}, but "
                                 f"{other.__name__}'s option of that name is {other_hints[f.name]}; rename it")
    REGISTRY[name] = (cls, dict(preset or {}))


register("sft", SFT)
register("spf", SPF)
register("spf-paper", SPF, PAPER_PRESET)
register("spf-random", SPFRandom)
register("mix", Mix)
register("safegrad", SafeGrad)
register("lisa", Lisa)
register("safelora", SafeLoRA)
register("vaccine", Vaccine)
register("antidote", Antidote)
register("booster", Booster)


def option_names(name: str) -> list[str]:
    """Return the option names method ``name`` accepts."""
    return [f.name for f in fields(_lookup(name)[0].Config)]


def _lookup(name: str) -> tuple[type[Method], dict[str, Any]]:
    if name not in REGISTRY:
        raise UserError(f"unknown method {name!r}; registered methods: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def build_method(name: str, options: Mapping[str, Any] | None = None) -> Method:
    """Return the method registered as ``name`` with its preset, overridden by ``options``; ``"a+b"`` combines
    registered methods (:class:`~safeft.methods.composite.Composite`), each option going to every part that has it.

    Raises:
        ValueError: for an unknown method, an option it does not have, or a value its options reject.
    """
    if "+" in name:
        from safeft.methods.composite import Composite

        names = [part.strip() for part in name.split("+")]
        options = dict(options or {})
        owned = {n: set(option_names(n)) for n in names}
        stray = sorted(k for k in options if not any(k.replace("-", "_") in o for o in owned.values()))
        if stray:
            raise UserError(f"method {name!r}: unknown key(s) {', '.join(stray)}; valid keys: "
                             f"{', '.join(sorted(set().union(*owned.values())))}")
        parts = [build_method(n, {k: v for k, v in options.items() if k.replace("-", "_") in owned[n]})
                 for n in names]
        return Composite(parts, "+".join(names))
    cls, preset = _lookup(name)
    values = {**preset, **dict(options or {})}
    config = from_dict(cls.Config, values, f"method {name!r}")
    if hasattr(config, "check_given"):  # options whose given value the config cannot tell from its default
        config.check_given(values)
    return cls(config, name)


def method_entry(entry: str | Mapping[str, Any]) -> tuple[str, Method]:
    """Return ``(label, method)`` for a bench entry: ``"spf"``, ``"spf rank=32 side=left"`` or a mapping
    ``{"method": "spf", "label": "spf r32", "rank": 32}``. The label defaults to the entry's text."""
    if isinstance(entry, str):
        name, _, rest = entry.strip().partition(" ")
        return entry.strip(), build_method(name, parse_pairs(rest, f"method {name!r}"))
    options = dict(entry)
    if "method" not in options:
        raise UserError(f"method entry {options} needs a 'method' key naming one of: {', '.join(REGISTRY)}")
    name = options.pop("method")
    label = options.pop("label", None)
    method = build_method(name, options)
    if label is None:
        label = " ".join([name, *(f"{k}={v}" for k, v in options.items())])
    return str(label), method
