"""The CLI stages on a tiny random model saved to disk, through typer's test runner."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from safeft.cli import app

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def fails(*args) -> str:
    """Run a command that must fail as a usage error: exit code 2, one message, no traceback."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output + repr(result.exception)
    assert "Traceback" not in result.output
    return result.output


def test_subspace_estimate_and_show(tiny_dir, tmp_path):
    invoke("subspace", "estimate", "--model", tiny_dir, "--out", tmp_path / "s", "--rank", 4, "--onset-tokens", 2)
    assert (tmp_path / "s" / "subspace.safetensors").exists()
    shown = invoke("subspace", "show", tmp_path / "s").output
    assert "rank   4" in shown and '"onset_tokens": 2' in shown
    assert "--overwrite" in fails("subspace", "estimate", "--model", tiny_dir, "--out", tmp_path / "s")


def test_flags_win_over_yaml_and_yaml_fills_required_options(tiny_dir, tmp_path):
    config = tmp_path / "estimate.yaml"
    config.write_text(f"out: {tmp_path / 's'}\nmodel: {tiny_dir}\nrank: 2\nonset_tokens: none\n")
    invoke("subspace", "estimate", "--config", config, "--rank", 3)  # --out comes from the file only
    shown = invoke("subspace", "show", tmp_path / "s").output
    assert "rank   3" in shown and "rank   2" not in shown  # the flag won
    assert '"onset_tokens": null' in shown  # the file's value, where no flag was given


def test_unknown_keys_and_wrong_types_are_named(tiny_dir, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("lr: 0.1\n")
    assert "unknown key(s) lr" in fails("align", "--model", tiny_dir, "--config", config)
    config.write_text(f"model: {tiny_dir}\nout: {tmp_path / 'x'}\nrank: many\n")
    assert "rank: expected int | None, got 'many'" in fails("subspace", "estimate", "--config", config)
    assert "missing required option(s): --out" in fails("subspace", "estimate", "--model", tiny_dir)
    message = fails("finetune", "--model", tiny_dir, "--out", tmp_path / "y", "--method", "spf", "--side", "up")
    assert "side must be one of left, right, two_sided" in message
    assert "registered methods: sft, spf" in fails("finetune", "--model", tiny_dir, "--out", tmp_path / "y",
                                                   "--method", "nope")
    message = fails("finetune", "--model", tiny_dir, "--out", tmp_path / "y", "--rank", 4)  # sft has no rank
    assert "method 'sft': options not taken by this method: rank; it takes no options" in message
    assert not (tmp_path / "y").exists()


def test_align_finetune_eval(tiny_dir, tmp_path):
    cache = tmp_path / "cache"
    config = tmp_path / "align.yaml"
    config.write_text("max_steps: 2\ncheck_every: 2\nlearning_rate: 0.001\n")
    invoke("align", "--model", tiny_dir, "--out", tmp_path / "aligned", "--cache", cache, "--config", config)
    report = json.loads((tmp_path / "aligned" / "align.json").read_text())
    assert report["steps"] == 2 and report["config"]["learning_rate"] == 0.001
    assert "already" in invoke("align", "--model", tiny_dir, "--out", tmp_path / "aligned", "--cache", cache,
                               "--config", config).output  # cached

    run = tmp_path / "spf"
    invoke("finetune", "--model", tmp_path / "aligned", "--out", run, "--method", "spf", "--steps", 2,
           "--batch-size", 4, "--harmful-ratio", 0.1, "--base-model", tiny_dir, "--cache", cache, "--rank", 4,
           "--task", "sentiment", "--max-train", 20)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["method"] == "spf" and cfg["examples"] == 20 and cfg["method_options"]["rank"] == 4
    assert cfg["model"] == str((tmp_path / "aligned").resolve())
    assert (run / "subspace" / "subspace.json").exists() and (run / "model" / "config.json").exists()
    log = json.loads((run / "train_log.json").read_text())
    assert log["steps"] == 2 and any("spf/conflict_rate" in e for e in log["log_history"])
    before, after = (load_file(d / "model.safetensors") for d in (tmp_path / "aligned", run / "model"))
    norms = [k for k in before if "norm" in k]
    assert norms and all(torch.equal(before[k], after[k]) for k in norms)  # SPF cannot project them: frozen
    assert not torch.equal(before["model.layers.0.mlp.down_proj.weight"], after["model.layers.0.mlp.down_proj.weight"])

    assert "--overwrite" in fails("finetune", "--model", tmp_path / "aligned", "--out", run)  # never silently

    out = tmp_path / "eval.json"
    invoke("eval", "--model", run, "--out", out, "--task", "sentiment", "--max-test", 4, "--max-new-tokens", 4)
    result = json.loads(out.read_text())
    assert result["accuracy"]["n"] == 4 and result["harmful_score"]["n"] == 80
    assert "--overwrite" in fails("eval", "--model", run, "--out", out)


@pytest.mark.slow
def test_demo_is_a_bench_of_sft_and_spf(tiny_dir, tmp_path):
    out = tmp_path / "demo"
    invoke("demo", "--model", tiny_dir, "--out", out, "--cache", tmp_path / "cache", "--steps", 1, "--batch-size", 4,
           "--max-new-tokens", 2, "--align-max-steps", 1, "--align-check-every", 1, "--methods", "sft",
           "--methods", "spf rank=4", "--settings", "task=sentiment max_train=20",
           "--settings", "task=sentiment max_train=20 harmful_ratio=0.1")
    summary = json.loads((out / "bench.json").read_text())
    assert len(summary["runs"]) == 4 and len(summary["aligned"]) == 1
    assert {(r["setting"], r["label"]) for r in summary["rows"]} == {
        ("sentiment-benign", "sft"), ("sentiment-benign", "spf rank=4"), ("sentiment-harmful0.1", "sft"),
        ("sentiment-harmful0.1", "spf rank=4")}
    assert (out / "bench.png").stat().st_size > 1000 and "| sentiment-harmful0.1 | spf rank=4 |" in (
        out / "bench.md").read_text()


def test_version_and_methods():
    from safeft import __version__

    assert __version__ in invoke("--version").output
    listed = invoke("methods").output
    assert all(name in listed for name in ("sft", "spf", "spf-paper", "spf-random", "mix"))


@pytest.mark.slow
def test_demo_lora_rank_adds_lora_rows_beside_full_fine_tuning():
    from safeft.cli import DEMO_LORA_LEARNING_RATE, DemoCommand
    from safeft.config import from_flat

    demo = from_flat(DemoCommand, {"lora_r": "8"})
    assert demo.train.lora_r == 0  # the full fine-tuning rows stay full fine-tuning
    assert [(s.harmful_ratio, s.lora_r) for s in demo.settings] == [(0.0, 0), (0.1, 0), (0.0, 8), (0.1, 8)]
    assert {s.learning_rate for s in demo.settings if s.lora_r} == {DEMO_LORA_LEARNING_RATE}
    assert len({s.name for s in demo.settings}) == 4
    assert [s.lora_r for s in from_flat(DemoCommand, {}).settings] == [0, 0]
