"""Run `safeft demo` on the embedded default model and keep its results under benchmarks/results/demo.*

    python benchmarks/demo.py --out benchmarks/results

Runs the same pipeline as `safeft demo` (align, cached after the first run -> fine-tune with SFT and SPF, benign
and with a 10% harmful mix -> evaluate), in a scratch directory, then writes ``demo.json`` (``aligned`` and
``runs`` with rates in percent and 95% Wilson intervals), ``demo.md`` (the table and the command) and ``demo.png``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path

from safeft.config import SPFConfig
from safeft.models import cache_dir
from safeft.pipeline import DemoConfig, demo
from safeft.train import TrainConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--scratch", type=Path, default=Path("runs/demo-benchmark"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--harmful-ratio", type=float, default=0.1)
    args = parser.parse_args()

    config = DemoConfig(harmful_ratio=args.harmful_ratio, train=TrainConfig(steps=args.steps, learning_rate=args.lr),
                        spf=SPFConfig())
    results = demo(config, args.scratch, cache_dir(), overwrite=True)
    command = "python " + shlex.join(sys.argv)
    summary = {"command": command, **{k: v for k, v in results.items() if k != "runs"},
               "runs": [{k: v for k, v in run.items() if k != "metrics"} for run in results["runs"]]}
    summary["aligned"] = {k: v for k, v in results["aligned"].items() if k != "metrics"}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    report = (args.scratch / "report.md").read_text().replace("![harmful score vs accuracy](demo.png)", "")
    (args.out / "demo.md").write_text(f"Command: `{command}`\n\n{report.strip()}\n")
    shutil.copy(args.scratch / "demo.png", args.out / "demo.png")


if __name__ == "__main__":
    main()
