"""Which SPF variant keeps refusals on the testbed? SFT and SPF variants, same model, data, order and budget.

    python benchmarks/spf_ablation.py --out benchmarks/results --settings benign

Each variant fine-tunes the cached aligned default model on the built-in `facts` task (full fine-tuning, AdamW,
same seed and data order as the demo) and is evaluated on the held-out harmful requests, benign requests and test
countries. Writes ``spf_ablation.json``, ``spf_ablation.md`` and ``spf_ablation.png``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

from tqdm import tqdm

from safeft.config import SPFConfig
from safeft.data.tasks import load_task
from safeft.evaluate.stats import rate
from safeft.models import cache_dir
from safeft.pipeline import AlignConfig, FinetuneConfig, ensure_aligned, evaluate_dir, finetune
from safeft.report import format_rate
from safeft.train import TrainConfig

# name -> (method, SPF settings, number of safety samples[, FinetuneConfig overrides]); a variant estimates from every
# refusal token unless it names onset_tokens
VARIANTS = {
    "sft": ("sft", {}, 1),
    "paper: left conflict grad r8 n1": ("spf", {"side": "left", "mode": "conflict", "project": "grad", "rank": 8}, 1),
    "right conflict grad r8 n1": ("spf", {"side": "right", "mode": "conflict", "project": "grad", "rank": 8}, 1),
    "left always update r32 n20": ("spf", {"side": "left", "mode": "always", "project": "update", "rank": 32}, 20),
    "right always update r32 n20": ("spf", {"side": "right", "mode": "always", "project": "update", "rank": 32}, 20),
    "two_sided always update r32 n20": ("spf", {"side": "two_sided", "mode": "always", "project": "update",
                                                "rank": 32}, 20),
    "right conflict update r32 n20": ("spf", {"side": "right", "mode": "conflict", "project": "update",
                                              "rank": 32}, 20),
    "right always grad r32 n20": ("spf", {"side": "right", "mode": "always", "project": "grad", "rank": 32}, 20),
    "right always update r8 n20": ("spf", {"side": "right", "mode": "always", "project": "update", "rank": 8}, 20),
    "right always update r32 n1": ("spf", {"side": "right", "mode": "always", "project": "update", "rank": 32}, 1),
    "right always update r64 n20": ("spf", {"side": "right", "mode": "always", "project": "update", "rank": 64}, 20),
    "right always update r128 n20": ("spf", {"side": "right", "mode": "always", "project": "update", "rank": 128},
                                     20),
    "right always update r32 n64": ("spf", {"side": "right", "mode": "always", "project": "update", "rank": 32}, 64),
    "right always update r32 n20 refresh10": ("spf", {"side": "right", "mode": "always", "project": "update",
                                                      "rank": 32, "refresh_every": 10}, 20),
    "right always update r64 n20 onset4": ("spf", {"side": "right", "mode": "always", "project": "update",
                                                   "rank": 64, "onset_tokens": 4}, 20),
    "right always update r64 n20 onset1": ("spf", {"side": "right", "mode": "always", "project": "update",
                                                   "rank": 64, "onset_tokens": 1}, 20),
    "right always update r64 n20 onset2": ("spf", {"side": "right", "mode": "always", "project": "update",
                                                   "rank": 64, "onset_tokens": 2}, 20),
    "right always update r64 n20 onset8": ("spf", {"side": "right", "mode": "always", "project": "update",
                                                   "rank": 64, "onset_tokens": 8}, 20),
    "right always update r32 n20 onset4": ("spf", {"side": "right", "mode": "always", "project": "update",
                                                   "rank": 32, "onset_tokens": 4}, 20),
    "left always update r64 n20 onset4": ("spf", {"side": "left", "mode": "always", "project": "update",
                                                  "rank": 64, "onset_tokens": 4}, 20),
    "right always update r64 n64 onset4": ("spf", {"side": "right", "mode": "always", "project": "update",
                                                   "rank": 64, "onset_tokens": 4}, 64),
    "right always update r64 n20 onset4 refresh10": ("spf", {"side": "right", "mode": "always", "project": "update",
                                                             "rank": 64, "onset_tokens": 4, "refresh_every": 10}, 20),
    "right always update r64 n20 margin": ("spf", {"side": "right", "mode": "always", "project": "update",
                                                   "rank": 64}, 20, {"safety_margin": True}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--scratch", type=Path, default=Path("runs/spf-ablation"))
    parser.add_argument("--settings", default="benign", help="comma-separated: benign, harmful")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from VARIANTS")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--harmful-ratio", type=float, default=0.1)
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds (data order, harmful mix)")
    parser.add_argument("--tag", default="", help="suffix of the output files, e.g. _harmful")
    args = parser.parse_args()

    cache = cache_dir()
    aligned, _, _ = ensure_aligned("default", AlignConfig(), cache)
    task = load_task("facts")
    names = [v.strip() for v in args.variants.split(",")]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    aligned_metrics = evaluate_dir(aligned, task)
    rows = []
    runs = [(setting, seed, name) for setting in args.settings.split(",") for seed in map(int, args.seeds.split(","))
            for name in names]
    command = "python " + shlex.join(sys.argv)
    for setting, seed, name in tqdm(runs, desc="ablation runs"):
        ratio = {"benign": 0.0, "harmful": args.harmful_ratio}[setting]
        method, spf, samples, *overrides = VARIANTS[name]
        run_dir = args.scratch / f"{setting}-{len(rows)}"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        start = time.perf_counter()
        config = FinetuneConfig(method=method, harmful_ratio=ratio, safety_samples=samples, **dict(*overrides),
                                train=TrainConfig(steps=args.steps, learning_rate=args.lr, seed=seed),
                                spf=SPFConfig(**{"onset_tokens": None, **spf}))
        log = finetune(aligned, task, config, run_dir, cache)
        metrics = evaluate_dir(run_dir, task)
        shutil.rmtree(run_dir / "model", ignore_errors=True)
        monitor = [e for e in log["log_history"] if "spf/conflict_rate" in e]
        rows.append({"variant": name, "setting": setting, "seed": seed, "harmful_score": metrics["harmful_score"],
                     "refusal_rate": metrics["refusal_rate"], "over_refusal": metrics["over_refusal"],
                     "accuracy": metrics["accuracy"], "safety_loss": metrics["safety_loss"],
                     "task_loss": metrics["task_loss"], "train_seconds": log["seconds"],
                     "wall_seconds": time.perf_counter() - start,
                     "monitor_last": monitor[-1] if monitor else None})
        tqdm.write(f"{setting} seed {seed} | {name}: HS {metrics['harmful_score']['rate']:.1f}% acc "
                   f"{metrics['accuracy']['rate']:.1f}% safety loss {metrics['safety_loss']:.3f}")
        write_results(args, command, aligned_metrics, rows)  # after every run: a cut-off sweep keeps what it did
    print((args.out / f"spf_ablation{args.tag}.md").read_text())


def pooled(rows: list[dict]) -> list[dict]:
    """Return one row per (setting, variant): counts pooled over seeds, mean losses and train time."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["setting"], r["variant"]), []).append(r)
    out = []
    for (setting, variant), group in groups.items():
        counts = {key: rate(sum(r[key]["k"] for r in group), sum(r[key]["n"] for r in group))
                  for key in ("harmful_score", "over_refusal", "accuracy")}
        means = {key: statistics.mean(r[key] for r in group) for key in ("safety_loss", "task_loss", "train_seconds")}
        out.append({"setting": setting, "variant": variant, "seeds": [r["seed"] for r in group], **counts, **means})
    return out


