"""How long each mode of ``safeft demo`` takes, as a user runs them one after the other.

    python benchmarks/demo_time.py --out benchmarks/results/demo_time

Runs, each as a fresh process into a fresh folder under ``--work`` (the runs' own results are not kept):
``safeft demo --smoke`` (a fresh cache, so its tiny model is written and aligned too), ``safeft demo`` (the default
model, aligned from safeft's cache when it is there: the aligned model's ``align.json`` says how long aligning took
when it was made) and then ``safeft demo --full`` into the same folder, which reuses the quick demo's runs. Written to
``OUT/demo_time.json`` (seconds per mode, the alignment's recorded seconds, the machine) and ``OUT/demo_time.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = {  # label -> (arguments after `safeft demo`, folder under --work)
    "safeft demo --smoke": (["--smoke", "--cache", "{work}/smoke-cache"], "smoke"),
    "safeft demo": ([], "demo"),
    "safeft demo --full (after safeft demo)": (["--full"], "demo"),
}


def run_mode(args: list[str], out: Path) -> float:
    """Return the wall-clock seconds of ``safeft demo ARGS --out OUT`` in a fresh process; raise if it fails."""
    argv = [sys.executable, "-m", "safeft", "--quiet", "demo", *args, "--out", str(out)]
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def alignment_seconds() -> float | None:
    """Return how long aligning the default model took when its cached aligned model was made, or None."""
    from safeft.models import cache_dir

    records = sorted(cache_dir().glob("aligned-default-*/align.json"))
    return json.loads(records[-1].read_text())["seconds"] if records else None


def markdown(record: dict) -> str:
    """Return the record as a short markdown table with the command that made it."""
    lines = ["# How long the demo takes", "",
             f"`{record['command']}` ({record['machine']}, {record['threads']} threads, torch {record['torch']}; "
             f"the default model's alignment was {'cached' if record['aligned_cached'] else 'not cached'})", "",
             "| command | minutes |", "|---|---|"]
    lines += [f"| `{label}` | {seconds / 60:.1f} |" for label, seconds in record["seconds"].items()]
    if record["alignment_seconds"] is not None:
        lines += ["", f"Aligning the default model the first time adds {record['alignment_seconds'] / 60:.1f} min "
                      "(its align.json, recorded when it was made)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/demo_time")
    parser.add_argument("--work", help="where the demos write (default: a temporary folder, removed after)")
    parser.add_argument("--modes", type=int, default=len(MODES), help="time only the first N modes")
    args = parser.parse_args()
    from safeft.recipes.bench import machine_info

    aligned_cached = alignment_seconds() is not None
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work or scratch)
        seconds = {}
        for label, (mode_args, folder) in list(MODES.items())[:args.modes]:
            seconds[label] = run_mode([a.format(work=work) for a in mode_args], work / folder)
            print(f"{label}: {seconds[label] / 60:.1f} min", flush=True)
    record = {"command": "python benchmarks/demo_time.py " + shlex.join(sys.argv[1:]), "seconds": seconds,
              "aligned_cached": aligned_cached, "alignment_seconds": alignment_seconds(),
              **machine_info(), "load_average": os.getloadavg()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_time.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "demo_time.md").write_text(markdown(record))
    print(markdown(record))


if __name__ == "__main__":
    main()
