"""The package as a user installs it (issue 38): the wheel goes into a fresh venv that already has torch, keeps that
torch, and its ``safeft`` command runs; the licence and citation files are there."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def run(*args, **kwargs) -> str:
    out = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=900, **kwargs)
    assert out.returncode == 0, f"{args}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def test_license_is_apache_2_and_pyproject_asks_for_ranges():
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License") and "END OF TERMS AND CONDITIONS" in text
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'license = { text = "Apache-2.0" }' in pyproject and "torch>=" in pyproject
    assert "torch==" not in pyproject and "torch==2.13.0" in (ROOT / "constraints.txt").read_text()
    assert "tensorboard = [" in pyproject
    assert "cff-version" in (ROOT / "CITATION.cff").read_text()


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_that_has_torch(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path / "dist", ROOT, env=env)
    (wheel,) = (tmp_path / "dist").glob("safeft-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names)
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv, env=env)  # not --system-site-packages: only what pip puts there
    pip = [venv / "bin" / "python", "-m", "pip", "install", "-q"]
    run(*pip, "torch==2.13.0", env=env)  # the user's torch, installed first
    run(*pip, wheel, env=env)
    assert run(venv / "bin" / "python", "-c", "import torch; print(torch.__version__)", env=env).startswith("2.13.0")
    assert run(venv / "bin" / "safeft", "--version", env=env).strip() == "safeft 0.1.0"
    assert "finetune" in run(venv / "bin" / "safeft", "--help", env={**env, "COLUMNS": "100"})