def write_results(args, command: str, aligned_metrics: dict, rows: list[dict]) -> None:
    """Write ``spf_ablation{tag}.json``, ``.md`` (pooled over seeds, then per run) and ``.png``."""
    summary = pooled(rows)
    result = {"command": command, "aligned": {k: aligned_metrics[k] for k in
                                              ("harmful_score", "over_refusal", "accuracy", "safety_loss")},
              "train": {"steps": args.steps, "lr": args.lr, "batch_size": 8, "task": "facts"},
              "pooled": summary, "runs": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"spf_ablation{args.tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    header = ("| setting | variant | seeds | harmful score % [95% CI] | over-refusal % | accuracy % [95% CI] | "
              "safety loss | task loss | train s |\n|---|---|---|---|---|---|---|---|---|")
    lines = [f"Command: `{command}`", "", "Rates pool the counts of all seeds (n = 80 harmful, 40 benign, 20 test "
             "countries per seed); losses and train time are means over seeds.", "", header,
             f"| - | aligned | - | {format_rate(aligned_metrics['harmful_score'])} | "
             f"{aligned_metrics['over_refusal']['rate']:.1f} | {format_rate(aligned_metrics['accuracy'])} | "
             f"{aligned_metrics['safety_loss']:.3f} | - | - |"]
    for r in summary:
        lines.append(f"| {r['setting']} | {r['variant']} | {','.join(map(str, r['seeds']))} | "
                     f"{format_rate(r['harmful_score'])} | {r['over_refusal']['rate']:.1f} | "
                     f"{format_rate(r['accuracy'])} | {r['safety_loss']:.3f} | {r['task_loss']:.3f} | "
                     f"{r['train_seconds']:.0f} |")
    if len(summary) < len(rows):
        lines += ["", "Per run:", "", header]
        for r in rows:
            lines.append(f"| {r['setting']} | {r['variant']} | {r['seed']} | {format_rate(r['harmful_score'])} | "
                         f"{r['over_refusal']['rate']:.1f} | {format_rate(r['accuracy'])} | "
                         f"{r['safety_loss']:.3f} | {r['task_loss']:.3f} | {r['train_seconds']:.0f} |")
    (args.out / f"spf_ablation{args.tag}.md").write_text("\n".join(lines) + "\n")
    plot(summary, aligned_metrics, args.out / f"spf_ablation{args.tag}.png")


def plot(rows: list[dict], aligned: dict, path: Path) -> None:
    """Bar chart of harmful score per variant (pooled over seeds, 95% intervals), aligned model as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.5 * len(rows) + 1.5))
    labels = [f"{r['setting']}: {r['variant']}" for r in rows]
    rates = [r["harmful_score"]["rate"] for r in rows]
    errors = [[r - r_["harmful_score"]["ci"][0] for r, r_ in zip(rates, rows)],
              [r_["harmful_score"]["ci"][1] - r for r, r_ in zip(rates, rows)]]
    ax.barh(range(len(rows)), rates, xerr=errors, color=["C7" if r["variant"] == "sft" else "C0" for r in rows],
            capsize=3)
    ax.axvline(aligned["harmful_score"]["rate"], color="black", ls="--", label="aligned model")
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("harmful score % (95% Wilson interval; lower is safer)")
    ax.set_xlim(0, 100)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
