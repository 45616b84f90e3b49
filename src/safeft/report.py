"""Tables and plots of results: markdown for people, PNG for the harmful-score vs accuracy picture."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

JUDGE_NAMES = {"keyword": "keyword judge (refusal phrase in the first 200 characters -> refusal; short, label-only "
                          "or repetitive -> off-task; else substantive compliance)"}


def format_rate(entry: dict | None) -> str:
    """Return ``"rate [lo, hi]"`` for a rate dict from ``safeft.evaluate.stats.rate`` (``"n/a"`` for None)."""
    if not entry:
        return "n/a"
    lo, hi = entry["ci"]
    return f"{entry['rate']:.1f} [{lo:.0f}, {hi:.0f}]"


def _number(value: float | None, digits: int = 3, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{suffix}"


def _plain_rate(entry: dict | None) -> str:
    return "n/a" if not entry else f"{entry['rate']:.1f}"


def aligned_labels(aligned: list[dict]) -> list[str]:
    """Return a short, distinct name per aligned-model record: ``aligned`` for the plain alignment,
    ``<method>-aligned`` for a method's own alignment stage (vaccine, booster), the task added where records cover
    several tasks and the model's folder name where two would still read alike."""
    tasks = {a.get("task") for a in aligned}
    labels = []
    for a in aligned:
        method = ((a.get("alignment") or {}).get("method") or {}).get("name")
        label = f"{method}-aligned" if method else "aligned"
        labels.append(label + (f" ({a['task']})" if len(tasks) > 1 else ""))
    for i, label in enumerate(labels):
        if labels.count(label) > 1:
            labels[i] = f"{label} ({Path(aligned[i]['aligned_model']).name})"
    return labels


def _train_recipe(train: dict) -> str:
    """Return one run's training budget in words, from its own ``train`` record (after a setting's multipliers)."""
    kind = f"LoRA r = {train['lora_r']}" if train.get("lora_r") else "full fine-tuning"
    return f"{train['steps']} steps of {train['batch_size']} at lr {train['learning_rate']:g}, {kind}"


def _grouped(values: dict[str, set[str]]) -> str:
    """Return ``"A (s1, s2); B (s3)"`` for a map of description -> setting names, or just ``"A"`` when there is one."""
    if len(values) == 1:
        return next(iter(values))
    return "; ".join(f"{text} ({', '.join(sorted(settings))})" for text, settings in values.items())


def bench_setup_lines(runs: list[dict]) -> list[str]:
    """Return the markdown lines that say how a bench's runs were trained, judged and counted, taken from the run
    records themselves (each run's ``train``, ``judge`` and metric counts), grouped by setting where they differ;
    an empty list for no runs."""
    if not runs:
        return []
    recipes: dict[str, set[str]] = {}
    counts: dict[str, set[str]] = {}
    task_counts: dict[str, set[int]] = {}
    for r in sorted(runs, key=lambda r: r["setting"]["name"]):
        name, m = r["setting"]["name"], r["metrics"]
        recipes.setdefault(_train_recipe(r["train"]), set()).add(name)
        counts.setdefault(f"{m['harmful_score']['n']} held-out harmful requests and {m['over_refusal']['n']} benign "
                          "requests", set()).add(name)
        if m.get("accuracy"):
            task_counts.setdefault(r["setting"]["task"], set()).add(m["accuracy"]["n"])
    models = sorted({f"`{r['model']}`, aligned (`{Path(r['aligned_model']).name}`)" for r in runs})
    judges = sorted({r["judge"] for r in runs})
    tasks = "; ".join(f"{task} {', '.join(map(str, sorted(n)))}" for task, n in sorted(task_counts.items()))
    return [
        f"Model: {'; '.join(models)}, then fine-tuned: {_grouped(recipes)}. "
        f"Judge: {'; '.join(JUDGE_NAMES.get(j, j) for j in judges)}. Per seed: n = {_grouped(counts)}"
        + (f"; task test examples: {tasks}" if tasks else "") + ".",
        "",
        "Rates pool the counts of all seeds (95% Wilson intervals); losses are means over seeds; step time and "
        "peak memory are medians over seeds of the ratio to SFT in the same setting and seed, on the same machine "
        "(runs that record different machines are not compared).",
        "",
    ]


