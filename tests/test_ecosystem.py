"""The CLI on the ecosystem's conventions: the usual training arguments, the user's own subspace, reporters."""

import json

import pytest
from typer.testing import CliRunner

from safeft.cli import app

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def test_finetune_takes_a_subspace_and_the_usual_training_arguments(tiny_dir, tmp_path):
    invoke("subspace", "estimate", "--model", tiny_dir, "--out", tmp_path / "s", "--rank", 2, "--num-samples", 2)
    out = tmp_path / "run"
    invoke("finetune", "--model", tiny_dir, "--out", out, "--method", "spf", "--subspace", tmp_path / "s",
           "--lora-r", 2, "--lora-alpha", 8, "--lora-targets", "q_proj,v_proj", "--gradient-accumulation", 2,
           "--report-to", "tensorboard", "--logging-steps", 1, "--steps", 2, "--batch-size", 2, "--task",
           "sentiment", "--max-train", 8)
    adapter = json.loads((out / "model" / "adapter_config.json").read_text())
    assert adapter["lora_alpha"] == 8 and set(adapter["target_modules"]) == {"q_proj", "v_proj"}
    record = json.loads((out / "config.json").read_text())
    assert record["global_batch_size"] == 4 and record["train"]["gradient_accumulation"] == 2
    given = (tmp_path / "s" / "subspace.safetensors").read_bytes()
    assert (out / "subspace" / "subspace.safetensors").read_bytes() == given  # used as given, not re-estimated
    assert list((out / "logs").rglob("events.out.tfevents*"))  # the TensorBoard log is kept
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps"] == 2 and [e for e in log["log_history"] if "spf/safety_drift" in e]


def test_quiet_silences_progress_bars(tiny_dir, tmp_path):
    from transformers.utils import logging as hf_logging

    args = ["subspace", "estimate", "--model", tiny_dir, "--out", tmp_path / "a", "--rank", 2, "--num-samples", 1]
    assert "gradient" in invoke(*args).output  # the estimation's progress bar
    try:
        quiet = invoke("-q", *args[:-5], tmp_path / "b", *args[-4:]).output
    finally:
        hf_logging.set_verbosity_warning()
        hf_logging.enable_progress_bar()
    assert "gradient" not in quiet and "targets, rank" in quiet  # the result line stays
    assert "exclude each other" in runner.invoke(app, ["-q", "-v", "methods"]).output


@pytest.mark.slow
def test_torchrun_and_accelerate_write_one_output_equal_to_one_process_with_the_global_batch(tiny_dir, tmp_path):
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    env = {**os.environ, "TQDM_DISABLE": "1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    safeft = str(Path(sys.executable).parent / "safeft")
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    common = ["finetune", "--model", str(tiny_dir), "--task", "sentiment", "--max-train", "16", "--steps", "3",
              "--learning-rate", "1e-3", "--method", "spf", "--rank", "4", "--safety-samples", "2"]

    def run(*command):
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    two = run(torchrun, "--nproc_per_node", "2", "--master_port", "29518", safeft, *common, "--out", "two",
              "--batch-size", "2")
    assert two.returncode == 0, two.stderr[-3000:]
    one = run(safeft, *common, "--out", "one", "--batch-size", "4")
    assert one.returncode == 0, one.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no partial output, no lock left
    assert json.loads((tmp_path / "two" / "config.json").read_text())["global_batch_size"] == 4
    a, b = (load_file(str(tmp_path / d / "model" / "model.safetensors")) for d in ("one", "two"))
    base = load_file(str(tiny_dir / "model.safetensors"))
    assert max(float((a[k] - base[k]).abs().max()) for k in a) > 1e-3  # it trained
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    config = Path(__file__).parents[1] / "examples" / "accelerate_2proc.yaml"
    launched = run(accelerate, "launch", "--config_file", str(config), "--main_process_port", "29520", safeft,
                   *common, "--out", "accelerate", "--batch-size", "2")
    assert launched.returncode == 0, launched.stderr[-3000:]
    c = load_file(str(tmp_path / "accelerate" / "model" / "model.safetensors"))
    assert all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)  # two processes there too, not one
    bad = run(torchrun, "--nproc_per_node", "2", "--master_port", "29519", safeft, *common, "--out",
              str(tiny_dir), "--batch-size", "2", "--overwrite")
    assert bad.returncode != 0 and bad.stderr.count("would overwrite the input") == 2  # every rank stops, none hangs
