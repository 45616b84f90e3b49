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

from safeft.recipes.selection import OPTIONS_RULE, candidates, choose_options


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
    chosen = choose_options(rows)
    command = "python " + " ".join(sys.argv)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "rule": OPTIONS_RULE,
                                                    "chosen": chosen}, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(chosen, rows, command))
    for method, c in chosen.items():
        print(f"{method}: {c['label']} - {c['why']}")


if __name__ == "__main__":
    main()
