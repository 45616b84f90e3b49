"""Command-line options generated from the run configuration, and YAML files merged with flags.

A command's options are the flat keys of its configuration dataclass (:func:`safeft.config.flat_fields`): the
field ``learning_rate`` is the flag ``--learning-rate`` and the YAML key ``learning_rate``. Values from
``--config FILE`` fill in; flags given on the command line win; everything then goes through
:func:`safeft.config.from_flat`, the same validation as the Python API. Help texts come from the dataclasses'
``Args:`` docstrings, so each option is described once.

Why not transformers' ``HfArgumentParser`` or TRL's ``TrlParser``: both are argparse parsers, while the CLI is
typer; and ``TrlParser`` puts YAML values in as argparse defaults, which argparse never converts or type-checks,
so a wrong type in a file would pass silently. Here file values and flag strings share one coercion path.
"""

from __future__ import annotations

import functools
import inspect
import re
import typing
import warnings
from collections.abc import Callable, Mapping
from dataclasses import MISSING, is_dataclass
from pathlib import Path
from typing import Any

import typer

from safeft.config import flat_fields, from_flat, normalize_keys, type_name
from safeft.errors import USER_ERRORS, UserError

CONFIG_HELP = ("YAML file of option values (keys are the option names with underscores, or TRL's names); flags on "
               "the line win.")

# Keys shown under another flag name, their old flag kept hidden with a deprecation warning: SPF's target
# modules beside LoRA's --lora-targets read as LoRA's. The YAML file takes either name.
FLAG_NAMES = {"target_modules": "spf_targets"}

# TRL's / transformers' TrainingArguments names accepted beside ours, as flags and as YAML keys (where the command
# has our key and not theirs), so a `trl sft` command line or YAML file carries over.
TRL_ALIASES = {"max_steps": "steps", "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
               "gradient_accumulation_steps": "gradient_accumulation", "output_dir": "out",
               "model_name_or_path": "model", "max_seq_length": "max_length", "lr_scheduler_type": "schedule",
               "save_steps": "save_every", "lora_target_modules": "lora_targets"}

PANELS = ("Model and data", "Training", "Method", "Evaluation", "Output")


def trl_aliases(key: str, namespace) -> list[str]:
    """Return TRL's names of option ``key`` in a command whose keys are ``namespace`` (none it has itself)."""
    return [alias for alias, ours in TRL_ALIASES.items() if ours == key and alias not in namespace]


def flag_name(key: str, namespace) -> str:
    """Return the name option ``key`` is shown under: :data:`FLAG_NAMES`'s, unless the command has that key too."""
    return FLAG_NAMES[key] if key in FLAG_NAMES and FLAG_NAMES[key] not in namespace else key


def short_help(text: str, width: int = 100) -> str:
    """Return an option's help cut to about one line: to its first sentence or clause when longer than ``width``
    (the whole text is in the docs and, for a method's options, in ``safeft methods NAME``)."""
    text = text.replace("``", "")
    for pattern in (r"(?<!e\.g)(?<!i\.e)\.\s|;\s", r"\s\("):
        if len(text) <= width:
            break
        cut = [m.start() for m in re.finditer(pattern, text) if m.start() >= 20]  # not inside the first words
        text = text[:cut[0]] if cut else text
    return text


def field_help(cls) -> dict[str, str]:
    """Return ``{field: help}`` parsed from the ``Args:`` sections of ``cls``'s docstring and its bases'."""
    helps: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        doc = inspect.getdoc(klass) or ""
        if "Args:" not in doc:
            continue
        current: list[str] = []
        for line in doc.split("Args:", 1)[1].splitlines():
            match = re.match(r"^\s{0,4}([a-z_][\w, ]*):\s*(.*)$", line)
            if match and not line.startswith(" " * 8):
                current = [n.strip() for n in match.group(1).split(",")]
                for name in current:
                    helps[name] = match.group(2).strip()
            elif line.strip() and current:
                for name in current:
                    helps[name] += " " + line.strip()
            elif not line.strip() and current:
                current = []
        for name, text in list(helps.items()):
            helps[name] = text.strip()
    return helps


def _is_list(tp) -> bool:
    if typing.get_origin(tp) is list:
        return True
    return any(typing.get_origin(a) is list for a in typing.get_args(tp))


