"""An interrupted fine-tune resumes from its last checkpoint and ends where an uninterrupted run ends."""

import json

import pytest
import torch
from transformers import TrainerCallback
from typer.testing import CliRunner

from safeft.cli import app
from safeft.config import DataConfig, TrainConfig
from safeft.io import INCOMPLETE, MARKER
from safeft.methods import build_method
from safeft.recipes.finetune import finetune
from safeft.spf import STATE_FILE

DATA = DataConfig(task="sentiment", max_train=12)
TRAIN = TrainConfig(steps=6, batch_size=2, save_every=2, learning_rate=1e-3)
OPTIONS = {"sft": {}, "spf": {"rank": 4, "safety_samples": 2}, "spf-lora": {"rank": 4, "safety_samples": 2}}


class Interrupt(TrainerCallback):
    """Stops the run like a kill would, right after optimizer step ``at``."""

    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt


def interrupted(method, at: int):
    """Return ``method`` with an extra callback that interrupts training after step ``at``."""
    own = method.callbacks
    method.callbacks = lambda *args: [*own(*args), Interrupt(at)]
    return method


@pytest.mark.parametrize("name", list(OPTIONS))
def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tiny_dir, tmp_path, name):
    method = name.removesuffix("-lora")
    train = TrainConfig(**{**TRAIN.to_dict(), "lora_r": 2 if name.endswith("lora") else 0})
    full, _, full_log = finetune(tiny_dir, DATA, build_method(method, OPTIONS[name]), train, tmp_path / "full",
                                 tmp_path / "cache", save_model=False)
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_dir, DATA, interrupted(build_method(method, OPTIONS[name]), at=5), train, tmp_path / "part",
                 tmp_path / "cache", save_model=False)
    checkpoint = tmp_path / "part" / "trainer" / "checkpoint-4"
    assert checkpoint.is_dir() and (method != "spf" or (checkpoint / STATE_FILE).exists())
    resumed, _, log = finetune(tiny_dir, DATA, build_method(method, OPTIONS[name]), train, tmp_path / "part",
                               tmp_path / "cache", save_model=False, resume=True)
    assert log["steps"] == full_log["steps"] == 6
    for (key, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6, rtol=1e-5), key
    if method == "spf":  # SPF's own state went on too: the drift it reports covers the whole run
        drift = [[e["spf/safety_drift"] for e in run["log_history"] if "spf/safety_drift" in e][-1]
                 for run in (full_log, log)]
        assert drift[1] == pytest.approx(drift[0], rel=1e-3, abs=1e-7)


def test_cli_resume_continues_the_partial_output_and_refuses_other_settings(tiny_dir, tmp_path, monkeypatch):
    import safeft.methods.sft

    runner = CliRunner()
    args = ["finetune", "--model", str(tiny_dir), "--out", str(tmp_path / "run"), "--task", "sentiment",
            "--max-train", "12", "--steps", "6", "--batch-size", "2", "--save-every", "2"]
    with monkeypatch.context() as patch:
        patch.setattr(safeft.methods.sft.SFT, "callbacks", lambda self, *a: [Interrupt(3)], raising=False)
        result = runner.invoke(app, args)
    assert result.exit_code == 130 and "INCOMPLETE" in result.output
    partial = tmp_path / "run.partial"
    assert (partial / INCOMPLETE).exists() and not (tmp_path / "run").exists()
    other = runner.invoke(app, [*args, "--learning-rate", "1e-3", "--resume"])
    assert other.exit_code == 2 and "other settings (train differ)" in other.output
    recorded = json.loads((partial / "config.json").read_text())
    del recorded["train"]["schedule"]  # a run started before the option existed: it had the default
    (partial / "config.json").write_text(json.dumps(recorded))
    result = runner.invoke(app, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / MARKER).exists() and not partial.exists()
    assert "nothing to resume" in runner.invoke(app, [*args, "--resume"]).output


def test_cli_resume_falls_back_past_a_truncated_checkpoint_and_refuses_to_restart_silently(tiny_dir, tmp_path,
                                                                                           monkeypatch, caplog):
    """The case of issue 39: the newest checkpoint's weights cut short (a full disk, a dying node)."""
    import safeft.methods.sft
    from safeft.models import load_model

    runner = CliRunner()
    args = ["finetune", "--model", str(tiny_dir), "--task", "sentiment", "--max-train", "12", "--steps", "6",
            "--batch-size", "2", "--save-every", "2"]
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "full")]).exit_code == 0
    run = [*args, "--out", str(tmp_path / "run")]
    with monkeypatch.context() as patch:
        patch.setattr(safeft.methods.sft.SFT, "callbacks", lambda self, *a: [Interrupt(5)], raising=False)
        assert runner.invoke(app, run).exit_code == 130
    trainer = tmp_path / "run.partial" / "trainer"
    weights = trainer / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    again = runner.invoke(app, run)  # without --resume: refused, the checkpoints kept
    assert again.exit_code == 2 and "checkpoint to resume from" in again.output and "--resume" in again.output
    assert "--overwrite" in again.output and weights.exists()
    with caplog.at_level("WARNING", logger="safeft"):  # the CLI prints it on stderr
        result = runner.invoke(app, [*run, "--resume"])
    assert result.exit_code == 0, result.output
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resuming from")]
    assert len(said) == 1 and "checkpoint-2 (step 2), the newest intact checkpoint" in said[0]
    assert "checkpoint-4 is damaged (model.safetensors has 1000 bytes" in said[0]
    full, _ = load_model(str(tmp_path / "full" / "model"))
    resumed, _ = load_model(str(tmp_path / "run" / "model"))
    for (key, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6, rtol=0), key


def test_cli_with_every_checkpoint_damaged_exits_2_naming_the_files_and_the_choices(tiny_dir, tmp_path, monkeypatch,
                                                                                      caplog):
    import safeft.methods.sft

    runner = CliRunner()
    run = ["finetune", "--model", str(tiny_dir), "--task", "sentiment", "--max-train", "12", "--steps", "6",
           "--batch-size", "2", "--save-every", "2", "--out", str(tmp_path / "run")]
    with monkeypatch.context() as patch:
        patch.setattr(safeft.methods.sft.SFT, "callbacks", lambda self, *a: [Interrupt(5)], raising=False)
        assert runner.invoke(app, run).exit_code == 130
    trainer = tmp_path / "run.partial" / "trainer"
    (trainer / "checkpoint-2" / "safeft-manifest.json").unlink()  # e.g. saved by an older safeft
    weights = trainer / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = runner.invoke(app, [*run, "--resume"])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "no intact checkpoint" in message and "checkpoint-4: model.safetensors has 1000 bytes" in message
    assert "checkpoint-2: no safeft-manifest.json" in message
    assert "--overwrite" in message and "--resume-from" in message
    with caplog.at_level("WARNING", logger="safeft"):
        result = runner.invoke(app, [*run, "--resume-from", str(trainer / "checkpoint-2")])  # the user vouches for it
    assert result.exit_code == 0, result.output
    assert "as asked" in caplog.text and (tmp_path / "run" / "model").is_dir()
