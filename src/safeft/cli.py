"""The ``safeft`` command line: the top level (``--version``, ``--debug``, ``--quiet``) and the list of commands.

The commands themselves are in :mod:`safeft.commands`, which imports torch and the method registry; this module
imports it only when a command runs or shows its own help, so ``safeft --version`` and ``safeft --help`` answer at
once. Names of :mod:`safeft.commands` (``FinetuneCommand``, ...) are reachable from here too.
"""

from __future__ import annotations

import click
import typer
from typer.core import TyperGroup

from safeft.options import DEBUG
from safeft.progress import Quiet

# name -> the one line `safeft --help` shows (a test checks it against each command's own help)
COMMANDS = {
    "align": "Align a model: SFT on harmful -> varied refusals plus benign -> its own answers (cached).",
    "finetune": "Fine-tune a model on a task (optionally with a harmful mix) with any registered method.",
    "methods": "List the registered methods, or one method's options with their defaults.",
    "eval": "Evaluate harmful score, over-refusal, task accuracy and safety loss (rates with 95% Wilson "
            "intervals).",
    "gcg": "Attack a model with GCG suffixes (Zou et al. 2023) toward AdvBench targets; apply the suffixes to "
           "other models with `safeft eval --suffixes`.",
    "bench": "Run a grid of methods x settings x seeds (resumable: finished runs are skipped) and summarise it in "
             "bench.json, bench.md, bench.png.",
    "demo": "Align (cached) -> fine-tune with SFT and SPF on a 10% harmful mix -> evaluate -> report; --smoke "
            "checks the install on a tiny random model in a minute; --full adds benign data and SPF's random-basis "
            "control (a bench with the demo grid).",
    "subspace": "Estimate and inspect safety subspaces.",
    "analyze": "Measure the paper's three findings (low rank, conflict, one sample is enough) on a model.",
}


class LazyGroup(TyperGroup):
    """A typer group whose commands are built from :mod:`safeft.commands` on first use; listing them in the
    group's help needs only :data:`COMMANDS`."""

    _listing = False
    _loaded: click.Group | None = None

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        if self._listing:
            return click.Command(name, help=COMMANDS[name], short_help=COMMANDS[name])
        if LazyGroup._loaded is None:
            from safeft.commands import app as commands

            LazyGroup._loaded = typer.main.get_command(commands)
        return LazyGroup._loaded.get_command(ctx, name)

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


app = typer.Typer(cls=LazyGroup, help="Fine-tune safety-aligned LLMs without losing their safety (SPF).",
                  no_args_is_help=True,
                  epilog="Example: safeft finetune --model MODEL_DIR --out runs/spf --method spf. "
                         "`safeft COMMAND --help` shows a command's options.")


def _version(value: bool) -> None:
    if value:
        from safeft import __version__

        typer.echo(f"safeft {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit."),
         debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error."),
         quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or library messages; results "
                                                                 "and errors only."),
         verbose: bool = typer.Option(False, "--verbose", "-v", help="Also show transformers' and peft's info "
                                                                     "messages.")) -> None:
    """safeft: Safety-Preserving Fine-Tuning."""
    DEBUG.on = debug
    Quiet.on = False
    if quiet and verbose:
        raise typer.BadParameter("--quiet and --verbose exclude each other")
    if quiet or verbose:
        import logging

        from transformers.utils import logging as hf_logging

        if quiet:
            Quiet.on = True
            hf_logging.disable_progress_bar()
        level = logging.ERROR if quiet else logging.INFO
        hf_logging.set_verbosity(level)
        logging.getLogger("peft").setLevel(level)


def __getattr__(name: str):
    # `from safeft.cli import FinetuneCommand` and the like: the commands' names, imported on first use
    if name.startswith("__"):
        raise AttributeError(name)
    from safeft import commands

    try:
        return getattr(commands, name)
    except AttributeError:
        raise AttributeError(f"module 'safeft.cli' has no attribute {name!r}") from None
