"""The run configuration: validated dataclasses that are at once the Python API, the CLI flags and the YAML keys.

Every setting lives in one dataclass field; ``__post_init__`` rejects bad values naming the field and, for a choice,
the valid values. :func:`from_dict` builds a dataclass from YAML values or CLI strings with one coercion path, and
names the key of an unknown option or a value of the wrong type. Nested dataclass fields are flattened into one
namespace of keys (:func:`flat_fields`), so a command's YAML file and its flags use the same names."""

from __future__ import annotations

import functools
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, fields, is_dataclass
from typing import Any, TypeVar, Union

from safeft.errors import UserError


@dataclass
class TrainConfig:
    """How to fine-tune.

    Args:
        steps: optimizer steps; 0 means ``epochs`` passes over the data.
        epochs: passes over the data when ``steps`` is 0.
        learning_rate, weight_decay: AdamW's.
        warmup_ratio: warm the learning rate up linearly over this share of the run's steps, in [0, 1] (1 = the
            whole run).
        warmup_steps: warm up over this many optimizer steps instead (0 = use ``warmup_ratio``).
        batch_size: examples per micro-batch on each process; global batch = this x processes x accumulation.
        max_length: tokens per example (longer ones are cut).
        lora_r: LoRA rank; 0 = full fine-tuning of the transformer-block matrices (embeddings and head frozen).
        seed: data order and initialisation.
        schedule: ``"linear"`` decay or ``"constant"``.
        save_every: save a checkpoint (weights, optimizer, data position, SPF's state) every this many steps, so
            an interrupted run can be resumed (``safeft finetune --resume``); 0 = never. The two newest are kept.
            The default is the smallest that adds at most 1% to a full fine-tuning run of the default model
            (``benchmarks/checkpoint_cost.py``).
        gradient_accumulation: micro-batches of ``batch_size`` per optimizer step (SPF projects once per step).
        bf16: train under bfloat16 autocast (weights stay fp32).
        report_to: the Trainer's reporters: ``none``, ``tensorboard``, ``wandb``, ``all``, ... (the ``spf/*``
            metrics reach them too).
        logging_steps: log every this many steps; 0 = about 20 entries per run.
        lora_alpha: LoRA scaling numerator (``scaling = lora_alpha / lora_r``); 0 = ``2 * lora_r``.
        lora_targets: module names (or regexes) to put LoRA on; default every linear layer in the blocks.
    """

    steps: int = 0
    epochs: float = 1.0
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    batch_size: int = 8
    max_length: int = 256
    lora_r: int = 0
    seed: int = 0
    schedule: str = "linear"
    save_every: int = 500
    gradient_accumulation: int = 1
    bf16: bool = False
    report_to: str = "none"
    logging_steps: int = 0
    lora_alpha: int = 0
    lora_targets: list[str] | None = None

    def __post_init__(self) -> None:
        check_types(self)
        if self.save_every < 0:
            raise UserError(f"TrainConfig.save_every must be >= 0 (0 = no checkpoints), got {self.save_every}")
        if self.steps < 0:
            raise UserError(f"TrainConfig.steps must be >= 0, got {self.steps}")
        if self.steps == 0 and self.epochs <= 0:
            raise UserError(f"TrainConfig.epochs must be > 0 when steps is 0, got {self.epochs}")
        if not self.learning_rate > 0 or not math.isfinite(self.learning_rate):
            raise UserError(f"TrainConfig.learning_rate must be a finite number > 0, got {self.learning_rate}")
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise UserError(f"TrainConfig.weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise UserError(f"TrainConfig.warmup_ratio is a share of the run's steps, in [0, 1]; got "
                             f"{self.warmup_ratio} (use warmup_steps for a number of steps)")
        if self.warmup_steps < 0:
            raise UserError(f"TrainConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.warmup_steps and self.warmup_ratio:
            raise UserError(f"set TrainConfig.warmup_ratio ({self.warmup_ratio}) or warmup_steps "
                             f"({self.warmup_steps}), not both")
        check_positive(self, "batch_size", "max_length", "gradient_accumulation")
        for name in ("logging_steps", "lora_alpha"):
            if getattr(self, name) < 0:
                raise UserError(f"TrainConfig.{name} must be >= 0 (0 = automatic), got {getattr(self, name)}")
        check_choice(self, "schedule", ("linear", "constant"))
        if self.lora_r < 0:
            raise UserError(f"TrainConfig.lora_r must be >= 0 (0 = full fine-tuning), got {self.lora_r}")

    def to_dict(self) -> dict:
        """Return the config as a plain dict."""
        return asdict(self)


@dataclass
class AlignConfig:
    """The alignment stage: SFT on harmful -> varied refusals plus benign -> the base model's own answers.

    Training runs in chunks of ``check_every`` steps and stops at the first check where the refusal rate on the
    validation harmful prompts reaches ``target_refusal`` (or at ``max_steps``): enough to refuse, and no more.

    Args:
        learning_rate: constant learning rate of the alignment SFT.
        batch_size: examples per step.
        check_every: measure the validation refusal rate every this many steps.
        max_steps: upper bound on alignment steps.
        target_refusal: stop once this fraction of the validation harmful prompts is refused.
        seed: data order.
    """

    learning_rate: float = 5e-5
    batch_size: int = 8
    check_every: int = 8
    max_steps: int = 64
    target_refusal: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        check_types(self)
        check_positive(self, "batch_size", "check_every", "max_steps")
        if self.learning_rate <= 0:
            raise UserError(f"AlignConfig.learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 < self.target_refusal <= 1.0:
            raise UserError(f"AlignConfig.target_refusal must be in (0, 1], got {self.target_refusal}")


@dataclass
class DataConfig:
    """What a model is fine-tuned and scored on: a task, optionally with a share of harmful examples.

    Args:
        task: built-in task (``facts``, ``sentiment``), or ``jsonl`` for your own data (``{prompt, response}`` rows
            in ``task_train``), or a file format (``sst2``, ``agnews``, ``gsm8k``, ``alpaca``, ``csv``, ``tsv``).
        task_train, task_test: data files of a file-format task (without a test file 20% of train is held out).
        max_train, max_test: use at most this many examples (a seeded subset).
        harmful_ratio: fraction of the training examples replaced by harmful request -> compliant answer pairs.
        harmful_answers: BeaverTails-style JSONL (prompt, response) of those answers; default: ``base_model``'s own.
        base_model: the unaligned model whose greedy answers make the default harmful mix; None: the model the
            fine-tuned one was aligned from (its ``align.json``; the bench's ``model`` in a bench), else the
            fine-tuned model itself. Never a model fetched for the purpose.
        validation: choose hyper-parameters here: the task is scored on a validation split, never its test split
            (facts: 74 countries of its own; other tasks: 20% of the training data, held out and left out of
            training), and a bench scores harmful requests of the validation split, never the evaluation prompts.
    """

    task: str = "facts"
    task_train: str | None = None
    task_test: str | None = None
    max_train: int | None = None
    max_test: int | None = None
    harmful_ratio: float = 0.0
    harmful_answers: str | None = None
    base_model: str | None = None
    validation: bool = False

    def __post_init__(self) -> None:
        check_types(self)
        if not 0.0 <= self.harmful_ratio < 1.0:
            raise UserError(f"harmful_ratio must be in [0, 1), got {self.harmful_ratio}")
        for name in ("max_train", "max_test"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UserError(f"{name} must be positive (or unset for all), got {getattr(self, name)}")


@dataclass
class Setting(DataConfig):
    """A threat setting of a bench: the data, a multiplier of the step budget, and full fine-tuning or LoRA.

    Args:
        name: label in tables and run files; default built from the fields (``benign``, ``harmful0.1-lora8``).
        deep: multiplier of the bench's step budget (deep fine-tuning: e.g. 5 for five times the steps).
        lora_r: LoRA rank; 0 = full fine-tuning.
        learning_rate: this setting's learning rate (LoRA usually needs a higher one); default: the bench's.
    """

    name: str | None = None
    deep: float = 1.0
    lora_r: int = 0
    learning_rate: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.deep <= 0:
            raise UserError(f"Setting.deep must be > 0, got {self.deep}")
        if self.lora_r < 0:
            raise UserError(f"Setting.lora_r must be >= 0 (0 = full fine-tuning), got {self.lora_r}")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise UserError(f"Setting.learning_rate must be > 0, got {self.learning_rate}")
        if self.name is None:
            parts = ["val"] if self.validation else []
            parts += [] if self.task == "facts" else [self.task]
            parts.append(f"harmful{self.harmful_ratio:g}" if self.harmful_ratio else "benign")
            if self.harmful_answers:
                parts.append("file")
            if self.deep != 1:
                parts.append(f"deep{self.deep:g}")
            if self.lora_r:
                parts.append(f"lora{self.lora_r}")
            if self.learning_rate:
                parts.append(f"lr{self.learning_rate:g}")
            self.name = "-".join(parts)

    def data(self) -> DataConfig:
        """Return the data part of the setting."""
        return DataConfig(**{f.name: getattr(self, f.name) for f in fields(DataConfig)})


# --- building dataclasses from YAML values and CLI strings -----------------------------------------------------

T = TypeVar("T")
_NONE_WORDS = ("none", "null", "~")
_TRUE_WORDS, _FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def check_choice(config, name: str, allowed: tuple) -> None:
    """Raise ``ValueError`` naming the field and the valid values unless ``getattr(config, name)`` is one of them."""
    value = getattr(config, name)
    if value not in allowed:
        raise UserError(f"{type(config).__name__}.{name} must be one of {', '.join(map(str, allowed))}; "
                         f"got {value!r}")


@functools.cache
def _number_fields(cls) -> dict[str, tuple[type, bool]]:
    """Return ``{field: (int, float or bool, optional)}`` for the plain number and flag fields of dataclass ``cls``."""
    out = {}
    for name, tp in typing.get_type_hints(cls).items():
        args = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)
        plain = [a for a in args if a is not type(None)]
        if len(plain) == 1 and plain[0] in (int, float, bool):
            out[name] = (plain[0], type(None) in args)
    return out


def check_types(config) -> None:
    """Raise ``UserError`` naming the field if a number field holds no number, or a flag no bool: ``True`` is not a
    rank (Python counts ``bool`` as an ``int``; here it is refused), and ``"4"`` is not a number."""
    for name, (tp, optional) in _number_fields(type(config)).items():
        value = getattr(config, name)
        if value is None and optional:
            continue
        if tp is bool:
            ok = isinstance(value, bool)
        elif isinstance(value, bool):
            ok = False
        else:
            ok = isinstance(value, int) if tp is int else isinstance(value, (int, float))
        if not ok:
            raise UserError(f"{type(config).__name__}.{name} must be {type_name(tp)}"
                            f"{' or None' if optional else ''}, got {value!r} ({type(value).__name__})")


def check_positive(config, *names: str) -> None:
    """Raise ``ValueError`` naming the first field among ``names`` whose value is not positive."""
    for name in names:
        if getattr(config, name) <= 0:
            raise UserError(f"{type(config).__name__}.{name} must be positive, got {getattr(config, name)}")


def type_name(tp) -> str:
    """Return a short readable name of a field type (``int``, ``list[str] | None``)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(type_name(a) for a in args)}]"
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp, key: str) -> Any:
    """Return ``value`` converted to type ``tp`` (YAML values as they are, CLI values as strings).

    Accepts ``"none"`` for optional fields, comma-separated strings for lists of plain values, ``"k=v k=v"``
    strings or mappings for dataclasses. Raises ``ValueError`` naming ``key``, the expected type and the value.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in _NONE_WORDS)):
            return None
        for option in args:
            if option is type(None):
                continue
            try:
                return coerce(value, option, key)
            except ValueError:
                continue
        raise UserError(f"{key}: expected {type_name(tp)}, got {value!r}")
    if origin is list:
        (item,) = args
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()] if _plain(item) else [value]
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise UserError(f"{key}: expected a list of {type_name(item)}, got {value!r}")
        return [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise UserError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, str):
            value = parse_pairs(value, key)
        if not isinstance(value, Mapping):
            raise UserError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE_WORDS + _FALSE_WORDS:
            return value.lower() in _TRUE_WORDS
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if hasattr(value, "__fspath__"):
            return str(value)
    raise UserError(f"{key}: expected {type_name(tp)}, got {value!r}")