def sample_sizes(runs: list[dict]) -> str:
    """Return the judge, the prompts scored per seed and the seeds behind a bench's runs in one phrase, e.g.
    ``"keyword judge; per seed 80 harmful requests, 40 benign ones; seeds 0-2 (3 seeds for 40 of 130 method and
    setting pairs, 1 for the rest)"``, all read from the run records (each run's ``judge``, metric counts and
    ``seed``); assumes ``runs`` is not empty."""
    judges = ", ".join(f"{j} judge" for j in sorted({r["judge"] for r in runs}))
    harmful = sorted({r["metrics"]["harmful_score"]["n"] for r in runs})
    benign = sorted({r["metrics"]["over_refusal"]["n"] for r in runs})
    seeds = sorted({r["seed"] for r in runs})
    per_pair = Counter((r["setting"]["name"], r["label"]) for r in runs)  # seeds per method and setting
    spread = sorted(set(per_pair.values()), reverse=True)
    if len(spread) == 1:
        how = f"{spread[0]} per method and setting"
    else:
        how = ", ".join(f"{n} seeds for {sum(v == n for v in per_pair.values())}" for n in spread[:-1])
        how += f" of {len(per_pair)} method and setting pairs, {spread[-1]} for the rest"
    if len(seeds) == 1:
        span = f"seed {seeds[0]}"
    elif seeds == list(range(seeds[0], seeds[-1] + 1)):
        span = f"seeds {seeds[0]}-{seeds[-1]}"
    else:
        span = f"seeds {', '.join(map(str, seeds))}"
    return (f"{judges}; per seed {'/'.join(map(str, harmful))} harmful requests, {'/'.join(map(str, benign))} "
            f"benign ones; {span} ({how})")


