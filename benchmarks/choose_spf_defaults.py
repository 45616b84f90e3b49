"""Choose SPF's defaults on validation data only, one factor at a time (issue 35), by a rule written down first.

    python benchmarks/choose_spf_defaults.py benchmarks/results/validation --out benchmarks/results/spf_choices

reads the validation bench's run files (every run must be on a validation setting), decides each factor by
:data:`safeft.recipes.selection.FACTOR_RULE` and writes ``OUT.json`` (the choices and every setting's decision)
and ``OUT.md`` (per factor: the choice, why, and each setting's rule-B table). A factor whose runs have not landed
yet is listed as pending.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from safeft.errors import UserError
from safeft.io import write_json
from safeft.recipes.bench import read_runs
from safeft.recipes.selection import FACTOR_RULE, LEARNING_RATE_RULE, choose_factor, pool_learning_rates
from safeft.report import verdict_markdown
from safeft.rules import WIN_RULE


def full(run: dict) -> bool:
    """Full fine-tuning at the default budget."""
    return not run["setting"].get("lora_r") and run["setting"].get("deep", 1.0) == 1.0


def full_any_budget(run: dict) -> bool:
    """Full fine-tuning at any budget (deep fine-tuning included)."""
    return not run["setting"].get("lora_r")


# factor -> (today's default label, candidate labels, which settings decide it)
FACTORS = {
    "onset tokens": ("spf", ["spf onset=all", "spf onset=2", "spf onset=8"], full),
    "rank": ("spf", ["spf rank=32", "spf rank=128"], full),
    "norms": ("spf", ["spf norms trained"], full),
    "side (full fine-tuning)": ("spf", ["spf side=left", "spf side=two_sided"], full),
    "side (LoRA)": ("spf side=two_sided", ["spf side=left", "spf side=right"],
                    lambda r: bool(r["setting"].get("lora_r"))),
    # judged at every full fine-tuning budget: a candidate for deep fine-tuning must also hold at 1x to replace the
    # default (a refresh every 50 steps never fires in a 40-step run, so only a changed subspace is judged there)
    "deep fine-tuning": ("spf", ["spf refresh=50", "spf refresh=50 accumulate", "spf rise=0.02",
                                 "spf rise=0.02 accumulate", "spf+mix 0.05", "spf refresh=25",
                                 "spf+mix 0.05 refresh=25", "spf margin", "spf margin refresh=50",
                                 "spf samples=64", "spf margin samples=64", "spf rank=128"],
                         full_any_budget),
    # around the LoRA side the side factor chose on validation (left), not the former default two_sided
    "margin (LoRA)": ("spf side=left", ["spf side=left margin"], lambda r: bool(r["setting"].get("lora_r"))),
    "rank (LoRA)": ("spf side=left", ["spf side=left rank=128"], lambda r: bool(r["setting"].get("lora_r"))),
    "task overlap": ("spf", ["spf task=0.5", "spf task=0.2", "spf mode=directional", "spf mode=conflict",
                             "spf+mix 0.05"], full),
    "refusal replay": ("spf", ["spf+mix 0.05", "spf+mix 0.1"], full),
    # around the rank the rank and deep factors chose (128), at every full fine-tuning budget as above
    "deep fine-tuning (rank 128)": ("spf rank=128", ["spf rank=128 margin", "spf+mix 0.05 rank=128",
                                                     "spf rank=192", "spf rank=128 refresh=50",
                                                     "spf rank=128 refresh=50 accumulate",
                                                     "spf rank=128 samples=64"], full_any_budget),
    # settings that differ only in their rate are pooled first (LEARNING_RATE_RULE)
    "learning rate": ("spf", ["spf lr=0.0001", "spf lr=0.00015", "spf lr=0.0002"], full),
}


def markdown(result: dict) -> str:
    """Return the choices as markdown: the title (the result's ``title``, else SPF's defaults), the rule, one line
    per factor, then each factor's rule-B tables."""
    sft_rates = ", ".join(f"{name}: {rate or 'the bench rate'}" for name, rate in result["sft_rates"].items())
    title = result.get("title", "SPF's defaults chosen on validation data")
    lines = [f"# {title}", "", f"Command: `{result['command']}`", "",
             f"Rule: {FACTOR_RULE}", "", f"Rule B's winner: {WIN_RULE}", "",
             f"Learning rate: {LEARNING_RATE_RULE} SFT's chosen rate: {sft_rates or 'none yet'}.", "",
             "| factor | today's default | choice | why | candidates not run yet | short of the default's seeds |",
             "|---|---|---|---|---|---|"]
    for name, f in result["factors"].items():
        short = "; ".join(f"{label} ({', '.join(settings)})" for label, settings in f["short"].items())
        lines.append(f"| {name} | {f['default']} | {f['choice'] or 'pending'} | {f['why']} | "
                     f"{', '.join(f['not_run']) or '-'} | {short or '-'} |")
    for name, f in result["factors"].items():
        if f["settings"]:
            rule = f.get("rule", "B")
            tables = verdict_markdown({rule: f["settings"]})
            by = [] if rule == "B" else [f"Decided by rule {rule}: rule B excluded the default and every candidate.",
                                         ""]
            lines += ["", f"## {name}", "", *by, *tables[tables.index(f"Rule {rule}:") + 2:]]
    return "\n".join(lines) + "\n"


def validation_runs(description: str, what: str) -> tuple[argparse.Namespace, list[dict], list[dict]]:
    """Parse the command line (a validation bench directory, ``--out``) and return ``(args, aligned, runs)``;
    raise ``UserError`` if any run is not on a validation setting (``what`` names what is being chosen)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("bench", help="validation bench directory (run files under BENCH/runs)")
    parser.add_argument("--out", required=True, help="output path without extension (.json and .md are written)")
    args = parser.parse_args()
    aligned, runs = read_runs(args.bench)
    off = sorted({r["setting"]["name"] for r in runs if not r["setting"].get("validation")})
    if off:
        raise UserError(f"{args.bench}: settings {', '.join(off)} are not on validation data; {what} are chosen on "
                        "validation settings only")
    return args, aligned, runs


def write_choices(out: str, result: dict) -> None:
    """Write ``result`` to ``OUT.json`` and its :func:`markdown` to ``OUT.md``."""
    write_json(Path(out).with_suffix(".json"), result)
    Path(out).with_suffix(".md").write_text(markdown(result))


def main() -> None:
    args, aligned, runs = validation_runs(__doc__.split("\n")[0], "SPF's defaults")
    by_rate, sft_rates = pool_learning_rates(runs)
    result = {"command": "python " + " ".join(sys.argv), "rule": FACTOR_RULE, "learning_rate_rule": LEARNING_RATE_RULE,
              "sft_rates": sft_rates, "factors": {}}
    for name, (default, options, keep) in FACTORS.items():
        factor_runs = by_rate if name == "learning rate" else runs
        chosen = choose_factor([r for r in factor_runs if keep(r)], aligned, default, options)
        not_run = [o for o in options if not any(r["label"] == o and keep(r) for r in factor_runs)]
        result["factors"][name] = {"default": default, "candidates": options, "not_run": not_run, **chosen}
        print(f"{name}: {chosen['choice'] or 'pending'} - {chosen['why']}" + (f" ({len(not_run)} of "
              f"{len(options)} candidates not run yet)" if not_run else "")
              + (f" ({len(chosen['short'])} short of the default's seeds)" if chosen["short"] else ""))
    write_choices(args.out, result)


if __name__ == "__main__":
    main()
