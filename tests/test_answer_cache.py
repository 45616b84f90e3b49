"""The harmful-answers cache: written atomically, and a damaged one (a line cut short) is named and rebuilt."""

import json

import pytest

import safeft.evaluate
from safeft.answers import compliant_examples, model_key, read_answers


@pytest.fixture
def fake_generate(monkeypatch):
    """Greedy answers without a model's cost: each prompt gets a compliant reply of its own; records the calls."""
    calls = []

    def generate(model, tokenizer, chats, **kwargs):
        calls.append([c[0]["content"] for c in chats])
        return [f"Sure, here is how to do it. Step one: {c[0]['content']}" for c in chats]

    monkeypatch.setattr(safeft.evaluate, "generate", generate)
    return calls


def test_a_cut_cache_is_named_and_rebuilt(tmp_path, tiny_dir, fake_generate):
    first = compliant_examples(str(tiny_dir), None, tmp_path)
    cache = tmp_path / f"harmful_answers-{model_key(str(tiny_dir))}.jsonl"
    whole = cache.read_text()
    assert len(fake_generate) == 1 and first
    cache.write_text(whole[:-30])  # the last line cut short, as a kill or a full disk leaves it
    with pytest.warns(UserWarning, match=f"{cache.name}: 1 damaged line.*generated again and the file is rewritten"):
        again = compliant_examples(str(tiny_dir), None, tmp_path)
    assert again == first and len(fake_generate[1]) == 1  # only the lost answer was generated again
    assert cache.read_text() == whole  # rebuilt whole
    assert [p.name for p in tmp_path.iterdir()] == [cache.name]  # no temporary file left


def test_a_damaged_line_beside_complete_answers_is_dropped_without_generating(tmp_path, tiny_dir, fake_generate):
    first = compliant_examples(str(tiny_dir), None, tmp_path)
    cache = tmp_path / f"harmful_answers-{model_key(str(tiny_dir))}.jsonl"
    whole = cache.read_text()
    cache.write_text(whole + '{"prompt": "an edited li\n[1, 2]\n')
    with pytest.warns(UserWarning, match="2 damaged line"):
        assert compliant_examples(str(tiny_dir), None, tmp_path) == first
    assert len(fake_generate) == 1 and cache.read_text() == whole


def test_the_cache_is_replaced_atomically(tmp_path, tiny_dir, fake_generate, monkeypatch):
    import os

    compliant_examples(str(tiny_dir), None, tmp_path)
    cache = tmp_path / f"harmful_answers-{model_key(str(tiny_dir))}.jsonl"
    rows = [json.loads(line) for line in cache.read_text().splitlines()]
    cache.write_text("".join(json.dumps(r) + "\n" for r in rows[1:]))  # one answer missing: it is generated
    before = cache.read_bytes()

    def crash(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="No space left"):
        compliant_examples(str(tiny_dir), None, tmp_path)
    assert cache.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [cache.name]
    assert len(read_answers(cache)) == len(rows) - 1
