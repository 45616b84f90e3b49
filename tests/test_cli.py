"""The CLI stages on a tiny random model saved to disk, through typer's test runner."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from safeft.cli import app
from safeft.testing import byte_tokenizer, tiny_llama

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_llama(seed=0).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def test_subspace_estimate_and_show(tiny_dir, tmp_path):
    invoke("subspace", "estimate", "--model", tiny_dir, "--out", tmp_path / "s", "--rank", 4, "--onset-tokens", 2)
    assert (tmp_path / "s" / "subspace.safetensors").exists()
    shown = invoke("subspace", "show", tmp_path / "s").output
    assert "rank   4" in shown and '"onset_tokens": 2' in shown
    again = runner.invoke(app, ["subspace", "estimate", "--model", str(tiny_dir), "--out", str(tmp_path / "s")])
    assert again.exit_code != 0 and "--overwrite" in again.output


def test_align_finetune_eval(tiny_dir, tmp_path):
    cache = tmp_path / "cache"
    config = tmp_path / "align.yaml"
    config.write_text("max_steps: 2\ncheck_every: 2\nlr: 0.001\n")
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
    assert cfg["method"] == "spf" and cfg["examples"] == 20 and cfg["spf"]["rank"] == 4
    assert (run / "subspace" / "subspace.json").exists() and (run / "model" / "config.json").exists()
    log = json.loads((run / "train_log.json").read_text())
    assert log["steps"] == 2 and any("spf/conflict_rate" in e for e in log["log_history"])
    before, after = (load_file(d / "model.safetensors") for d in (tmp_path / "aligned", run / "model"))
    norms = [k for k in before if "norm" in k]
    assert norms and all(torch.equal(before[k], after[k]) for k in norms)  # SPF cannot project them: frozen
    assert not torch.equal(before["model.layers.0.mlp.down_proj.weight"], after["model.layers.0.mlp.down_proj.weight"])

    refused = runner.invoke(app, ["finetune", "--model", str(tmp_path / "aligned"), "--out", str(run)])
    assert refused.exit_code != 0 and "--overwrite" in str(refused.exception)  # never overwrites silently

    out = tmp_path / "eval.json"
    invoke("eval", "--model", run, "--out", out, "--task", "sentiment", "--max-test", 4, "--max-new-tokens", 4)
    result = json.loads(out.read_text())
    assert result["accuracy"]["n"] == 4 and result["harmful_score"]["n"] == 80
    assert runner.invoke(app, ["eval", "--model", str(run), "--out", str(out)]).exit_code != 0


def test_demo_writes_report_results_and_plot(tiny_dir, tmp_path):
    out = tmp_path / "demo"
    invoke("demo", "--model", tiny_dir, "--out", out, "--cache", tmp_path / "cache", "--steps", 1, "--batch-size", 4,
           "--max-new-tokens", 2, "--align-max-steps", 1, "--task", "sentiment", "--rank", 4)
    results = json.loads((out / "results.json").read_text())
    assert {"aligned", "runs"} <= results.keys() and len(results["runs"]) == 4
    for run in results["runs"]:
        assert {"method", "setting", "harmful_score", "harmful_score_ci", "over_refusal", "accuracy",
                "accuracy_ci"} <= run.keys()
    assert (out / "demo.png").stat().st_size > 1000 and "| SPF |" in (out / "report.md").read_text()


def test_bad_config_keys_are_named(tiny_dir, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("learning_rate: 0.1\n")
    result = runner.invoke(app, ["align", "--model", str(tiny_dir), "--config", str(config)])
    assert result.exit_code != 0 and "unknown keys ['learning_rate']" in result.output
