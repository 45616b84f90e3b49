"""How long ``safeft --version`` and ``safeft --help`` take, start of the process to its end.

    PYTHONPATH=src python benchmarks/cli_startup.py --runs 10 --before OLD/src --out benchmarks/results/cli_startup

Each command runs ``--runs`` times as a fresh process (``python -m safeft ...`` with this interpreter, after one
untimed warm-up run that fills the OS file cache); ``python -c "import torch"`` is timed the same way as the
reference for what importing torch alone costs, and with ``--before SRC`` the ``--version`` of another source
tree (e.g. ``git archive`` of the commit before the lazy CLI) as the before row. Written to
``OUT/cli_startup.json`` (every run's seconds) and ``OUT/cli_startup.md`` (median, min, max per command, with the
command line that made it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = {
    "safeft --version": [sys.executable, "-m", "safeft", "--version"],
    "safeft --help": [sys.executable, "-m", "safeft", "--help"],
    "python -c 'import torch' (reference)": [sys.executable, "-c", "import torch"],
}


def time_command(argv: list[str], runs: int, pythonpath: str | None = None) -> list[float]:
    """Return the wall-clock seconds of ``runs`` runs of ``argv`` (after one untimed run); raise if one fails."""
    env = {**os.environ, "COLUMNS": "100", **({"PYTHONPATH": pythonpath} if pythonpath else {})}
    subprocess.run(argv, check=True, capture_output=True, env=env)
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, env=env)
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results/cli_startup")
    parser.add_argument("--before", help="a source tree (its src/) whose `safeft --version` is timed as well")
    args = parser.parse_args()
    import safeft

    results = {name: time_command(argv, args.runs) for name, argv in COMMANDS.items()}
    if args.before:
        old = [sys.executable, "-c", "from safeft.cli import app; app(prog_name='safeft')", "--version"]
        results[f"safeft --version, before ({args.before})"] = time_command(old, args.runs, args.before)
    path = os.environ.get("PYTHONPATH")
    command = (f"PYTHONPATH={path} " if path else "") + "python benchmarks/cli_startup.py " + shlex.join(sys.argv[1:])
    record = {"command": command, "runs": args.runs, "safeft_version": safeft.__version__,
              "python": platform.python_version(), "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "load_average": os.getloadavg(), "seconds": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cli_startup.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["# CLI start-up time", "", f"`{command}` ({args.runs} runs each after one warm-up, fresh processes; "
             f"Python {record['python']}, {record['cpus']} CPUs, load average {record['load_average'][0]:.1f} "
             "from other jobs)", "",
             "| command | median s | min s | max s |", "|---|---|---|---|"]
    for name, seconds in results.items():
        lines.append(f"| `{name}` | {statistics.median(seconds):.2f} | {min(seconds):.2f} | {max(seconds):.2f} |")
    (out / "cli_startup.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
