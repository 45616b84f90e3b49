"""Rebuild every generated results page from the committed JSON under benchmarks/results.

    python benchmarks/report.py           # rewrite the generated blocks of README.md and docs/**/*.md, the figures
                                          # they show (docs/results/img/) and each bench's bench.md
    python benchmarks/report.py --check   # write nothing; exit 1 naming every file that differs

A page's generated part sits between two marker comments, the block's name first:

    <!-- generated: bench-setting bench harmful0.1 -->
    ... (rewritten by this script: never edit it by hand) ...
    <!-- end generated -->

Everything outside the markers is hand-written and only interprets. The block names (:data:`BLOCKS`) take
arguments: a results directory under benchmarks/results, a setting, a JSON file.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FIGURES = ROOT / "docs" / "results" / "img"
BLOCK = re.compile(r"(<!-- generated: (?P<name>[^>]*?) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.DOTALL)
BENCH_DIRS = ("bench", "demo", "lora_sides")  # whose bench.md is rebuilt from the run files
FIGURE_FILES = ("demo/bench.png", "lora_sides/bench.png", "bench/bench.png", "jailbreaks.png", "findings.png",
                "spf_ablation.png", "spf_cost_validation/cost_curve.png")

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmark scripts' own markdown writers


def _json(relative: str) -> dict:
    path = RESULTS / relative
    if not path.is_file():
        raise ValueError(f"{path}: no such results file; name a JSON file under benchmarks/results")
    return json.loads(path.read_text())


def _demote(markdown: str) -> str:
    """Return ``markdown`` with every heading one level lower, so a script's own title sits under the page's."""
    return re.sub(r"^(#+) ", r"#\1 ", markdown, flags=re.MULTILINE)


@functools.cache
def bench_data(name: str) -> dict:
    """Return a bench directory's ``aligned`` and ``runs`` records, pooled ``rows`` and ``verdicts`` per rule, all
    computed from its run files (``benchmarks/results/NAME/runs``)."""
    from safeft.recipes.bench import pooled, read_runs
    from safeft.rules import RULES, decide

    directory = RESULTS / name
    if not (directory / "runs").is_dir():
        raise ValueError(f"{directory}: no runs/ folder; name a bench directory under benchmarks/results")
    aligned, runs = read_runs(directory)
    return {"aligned": aligned, "runs": runs, "rows": pooled(runs),
            "verdicts": {rule: decide(runs, aligned, rule) for rule in RULES}}


def block_bench_setup(name: str) -> str:
    from safeft.report import bench_setup_lines

    return "\n".join(bench_setup_lines(bench_data(name)["runs"]))


def block_bench_table(name: str) -> str:
    from safeft.report import bench_table_lines

    data = bench_data(name)
    return "\n".join(bench_table_lines(data["aligned"], data["rows"])) + "\n"


def block_bench_setting(name: str, setting: str) -> str:
    """One setting's compact table, then every method's harmful score per seed where it ran several."""
    from safeft.report import setting_table_lines

    rows = bench_data(name)["rows"]
    lines = setting_table_lines(rows, setting)
    seeded = [r for r in rows if r["setting"] == setting and len(r["seeds"]) > 1]
    if seeded:
        per_seed = "; ".join(f"`{r['label']}` " + " / ".join(f"{v:.1f}" for _, v in sorted(
            r["per_seed_harmful_score"].items(), key=lambda item: int(item[0]))) for r in seeded)
        lines += ["", f"Harmful score % per seed: {per_seed}."]
    return "\n".join(lines) + "\n"


def block_bench_verdicts(name: str) -> str:
    from safeft.report import verdict_markdown

    return "\n".join(verdict_markdown(bench_data(name)["verdicts"])).strip() + "\n"


def _run_value(run: dict, metric: str) -> float:
    value = run["metrics"][metric]
    return value["rate"] if isinstance(value, dict) else value


def block_bench_seeds(name: str, metric: str = "harmful_score", setting: str = "", labels: str = "") -> str:
    """A list, per (setting, method) that ran several seeds, of ``metric`` on each seed (seed order), from the run
    files; ``setting`` and ``labels`` (each comma-separated) keep those settings and methods only."""
    keep = set(labels.split(",")) if labels else None
    settings = set(setting.split(",")) if setting else None
    groups: dict[tuple[str, str], dict[int, float]] = {}
    for run in bench_data(name)["runs"]:
        if (settings is None or run["setting"]["name"] in settings) and (keep is None or run["label"] in keep):
            groups.setdefault((run["setting"]["name"], run["label"]), {})[run["seed"]] = _run_value(run, metric)
    lines = [f"- `{s}` `{label}`, seeds {','.join(str(k) for k in sorted(v))}: "
             + " / ".join(f"{v[k]:.{3 if 'loss' in metric else 1}f}" for k in sorted(v))
             for (s, label), v in sorted(groups.items()) if len(v) > 1]
    unit = "" if "loss" in metric else " %"
    return f"{metric.replace('_', ' ').capitalize()}{unit} per seed:\n\n" + ("\n".join(lines) or "- none yet") + "\n"


def block_bench_cost_steps(name: str, setting: str = "") -> str:
    """A list, per SPF-family run (of the comma-separated settings ``setting``, or all), of its estimation and
    re-estimates in SFT-step units and its training cost against SFT's with them included."""
    from safeft.report import cost_in_sft_steps_lines

    settings = set(setting.split(",")) if setting else None
    runs = [r for r in bench_data(name)["runs"] if settings is None or r["setting"]["name"] in settings]
    lines = cost_in_sft_steps_lines(runs)
    return ("Cost in SFT steps (seconds / SFT's median step in the same setting and seed, on the same machine; runs "
            "without such an SFT run are left out):\n\n" + ("\n".join(lines) if lines else "- none yet") + "\n")


