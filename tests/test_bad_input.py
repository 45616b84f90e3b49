"""Bad input gets a short message that names the problem, exit code 2, no traceback, and nothing the user had is
changed: every file under the test's folder (inputs, an earlier output, a foreign folder) is compared byte for byte."""

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from safeft.cli import app
from safeft.io import writing
from safeft.testing import CHATML_TEMPLATE, byte_tokenizer, tiny_llama

runner = CliRunner()


def tree(path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def world(tmp_path, tiny_dir):
    """Inputs and earlier outputs a user might have: a model, a finished safeft output, a folder of their own,
    data files good and bad, a model whose weights are NaN."""
    shutil.copytree(tiny_dir, tmp_path / "model")
    with writing(tmp_path / "prior", overwrite=False) as out:
        (out / "result.json").write_text("{}")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    (tmp_path / "a_file.txt").write_text("text")
    (tmp_path / "empty_dir").mkdir()
    rows = [{"prompt": f"Say {i}.", "response": f"{i}."} for i in range(8)]
    (tmp_path / "good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "malformed.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": \n')
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "no_response.jsonl").write_text('{"prompt": "a"}\n')
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "caf\xe9", "response": "b"}\n'.encode("latin-1"))
    (tmp_path / "safety_bad.jsonl").write_text('{"prompt": "how?"}\n')
    (tmp_path / "bad.yaml").write_text("steps: [1,\n")
    (tmp_path / "list.yaml").write_text("- steps\n- 3\n")
    (tmp_path / "unknown.yaml").write_text("stepz: 3\n")
    (tmp_path / "eval.json").write_text("{}")
    (tmp_path / "templates.csv").write_text("template\nno place for a request\n")
    tiny_llama(seed=0).save_pretrained(tmp_path / "no_template")
    byte_tokenizer(chat_template=None).save_pretrained(tmp_path / "no_template")
    (tmp_path / "chatml.jinja").write_text(CHATML_TEMPLATE)
    nan = tiny_llama(seed=0)
    with torch.no_grad():
        nan.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    nan.save_pretrained(tmp_path / "nan_model")
    byte_tokenizer().save_pretrained(tmp_path / "nan_model")
    shutil.copytree(tiny_dir, tmp_path / "truncated")
    weights = tmp_path / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return tmp_path


TRAIN = ["--steps", "1", "--batch-size", "2"]

