"""Choose each method's options from validation benches, by one rule written down before the results.

Rule (``safeft.recipes.selection.OPTIONS_RULE``): among a method's candidates, those that pass rule B's gates
(accuracy within 1 point of ``sft``'s, over-refusal at most the aligned model's + 5 points), the lowest mean harmful
score over seeds; rule A's gate alone where none passes B's. Only validation settings are read (``validation:
true``: validation-split harmful requests, held-out training examples), so no evaluation prompt or test example
decides an option.

    python benchmarks/select_options.py benchmarks/results/baselines_validation \
        benchmarks/results/baselines_validation_lora --out benchmarks/results/baselines_selection

writes ``OUT.json`` (per method: the chosen label and options, and every candidate's numbers) and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safeft.recipes.selection import OPTIONS_RULE, choose_options, validation_runs


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}%"


def markdown(chosen: dict[str, dict], command: str) -> str:
    """Return the selection as markdown: sft's row per setting, then every method's candidates (means over the
    seeds listed; the chosen one in bold, a gate's reason where one excluded it), then one line per choice."""
    lines = ["# Options chosen on validation data", "", f"Command: `{command}`", "", f"Rule: {OPTIONS_RULE}", "",
             "| method | candidate | setting | seeds | val harmful score | val accuracy | val over-refusal | "
             "task loss | chosen | excluded because |", "|---|---|---|---|---|---|---|---|---|---|"]

    def line(method: str, r: dict, mark: str) -> str:
        seeds = ",".join(str(s) for s in r.get("seeds") or [])
        loss = "-" if r.get("task_loss") is None else f"{r['task_loss']:.3f}"
        return (f"| {method} | {r['label']} | {r['setting']} | {seeds} | {_rate(r['harmful_score'])} | "
                f"{_rate(r['accuracy'])} | {_rate(r.get('over_refusal'))} | {loss} | {mark} | {r.get('why') or ''} |")

    references = {(r["setting"], r["label"]): r for c in chosen.values() for r in c.get("reference", {}).values()}
    lines += [line("sft", r, "") for _, r in sorted(references.items())]
    for method, c in chosen.items():
        lines += [line(method, r, "**yes**" if r["label"] == c["label"] else "")
                  for r in sorted(c["candidates"], key=lambda r: (r["label"], r["setting"]))]
    lines += ["", *[f"- `{m}`: {c['label']} ({c['why']})" for m, c in chosen.items()], ""]
    return "\n".join(lines)


def main() -> None:
    import sys

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("benches", nargs="+", help="validation bench directories")
    parser.add_argument("--out", required=True, help="output path without extension (.json and .md are written)")
    parser.add_argument("--methods", default="", help="comma-separated registry names to choose for (default: all "
                        "but sft), e.g. to leave spf to benchmarks/choose_spf_defaults.py")
    parser.add_argument("--settings", default="", help="comma-separated setting names to read (default: all), e.g. "
                        "to leave out a learning-rate grid of the same bench")
    args = parser.parse_args()
    aligned, runs = validation_runs(args.benches)
    if args.methods:
        keep = {"sft", *args.methods.split(",")}
        runs = [r for r in runs if r["method"] in keep]
    if args.settings:
        runs = [r for r in runs if r["setting"]["name"] in args.settings.split(",")]
    chosen = choose_options(runs, aligned)
    command = "python " + " ".join(sys.argv)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "rule": OPTIONS_RULE,
                                                    "chosen": chosen}, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(chosen, command))
    for method, c in chosen.items():
        print(f"{method}: {c['label']} - {c['why']}")


if __name__ == "__main__":
    main()