def block_bench_harmful_by_category(name: str, setting: str = "") -> str:
    """A table, per (setting, method) of the comma-separated settings ``setting`` (or all) and the bench's aligned
    models, of the share of each harm category's held-out requests complied with, pooled over seeds."""
    from safeft.report import harmful_by_category_lines

    settings = set(setting.split(",")) if setting else None
    data = bench_data(name)
    runs = [r for r in data["runs"] if settings is None or r["setting"]["name"] in settings]
    tasks = {r["setting"].get("task", "facts") for r in runs}
    lines = harmful_by_category_lines([a for a in data["aligned"] if a.get("task") in tasks], runs)
    return ("Harmful score by harm category (requests complied with, pooled over seeds):\n\n"
            + ("\n".join(lines) if lines else "- none yet") + "\n")


def block_bench_vs_sft(name: str, setting: str = "") -> str:
    """A list, per setting (or the one ``setting``) and method other than SFT (pooled over seeds): harmful score
    against the aligned model (points), accuracy against SFT (points) and task loss against SFT (per cent)."""
    data = bench_data(name)
    rows = data["rows"]
    # the plain aligned model: the one SFT started from in the setting (vaccine and booster align their own)
    aligned = {(a["task"], a["aligned_model"]): a["metrics"]["harmful_score"]["rate"] for a in data["aligned"]}
    start = {r["setting"]["name"]: r["aligned_model"] for r in data["runs"] if r["label"] == "sft"}
    lines = []
    for row in rows:
        sft = next((r for r in rows if r["setting"] == row["setting"] and r["label"] == "sft"), None)
        if row["label"] == "sft" or sft is None or (setting and row["setting"] != setting):
            continue
        base = aligned[row["task"], start[row["setting"]]]
        lines.append(
            f"- `{row['setting']}` `{row['label']}`: harmful score "
            f"{row['harmful_score']['rate'] - base:+.1f} points vs aligned, accuracy "
            f"{row['accuracy']['rate'] - sft['accuracy']['rate']:+.1f} points vs SFT, task loss "
            f"{100 * (row['task_loss'] / sft['task_loss'] - 1):+.0f}% vs SFT")
    return "\n".join(lines) + "\n"


def block_bench_monitor(name: str, key: str, label: str, settings: str) -> str:
    """One sentence: the monitor metric ``key`` at the last logged step of ``label``'s seed-0 run in each of the
    comma-separated ``settings``."""
    last = {r["setting"]["name"]: (r["monitor_last"] or {}).get(key) for r in bench_data(name)["runs"]
            if r["label"] == label and r["seed"] == 0}
    values = ", ".join(f"{s} {last[s]:.4f}" for s in settings.split(","))
    return f"`{key}` at the last step, `{label}` seed 0: {values}.\n"


