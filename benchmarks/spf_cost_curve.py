"""Protection against cost: SPF's harmful score against the number of directions it guards, from a bench.

    python benchmarks/spf_cost_curve.py benchmarks/results/spf_cost_validation

Reads the bench's run files (``safeft bench``; SPF runs record ``method_facts.subspace_directions`` and
``subspace_fraction``), pools each SPF candidate's seeds per setting (rates with 95% Wilson intervals) and writes
``cost_curve.json``, ``cost_curve.md`` and ``cost_curve.png`` into the bench folder: harmful score (and accuracy)
against guarded directions, one line per setting, with SFT and the aligned model as reference levels.

It also applies the rule the validation grid was written with (``--reference spf --tolerance 1``): the candidate
with the smallest subspace whose pooled harmful score is at most ``tolerance`` points above the reference's in every
setting, at accuracy at most ``tolerance`` points below it, is chosen; ``choice`` in the JSON names it with every
candidate's verdict, or names the reference when none qualifies.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safeft.recipes.selection import choose_smallest_subspace, cost_curve


def to_markdown(result: dict) -> str:
    lines = [f"Protection against subspace size, from `{result['bench']}` (keyword judge; rates pooled over seeds)."]
    for setting, entry in result["settings"].items():
        lines += ["", f"**{setting}**" + (f" (SFT: harmful {entry['sft']['harmful_score']['rate']:.1f}%)"
                                          if entry["sft"] else ""), "",
                  "| SPF candidate | seeds | directions | subspace share | harmful score % [95% CI] | accuracy % | "
                  "task loss |", "|---|---|---|---|---|---|---|"]
        for p in entry["points"]:
            h, a = p["harmful_score"], p["accuracy"]
            lines.append(f"| {p['label']} | {','.join(map(str, p['seeds']))} | {p['directions']:,.0f} | "
                         f"{100 * p['subspace_fraction']:.2f}% | {h['rate']:.1f} [{h['ci'][0]:.0f}, {h['ci'][1]:.0f}] "
                         f"| {'-' if a is None else format(a['rate'], '.1f')} | "
                         f"{'-' if p['task_loss'] is None else format(p['task_loss'], '.3f')} |")
    if "choice" in result:
        c = result["choice"]
        none = " (no smaller candidate qualifies)." if c["chosen"] == c["reference"] else "."
        lines += ["", f"Rule: the smallest subspace within {c['tolerance']:g} point(s) of `{c['reference']}`'s "
                  "harmful score (not above it by more) and accuracy (not below it by more) in every setting. "
                  f"**Chosen: `{c['chosen']}`**{none}", ""]
        lines += [f"- `{label}`: {verdict}" for label, verdict in c["verdicts"].items()]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    highest: dict[str, tuple[float, float]] = {}
    for i, (setting, entry) in enumerate(result["settings"].items()):
        color = f"C{i}"
        xs = [p["directions"] for p in entry["points"]]
        ys = [p["harmful_score"]["rate"] for p in entry["points"]]
        low = [max(y - p["harmful_score"]["ci"][0], 0) for y, p in zip(ys, entry["points"])]
        high = [max(p["harmful_score"]["ci"][1] - y, 0) for y, p in zip(ys, entry["points"])]
        ax.errorbar(xs, ys, yerr=[low, high], fmt="o", color=color, capsize=3, label=f"SPF, {setting}")
        for x, y, p in zip(xs, ys, entry["points"]):  # one label per candidate, at its highest point
            if y >= highest.get(p["label"], (0, -1))[1]:
                highest[p["label"]] = (x, y)
        if entry["sft"]:
            ax.axhline(entry["sft"]["harmful_score"]["rate"], color=color, linestyle="--", linewidth=1,
                       label=f"SFT, {setting}")
    for label, (x, y) in highest.items():
        ax.annotate(label.removeprefix("spf").strip() or "default", (x, y), fontsize=7, textcoords="offset points",
                    xytext=(4, 4))
    if result["aligned_harmful_score"]:
        ax.axhline(result["aligned_harmful_score"]["rate"], color="gray", linestyle=":", label="aligned model")
    ax.set_xscale("log")
    ax.set_xlabel("guarded directions (ranks summed over matrices)")
    ax.set_ylabel("harmful score % (95% CI)")
    ax.set_title("SPF: protection against subspace size")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bench_dir", type=Path)
    parser.add_argument("--reference", default="spf", help="the label of today's default among the bench's methods")
    parser.add_argument("--tolerance", type=float, default=1.0, help="points of harmful score and accuracy")
    args = parser.parse_args()
    result = cost_curve(args.bench_dir)
    if not result["settings"]:
        raise SystemExit(f"{args.bench_dir}: no SPF run records its subspace size (method_facts); rerun the bench "
                         "with this safeft")
    try:
        result["choice"] = choose_smallest_subspace(result, args.reference, args.tolerance)
    except ValueError as error:
        raise SystemExit(f"{args.bench_dir}: {error}; name the default's label with --reference") from None
    (args.bench_dir / "cost_curve.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.bench_dir / "cost_curve.md").write_text(to_markdown(result))
    plot(result, args.bench_dir / "cost_curve.png")
    print(to_markdown(result))


if __name__ == "__main__":
    main()
