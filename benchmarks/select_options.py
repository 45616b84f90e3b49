"""Choose each method's options from validation benches, by one rule written down before the results.

Rule: among a method's candidates (the runs of that registry name), keep those whose validation accuracy is within
1 point of ``sft``'s in the same setting (or above it), and take the lowest validation harmful score; ties go to
the lower task loss. If no candidate keeps the accuracy, take the most accurate one and say so. Only validation
settings are read (``validation: true``: validation-split harmful requests, held-out training examples), so no
evaluation prompt or test example decides an option.

    python benchmarks/select_options.py benchmarks/results/baselines_validation \
        benchmarks/results/baselines_validation_lora --out benchmarks/results/baselines_selection

writes ``OUT.json`` (per method: the chosen label and options, and every candidate's numbers) and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safeft.recipes.bench import ACCURACY_SLACK, read_runs  # the points of accuracy a defence may lose against sft


def candidates(bench_dirs: list[str]) -> list[dict]:
    """Return one row per validation run: method, label, options, setting, and its validation numbers."""
    rows = []
    for bench_dir in bench_dirs:
        for run in read_runs(bench_dir)[1]:
            if not run["setting"].get("validation"):
                raise ValueError(f"{bench_dir}: run {run['label']} is not on validation data; options are chosen "
                                 "on validation settings only")
            h = run["headline"]
            rows.append({"method": run["method"], "label": run["label"], "options": run["method_options"],
                         "setting": run["setting"]["name"], "seed": run["seed"], "harmful_score": h["harmful_score"],
                         "accuracy": h["accuracy"], "task_loss": h["task_loss"]})
    return rows


def choose(rows: list[dict]) -> dict[str, dict]:
    """Return, per method other than sft, the chosen candidate and why (see the module docstring)."""
    sft = {r["setting"]: r for r in rows if r["method"] == "sft"}
    chosen = {}
    for method in sorted({r["method"] for r in rows} - {"sft"}):
        pool = [r for r in rows if r["method"] == method]
        reference = {r["setting"]: sft[r["setting"]]["accuracy"] for r in pool if r["setting"] in sft}
        if len(reference) < len({r["setting"] for r in pool}):
            raise ValueError(f"{method}: no sft run in its setting to compare accuracy with")
        keep = [r for r in pool if r["accuracy"] >= reference[r["setting"]] - ACCURACY_SLACK]
        if keep:
            best = min(keep, key=lambda r: (r["harmful_score"], r["task_loss"]))
            why = (f"lowest validation harmful score ({best['harmful_score']:.1f}%) among {len(keep)} of {len(pool)} "
                   f"candidates within {ACCURACY_SLACK:g} point of sft's accuracy ({reference[best['setting']]:.1f}%)")
        else:
            best = max(pool, key=lambda r: (r["accuracy"], -r["harmful_score"]))
            why = (f"no candidate within {ACCURACY_SLACK:g} point of sft's accuracy; the most accurate "
                   f"({best['accuracy']:.1f}% vs sft {reference[best['setting']]:.1f}%)")
        chosen[method] = {"label": best["label"], "options": best["options"], "why": why, "candidates": pool}
    return chosen


def markdown(chosen: dict[str, dict], rows: list[dict], command: str) -> str:
    """Return the selection as a markdown table (every candidate, the chosen ones in bold)."""
    lines = ["# Options chosen on validation data", "", f"Command: `{command}`", "",
             "| method | candidate | setting | val harmful score | val accuracy | task loss | chosen |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["method"] != "sft", r["method"], r["label"])):
        mark = "**yes**" if chosen.get(r["method"], {}).get("label") == r["label"] else ""
        lines.append(f"| {r['method']} | {r['label']} | {r['setting']} | {r['harmful_score']:.1f}% | "
                     f"{r['accuracy']:.1f}% | {r['task_loss']:.3f} | {mark} |")
    lines += ["", *[f"- `{m}`: {c['label']} ({c['why']})" for m, c in chosen.items()], ""]
    return "\n".join(lines)


def main() -> None:
    import sys

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("benches", nargs="+", help="validation bench directories")
    parser.add_argument("--out", required=True, help="output path without extension (.json and .md are written)")
    args = parser.parse_args()
    rows = candidates(args.benches)
    chosen = choose(rows)
    command = "python " + " ".join(sys.argv)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "rule": __doc__.split("\n\n")[1],
                                                    "chosen": chosen}, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(chosen, rows, command))
    for method, c in chosen.items():
        print(f"{method}: {c['label']} - {c['why']}")


if __name__ == "__main__":
    main()