def block_bench_row(name: str, setting: str, label: str) -> str:
    """One method's pooled row of one setting in a bench directory, as a sentence, with its per-seed harmful score."""
    row = next(r for r in bench_data(name)["rows"] if r["setting"] == setting and r["label"] == label)
    h = row["harmful_score"]
    per_seed = " / ".join(f"{v:.1f}" for _, v in sorted(row["per_seed_harmful_score"].items(),
                                                         key=lambda item: int(item[0])))
    return (f"`{label}` in `{name}` {setting}, seeds {','.join(str(s) for s in row['seeds'])}: harmful score "
            f"{h['rate']:.1f}% [{h['ci'][0]:.0f}, {h['ci'][1]:.0f}] (per seed {per_seed}), over-refusal "
            f"{row['over_refusal']['rate']:.1f}%, accuracy {row['accuracy']['rate']:.1f}%, task loss "
            f"{row['task_loss']:.3f}.\n")


def block_headline(name: str) -> str:
    """The front page's table: both rules in words, then per setting the winners and SPF's row."""
    from safeft.report import headline_lines, sample_sizes
    from safeft.rules import RULES

    data = bench_data(name)
    return "\n".join([
        f"Rule B (the one this project reports): {RULES['B']}. Rule A: the {RULES['A']}. Under each, a method "
        "whose per-seed paired harmful-score difference against the leader has a 95% interval reaching 0 ties with "
        f"it. {len(data['runs'])} runs: {sample_sizes(data['runs'])}; means over seeds:", "",
        *headline_lines(data["verdicts"]), ""])


def block_limits(name: str) -> str:
    """Every setting SPF neither wins nor ties under rule B, with its numbers, and white-box GCG."""
    from safeft.report import limits_lines

    lines = limits_lines(bench_data(name)["verdicts"]["B"]) or ["- none: `spf` wins or ties every setting."]
    models = _json("jailbreaks.json")["models"]
    gcg = "; ".join(f"{label} {m['gcg_asr']['k']} of {m['gcg_asr']['n']}" for label, m in models.items())
    templates = "; ".join(f"{label} {m['template_asr']['rate']:.1f}%" for label, m in models.items())
    lines.append(f"- white-box GCG (jailbreaks.json): requests broken, {gcg}; jailbreak templates: {templates}.")
    return "\n".join(lines) + "\n"


def block_jailbreaks() -> str:
    import jailbreaks

    return _demote(jailbreaks.markdown(_json("jailbreaks.json")))


def block_overhead(relative: str) -> str:
    import overhead

    result = _json(relative)
    return f"Command: `{result['command']}`\n\n" + overhead.to_markdown(result)


def block_distributed() -> str:
    import distributed

    return _demote(distributed.markdown(_json("distributed.json")))


def block_cost_curve(name: str) -> str:
    import spf_cost_curve

    return _demote(spf_cost_curve.to_markdown(_json(f"{name}/cost_curve.json")))


def block_estimation_sums(relative: str) -> str:
    import estimation_sums

    return _demote(estimation_sums.markdown(_json(relative)))


def block_estimation_accuracy() -> str:
    """Randomized SVD against LAPACK on the default model's safety gradients (estimation_accuracy.json)."""
    r = _json("estimation_accuracy.json")
    s = r["summary"]
    return (f"Command: `{r['command']}`. Randomized SVD against LAPACK on {r['targets']} safety gradients "
            f"(rank {r['rank']}, {r['samples']} samples): subspace overlap at least {s['overlap_U']['min']:.4f} (U) "
            f"and {s['overlap_V']['min']:.4f} (V), largest singular-value error {s['max_singular_value_error']:.1e} "
            f"of the first value; {r['seconds']['randomized']:.1f} s against {r['seconds']['lapack']:.1f} s.\n")


