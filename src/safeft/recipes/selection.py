"""Rules that choose from bench results: each method's options from validation runs, and the cheapest SPF
subspace that protects as well as the default. Benchmark scripts (``benchmarks/select_options.py``,
``benchmarks/spf_cost_curve.py``) print and plot what these return."""

from __future__ import annotations

import statistics
from pathlib import Path

from safeft.recipes.bench import ACCURACY_SLACK, pooled, read_runs

OPTIONS_RULE = ("Among a method's candidates (the runs of that registry name), keep those whose validation accuracy "
                "is within 1 point of sft's in the same setting (or above it), and take the lowest validation harmful "
                "score; ties go to the lower task loss. If no candidate keeps the accuracy, take the most accurate "
                "one and say so. Only validation settings are read (validation: true), so no evaluation prompt or "
                "test example decides an option.")


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


def choose_options(rows: list[dict]) -> dict[str, dict]:
    """Return, per method other than sft, the chosen candidate and why, by :data:`OPTIONS_RULE`; ``rows`` are
    :func:`candidates`'."""
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


def cost_curve(bench_dir: str | Path) -> dict:
    """Return ``{"settings": {name: {"sft": row, "aligned": rate, "points": [...]}}}`` from a bench's run files;
    each point is an SPF label with its median directions and subspace share and its pooled rates."""
    aligned, runs = read_runs(bench_dir)
    rows = {(r["setting"], r["label"]): r for r in pooled(runs)}
    facts: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        if run.get("method_facts", {}).get("subspace_directions") is not None:
            facts.setdefault((run["setting"]["name"], run["label"]), []).append(run["method_facts"])
    settings: dict[str, dict] = {}
    for (setting, label), found in sorted(facts.items()):
        row = rows[(setting, label)]
        entry = settings.setdefault(setting, {"sft": None, "points": []})
        entry["points"].append({
            "label": label, "seeds": row["seeds"],
            "directions": statistics.median(f["subspace_directions"] for f in found),
            "subspace_fraction": statistics.median(f["subspace_fraction"] for f in found),
            "harmful_score": row["harmful_score"], "accuracy": row["accuracy"], "task_loss": row["task_loss"]})
    for setting, entry in settings.items():
        entry["points"].sort(key=lambda p: p["directions"])
        sft = rows.get((setting, "sft"))
        entry["sft"] = {"harmful_score": sft["harmful_score"], "accuracy": sft["accuracy"]} if sft else None
    # the aligned model's harmful score does not depend on the task: its requests are the same in every setting
    aligned_scores = [a["metrics"]["harmful_score"] for a in aligned if a["metrics"].get("harmful_score")]
    return {"bench": str(bench_dir), "settings": settings,
            "aligned_harmful_score": aligned_scores[0] if aligned_scores else None}


def choose_smallest_subspace(result: dict, reference: str = "spf", tolerance: float = 1.0) -> dict:
    """Return ``{"chosen": label, "reference": label, "tolerance": points, "verdicts": {label: reason}}``: the
    candidate with the smallest subspace share (ties: fewer directions) that, in every setting of ``result``,
    has a harmful score at most ``tolerance`` points above the reference's and an accuracy at most ``tolerance``
    points below it (pooled rates, in %); the reference itself when no smaller candidate qualifies. Assumes every
    setting holds a point labelled ``reference``; a candidate missing from a setting does not qualify."""
    settings = {name: {p["label"]: p for p in entry["points"]} for name, entry in result["settings"].items()}
    missing = [name for name, points in settings.items() if reference not in points]
    if missing:
        raise ValueError(f"no run of the reference {reference!r} in {', '.join(missing)}")
    size: dict[str, tuple[float, float]] = {}
    for points in settings.values():
        for label, p in points.items():
            size.setdefault(label, (p["subspace_fraction"], p["directions"]))
    verdicts: dict[str, str] = {}
    for label in sorted(size, key=size.get):
        if size[label] >= size[reference]:
            continue
        reasons = []
        for name, points in settings.items():
            if label not in points:
                reasons.append(f"no run in {name}")
                continue
            ref, cand = points[reference], points[label]
            harm = cand["harmful_score"]["rate"] - ref["harmful_score"]["rate"]
            if harm > tolerance:
                reasons.append(f"{name}: harmful +{harm:.1f} points")
            if ref["accuracy"] is not None and cand["accuracy"] is not None:
                drop = ref["accuracy"]["rate"] - cand["accuracy"]["rate"]
                if drop > tolerance:
                    reasons.append(f"{name}: accuracy -{drop:.1f} points")
        verdicts[label] = "; ".join(reasons) or "qualifies"
    qualified = [label for label, verdict in verdicts.items() if verdict == "qualifies"]
    return {"chosen": qualified[0] if qualified else reference, "reference": reference, "tolerance": tolerance,
            "verdicts": verdicts}
