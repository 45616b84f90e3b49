"""The CLI on the ecosystem's conventions: the usual training arguments, the user's own subspace, reporters."""

import json

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