def block_bf16_check(relative: str) -> str:
    """The bf16 shortcut against the fp32-copy path (benchmarks/bf16_check.py's JSON)."""
    r = _json(relative)
    lines = [f"Command: `{r['command']}` on {r['device']} (torch {r['torch']})", "",
             "| side | sketch rel. error vs fp32 copy | subtraction: entries differing | max diff. |",
             "|---|---|---|---|"]
    for key, sides in r.items():
        if key.startswith("matrix_"):
            lines += [f"| {side} ({key[len('matrix_'):]}) | {m['sketch_relative_error']:.2e} | "
                      f"{m['subtract_entries_differing']:.2e} | {m['subtract_max_difference']:.2e} |"
                      for side, m in sides.items()]
    lines += ["", f"SPF on a bf16 tiny Llama, 20 AdamW steps: max over targets ||dW V|| / ||dW|| = "
              f"{r['invariant_max_dWV_over_dW']:.2e}."]
    return "\n".join(lines) + "\n"


def block_batched_check(relative: str) -> str:
    """The batched correction against the per-target one (benchmarks/batched_check.py's JSON), in one sentence."""
    r = _json(relative)
    v = r["max_dW_V_over_dW"]
    text = (f"`{r['command']}` on {r['device']}: after {r['steps']} step(s) the batched and per-target paths' "
            f"weights differ in {100 * r['entries_differing']:.2f}% of the entries, by at most "
            f"{100 * r['largest_difference_over_largest_weight']:.2g}% of the largest weight; max ||dW V|| / ||dW|| "
            f"{v['batched']:.3g} batched, {v['plain']:.3g} per target")
    if "hooks_median_s" in r:
        h = r["hooks_median_s"]
        text += f"; hooks {h['batched']:.2f} s a step batched against {h['plain']:.2f} s per target"
    return text + ".\n"


def block_selection() -> str:
    import select_options

    chosen = _json("baselines_selection.json")
    return _demote(select_options.markdown(chosen["chosen"], chosen["command"]))


def block_choices(name: str = "spf_choices.json") -> str:
    """Options chosen on validation data by the factor rule: the JSON ``name`` that benchmarks/choose_spf_defaults.py
    (SPF's defaults) or benchmarks/choose_learning_rates.py (every method's rate) wrote."""
    import choose_spf_defaults

    return _demote(choose_spf_defaults.markdown(_json(name)))


def block_findings() -> str:
    from safeft.analysis import summary_markdown

    findings = _json("findings.json")
    parts = [f"Command: `{findings['command']}`", "", f"Model: {findings['model']}.", ""]
    parts += [_demote(summary_markdown(result, title)) for title, result in findings["analyses"].items()]
    return "\n".join(parts)


def block_ablation(tag: str = "") -> str:
    """A table of the former ablation script's runs (``spf_ablation{TAG}.json``), pooled per (setting, variant)."""
    from safeft.evaluate.stats import rate
    from safeft.report import format_rate

    result = _json(f"spf_ablation{tag}.json")
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in result["runs"]:
        groups.setdefault((run["setting"], run["variant"]), []).append(run)
    a = result["aligned"]
    lines = [f"Command: `{result['command']}`", "",
             "| setting | variant | seeds | harmful score % [95% CI] | over-refusal % | accuracy % [95% CI] | "
             "safety loss | task loss | train s |", "|---|---|---|---|---|---|---|---|---|",
             f"| - | aligned | - | {format_rate(a['harmful_score'])} | {a['over_refusal']['rate']:.1f} | "
             f"{format_rate(a['accuracy'])} | {a['safety_loss']:.3f} | - | - |"]

    def pooled(group: list[dict], key: str) -> dict:
        return rate(sum(r[key]["k"] for r in group), sum(r[key]["n"] for r in group))

    for (setting, variant), group in groups.items():
        seeds = ",".join(str(r.get("seed", 0)) for r in group)
        lines.append(f"| {setting} | {variant} | {seeds} | {format_rate(pooled(group, 'harmful_score'))} | "
                     f"{pooled(group, 'over_refusal')['rate']:.1f} | {format_rate(pooled(group, 'accuracy'))} | "
                     f"{sum(r['safety_loss'] for r in group) / len(group):.3f} | "
                     f"{sum(r['task_loss'] for r in group) / len(group):.3f} | "
                     f"{sum(r['train_seconds'] for r in group) / len(group):.0f} |")
    if any(len(g) > 1 for g in groups.values()):
        lines += ["", "Per run (harmful score %): " + "; ".join(
            f"{s} {v}: " + ", ".join(f"{r['harmful_score']['rate']:.1f}" for r in g)
            for (s, v), g in groups.items() if len(g) > 1) + "."]
    return "\n".join(lines) + "\n"


