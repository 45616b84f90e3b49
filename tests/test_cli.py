"""The CLI stages on a tiny random model saved to disk, through typer's test runner."""

import json
import os
import subprocess
import sys
from pathlib import Path

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

    demo = from_flat(DemoCommand, {"lora_r": "8", "full": "true"})
    assert demo.train.lora_r == 0  # the full fine-tuning rows stay full fine-tuning
    assert [(s.harmful_ratio, s.lora_r) for s in demo.settings] == [(0.0, 0), (0.1, 0), (0.0, 8), (0.1, 8)]
    assert {s.learning_rate for s in demo.settings if s.lora_r} == {DEMO_LORA_LEARNING_RATE}
    assert len({s.name for s in demo.settings}) == 4
    assert [s.lora_r for s in from_flat(DemoCommand, {"full": "true"}).settings] == [0, 0]


def test_the_quick_demo_is_sft_against_spf_at_ten_percent_and_full_is_the_grid():
    from safeft.cli import DemoCommand
    from safeft.config import from_flat

    quick, full = from_flat(DemoCommand, {}), from_flat(DemoCommand, {"full": "true"})
    assert quick.methods == ["sft", "spf"] and [s.harmful_ratio for s in quick.settings] == [0.1]
    assert full.methods == ["sft", "spf", "spf-random"] and [s.harmful_ratio for s in full.settings] == [0.0, 0.1]
    assert "random-basis" in full.title and "random-basis" not in quick.title
    # the quick demo's runs are the full grid's runs: same settings and labels, so --full reuses them
    assert {s.name for s in quick.settings} <= {s.name for s in full.settings}
    assert from_flat(DemoCommand, {"full": "true", "methods": ["sft"]}).methods == ["sft"]  # given ones are kept