def _describe_default(default) -> str:
    if default is MISSING:
        return "none: required"
    if is_dataclass(default):
        return type(default).__name__ + "()"
    if isinstance(default, list):
        items = [d if not is_dataclass(d) else getattr(d, "name", type(d).__name__) for d in default]
        return ",".join(map(str, items)) if items else "none"
    return "none" if default is None else str(default)


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _parameter(key: str, tp, default, help_text: str, panel: str | None = None, *, flag: str | None = None,
               hidden: bool = False, name: str | None = None, also: list[str] = ()) -> inspect.Parameter:
    """The typer parameter ``name`` (default ``key``) of option ``key``, shown as ``--flag`` (default ``--key``);
    ``also`` names TRL's flags for it in the help."""
    flag = _flag(flag or key)
    trl = f"; TRL: {', '.join(map(_flag, also))}" if also else ""
    shown = f"{short_help(help_text)} (default: {_describe_default(default)}{trl})".strip()
    metavar = type_name(tp).replace(" | None", "|none").upper()
    common = dict(show_default=False, rich_help_panel=panel, hidden=hidden)
    if tp is bool:
        option = typer.Option(None, f"{flag}/--no-{flag[2:]}", help=shown, **common)
        annotation = bool | None
    elif _is_list(tp):
        option = typer.Option(None, flag, help=shown + "; repeat the flag, or separate plain values by commas",
                              metavar=metavar, **common)
        annotation = list[str] | None
    else:
        option = typer.Option(None, flag, help=shown, metavar=metavar, **common)
        annotation = str | None
    return inspect.Parameter(name or key, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


def read_yaml(path: Path) -> dict[str, Any]:
    """Return the mapping in YAML file ``path``; ``UserError`` if it is missing, malformed or not a mapping."""
    import yaml

    try:
        loaded = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_unique_key_loader())
    except FileNotFoundError:
        raise UserError(f"--config {path}: no such file") from None
    except (IsADirectoryError, UnicodeDecodeError) as error:
        raise UserError(f"--config {path}: not a readable UTF-8 text file ({type(error).__name__})") from None
    except _DuplicateKey as error:
        raise UserError(f"--config {path}: {error}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UserError(f"--config {path}: not valid YAML ({where}{problem})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, Mapping):
        raise UserError(f"--config {path} must hold a mapping of option names to values")
    return normalize_keys(loaded, f"--config {path}")


class _DuplicateKey(Exception):
    pass


def _unique_key_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently)."""

        def construct_mapping(self, node, deep=False):
            seen: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise _DuplicateKey(f"key {key!r} is given twice (lines {seen[key]} and "
                                        f"{key_node.start_mark.line + 1}); keep one")
                seen[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep=deep)

    return Loader


def _our_names(values: Mapping[str, Any], namespace, where: str) -> dict[str, Any]:
    """Return ``values`` with TRL's and renamed keys (:data:`TRL_ALIASES`, :data:`FLAG_NAMES`) under our names."""
    renames = {alias: key for key in namespace for alias in trl_aliases(key, namespace)}
    renames |= {flag_name(key, namespace): key for key in namespace}
    out = {}
    for key, value in values.items():
        ours = renames.get(key, key)
        if ours in out:
            raise UserError(f"{where}: {key!r} and {next(k for k in values if renames.get(k, k) == ours)!r} name "
                             "the same option; give one")
        out[ours] = value
    return out


def _split_commas(values: list[str]) -> list[str]:
    """Split command-line list items on commas, except items holding ``key=value`` pairs."""
    out = []
    for value in values:
        out += [value] if "=" in value else [v.strip() for v in value.split(",") if v.strip()]
    return out


def merge(cls, cli_values: Mapping[str, Any], config_file: Path | None, extra: Mapping[str, Any] = ()
          ) -> tuple[Any, dict[str, Any]]:
    """Return ``(cls instance, extra values)`` from a YAML file's values overridden by the flags given.

    ``cli_values`` holds None for every flag not given. ``extra`` maps further accepted keys (e.g. a method's
    options) to their types; their values are returned apart, unvalidated.
    """
    given = {k: (_split_commas(v) if isinstance(v, list) else v) for k, v in cli_values.items()
             if v is not None and v != []}
    namespace = flat_fields(cls)
    from_file = read_yaml(config_file) if config_file else {}
    from_file = _our_names(from_file, {**namespace, **dict.fromkeys(extra)}, f"--config {config_file}")
    unknown = sorted(set(from_file) - set(namespace) - set(extra))
    if unknown:
        raise UserError(f"--config {config_file}: unknown key(s) {', '.join(unknown)}; valid keys: "
                         f"{', '.join(sorted(set(namespace) | set(extra)))}")
    values = {**from_file, **given}
    extras = {k: values.pop(k) for k in list(values) if k in extra and k not in namespace}
    missing = [k for k, (_, _, default) in namespace.items() if default is MISSING and k not in values]
    if missing:
        raise UserError("missing required option(s): " + ", ".join("--" + k.replace("_", "-") for k in missing)
                         + (f" (give them as flags or as keys of {config_file})" if config_file else ""))
    try:
        return from_flat(cls, values), extras
    except ValueError as error:
        in_file = sorted(k for k in from_file if k not in given and str(error).startswith(k))
        raise UserError(f"{error}" + (f" (in --config {config_file})" if in_file else "")) from None