def block_ablation_runs(tag: str, metric: str = "harmful_score") -> str:
    """One sentence per (setting, variant) of ``spf_ablation{TAG}.json``: ``metric`` on each run, in run order."""
    groups: dict[tuple[str, str], list[str]] = {}
    for run in _json(f"spf_ablation{tag}.json")["runs"]:
        value = run[metric]["rate"] if isinstance(run[metric], dict) else run[metric]
        groups.setdefault((run["setting"], run["variant"]), []).append(f"{value:.1f} (seed {run.get('seed', 0)})")
    return f"{metric.replace('_', ' ').capitalize()} per run: " + "; ".join(
        f"{s} {v}: " + ", ".join(values) for (s, v), values in groups.items()) + ".\n"


def block_demo_time(style: str = "line") -> str:
    """How long each mode of ``safeft demo`` took (demo_time/demo_time.json): one README line, or the table."""
    import demo_time

    record = _json("demo_time/demo_time.json")
    if style == "table":
        return _demote(demo_time.markdown(record))
    smoke, quick, *full = (seconds / 60 for seconds in record["seconds"].values())
    first = record["alignment_seconds"] / 60
    after = f"`--full` after it {full[0]:.1f} min more" if full else "`--full` (not timed yet) runs four more runs"
    return (f"Measured ({record['machine']}, `benchmarks/results/demo_time/`): `--smoke` {smoke * 60:.0f} s; "
            f"`safeft demo` {quick:.1f} min with the aligned model cached (aligning it the first time adds "
            f"{first:.1f} min); {after}.\n")


def block_eval_time() -> str:
    """The evaluation's two loss passes in the order given and batched by length (eval_time/eval_time.json)."""
    import eval_time

    return _demote(eval_time.markdown(_json("eval_time/eval_time.json")))


def block_task_pass_time() -> str:
    """The task's replies and loss in two passes and in one (task_pass_time/task_pass_time.json)."""
    import task_pass_time

    return _demote(task_pass_time.markdown(_json("task_pass_time/task_pass_time.json")))


def block_checkpoint_cost(*names: str) -> str:
    """The cost of one checkpoint (checkpoint_cost/<name>/checkpoint_cost.json), a table per name, then the
    ``--save-every`` default beside what the first measurement suggests."""
    import checkpoint_cost
    from safeft.config import TrainConfig

    records = [_json(f"checkpoint_cost/{name}/checkpoint_cost.json") for name in names]
    parts = [_demote(checkpoint_cost.markdown(record)) for record in records]
    first = records[0]
    parts.append(f"The default `--save-every` is {TrainConfig().save_every}; on {first['model']} "
                 f"({'LoRA r=' + str(first['lora_r']) if first['lora_r'] else 'full fine-tuning'}) it adds "
                 f"{100 * first['checkpoint_in_steps'] / TrainConfig().save_every:.1f}% to a run's time, and a "
                 f"crash loses at most {TrainConfig().save_every} steps (about "
                 f"{TrainConfig().save_every * first['step_seconds_median'] / 60:.0f} min at "
                 f"{first['step_seconds_median']:.1f} s per step).\n")
    return "\n".join(parts)


def block_module_map() -> str:
    """The src/safeft tree, one line per module: the first line of its docstring."""
    import ast

    package = ROOT / "src" / "safeft"
    lines = ["```text", "src/safeft/"]
    for path in sorted(package.rglob("*.py"), key=lambda p: (p.parent != package, p.relative_to(package).parts)):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        first = doc.strip().split("\n")[0] if doc.strip() else "(no docstring)"
        lines.append(f"  {str(path.relative_to(package)):<28} {first}")
    return "\n".join(lines + ["```"]) + "\n"