def test_cli_module_imports_neither_torch_nor_transformers():
    # a fresh interpreter: this test process has torch loaded already
    code = ("import sys, safeft, safeft.cli; heavy = [m for m in ('torch', 'transformers', 'peft', 'safeft.commands')"
            " if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    assert out.stdout.strip() == "[]"


def test_top_level_help_lists_every_command_with_its_own_help():
    import typer.main

    from safeft.cli import COMMANDS
    from safeft.commands import app as commands

    group = typer.main.get_command(commands)
    assert set(group.commands) == set(COMMANDS)
    for name, line in COMMANDS.items():
        assert (group.commands[name].help or "").split("\n")[0] == line, name
    listed = invoke("--help").output
    assert all(name in listed for name in COMMANDS)


def test_finetune_help_groups_options_in_panels_with_an_example():
    shown = runner.invoke(app, ["finetune", "--help"], env={"COLUMNS": "200"}).output
    panels = ["Model and data", "Training", "Method", "Evaluation", "Output"]
    assert all(f"─ {p} " in shown for p in panels)
    assert [shown.index(f"─ {p} ") for p in panels] == sorted(shown.index(f"─ {p} ") for p in panels)
    assert shown.index("--model ") < shown.index("─ Training ") < shown.index("--steps ") < shown.index("─ Method ")
    assert shown.index("─ Method ") < shown.index("--rank ") < shown.index("─ Evaluation ")
    assert "Example: safeft finetune" in shown and "jsonl for your own data" in shown
    assert "per micro-batch on each process" in shown and "TRL: --per-device-train-batch-size" in shown
    assert "--spf-targets" in shown and "--target-modules" not in shown  # SPF's, apart from --lora-targets
    shown = runner.invoke(app, ["eval", "--help"], env={"COLUMNS": "200"}).output
    assert all(f"─ {p} " in shown for p in ["Model and data", "Evaluation", "Output"])
    assert "Example: safeft eval" in shown
    from safeft.commands import FinetuneCommand, method_help
    from safeft.options import option_help, short_help

    helps = {**option_help(FinetuneCommand), **method_help()}
    assert max(len(short_help(text)) for text in helps.values()) <= 150  # two lines at most at 100 columns


def test_methods_name_lists_that_methods_options_with_defaults():
    shown = invoke("methods", "spf").output
    assert "--mode (default: always)" in shown and "--spf-targets (default: none)" in shown
    assert "--rank (default: none)" in shown
    assert "128 for full fine-tuning and 64 under LoRA" in " ".join(shown.split())  # the help, unwrapped
    assert "--safety-ratio" not in shown  # mix's, not SPF's
    assert "no options" in invoke("methods", "sft").output
    assert "unknown method 'spff'" in fails("methods", "spff")


@pytest.fixture
def captured_finetune(monkeypatch):
    """`safeft finetune` with the training replaced by a recorder of what it was given."""
    import safeft.recipes.finetune as recipe

    calls = []

    def fake(model, data, method, train, out, cache, **kwargs):
        calls.append({"model": model, "data": data, "method": method, "train": train})
        return None, None, {"steps": train.steps, "seconds": 0}

    monkeypatch.setattr(recipe, "finetune", fake)
    return calls


def test_trl_names_work_as_flags_and_yaml_keys_and_the_global_batch_is_printed(tiny_dir, tmp_path,
                                                                              captured_finetune):
    result = invoke("finetune", "--model-name-or-path", tiny_dir, "--output-dir", tmp_path / "a", "--max-steps", 3,
                    "--per-device-train-batch-size", 2, "--gradient-accumulation-steps", 4, "--learning-rate", 1e-4)
    train = captured_finetune[-1]["train"]
    assert (train.steps, train.batch_size, train.gradient_accumulation, train.learning_rate) == (3, 2, 4, 1e-4)
    assert captured_finetune[-1]["model"] == str(tiny_dir) and (tmp_path / "a").is_dir()
    assert "global batch 8 examples per optimizer step = 2 per process x 1 process(es) x 4" in result.output
    trl = tmp_path / "trl.yaml"
    trl.write_text(f"model_name_or_path: {tiny_dir}\noutput_dir: {tmp_path / 'b'}\nmax_steps: 5\n"
                   "per_device_train_batch_size: 3\ngradient_accumulation_steps: 2\nlearning_rate: 2.0e-4\n"
                   "lr_scheduler_type: constant\nnum_train_epochs: 2\nspf_targets: [q_proj]\n")
    invoke("finetune", "--config", trl, "--method", "spf")
    train = captured_finetune[-1]["train"]
    assert (train.steps, train.batch_size, train.gradient_accumulation, train.schedule) == (5, 3, 2, "constant")
    assert captured_finetune[-1]["method"].config.target_modules == ["q_proj"]
    assert "name the same option" in fails("finetune", "--model", tiny_dir, "--out", tmp_path / "c", "--steps", 1,
                                           "--max-steps", 2)
    trl.write_text(f"model: {tiny_dir}\nout: {tmp_path / 'c'}\nsteps: 1\nmax_steps: 2\n")
    assert "name the same option" in fails("finetune", "--config", trl)


def test_spf_targets_flag_and_the_old_name_still_works_with_a_warning(tiny_dir, tmp_path, captured_finetune):
    invoke("finetune", "--model", tiny_dir, "--out", tmp_path / "a", "--method", "spf", "--spf-targets", "q_proj")
    assert captured_finetune[-1]["method"].config.target_modules == ["q_proj"]
    with pytest.warns(FutureWarning, match="--target-modules is deprecated: use --spf-targets"):
        invoke("finetune", "--model", tiny_dir, "--out", tmp_path / "b", "--method", "spf", "--target-modules",
               "v_proj")
    assert captured_finetune[-1]["method"].config.target_modules == ["v_proj"]


def test_held_out_share_is_announced(tmp_path):
    from safeft.data.tasks import load_task

    rows = [{"prompt": f"Say {i}.", "response": f"{i}."} for i in range(10)]
    (tmp_path / "own.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(UserWarning, match="2 of the 10 examples of .*own.jsonl .*held out as the test split"):
        task = load_task("jsonl", str(tmp_path / "own.jsonl"))
    assert (len(task.train), len(task.test)) == (8, 2)


def test_eval_summary_shows_refusal_and_off_task_and_warns_when_off_task_dominates(tiny_dir, tmp_path,
                                                                                  monkeypatch):
    import safeft.recipes.evaluate as recipe

    def share(rate):
        return {"rate": rate, "ci": [max(0.0, rate - 5), min(100.0, rate + 5)]}

    result = {"harmful_score": share(0.0), "refusal_rate": share(0.0), "off_task_rate": share(100.0),
              "over_refusal": share(0.0), "accuracy": None}
    monkeypatch.setattr(recipe, "evaluate_dir", lambda *a, **k: result)
    shown = invoke("eval", "--model", tiny_dir, "--out", tmp_path / "e.json", "--task", "none").output
    assert "harmful score 0.0%" in shown and "refusal 0.0%, off-task 100.0%" in shown
    assert "Warning: 100.0% of the answers to harmful requests are off-task" in shown
    result.update(refusal_rate=share(90.0), off_task_rate=share(10.0))
    shown = invoke("eval", "--model", tiny_dir, "--out", tmp_path / "f.json", "--task", "none").output
    assert "refusal 90.0%, off-task 10.0%" in shown and "Warning" not in shown


def test_a_bug_exits_1_with_the_debug_pointer_and_bad_input_exits_2(tiny_dir, tmp_path, monkeypatch):
    import safeft.recipes.finetune as recipe
    from safeft.errors import UserError

    def deep_value_error(*args, **kwargs):
        raise ValueError("shapes (3, 4) and (5, 6) do not align")  # not the user's input: a bug

    monkeypatch.setattr(recipe, "finetune", deep_value_error)
    args = ["finetune", "--model", str(tiny_dir), "--out", str(tmp_path / "a")]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "ValueError: shapes (3, 4)" in result.output and "looks like a bug" in result.output
    assert "--debug" in result.output and "Traceback" not in result.output

    def bad_input(*args, **kwargs):
        raise UserError("--task-train my.jsonl: line 3 has no 'response'")

    monkeypatch.setattr(recipe, "finetune", bad_input)
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "Error: --task-train my.jsonl: line 3" in result.output
    assert "bug" not in result.output


@pytest.mark.slow
def test_the_smoke_demo_runs_the_whole_pipeline_on_a_tiny_model_it_writes_once(tmp_path):
    from safeft.cli import DemoCommand
    from safeft.config import from_flat

    invoke("demo", "--smoke", "--out", tmp_path / "smoke", "--cache", tmp_path / "cache")
    summary = json.loads((tmp_path / "smoke" / "bench.json").read_text())
    assert {r["label"] for r in summary["rows"]} == {"sft", "spf rank=4"} and len(summary["aligned"]) == 1
    model = tmp_path / "cache" / "tiny-random-llama"
    assert (model / "config.json").is_file() and not list((tmp_path / "cache").glob("*.partial-*"))
    # with --full the smoke grid is the full grid's, shrunk; a model the user names is refused, not replaced
    full = from_flat(DemoCommand, {"smoke": "true", "full": "true", "cache": str(tmp_path / "cache")})
    assert full.methods == ["sft", "spf rank=4", "spf-random rank=4"] and len(full.settings) == 2
    assert full.model == str(model)
    refused = fails("demo", "--smoke", "--model", tmp_path / "mine", "--out", tmp_path / "x")
    assert "drop --model" in refused and not (tmp_path / "x").exists()