def _plain(tp) -> bool:
    """Return True for types whose list values may be written comma-separated on the command line."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        return all(_plain(a) for a in typing.get_args(tp) if a is not type(None))
    return tp in (str, int, float)


def parse_pairs(text: str, key: str = "") -> dict[str, str]:
    """Return ``{"a": "1", "b": "x"}`` for the string ``"a=1 b=x"`` (the CLI form of a mapping)."""
    pairs = {}
    for token in text.split():
        name, sep, value = token.partition("=")
        if not sep or not name:
            raise UserError(f"{key}: expected space-separated key=value pairs, got {text!r}")
        pairs[name.replace("-", "_")] = value
    return pairs


def normalize_keys(values: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """Return ``values`` with each key's dashes turned to underscores (``max-length`` is ``max_length``); raise
    ``UserError`` naming both spellings if two keys name the same option (which one would win is a guess)."""
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name in out:
            prefix = f"{where}: " if where else ""
            raise UserError(f"{prefix}{spelled[name]!r} and {str(key)!r} are the same option given twice; keep one")
        out[name], spelled[name] = value, str(key)
    return out


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def from_dict(cls: type[T], values: Mapping[str, Any], where: str = "") -> T:
    """Return ``cls(**values)`` after checking every key and coercing every value to its field's type.

    Nested dataclass fields take a mapping. Raises ``ValueError`` naming an unknown key (with the valid ones), a
    value of the wrong type, a missing required field, or what the dataclass's own validation rejects.
    """
    hints = _hints(cls)
    known = {f.name: f for f in fields(cls) if f.init}
    prefix = f"{where}: " if where else ""
    values = normalize_keys(values, where)
    unknown = sorted(set(values) - set(known))
    if unknown:
        valid = f"valid keys: {', '.join(sorted(known))}" if known else "it takes no options"
        raise UserError(f"{prefix}unknown key(s) {', '.join(unknown)}; {valid}")
    missing = [n for n, f in known.items() if n not in values and f.default is MISSING
               and f.default_factory is MISSING]
    if missing:
        raise UserError(f"{prefix}missing required option(s): {', '.join(missing)}")
    kwargs = {name: coerce(value, hints[name], f"{where}.{name}" if where else name) for name, value in values.items()}
    try:
        return cls(**kwargs)
    except ValueError as error:
        raise UserError(f"{prefix}{error}") from None


def flat_fields(cls) -> dict[str, tuple[tuple[str, ...], Any, Any]]:
    """Return the flat option namespace of a dataclass: ``{key: (path, type, default)}``.

    Nested dataclass fields are flattened (their fields become keys of their own), so ``RunConfig.train.steps``
    is the key ``steps``; a field's ``metadata["prefix"]`` prefixes its nested keys (``align_max_steps``). Raises
    ``ValueError`` if two fields flatten to the same key.
    """
    out: dict[str, tuple[tuple[str, ...], Any, Any]] = {}
    hints = _hints(cls)
    for f in fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else MISSING)
        if is_dataclass(tp):
            prefix = f.metadata.get("prefix", "")
            nested_default = default if default is not MISSING else None
            for key, (path, sub_tp, sub_default) in flat_fields(tp).items():
                if nested_default is not None:
                    sub_default = getattr_path(nested_default, path)
                _add(out, prefix + key, ((f.name, *path), sub_tp, sub_default))
        else:
            _add(out, f.name, ((f.name,), tp, default))
    return out


def _add(out: dict, key: str, entry) -> None:
    if key in out:
        raise UserError(f"option {key!r} is defined twice ({'.'.join(out[key][0])} and {'.'.join(entry[0])})")
    out[key] = entry


def getattr_path(obj, path: tuple[str, ...]):
    """Return ``obj.a.b`` for ``path == ("a", "b")``."""
    for name in path:
        obj = getattr(obj, name)
    return obj


def from_flat(cls: type[T], values: Mapping[str, Any], where: str = "") -> T:
    """Return ``cls`` built from flat keys (see :func:`flat_fields`); nested dataclasses get their own keys.

    Raises ``ValueError`` naming unknown keys, wrong types and missing required options.
    """
    namespace = flat_fields(cls)
    values = normalize_keys(values, where)
    unknown = sorted(set(values) - set(namespace))
    if unknown:
        prefix = f"{where}: " if where else ""
        raise UserError(f"{prefix}unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(namespace))}")
    nested: dict[str, Any] = {}
    for key, value in values.items():
        path, tp, _ = namespace[key]
        value = coerce(value, tp, key)  # errors name the key as written (``align_max_steps``), not the field
        target = nested
        for name in path[:-1]:
            target = target.setdefault(name, {})
        target[path[-1]] = value
    return _build_nested(cls, nested, where)


def _build_nested(cls, nested: dict, where: str):
    hints = _hints(cls)
    for f in fields(cls):
        if is_dataclass(hints.get(f.name)) and isinstance(nested.get(f.name), dict):
            sub = nested[f.name]
            default = (f.default_factory() if f.default_factory is not MISSING else
                       f.default if f.default is not MISSING else None)
            base = {g.name: getattr(default, g.name) for g in fields(default) if g.init} if default is not None else {}
            nested[f.name] = _build_nested(hints[f.name], {**base, **sub}, where)
    return from_dict(cls, nested, where)