BLOCKS = {
    "bench-setup": block_bench_setup, "bench-table": block_bench_table, "bench-setting": block_bench_setting,
    "bench-verdicts": block_bench_verdicts, "bench-seeds": block_bench_seeds,
    "bench-cost-steps": block_bench_cost_steps, "bench-harmful-by-category": block_bench_harmful_by_category,
    "bench-vs-sft": block_bench_vs_sft,
    "bench-monitor": block_bench_monitor, "bench-row": block_bench_row,
    "headline": block_headline, "limits": block_limits,
    "jailbreaks": block_jailbreaks,
    "overhead": block_overhead, "distributed": block_distributed, "cost-curve": block_cost_curve,
    "estimation-sums": block_estimation_sums, "estimation-accuracy": block_estimation_accuracy,
    "bf16-check": block_bf16_check, "batched-check": block_batched_check,
    "selection": block_selection, "choices": block_choices, "findings": block_findings,
    "ablation": block_ablation, "ablation-runs": block_ablation_runs,
    "module-map": block_module_map, "demo-time": block_demo_time, "checkpoint-cost": block_checkpoint_cost,
    "eval-time": block_eval_time, "task-pass-time": block_task_pass_time,
}


def render_block(name: str) -> str:
    """Return the markdown of the block called ``name`` (its kind, then its arguments, separated by spaces)."""
    kind, *args = shlex.split(name)
    if kind not in BLOCKS:
        raise ValueError(f"unknown generated block {kind!r}; known: {', '.join(BLOCKS)}")
    body = BLOCKS[kind](*args)
    return body if body.endswith("\n") else body + "\n"


def fill(text: str) -> str:
    """Return ``text`` with the body of every generated block replaced by what :func:`render_block` makes."""
    return BLOCK.sub(lambda m: m.group(1) + render_block(m.group("name")) + m.group(4), text)


def pages() -> list[Path]:
    """Return README.md and every docs page that holds a generated block."""
    docs = sorted((ROOT / "docs").rglob("*.md"))
    return [p for p in [ROOT / "README.md", *docs] if "<!-- generated: " in p.read_text()]


def bench_summaries() -> dict[Path, str]:
    """Return each bench directory's bench.md as :func:`safeft.report.bench_markdown` writes it from the run files
    (title and command kept from its committed bench.json)."""
    from safeft.report import bench_markdown

    out = {}
    for name in BENCH_DIRS:
        data = bench_data(name)
        committed = _json(f"{name}/bench.json")
        summary = {"title": committed["title"], "command": committed.get("command"), "rows": data["rows"],
                   "verdicts": data["verdicts"]}
        out[RESULTS / name / "bench.md"] = bench_markdown(summary, data["aligned"], data["runs"])
    return out


def expected_text() -> dict[Path, str]:
    """Return every generated text file as the committed JSON makes it: pages with their blocks filled, bench.md."""
    return {**{p: fill(p.read_text()) for p in pages()}, **bench_summaries()}


def expected_figures() -> dict[Path, bytes]:
    """Return the figures the docs show, copied from benchmarks/results (the site cannot reach outside docs/)."""
    return {FIGURES / relative.replace("/", "_"): (RESULTS / relative).read_bytes() for relative in FIGURE_FILES}


def stale() -> list[Path]:
    """Return the generated files whose committed content differs from what the JSON makes (or that are missing)."""
    found = [p for p, text in expected_text().items() if not p.is_file() or p.read_text() != text]
    return found + [p for p, data in expected_figures().items() if not p.is_file() or p.read_bytes() != data]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if any generated file is stale")
    args = parser.parse_args()
    if args.check:
        differ = stale()
        for path in differ:
            print(f"stale: {path.relative_to(ROOT)} (run python benchmarks/report.py)")
        raise SystemExit(1 if differ else 0)
    for path, text in expected_text().items():
        path.write_text(text)
    FIGURES.mkdir(parents=True, exist_ok=True)
    for path, data in expected_figures().items():
        path.write_bytes(data)
    print(f"wrote {len(pages())} pages, {len(BENCH_DIRS)} bench summaries and {len(FIGURE_FILES)} figures")


if __name__ == "__main__":
    main()