class DEBUG:
    """``safeft --debug``: show tracebacks instead of one-line errors."""

    on = False


def command(app: typer.Typer, name: str, cls, *, help: str, extra: Mapping[str, tuple] | None = None,
            extra_help: Mapping[str, str] | None = None, yaml: bool = True, panels: Mapping[str, str] | None = None,
            epilog: str | None = None) -> Callable:
    """Register a command on ``app`` whose options are the flat fields of ``cls`` (plus ``extra``:
    ``{key: (type, default)}``); the decorated function receives ``(config instance, extra values)``.

    ``panels`` maps a flat key, or the name of the field holding it (``train``), to the help panel it is listed in
    (``extra`` options: ``Method``); ``epilog`` ends the command's help (an example)."""
    extra = dict(extra or {})
    panels = dict(panels or {})

    def decorate(run: Callable[[Any, dict], None]) -> Callable:
        helps = {**option_help(cls), **(extra_help or {})}
        namespace = flat_fields(cls)
        keys = {**namespace, **dict.fromkeys(extra)}
        options = [(k, tp, d, helps.get(path[-1], ""), panels.get(k, panels.get(path[0])))
                   for k, (path, tp, d) in namespace.items()]
        options += [(k, tp, d, helps.get(k, ""), panels.get(k, "Method" if panels else None))
                    for k, (tp, d) in extra.items()]
        if panels:  # listed in the order of PANELS, the others after them
            options.sort(key=lambda o: PANELS.index(o[4]) if o[4] in PANELS else len(PANELS))
        params = [_parameter(k, tp, d, text, panel, flag=flag_name(k, keys), also=trl_aliases(k, keys))
                  for k, tp, d, text, panel in options]
        # hidden parameters for the other names: {parameter: (key, flag, deprecated)}
        others = {f"_alias_{a}": (k, a, False) for k, *_ in options for a in trl_aliases(k, keys)}
        others |= {f"_alias_{k}": (k, k, True) for k, *_ in options if flag_name(k, keys) != k}
        types = {k: (tp, d) for k, tp, d, *_ in options}
        params += [_parameter(k, *types[k], "", flag=a, hidden=True, name=n) for n, (k, a, _) in others.items()]
        if yaml:
            params.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Path | None,
                                            default=typer.Option(None, "--config", help=CONFIG_HELP,
                                                                 rich_help_panel=panels.get("config"))))

        @functools.wraps(run)
        def invoke(**kwargs):
            config_file = kwargs.pop("config", None)
            try:
                for name, (key, flag, deprecated) in others.items():
                    value = kwargs.pop(name)
                    if value is None or value == []:
                        continue
                    if deprecated:
                        warnings.warn(f"{_flag(flag)} is deprecated: use {_flag(flag_name(key, keys))} (the same "
                                      "option)", FutureWarning, stacklevel=1)
                    if kwargs[key] is not None and kwargs[key] != []:
                        raise UserError(f"{_flag(flag)} and {_flag(flag_name(key, keys))} name the same option; "
                                        "give one")
                    kwargs[key] = value
                instance, extras = merge(cls, kwargs, config_file, {k: v[0] for k, v in extra.items()})
                run(instance, extras)
            except USER_ERRORS as error:
                if DEBUG.on:
                    raise
                typer.echo(f"Error: {error}", err=True)
                _exit_with_the_other_processes(2)
                raise typer.Exit(2) from None
            except KeyboardInterrupt:
                typer.echo("Interrupted: outputs being written were left as <out>.partial (marked INCOMPLETE)",
                           err=True)
                raise typer.Exit(130) from None
            except Exception as error:
                if DEBUG.on:
                    raise
                typer.echo(f"Error: {type(error).__name__}: {error}\nThis looks like a bug in safeft; rerun with "
                           "--debug for the traceback and report it.", err=True)
                raise typer.Exit(1) from None

        invoke.__signature__ = inspect.Signature(params)
        invoke.__annotations__ = {p.name: p.annotation for p in params}
        invoke.__doc__ = help
        app.command(name, help=help, epilog=epilog)(invoke)
        return invoke

    return decorate


def _exit_with_the_other_processes(code: int) -> None:
    """In a run of several processes that stopped together on bad input (they left their group at once,
    :func:`safeft.distributed.share_error`), exit now, as the others do: torchrun stops the processes still
    shutting down when one has exited (SIGTERM), so a slow interpreter teardown would not end with ``code``."""
    import os
    import sys

    from safeft import distributed

    if distributed.world_size() > 1 and "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and not dist.is_initialized():
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


def option_help(cls) -> dict[str, str]:
    """Return the help of every field of ``cls`` and of its nested dataclasses, by field name (the class's own
    docstring wins over a nested one's)."""
    helps = field_help(cls)
    for tp in typing.get_type_hints(cls).values():
        if is_dataclass(tp):
            helps = {**option_help(tp), **helps}
    return helps
