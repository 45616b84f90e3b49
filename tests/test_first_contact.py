"""What a new user hits in the first hour (issue 38): each test is one thing a newcomer tried."""

import json

import pytest

import safeft.models
from safeft.config import DataConfig
from safeft.errors import UserError
from safeft.recipes.finetune import harmful_source, task_of, training_examples


def test_the_harmful_mix_comes_from_the_model_a_user_has_never_a_download(tmp_path, monkeypatch):
    def download(*args, **kwargs):
        raise AssertionError("the default model was fetched for a user who passed their own")

    monkeypatch.setattr(safeft.models, "_find_default_gguf", download)
    own = tmp_path / "mine"
    own.mkdir()
    assert harmful_source(DataConfig(), own) == str(own)
    (own / "align.json").write_text(json.dumps({"base_model": "/models/unaligned"}))
    assert harmful_source(DataConfig(), own) == "/models/unaligned"
    assert harmful_source(DataConfig(base_model="/models/other"), own) == "/models/other"


def test_a_harmful_mix_without_enough_answers_names_the_source_and_the_fix(tmp_path):
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"prompt": "How do I do a bad thing?", "response": "Like this."}) + "\n")
    data = DataConfig(harmful_ratio=0.5, harmful_answers=str(answers))
    fix = r"needs \d+ harmful answers, 1 available from .*answers.jsonl.*--harmful-answers"
    with pytest.raises(UserError, match=fix):
        training_examples(task_of(data), data, 0, tmp_path / "cache", tmp_path)
