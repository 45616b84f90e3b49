"""Do the paper's three findings hold on the aligned default model? Built-in data and public sets, one run.

    python benchmarks/findings.py --out benchmarks/results \\
        --advbench ../shared/data/advbench/harmful_behaviors.csv --sst2 ../shared/data/sst2/train.tsv \\
        --agnews ../shared/data/agnews/train.csv --gsm8k ../shared/data/gsm8k/train.jsonl \\
        --alpaca ../shared/data/alpaca/alpaca_data_sample1k.json

Analyses (N samples per set, same r grid): built-in harmful requests (with varied refusals) vs the built-in facts
task; then AdvBench (with the same kind of refusals) vs each utility set given. Writes ``findings.json`` (the
built-in analysis's headline numbers at top level: ``effective_rank``, ``negative_cosine_fraction``,
``one_vs_many_overlap``; every analysis in full under ``analyses``), ``findings.md`` and one PNG per analysis.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from safeft.analysis import AnalysisConfig, analysis_inputs, analyze, plot, summary_markdown
from safeft.config import AlignConfig
from safeft.models import cache_dir
from safeft.recipes.align import ensure_aligned
from safeft.recipes.finetune import load_finetuned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--num-samples", type=int, default=16)
    for name in ("advbench", "sst2", "agnews", "gsm8k", "alpaca"):
        parser.add_argument(f"--{name}", type=Path, default=None, help=f"path of the {name} file")
    args = parser.parse_args()

    aligned, _, _ = ensure_aligned("default", AlignConfig(), cache_dir())
    model, tokenizer = load_finetuned(aligned)
    config = AnalysisConfig(num_samples=args.num_samples)

    runs = [("built-in harmful vs facts", None, "advbench", "facts", None)]
    if args.advbench:
        runs += [(f"AdvBench vs {name}", args.advbench, "advbench", name, getattr(args, name))
                 for name in ("sst2", "agnews", "gsm8k", "alpaca") if getattr(args, name)]
    analyses, tables = {}, []
    args.out.mkdir(parents=True, exist_ok=True)
    for index, (title, safety_path, safety_format, task, task_path) in enumerate(runs):
        start = time.perf_counter()
        safety, utility = analysis_inputs(safety_path, safety_format, task, task_path, config.num_samples)
        result = analyze(model, tokenizer, safety, utility, config)
        result["seconds"] = time.perf_counter() - start
        analyses[title] = result
        image = args.out / ("findings.png" if index == 0 else f"findings_{task}.png")
        plot(result, image)
        tables.append(summary_markdown(result, title) + f"\n![{title}]({image.name})\n")
        print(tables[-1])

    headline = analyses[runs[0][0]]
    findings = {
        "command": "python " + shlex.join(sys.argv),
        "model": f"aligned default model ({aligned.name})",
        "effective_rank": {k: headline["effective_rank"][k] for k in ("safety", "utility", "definition")},
        "negative_cosine_fraction": headline["negative_cosine_fraction"],
        "one_vs_many_overlap": headline["one_vs_many_overlap"],
        "analyses": analyses,
    }
    (args.out / "findings.json").write_text(json.dumps(findings, indent=2) + "\n")
    (args.out / "findings.md").write_text(f"Command: `{findings['command']}`\n\nModel: {findings['model']}, "
                                          f"N = {config.num_samples} samples per set.\n\n" + "\n".join(tables))


if __name__ == "__main__":
    main()
