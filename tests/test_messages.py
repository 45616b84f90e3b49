"""Messages that name the problem and the fix: each bad input below is exit code 2, one short line, no traceback,
and nothing under the test's folder changed (compared byte for byte)."""

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from safeft.cli import app
from safeft.testing import byte_tokenizer, tiny_llama

runner = CliRunner()


def tree(path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def world(tmp_path, tiny_dir):
    shutil.copytree(tiny_dir, tmp_path / "model")
    rows = [{"prompt": f"Say {i}.", "response": f"{i}."} for i in range(8)]
    (tmp_path / "good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "one.jsonl").write_text(json.dumps(rows[0]) + "\n")
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "caf\xe9", "response": "b"}\n'.encode("latin-1"))
    (tmp_path / "latin1.csv").write_bytes("prompt,response\nSay.,caf\xe9\n".encode("latin-1"))
    (tmp_path / "safety_latin1.jsonl").write_bytes('{"prompt": "caf\xe9", "refusal": "no"}\n'.encode("latin-1"))
    unanswered = [{"messages": [{"role": "user", "content": f"Say {i}."}]} for i in range(4)]
    (tmp_path / "unanswered.jsonl").write_text("".join(json.dumps(r) + "\n" for r in unanswered))
    (tmp_path / "raises.jinja").write_text("{{ raise_exception('no system role here') }}")
    (tmp_path / "syntax.jinja").write_text("{% for m in messages %}{{ m['content'] }")
    (tmp_path / "a_file.txt").write_text("text")
    nan = tiny_llama(seed=0)
    with torch.no_grad():
        nan.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    nan.save_pretrained(tmp_path / "nan_model")
    byte_tokenizer().save_pretrained(tmp_path / "nan_model")
    return tmp_path


TRAIN = ["--steps", "1", "--batch-size", "2"]
FT = ["finetune", "--model", "{model}", "--out", "{root}/run"]

CASES = {
    "data not utf-8 names the file": ([*FT, "--task", "jsonl", "--task-train", "{root}/latin1.jsonl", *TRAIN],
                                      "latin1.jsonl:1: not UTF-8 text"),
    "csv not utf-8 names the file": ([*FT, "--task", "csv", "--task-train", "{root}/latin1.csv", *TRAIN],
                                     "latin1.csv:2: not UTF-8 text"),
    "safety samples not utf-8": (["subspace", "estimate", "--model", "{model}", "--out", "{root}/s", "--samples",
                                  "{root}/safety_latin1.jsonl"], "safety_latin1.jsonl:1: not UTF-8 text"),
    "out under /proc": ([*FT[:3], "--out", "/proc/safeft-test-out", *TRAIN],
                        "cannot write --out /proc/safeft-test-out"),
    "out under a file": ([*FT[:3], "--out", "{root}/a_file.txt/run", *TRAIN], "a_file.txt is a file, not a folder"),
    "eval out under /proc": (["eval", "--model", "{model}", "--out", "/proc/safeft-test.json", "--task", "none"],
                             "cannot write --out /proc/safeft-test.json"),
    "eval out under a file": (["eval", "--model", "{model}", "--out", "{root}/a_file.txt/e.json", "--task", "none"],
                              "a_file.txt is a file, not a folder"),
    "built-in task with a training file": ([*FT, "--task", "facts", "--task-train", "{root}/good.jsonl", *TRAIN],
                                           "the built-in task 'facts' has its own data; --task-train is for a task "
                                           "read from files: name the file's format with --task"),
    "nan-weight model": (["finetune", "--model", "{root}/nan_model", "--out", "{root}/run", *TRAIN],
                         "nan_model has non-finite weights (NaN or inf, first in "
                         "model.layers.0.mlp.down_proj.weight)"),
    "weight decay nan": ([*FT, "--weight-decay", "nan", *TRAIN], "weight_decay must be a finite number >= 0"),
    "chat template that raises": ([*FT, "--chat-template", "{root}/raises.jinja", *TRAIN],
                                  "raises.jinja cannot render a user -> assistant exchange: TemplateError: no system "
                                  "role here"),
    "chat template syntax error": ([*FT, "--chat-template", "{root}/syntax.jinja", *TRAIN],
                                   "syntax.jinja cannot render a user -> assistant exchange: TemplateSyntaxError"),
    "eval with a chat template that raises": (["eval", "--model", "{model}", "--out", "{root}/e.json", "--task",
                                               "none", "--chat-template", "{root}/raises.jinja"], "raises.jinja"),
    "one-row file": ([*FT, "--task", "jsonl", "--task-train", "{root}/one.jsonl", *TRAIN],
                     "one.jsonl: 1 example is too few to hold out a test share (20%)"),
    "one-row file under --validation": ([*FT, "--task", "jsonl", "--task-train", "{root}/one.jsonl", "--task-test",
                                         "{root}/good.jsonl", "--validation", *TRAIN], "turn --validation off"),
    "bench out inside the model": (["bench", "--model", "{model}", "--out", "{model}/bench", "--steps", "1",
                                    "--methods", "sft"], "would overwrite the input"),
    "bench out is the model": (["bench", "--model", "{model}", "--out", "{model}", "--methods", "sft"],
                               "would overwrite the input"),
    "finetune rows without answers": ([*FT, "--task", "jsonl", "--task-train", "{root}/unanswered.jsonl", *TRAIN],
                                      "unanswered.jsonl: 4 of 4 examples have no answer"),
    "analyze rows without answers": (["analyze", "--model", "{model}", "--out", "{root}/a", "--task", "jsonl",
                                      "--task-data", "{root}/unanswered.jsonl"],
                                     "unanswered.jsonl: 4 of 4 examples have no answer"),
    "analyze safety rows without answers": (["analyze", "--model", "{model}", "--out", "{root}/a", "--safety-data",
                                             "{root}/unanswered.jsonl", "--safety-format", "jsonl"],
                                            "unanswered.jsonl: 4 of 4 examples have no answer"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_message_names_the_problem_and_the_fix(world, case):
    argv, expected = CASES[case]
    args = [a.format(model=world / "model", root=world) for a in argv]
    before = tree(world)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, f"{case}: exit {result.exit_code}\n{result.output}{result.exception!r}"
    assert "Traceback" not in result.output and "bug" not in result.output
    assert expected.lower() in result.output.lower(), f"{case}: {result.output}"
    message = result.output[result.output.rfind("Error"):]
    assert len(message.strip().splitlines()) == 1, message
    assert tree(world) == before, f"{case} changed or left files"


def test_eval_refuses_an_unwritable_out_before_loading_anything(world, monkeypatch):
    import safeft.recipes.evaluate

    def never(*args, **kwargs):
        raise AssertionError("evaluation ran before --out was checked")

    monkeypatch.setattr(safeft.recipes.evaluate, "evaluate_dir", never)
    result = runner.invoke(app, ["eval", "--model", str(world / "model"), "--out", "/proc/safeft-test.json"])
    assert result.exit_code == 2 and "cannot write --out" in result.output, result.output


def test_a_utf8_bom_csv_is_read(tmp_path):
    from safeft.data.loaders import load_examples

    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbfprompt,response\r\nSay 1.,1.\r\nSay 2.,2.\r\n")  # as spreadsheet programs save it
    assert [(e.prompt, e.response) for e in load_examples("csv", path)] == [("Say 1.", "1."), ("Say 2.", "2.")]
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "response": "b"}\n')
    assert load_examples("jsonl", jsonl)[0].response == "b"


def test_one_shared_check_refuses_examples_without_answers():
    from safeft.data.examples import ChatExample, require_responses
    from safeft.errors import UserError

    rows = [ChatExample.from_pair("a", "b"), ChatExample(({"role": "user", "content": "c"},))]
    with pytest.raises(UserError, match=r"data.jsonl: 1 of 2 examples have no answer .*first: example 2"):
        require_responses(rows, "data.jsonl")
