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
from collections.abc import Callable, Mapping
from dataclasses import MISSING, is_dataclass
from pathlib import Path
from typing import Any

import typer

from safeft.config import flat_fields, from_flat, normalize_keys, type_name
from safeft.errors import USER_ERRORS, UserError

CONFIG_HELP = "YAML file of option values (keys are the option names with underscores); flags on the line win."


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


def _parameter(key: str, tp, default, help_text: str) -> inspect.Parameter:
    flag = "--" + key.replace("_", "-")
    shown = f"{help_text.replace('``', '')} (default: {_describe_default(default)})".strip()
    metavar = type_name(tp).replace(" | None", "|none").upper()
    if tp is bool:
        option = typer.Option(None, f"{flag}/--no-{key.replace('_', '-')}", help=shown, show_default=False)
        annotation = bool | None
    elif _is_list(tp):
        option = typer.Option(None, flag, help=shown + "; repeat the flag, or separate plain values by commas",
                              show_default=False, metavar=metavar)
        annotation = list[str] | None
    else:
        option = typer.Option(None, flag, help=shown, show_default=False, metavar=metavar)
        annotation = str | None
    return inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


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
    from_file = read_yaml(config_file) if config_file else {}
    namespace = flat_fields(cls)
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
            extra_help: Mapping[str, str] | None = None, yaml: bool = True) -> Callable:
    """Register a command on ``app`` whose options are the flat fields of ``cls`` (plus ``extra``:
    ``{key: (type, default)}``); the decorated function receives ``(config instance, extra values)``."""
    extra = dict(extra or {})

    def decorate(run: Callable[[Any, dict], None]) -> Callable:
        helps = {**option_help(cls), **(extra_help or {})}
        params = [_parameter(k, tp, d, helps.get(path[-1], "")) for k, (path, tp, d) in flat_fields(cls).items()]
        params += [_parameter(k, tp, d, helps.get(k, "")) for k, (tp, d) in extra.items()]
        if yaml:
            params.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Path | None,
                                            default=typer.Option(None, "--config", help=CONFIG_HELP)))

        @functools.wraps(run)
        def invoke(**kwargs):
            config_file = kwargs.pop("config", None)
            try:
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
        app.command(name, help=help)(invoke)
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
