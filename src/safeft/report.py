"""Tables and plots of results: markdown for people, PNG for the harmful-score vs accuracy picture."""

from __future__ import annotations

from pathlib import Path


def format_rate(entry: dict | None) -> str:
    """Return ``"rate [lo, hi]"`` for a rate dict from ``safeft.evaluate.stats.rate`` (``"n/a"`` for None)."""
    if not entry:
        return "n/a"
    lo, hi = entry["ci"]
    return f"{entry['rate']:.1f} [{lo:.0f}, {hi:.0f}]"


def _loss(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def demo_table(aligned: dict, runs: list[dict]) -> str:
    """Return a markdown table: one row for the aligned model and one per (setting, method) run."""
    lines = ["| model | setting | harmful score % [95% CI] | refusal % | off-task % | over-refusal % | "
             "accuracy % [95% CI] | safety loss | task loss |", "|---|---|---|---|---|---|---|---|---|"]

    def row(name: str, setting: str, m: dict) -> str:
        return (f"| {name} | {setting} | {format_rate(m['harmful_score'])} | {m['refusal_rate']['rate']:.1f} | "
                f"{m['off_task_rate']['rate']:.1f} | {format_rate(m['over_refusal'])} | "
                f"{format_rate(m['accuracy'])} | {_loss(m['safety_loss'])} | {_loss(m['task_loss'])} |")

    lines.append(row("aligned", "-", aligned))
    lines += [row(r["method"].upper(), r["setting"], r["metrics"]) for r in runs]
    return "\n".join(lines) + "\n"


def plot_demo(aligned: dict, runs: list[dict], path: str | Path) -> Path:
    """Draw harmful score against accuracy (with 95% intervals) per method and setting; return the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    markers = {"sft": "o", "spf": "s"}
    colours = {}
    points = [("aligned", "-", aligned)] + [(r["method"], r["setting"], r["metrics"]) for r in runs]
    for method, setting, m in points:
        if m["accuracy"] is None:
            continue
        colour = colours.setdefault(setting, f"C{len(colours)}")
        x, y = m["accuracy"]["rate"], m["harmful_score"]["rate"]
        ax.errorbar(x, y, xerr=[[x - m["accuracy"]["ci"][0]], [m["accuracy"]["ci"][1] - x]],
                    yerr=[[y - m["harmful_score"]["ci"][0]], [m["harmful_score"]["ci"][1] - y]],
                    fmt=markers.get(method, "*"), color="black" if method == "aligned" else colour, capsize=3,
                    markersize=9, label=f"{method.upper() if method != 'aligned' else 'aligned'}"
                                         f"{'' if setting == '-' else ', ' + setting}")
    ax.set_xlabel("task accuracy (%)")
    ax.set_ylabel("harmful score (%)  (lower is safer)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title("Harmful score vs task accuracy, 95% Wilson intervals")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
