"""The scripts in examples/ run as a user would run them (on the tiny model, in seconds)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[1] / "examples"
pytestmark = pytest.mark.slow  # every example runs as its own process


def run(command, tmp_path) -> str:
    env = {**os.environ, "TQDM_DISABLE": "1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


@pytest.mark.parametrize("flags", [[], ["--lora"]], ids=["full", "lora"])
def test_trl_example(tmp_path, flags):
    output = run([sys.executable, str(EXAMPLES / "trl_sft.py"), "--tiny", "--out", str(tmp_path / "out"), *flags],
                 tmp_path)
    assert "spf/safety_drift" in output
    assert (tmp_path / "out" / ("adapter_config.json" if flags else "config.json")).exists()


def test_plain_loop_example(tmp_path):
    assert "step 2: loss" in run([sys.executable, str(EXAMPLES / "plain_loop.py"), "--tiny"], tmp_path)


def test_ddp_example_with_two_processes(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    output = run([torchrun, "--nproc_per_node", "2", "--master_port", "29517", str(EXAMPLES / "ddp_loop.py"),
                  "--tiny"], tmp_path)
    assert "2 ranks, 2 steps; ranks agree: True" in output
