"""Rules that choose from bench results: each method's options from validation runs, and the cheapest SPF
subspace that protects as well as the default. Benchmark scripts (``benchmarks/select_options.py``,
``benchmarks/spf_cost_curve.py``) print and plot what these return."""

from __future__ import annotations

import statistics
from pathlib import Path

from safeft.errors import UserError
from safeft.recipes.bench import pooled, read_runs
from safeft.rules import ACCURACY_GATE, decide

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
                raise UserError(f"{bench_dir}: run {run['label']} is not on validation data; options are chosen "
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
            raise UserError(f"{method}: no sft run in its setting to compare accuracy with")
        keep = [r for r in pool if r["accuracy"] >= reference[r["setting"]] - ACCURACY_GATE]
        if keep:
            best = min(keep, key=lambda r: (r["harmful_score"], r["task_loss"]))
            why = (f"lowest validation harmful score ({best['harmful_score']:.1f}%) among {len(keep)} of {len(pool)} "
                   f"candidates within {ACCURACY_GATE:g} point of sft's accuracy ({reference[best['setting']]:.1f}%)")
        else:
            best = max(pool, key=lambda r: (r["accuracy"], -r["harmful_score"]))
            why = (f"no candidate within {ACCURACY_GATE:g} point of sft's accuracy; the most accurate "
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
        raise UserError(f"no run of the reference {reference!r} in {', '.join(missing)}")
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


LEARNING_RATE_RULE = ("Settings that differ only in their learning rate are pooled into one: each run is labelled "
                      "with its rate (`spf lr=0.0002`; at the bench's own rate the plain label). SFT's rate is the "
                      "one with the highest mean validation accuracy on the seeds every SFT rate ran (SFT has no "
                      "safety aim; ties go to the bench's rate), and that SFT is the accuracy reference every "
                      "defence, at any rate, is gated against.")


def pool_learning_rates(runs: list[dict]) -> tuple[list[dict], dict[str, float | None]]:
    """Return ``(runs, sft_rates)`` by :data:`LEARNING_RATE_RULE`: run records (:func:`read_runs`) with every setting
    named ``<base>-lr<rate>`` merged into ``<base>`` (where runs at two or more rates share that base), each of its
    runs labelled ``<label> lr=<rate>``, the SFT runs of other rates than SFT's chosen one dropped and the chosen one
    labelled ``sft``; ``sft_rates`` maps each pooled base setting to SFT's chosen rate (None: the bench's). A setting
    named by hand without that suffix is left as it is."""
    def base(run: dict) -> str:
        rate = run["setting"].get("learning_rate")
        return run["setting"]["name"].removesuffix(f"-lr{rate:g}") if rate else run["setting"]["name"]

    rates: dict[str, set] = {}
    for run in runs:
        rates.setdefault(base(run), set()).add(run["setting"].get("learning_rate"))
    pooled_bases = {name for name, found in rates.items() if len(found) > 1}
    merged = []
    for run in runs:
        if base(run) not in pooled_bases:
            merged.append(run)
            continue
        rate = run["setting"].get("learning_rate")
        label = f"{run['label']} lr={rate:g}" if rate and base(run) != run["setting"]["name"] else run["label"]
        merged.append({**run, "label": label, "setting": {**run["setting"], "name": base(run)}})
    sft_rates: dict[str, float | None] = {}
    for name in sorted(pooled_bases):
        sft = {}
        for run in merged:
            if run["setting"]["name"] == name and run["method"] == "sft":
                sft.setdefault(run["label"], {})[run["seed"]] = run
        if not sft:
            continue
        seeds = set.intersection(*(set(by_seed) for by_seed in sft.values()))
        if not seeds:
            raise UserError(f"{name}: no seed that every SFT learning rate ran; run one to choose SFT's rate")

        accuracy = {label: statistics.mean(by_seed[s]["metrics"]["accuracy"]["rate"] for s in seeds)
                    for label, by_seed in sft.items()}
        best = max(sft, key=lambda label: (accuracy[label], label == "sft"))
        sft_rates[name] = next(iter(sft[best].values()))["setting"].get("learning_rate") if best != "sft" else None
        merged = [{**r, "label": "sft"} if r["label"] == best and r["setting"]["name"] == name else r
                  for r in merged if not (r["setting"]["name"] == name and r["label"] in set(sft) - {best})]
    return merged, sft_rates


FACTOR_RULE = ("One factor at a time around today's default: in every validation setting where the default and a "
               "candidate both ran, decide the setting among sft, the default and the factor's candidates by rule B "
               "(decide). A candidate replaces the default only if it wins at least one setting and, in every "
               "setting, is neither excluded by a gate nor loses (its paired interval against the winner above 0). "
               "If the default is excluded everywhere, the candidate that passes the gates in the most settings "
               "(then the lowest mean harmful score) replaces it; if every candidate is excluded everywhere too, "
               "the factor is decided the same way by rule A (the accuracy gate alone), so the choice is at least "
               "one that keeps SFT's accuracy. Otherwise the default stays. Every method is "
               "compared on the seeds the default ran in that setting: a candidate that lacks one of them is not "
               "judged there (it is listed as short of seeds), and its extra seeds are left out.")


def choose_factor(runs: list[dict], aligned: list[dict], default: str, options: list[str],
                  rule: str = "B") -> dict:
    """Return ``{"choice", "why", "settings": [decide entries], "short": {label: [settings]}, "rule"}`` for one factor
    by :data:`FACTOR_RULE`; ``rule`` is the rule the choice was made by (``"A"`` where rule B excluded everyone).

    ``default`` is today's default's method label, ``options`` the candidate labels of the same factor; only
    settings where ``default`` and at least one candidate ran on all of the default's seeds are read; ``short``
    names, per candidate, the settings where it ran on only some of them. ``choice`` is ``default`` when nothing
    replaces it and ``None`` when no setting has both."""
    names = [default, *options]
    default_seeds: dict[str, set[int]] = {}
    for r in runs:
        if r["label"] == default:
            default_seeds.setdefault(r["setting"]["name"], set()).add(r["seed"])
    seeds: dict[tuple[str, str], set[int]] = {}
    for r in runs:
        if r["label"] in options and r["setting"]["name"] in default_seeds:
            seeds.setdefault((r["setting"]["name"], r["label"]), set()).add(r["seed"])
    judged = {key for key, found in seeds.items() if default_seeds[key[0]] <= found}
    short: dict[str, list[str]] = {}
    for setting, label in sorted(set(seeds) - judged):
        short.setdefault(label, []).append(setting)
    settings = {setting for setting, _ in judged}
    kept = [r for r in runs if r["setting"]["name"] in settings and r["seed"] in default_seeds[r["setting"]["name"]]
            and (r["label"] not in options or (r["setting"]["name"], r["label"]) in judged)]
    entries = decide(kept, aligned, rule, names)
    if not entries:
        return {"choice": None, "why": f"no setting where {default} and a candidate both ran on the default's seeds",
                "settings": [], "short": short, "rule": rule}

    def status(entry: dict, label: str) -> str | None:
        return entry["methods"].get(label, {}).get("status")

    winners = [o for o in options
               if any(status(e, o) == "wins" for e in entries)
               and all(status(e, o) not in ("excluded", "loses") for e in entries if o in e["methods"])]
    if winners:
        best = min(winners, key=lambda o: sum(e["methods"][o]["harmful_score"] for e in entries if o in e["methods"]))
        won = [e["setting"] for e in entries if status(e, best) == "wins"]
        return {"choice": best, "why": f"wins {', '.join(won)} and neither loses nor is excluded elsewhere",
                "settings": entries, "short": short, "rule": rule}
    if all(status(e, default) == "excluded" for e in entries):
        passing = {o: [e for e in entries if status(e, o) not in (None, "excluded")] for o in options}
        passing = {o: es for o, es in passing.items() if es}
        if passing:
            best = min(passing, key=lambda o: (-len(passing[o]), statistics.mean(
                e["methods"][o]["harmful_score"] for e in passing[o])))
            return {"choice": best, "why": f"the default is excluded everywhere; {best} passes the gates in "
                                           f"{len(passing[best])} of {len(entries)} settings",
                    "settings": entries, "short": short, "rule": rule}
        if rule == "B":
            by_a = choose_factor(runs, aligned, default, options, rule="A")
            return {**by_a, "why": f"every candidate is excluded by rule B too; by rule A: {by_a['why']}"}
        return {"choice": default, "why": "every candidate is excluded too; the default stays", "settings": entries,
                "short": short, "rule": rule}
    return {"choice": default, "why": "no candidate wins a setting without losing or being excluded in another",
            "settings": entries, "short": short, "rule": rule}


def choose_learning_rates(runs: list[dict], aligned: list[dict]) -> tuple[dict[str, float | None], dict[str, dict]]:
    """Return ``(sft_rates, choices)``: runs pooled by :func:`pool_learning_rates`, then, for every method label that
    ran at a rate other than the bench's (``<label> lr=<rate>`` once pooled), :func:`choose_factor` among its rates
    with the bench's rate (the plain label) as the default; ``choices`` maps each such label to that result plus its
    ``default``, ``candidates`` (by rate) and ``not_run`` (the plain label, where it never ran at the bench's rate)."""
    pooled, sft_rates = pool_learning_rates(runs)
    rated = sorted({r["label"].split(" lr=")[0] for r in pooled if " lr=" in r["label"] and r["method"] != "sft"})
    choices = {}
    for label in rated:
        options = sorted({r["label"] for r in pooled if r["label"].startswith(f"{label} lr=")},
                         key=lambda o: float(o.split(" lr=")[1]))
        chosen = choose_factor(pooled, aligned, label, options)
        not_run = [] if any(r["label"] == label for r in pooled) else [label]
        choices[label] = {"default": label, "candidates": options, "not_run": not_run, **chosen}
    return sft_rates, choices