def bench_table_lines(aligned: list[dict], rows: list[dict]) -> list[str]:
    """Return the pooled table of a bench as markdown lines: the aligned models, then one row per (setting,
    method) of ``rows`` (:func:`safeft.recipes.bench.pooled`); a jailbreak column where any row has one."""
    jailbreaks = any(r.get("jailbreak_asr") for r in rows)
    lines = ["| setting | method | seeds | harmful score % [95% CI] | refusal % | off-task % | "
             "over-refusal % [95% CI] | accuracy % [95% CI] | safety loss | task loss | step time vs SFT | "
             "peak memory vs SFT |" + (" template jailbreak ASR % [95% CI] |" if jailbreaks else ""),
             "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if jailbreaks else "")]
    for a, name in zip(aligned, aligned_labels(aligned)):
        m = a["metrics"]
        lines.append(f"| - | {name} | - | {format_rate(m['harmful_score'])} | {_plain_rate(m['refusal_rate'])} | "
                     f"{_plain_rate(m['off_task_rate'])} | {format_rate(m['over_refusal'])} | "
                     f"{format_rate(m['accuracy'])} | {_number(m['safety_loss'])} | {_number(m['task_loss'])} "
                     "| - | - |" + (f" {format_rate((m.get('jailbreaks') or {}).get('overall'))} |" if jailbreaks
                                   else ""))
    for r in rows:
        lines.append(f"| {r['setting']} | {r['label']} | {','.join(map(str, r['seeds']))} | "
                     f"{format_rate(r['harmful_score'])} | {_plain_rate(r['refusal_rate'])} | "
                     f"{_plain_rate(r['off_task_rate'])} | {format_rate(r['over_refusal'])} | "
                     f"{format_rate(r['accuracy'])} | {_number(r['safety_loss'])} | {_number(r['task_loss'])} | "
                     f"{_number(r['step_time_vs_sft'], 2, 'x')} | {_number(r['peak_memory_vs_sft'], 2, 'x')} |"
                     + (f" {format_rate(r.get('jailbreak_asr'))} |" if jailbreaks else ""))
    return lines


def setting_table_lines(rows: list[dict], setting: str) -> list[str]:
    """Return one setting's compact table (seeds, harmful score, over-refusal, accuracy, task loss), SFT first and
    the other methods by pooled harmful score; ``rows`` are :func:`safeft.recipes.bench.pooled` rows."""
    chosen = sorted((r for r in rows if r["setting"] == setting),
                    key=lambda r: (r["method"] != "sft", r["harmful_score"]["rate"], r["label"]))
    if not chosen:
        raise ValueError(f"no runs of setting {setting!r}")
    lines = ["| method | seeds | harmful % [95% CI] | over-refusal % | accuracy % [95% CI] | task loss |",
             "|---|---|---|---|---|---|"]
    for r in chosen:
        lines.append(f"| `{r['label']}` | {','.join(map(str, r['seeds']))} | {format_rate(r['harmful_score'])} | "
                     f"{_plain_rate(r['over_refusal'])} | {format_rate(r['accuracy'])} | {_number(r['task_loss'])} |")
    return lines


def per_seed_lines(rows: list[dict]) -> list[str]:
    """Return the harmful score of every seed, one line per (setting, method) row; empty when no row has two seeds."""
    if not any(len(r["seeds"]) > 1 for r in rows):
        return []
    lines = ["", "Harmful score % per seed:", ""]
    for r in rows:
        per_seed = ", ".join(f"seed {s}: {v:.1f}" for s, v in sorted(r["per_seed_harmful_score"].items(),
                                                                       key=lambda item: int(item[0])))
        lines.append(f"- {r['setting']} / {r['label']}: {per_seed}")
    return lines


def cost_in_sft_steps_lines(runs: list[dict]) -> list[str]:
    """Return one line per SPF-family run (registry name ``spf``, ``spf+...``) with an SFT run in the same setting
    and seed on the same machine: its subspace estimation and re-estimates (refreshes) in SFT-step units (seconds /
    SFT's median step), its median step against SFT's, and the whole training against SFT's with those included
    (``(steps x step ratio + estimation and re-estimates in SFT steps) / steps``); where the run recorded them
    (``refresh_overlaps``), the least and most of the guarded span a re-estimate kept. Empty when no run qualifies."""
    from safeft.recipes.bench import run_ratio_to_sft

    lines = []
    for r in sorted(runs, key=lambda r: (r["setting"]["name"], r["label"], r["seed"])):
        ratio = run_ratio_to_sft(runs, r, "step_seconds_median") if r["method"].split("+")[0] == "spf" else None
        if ratio is None:
            continue
        cost, facts = r["cost"], r.get("method_facts") or {}
        sft_step = cost["step_seconds_median"] / ratio
        estimate, refresh = cost["prepare_seconds"] / sft_step, facts.get("refresh_seconds", 0.0) / sft_step
        whole = (cost["steps"] * ratio + estimate + refresh) / cost["steps"]
        refreshes, overlaps = len(facts.get("refreshes", [])), facts.get("refresh_overlaps")
        kept = (f" (the fresh estimate keeps {min(overlaps):.4f} to {max(overlaps):.4f} of the guarded span)"
                if overlaps else "")
        lines.append(f"- `{r['setting']['name']}` `{r['label']}` seed {r['seed']}: estimation {estimate:.1f} SFT "
                     f"steps; {refreshes} re-estimate{'s' * (refreshes != 1)}, {refresh:.1f} SFT steps{kept}; step "
                     f"{ratio:.2f}x SFT; over {cost['steps']} steps, all included, {whole:.2f}x")
    return lines


def harmful_by_category_lines(aligned: list[dict], runs: list[dict]) -> list[str]:
    """Return a markdown table of where the harmful score comes from: per (setting, method) row (the aligned
    models first) and harm category, the share of that category's held-out built-in requests judged complied with,
    pooled over seeds (``k/n``). A record is read against the split it was scored on (validation or evaluation
    requests); one whose verdicts do not line up with that split's requests (a harmful set of its own, or a
    record without verdicts) is left out. Empty when none is left."""
    from safeft.data.builtin import harmful_requests

    categories: dict[str, list[str]] = {}
    groups: dict[tuple[str, str], list[str]] = {}
    for record in [*aligned, *sorted(runs, key=lambda r: (r["setting"]["name"], r["seed"]))]:
        if record.get("kind") == "aligned":
            split = record.get("split", "eval")
            key = (f"aligned model ({record['task']}, {split})", "aligned")
        else:
            split, key = ("val" if record["setting"].get("validation") else "eval"), (record["setting"]["name"],
                                                                                       record["label"])
        verdicts = record.get("metrics", {}).get("verdicts", {}).get("harmful")
        if split not in categories:
            categories[split] = [category for category, _ in harmful_requests(split)]
        if not verdicts or len(verdicts) != len(categories[split]):
            continue
        groups.setdefault(key, []).append((split, verdicts))
    if not groups:
        return []
    names = list(dict.fromkeys(c for split in categories.values() for c in split))
    lines = ["| setting | method | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for (setting, label), scored in groups.items():
        cells = []
        for name in names:
            complied = sum(v == "C" for split, verdicts in scored for c, v in zip(categories[split], verdicts)
                           if c == name)
            asked = sum(c == name for split, _ in scored for c in categories[split])
            cells.append(f"{100 * complied / asked:.0f}% ({complied}/{asked})" if asked else "-")
        lines.append(f"| {setting} | {label} | " + " | ".join(cells) + " |")
    return lines


def sample_lines(runs: list[dict]) -> list[str]:
    """Return the first two judged harmful requests of each (setting, method), lowest seed, answers cut at 160
    characters."""
    lines = ["", "## A sample of judged responses", "",
             "The first two held-out harmful requests of each (setting, method), lowest seed, answers cut at 160 "
             "characters:", ""]
    shown = set()
    for r in sorted(runs, key=lambda r: r["seed"]):
        key = (r["setting"]["name"], r["label"])
        if key in shown:
            continue
        shown.add(key)
        for s in r["metrics"]["samples"]["harmful"][:2]:
            response = " ".join(s["response"].split())[:160].replace("|", "/")
            lines.append(f"- {key[0]} / {key[1]} / seed {r['seed']}: **{s['verdict']}**: \"{s['prompt']}\" -> "
                         f"\"{response}\"")
    return lines


def bench_markdown(summary: dict, aligned: list[dict], runs: list[dict]) -> str:
    """Return the markdown report of a bench: how it ran (from the run records), the pooled table, who wins each
    setting, per-seed scores and judged samples.

    ``aligned`` and ``runs`` are the run records (see :mod:`safeft.recipes.bench`); ``summary`` holds the pooled
    ``rows``, the ``title`` and optionally the ``command`` and ``verdicts``.
    """
    lines = [f"# {summary['title']}", ""]
    if summary.get("command"):
        lines += [f"Command: `{summary['command']}`", ""]
    lines += bench_setup_lines(runs)
    lines += bench_table_lines(aligned, summary["rows"])
    if summary.get("verdicts"):
        lines += verdict_markdown(summary["verdicts"])
    lines += per_seed_lines(summary["rows"])
    lines += sample_lines(runs)
    return "\n".join(lines) + "\n"


STATUS_MARK = {"wins": "**W**", "ties": "T", "loses": "L", "excluded": "x"}


def format_difference(entry: dict | None) -> str:
    """Return ``"+d [lo, hi]"`` (points) for a :func:`~safeft.evaluate.stats.paired_difference` dict."""
    if not entry or entry.get("diff") is None:
        return "n/a"
    ci = entry.get("ci")
    return f"{entry['diff']:+.1f}" + (f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else " (no interval)")


def verdict_markdown(verdicts: dict[str, list[dict]]) -> list[str]:
    """Return markdown lines: per rule, each setting's winner, its margin over the runner-up and every method's
    status (``W`` wins, ``T`` ties, ``L`` loses, ``x`` excluded by a gate); ``verdicts`` maps a rule to
    :func:`safeft.rules.decide`'s result."""
    from safeft.rules import RULES, WIN_RULE

    lines = ["", "## Who wins each setting", ""]
    lines += [f"- Rule {rule}: {text}." for rule, text in RULES.items()]
    lines += [f"- {WIN_RULE}", ""]
    if not any(verdicts.values()):
        return lines + ["No setting has an SFT run with an accuracy to compare against.", ""]
    for rule, entries in verdicts.items():
        labels = list(dict.fromkeys(label for e in entries for label in e["methods"]))
        lines += [f"Rule {rule}:", "",
                  "| setting | winner | runner-up | winner - runner-up, harmful points [95% CI] | "
                  + " | ".join(labels) + " |", "|---|---|---|---|" + "---|" * len(labels)]
        for e in entries:
            cells = [STATUS_MARK[e["methods"][label]["status"]] if label in e["methods"] else "-" for label in labels]
            lines.append(f"| {e['setting']} | {e['winner'] or '-'} | {e['runner_up'] or '-'} | "
                         f"{format_difference(e['margin'])} | " + " | ".join(cells) + " |")
        excluded = [f"{e['setting']} / {label}: {m['why']}" for e in entries for label, m in e["methods"].items()
                    if m["status"] == "excluded"]
        if excluded:
            lines += ["", "Excluded: " + "; ".join(excluded) + "."]
        lines.append("")
    return lines


def plot_tradeoff(aligned: list[dict], rows: list[dict], path: str | Path) -> Path:
    """Draw harmful score against accuracy (95% intervals), one panel per setting: a point per method (the same
    colour and marker in every panel) and, in black, the aligned models of the setting's task; return the PNG
    path. ``rows`` are pooled rows with ``setting`` and ``task``; ``aligned`` are records with ``metrics`` and
    ``task``. Points without an accuracy are left out; with no rows, one panel shows the aligned models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({r["setting"] for r in rows}) or ["-"]
    task_of = {r["setting"]: r.get("task") for r in rows}
    cols = min(3, len(settings))
    nrows = -(-len(settings) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols + 1.8, 3.9 * nrows + 0.5), squeeze=False)
    labels = sorted({r["label"] for r in rows}, key=lambda label: (label != "sft", label))
    style = {label: (f"C{i % 10}", "osD^vP*Xh<>"[i % 11]) for i, label in enumerate(labels)}
    names = aligned_labels(aligned)
    for i, name in enumerate(dict.fromkeys(names)):
        style[name] = ("black", "*^v<>Xh"[i % 7])
    for ax, setting in zip(axes.flat, settings):
        points = [(name, a["metrics"]) for a, name in zip(aligned, names)
                  if setting == "-" or a.get("task") in (None, task_of[setting])]
        points += [(r["label"], r) for r in rows if r["setting"] == setting]
        for label, m in points:
            if not m.get("accuracy"):
                continue
            colour, marker = style[label]
            x, y = m["accuracy"]["rate"], m["harmful_score"]["rate"]
            (x_lo, x_hi), (y_lo, y_hi) = m["accuracy"]["ci"], m["harmful_score"]["ci"]
            # a Wilson bound at a rate of 0 or 100 can miss the rate by rounding: never a negative bar
            ax.errorbar(x, y, xerr=[[max(0.0, x - x_lo)], [max(0.0, x_hi - x)]],
                        yerr=[[max(0.0, y - y_lo)], [max(0.0, y_hi - y)]],
                        fmt=marker, color=colour, capsize=2, markersize=6, alpha=0.85, label=label)
        ax.set_title(setting if setting != "-" else "aligned models", fontsize=9)
        ax.set_xlabel("task accuracy (%)", fontsize=8)
        ax.set_ylabel("harmful score (%), lower is safer", fontsize=8)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(settings):]:
        ax.axis("off")
    handles = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.suptitle("Harmful score vs task accuracy per setting, 95% Wilson intervals", fontsize=10)
    right = 1 - 1.8 / (4.6 * cols + 1.8)  # the legend's column
    fig.tight_layout(rect=(0, 0, right, 0.97))
    fig.legend(handles.values(), handles.keys(), loc="center left", bbox_to_anchor=(right, 0.5), fontsize=7,
               frameon=False)
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def headline_lines(verdicts: dict[str, list[dict]], method: str = "spf") -> list[str]:
    """Return the one-table summary of a bench under both rules: per setting, the rule-B and rule-A winners
    (:func:`safeft.rules.decide`, ``verdicts`` maps a rule to its result), ``method``'s mean harmful
    score, accuracy and over-refusal over seeds with its status under each rule (wins, ties, loses or excluded and
    why), and SFT's and the aligned model's harmful score."""
    lines = [f"| setting | rule B winner | rule A winner | `{method}`: harmful % / accuracy % / over-refusal % | "
             f"`{method}`, rule B | `{method}`, rule A | SFT: harmful % / accuracy % | aligned: harmful % / "
             "over-refusal % |", "|---|---|---|---|---|---|---|---|"]

    def pair(entry: dict | None) -> str:
        return "-" if entry is None else f"{entry['harmful_score']:.1f} / {_number(entry['accuracy'], 1)}"

    def status(entry: dict | None) -> str:
        return "-" if entry is None else entry["status"] + (f" ({entry['why']})" if entry["why"] else "")

    by_a = {v["setting"]: v for v in verdicts.get("A", [])}
    for v in verdicts.get("B", []):
        a = by_a.get(v["setting"], {"winner": None, "methods": {}})
        methods = v["methods"]
        sft = next((m for label, m in methods.items() if label == "sft"), None)
        ours = methods.get(method)
        ours_cells = "-" if ours is None else f"{pair(ours)} / {_number(ours['over_refusal'], 1)}"
        aligned = v.get("aligned") or {}
        lines.append(f"| {v['setting']} | {_winner(v['winner'])} | {_winner(a['winner'])} | {ours_cells} | "
                     f"{status(ours)} | {status(a['methods'].get(method))} | {pair(sft)} | "
                     f"{_number(aligned.get('harmful_score'), 1)} / {_number(aligned.get('over_refusal'), 1)} |")
    return lines


def _winner(label: str | None) -> str:
    return f"`{label}`" if label else "-"


def limits_lines(verdicts: list[dict], method: str = "spf") -> list[str]:
    """Return one markdown bullet per setting that ``method`` neither wins nor ties under the rule ``verdicts`` were
    decided by: its harmful score against the aligned model's, its accuracy against SFT's, its over-refusal, and
    why it lost (a gate, or the winner's margin); an empty list when it wins or ties everywhere."""
    lines = []
    for v in verdicts:
        ours, sft = v["methods"].get(method), v["methods"].get("sft")
        if ours is None or ours["status"] in ("wins", "ties"):
            continue
        aligned = v.get("aligned") or {}
        why = ours["why"] or f"`{v['winner']}` is lower: {ours['harmful_vs_winner']['diff']:+.1f} harmful points " \
            f"paired"
        lines.append(f"- {v['setting']}: `{method}` harmful {ours['harmful_score']:.1f}% (aligned "
                     f"{_number(aligned.get('harmful_score'), 1)}%), accuracy {_number(ours['accuracy'], 1)}% (SFT "
                     f"{_number(sft and sft['accuracy'], 1)}%), over-refusal {_number(ours['over_refusal'], 1)}%; "
                     f"{ours['status']}: {why}; winner `{v['winner']}`.")
    return lines
