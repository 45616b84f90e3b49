"""A run launched as several processes stops on bad input as one process does: every rank exits with code 2 and the
same one-line message, none aborts (SIGABRT), none is killed by the launcher, none hangs."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
@pytest.mark.parametrize("out", ["model", "/proc/safeft-test-out"], ids=["out is the model", "out under /proc"])
def test_torchrun_with_a_bad_out_exits_2_on_every_rank(tiny_dir, tmp_path, out):
    shutil.copytree(tiny_dir, tmp_path / "model")
    src = str(Path(__file__).parents[1] / "src")
    env = {**os.environ, "TQDM_DISABLE": "1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    safeft = str(Path(sys.executable).parent / "safeft")
    result = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29537", safeft, "finetune",
                             "--model", "model", "--out", out, "--overwrite", "--steps", "1"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    codes = re.findall(r"^\s*exitcode\s*:\s*(-?\d+)", result.stderr, flags=re.MULTILINE)  # torchrun's report
    assert codes == ["2", "2"], result.stderr[-3000:]  # both ranks: bad input, not SIGABRT (-6) or SIGTERM (-15)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 2 and errors[0] == errors[1] and "--out" in errors[0], result.stderr[-3000:]
    assert "bug" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no partial output, no lock left