CASES = {
    # finetune: outputs
    "finetune out is the model": (["finetune", "--model", "{model}", "--out", "{model}", "--overwrite"],
                                  "would overwrite the input"),
    "finetune out inside the model": (["finetune", "--model", "{model}", "--out", "{model}/run"],
                                      "would overwrite the input"),
    "finetune out holds the model": (["finetune", "--model", "{model}", "--out", "{root}", "--overwrite"],
                                     "would overwrite the input"),
    "finetune over a folder safeft did not write": (["finetune", "--model", "{model}", "--out", "{root}/mine",
                                                     "--overwrite"], "not written by a finished safeft command"),
    "finetune over an output without --overwrite": (["finetune", "--model", "{model}", "--out", "{root}/prior"],
                                                     "pass --overwrite"),
    "finetune out is a file": (["finetune", "--model", "{model}", "--out", "{root}/a_file.txt"], "is a file"),
    "finetune out is the training data": (["finetune", "--model", "{model}", "--out", "{root}/good.jsonl",
                                           "--task", "jsonl", "--task-train", "{root}/good.jsonl", "--overwrite"],
                                          "would overwrite the input"),
    # finetune: models
    "finetune model missing": (["finetune", "--model", "{root}/nope", "--out", "{root}/run"],
                               "no such model directory"),
    "finetune model folder without config": (["finetune", "--model", "{root}/empty_dir", "--out", "{root}/run"],
                                             "not a model directory"),
    "finetune model is a file": (["finetune", "--model", "{root}/a_file.txt", "--out", "{root}/run"], "is a file"),
    "finetune hub id not cached": (["finetune", "--model", "nobody/no-such-model", "--out", "{root}/run"],
                                   "not in the local Hugging Face cache"),
    # finetune: options
    "unknown method": (["finetune", "--model", "{model}", "--out", "{root}/run", "--method", "nope"],
                       "registered methods"),
    "bad side": (["finetune", "--model", "{model}", "--out", "{root}/run", "--method", "spf", "--side", "up"],
                 "side must be one of"),
    "option of another method": (["finetune", "--model", "{model}", "--out", "{root}/run", "--rank", "4"],
                                 "options not taken by this method"),
    "max-train 0": (["finetune", "--model", "{model}", "--out", "{root}/run", "--max-train", "0"],
                    "must be positive"),
    "negative steps": (["finetune", "--model", "{model}", "--out", "{root}/run", "--steps", "-1"], "steps must be"),
    "negative learning rate": (["finetune", "--model", "{model}", "--out", "{root}/run", "--learning-rate", "-1"],
                               "learning_rate"),
    "harmful ratio above 1": (["finetune", "--model", "{model}", "--out", "{root}/run", "--harmful-ratio", "1.5"],
                              "harmful_ratio"),
    "rank 0": (["finetune", "--model", "{model}", "--out", "{root}/run", "--method", "spf", "--rank", "0"], "rank"),
    "not a number": (["finetune", "--model", "{model}", "--out", "{root}/run", "--steps", "many"], "steps"),
    "lisa without task steps": (["finetune", "--model", "{model}", "--out", "{root}/run", "--method", "lisa",
                                 "--task-steps", "0"], "task_steps"),
    "safelora on its own base model": (["finetune", "--model", "{model}", "--out", "{root}/run", "--method",
                                        "safelora", "--base-model", "{model}", *TRAIN], "no alignment direction"),
    "antidote harmful data missing": (["finetune", "--model", "{model}", "--out", "{root}/run", "--method",
                                       "antidote", "--harmful-data", "{root}/nope.jsonl", *TRAIN], "nope.jsonl"),
    "align with a method that does not align": (["align", "--model", "{model}", "--out", "{root}/al", "--method",
                                                 "mix"], "does not change the alignment stage"),
    # finetune: data
    "unknown task": (["finetune", "--model", "{model}", "--out", "{root}/run", "--task", "nope"], "unknown task"),
    "file task without file": (["finetune", "--model", "{model}", "--out", "{root}/run", "--task", "sst2"],
                               "needs a training file"),
    "missing data file": (["finetune", "--model", "{model}", "--out", "{root}/run", "--task", "jsonl",
                           "--task-train", "{root}/nope.jsonl"], "does not exist"),
    "malformed jsonl": (["finetune", "--model", "{model}", "--out", "{root}/run", "--task", "jsonl",
                         "--task-train", "{root}/malformed.jsonl"], "malformed.jsonl:2: not valid JSON"),
    "empty data file": (["finetune", "--model", "{model}", "--out", "{root}/run", "--task", "jsonl",
                         "--task-train", "{root}/empty.jsonl"], "empty"),
    "row without response": (["finetune", "--model", "{model}", "--out", "{root}/run", "--task", "jsonl",
                              "--task-train", "{root}/no_response.jsonl"], "'response' is missing"),
    "data not utf-8": (["finetune", "--model", "{model}", "--out", "{root}/run", "--task", "jsonl",
                        "--task-train", "{root}/latin1.jsonl"], "UTF-8"),
    "data is a folder": (["finetune", "--model", "{model}", "--out", "{root}/run", "--task", "jsonl",
                          "--task-train", "{root}/mine"], "mine"),
    "bad safety data": (["finetune", "--model", "{model}", "--out", "{root}/run", "--method", "spf",
                         "--safety-data", "{root}/safety_bad.jsonl"], "safety_bad.jsonl:1"),
    # finetune: training that cannot succeed
    "diverging learning rate": (["finetune", "--model", "{model}", "--out", "{root}/run", "--learning-rate", "1e30",
                                 "--task", "jsonl", "--task-train", "{root}/good.jsonl", "--steps", "3",
                                 "--batch-size", "2"], "diverged"),
    "spf diverging learning rate": (["finetune", "--model", "{model}", "--out", "{root}/run", "--method", "spf",
                                     "--rank", "4", "--safety-samples", "2", "--learning-rate", "1e30", "--task",
                                     "jsonl", "--task-train", "{root}/good.jsonl", "--steps", "3", "--batch-size",
                                     "2"], "non-finite"),
    "truncated weights": (["finetune", "--model", "{root}/truncated", "--out", "{root}/run"],
                          "truncated or corrupt"),
    "every response cut": (["finetune", "--model", "{model}", "--out", "{root}/run", "--task", "jsonl",
                            "--task-train", "{root}/good.jsonl", "--max-length", "4", *TRAIN],
                           "no trainable tokens"),
    "finetune without a chat template": (["finetune", "--model", "{root}/no_template", "--out", "{root}/run", *TRAIN],
                                         "--chat-template"),
    "chat template file missing": (["finetune", "--model", "{root}/no_template", "--out", "{root}/run",
                                    "--chat-template", "{root}/nope.jinja", *TRAIN], "nope.jinja"),
    # jailbreaks
    "template file without placeholder": (["eval", "--model", "{model}", "--out", "{root}/e.json", "--task", "none",
                                           "--jailbreaks", "{root}/templates.csv"], "has no placeholder"),
    "jailbreak requests 0": (["eval", "--model", "{model}", "--out", "{root}/e.json", "--jailbreaks", "builtin",
                              "--jailbreak-requests", "0"], "must be positive"),
    "suffixes not from gcg": (["eval", "--model", "{model}", "--out", "{root}/e.json", "--suffixes",
                               "{root}/eval.json"], "not a GCG result file"),
    "gcg without targets": (["gcg", "--model", "{model}", "--harmful", "{root}/good.jsonl", "--out",
                             "{root}/g.json"], "good.jsonl"),
    "judge without its path": (["eval", "--model", "{model}", "--out", "{root}/e.json", "--judge", "llamaguard"],
                               "needs a path"),
    # --config files
    "config missing": (["finetune", "--config", "{root}/nope.yaml"], "no such file"),
    "config not yaml": (["finetune", "--config", "{root}/bad.yaml"], "not valid YAML"),
    "config a list": (["finetune", "--config", "{root}/list.yaml"], "must hold a mapping"),
    "config unknown key": (["finetune", "--model", "{model}", "--out", "{root}/run", "--config",
                            "{root}/unknown.yaml"], "unknown key(s) stepz"),
    # align
    "align out is the model": (["align", "--model", "{model}", "--out", "{model}", "--overwrite"],
                               "would overwrite the input"),
    "align over a folder safeft did not write": (["align", "--model", "{model}", "--out", "{root}/mine"],
                                                 "already exists and is not empty"),
    "align model missing": (["align", "--model", "{root}/nope", "--out", "{root}/aligned"],
                            "no such model directory"),
    # eval
    "eval out is a model file": (["eval", "--model", "{model}", "--out", "{model}/config.json", "--overwrite"],
                                 "would overwrite the input"),
    "eval out is a folder": (["eval", "--model", "{model}", "--out", "{root}/mine"], "is a directory"),
    "eval out exists": (["eval", "--model", "{model}", "--out", "{root}/eval.json"], "pass --overwrite"),
    "eval model missing": (["eval", "--model", "{root}/nope", "--out", "{root}/e.json"], "no such model directory"),
    "eval judge missing": (["eval", "--model", "{model}", "--out", "{root}/e.json", "--judge", "{root}/nope"],
                           "no such model directory"),
    "eval harmful file missing": (["eval", "--model", "{model}", "--out", "{root}/e.json", "--harmful",
                                   "{root}/nope.csv"], "nope.csv"),
    "eval unknown task": (["eval", "--model", "{model}", "--out", "{root}/e.json", "--task", "nope"],
                          "unknown task"),
    "eval test file for a built-in task": (["eval", "--model", "{model}", "--out", "{root}/e.json", "--task-test",
                                            "{root}/good.jsonl"], "has its own test split"),
    "eval without a chat template": (["eval", "--model", "{root}/no_template", "--out", "{root}/e.json"],
                                     "--chat-template"),
    "eval of a diverged model": (["eval", "--model", "{root}/nan_model", "--out", "{root}/e.json"],
                                 "non-finite weights"),
    # subspace and analyze
    "estimate out is the model": (["subspace", "estimate", "--model", "{model}", "--out", "{model}",
                                   "--overwrite"], "would overwrite the input"),
    "estimate samples missing": (["subspace", "estimate", "--model", "{model}", "--out", "{root}/s", "--samples",
                                  "{root}/nope.jsonl"], "nope.jsonl"),
    "estimate samples malformed": (["subspace", "estimate", "--model", "{model}", "--out", "{root}/s",
                                    "--samples", "{root}/safety_bad.jsonl"], "safety_bad.jsonl:1"),
    "estimate zero samples": (["subspace", "estimate", "--model", "{model}", "--out", "{root}/s", "--num-samples",
                               "0"], "between 1 and"),
    "estimate rank above a matrix": (["subspace", "estimate", "--model", "{model}", "--out", "{root}/s", "--rank",
                                      "1000"], "exceeds the smaller dimension"),
    "spf zero safety samples": (["finetune", "--model", "{model}", "--out", "{root}/run", "--method", "spf",
                                 "--safety-samples", "0"], "safety_samples must be positive"),
    "analyze one sample": (["analyze", "--model", "{model}", "--out", "{root}/a", "--num-samples", "1"],
                           "num_samples must be >= 2"),
    "show a folder that is no subspace": (["subspace", "show", "{root}/mine"], "not a saved subspace"),
    "analyze out is the model": (["analyze", "--model", "{model}", "--out", "{model}", "--overwrite"],
                                 "would overwrite the input"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_named_with_exit_code_2_and_changes_nothing(world, case):
    argv, expected = CASES[case]
    args = [a.format(model=world / "model", root=world) for a in argv]
    before = tree(world)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, f"{case}: exit {result.exit_code}\n{result.output}{result.exception!r}"
    assert "Traceback" not in result.output
    assert expected.lower() in result.output.lower(), f"{case}: {result.output}"
    message = result.output[result.output.rfind("Error"):]
    assert len(message.strip().splitlines()) <= 3, message  # a short message, not a dump
    assert tree(world) == before, f"{case} changed or left files"
    assert not list(world.glob("*.partial")) and not list(world.glob(".*.lock"))


def test_a_lora_output_refuses_a_base_model_swapped_at_its_path(world):
    from safeft.answers import model_key
    from safeft.config import DataConfig, TrainConfig
    from safeft.methods import build_method
    from safeft.recipes.finetune import finetune, load_finetuned

    base = world / "model"
    key = model_key(str(base))
    finetune(base, DataConfig(task="sentiment", max_train=4), build_method("sft"),
             TrainConfig(steps=1, batch_size=2, lora_r=2), world / "run", world / "cache")
    load_finetuned(world / "run")  # the base it was trained on: merges
    tiny_llama(seed=1).save_pretrained(base)  # another checkpoint at the same path
    with pytest.raises(ValueError, match="now holds other weights"):
        load_finetuned(world / "run")
    assert model_key(str(base)) != key  # caches keyed by the model's content move on too


def test_every_command_that_loads_a_model_takes_a_chat_template(world):
    template = str(world / "chatml.jinja")
    for command in (["finetune", "--model", str(world / "no_template"), "--out", str(world / "run"), "--task",
                     "sentiment", "--max-train", "4", "--lora-r", "2", *TRAIN],
                    ["eval", "--model", str(world / "run"), "--out", str(world / "e.json"), "--task", "none",
                     "--max-new-tokens", "1"],
                    ["subspace", "estimate", "--model", str(world / "no_template"), "--out", str(world / "s"),
                     "--rank", "2", "--num-samples", "1"]):
        result = runner.invoke(app, [*command, "--chat-template", template])
        assert result.exit_code == 0, result.output + repr(result.exception)
    for command in ("align", "analyze"):
        assert "--chat-template" in runner.invoke(app, [command, "--help"]).output


def test_tracebacks_only_with_debug_and_bugs_are_told_apart_from_bad_input(world, monkeypatch):
    from safeft.options import DEBUG

    monkeypatch.setattr(DEBUG, "on", False)  # restored after the test, whatever --debug set
    args = ["finetune", "--model", str(world / "nope"), "--out", str(world / "run")]
    debug = runner.invoke(app, ["--debug", *args])
    assert isinstance(debug.exception, FileNotFoundError)  # raised through: the runner shows the traceback
    import safeft.recipes.finetune

    def broken(*args, **kwargs):
        raise RuntimeError("internal state lost")

    monkeypatch.setattr(safeft.recipes.finetune, "finetune", broken)
    result = runner.invoke(app, ["finetune", "--model", str(world / "model"), "--out", str(world / "run")])
    assert result.exit_code == 1 and "RuntimeError: internal state lost" in result.output
    assert "--debug" in result.output and "Traceback" not in result.output


def test_examples_beyond_the_position_limit_are_cut_with_a_count():
    tokenizer = byte_tokenizer()
    from transformers import LlamaConfig, LlamaForCausalLM

    from safeft.data.examples import ChatExample
    from safeft.train import encode_for_training

    config = tiny_llama().config
    short = LlamaForCausalLM(LlamaConfig(**{**config.to_dict(), "max_position_embeddings": 40}))
    examples = [ChatExample.from_pair("Hi.", "Hello."), ChatExample.from_pair("A story?", "Once " * 20)]
    with pytest.warns(UserWarning, match=r"1 of 2 training examples are longer than 40 tokens and were cut to the "
                                         r"model's position limit 40"):
        encoded = encode_for_training(short, tokenizer, examples, max_length=256)
    assert max(len(e.input_ids) for e in encoded) == 40
