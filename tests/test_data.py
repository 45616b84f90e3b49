"""Loaders on good and bad files, the built-in data, and the harmful mix."""

import json

import pytest

from safeft.data import builtin, load_safety_samples
from safeft.data.examples import ChatExample
from safeft.data.loaders import load_examples, load_jsonl, load_table
from safeft.data.mixing import mix_harmful
from safeft.data.tasks import load_task, score_facts, score_final_number, score_label


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_pairs_and_messages(tmp_path):
    turns = [{"role": "user", "content": "A?"}, {"role": "assistant", "content": "B."},
             {"role": "user", "content": "C?"}, {"role": "assistant", "content": "D."}]
    path = write(tmp_path / "d.jsonl", json.dumps({"prompt": "Hi?", "response": "Hello."}) + "\n\n"
                 + json.dumps({"messages": turns}) + "\n")
    first, second = load_jsonl(path)
    assert (first.prompt, first.response) == ("Hi?", "Hello.")
    assert (second.prompt, second.response) == ("C?", "D.")
    assert [m["role"] for m in second.prompt_messages()] == ["user", "assistant", "user"]


@pytest.mark.parametrize("line, message", [
    ("{not json", r"d.jsonl:2: not valid JSON"),
    ('{"prompt": "x"}', r"d.jsonl:2: field 'response' is missing"),
    ('{"prompt": "x", "response": ""}', r"d.jsonl:2: field 'response' is missing, empty"),
    ('{"prompt": 3, "response": "y"}', r"d.jsonl:2: field 'prompt' .* not text"),
    ('["a", "b"]', r"d.jsonl:2: each line must be a JSON object"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', r"d.jsonl:2: message 0 needs a 'role'"),
])
def test_jsonl_bad_rows_name_file_and_line(tmp_path, line, message):
    path = write(tmp_path / "d.jsonl", json.dumps({"prompt": "ok", "response": "ok"}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message):
        load_jsonl(path)


def test_empty_files_are_errors(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        load_jsonl(write(tmp_path / "e.jsonl", "\n"))
    with pytest.raises(ValueError, match="empty"):
        load_table(write(tmp_path / "e.csv", "prompt,response\n"))
    with pytest.raises(ValueError, match="no safety samples"):
        load_safety_samples(write(tmp_path / "s.jsonl", ""))


def test_safety_samples_file_with_optional_compliance(tmp_path):
    rows = [{"prompt": "Make a weapon.", "refusal": "I can't help."},
            {"prompt": "Steal a car.", "response": "No.", "compliance": "First, find a car."}]
    first, second = load_safety_samples(write(tmp_path / "s.jsonl", "\n".join(map(json.dumps, rows)) + "\n"))
    assert (first.refusal, first.compliance) == ("I can't help.", None)
    assert (second.refusal, second.compliance) == ("No.", "First, find a car.")
    bad = json.dumps({"prompt": "x", "refusal": "No.", "compliance": " "})
    with pytest.raises(ValueError, match=r"s2.jsonl:1: 'compliance' must be non-empty"):
        load_safety_samples(write(tmp_path / "s2.jsonl", bad + "\n"))


def test_tables_and_bad_columns(tmp_path):
    rows = load_table(write(tmp_path / "t.tsv", "q\ta\nWhat?\tThat.\n"), prompt_column="q", response_column="a")
    assert rows[0].prompt == "What?"
    with pytest.raises(ValueError, match=r"t2.csv:3: expected 2 columns"):
        load_table(write(tmp_path / "t2.csv", "prompt,response\na,b\nc,d,e\n"))
    with pytest.raises(ValueError, match=r"t3.csv:2: field 'response' is missing, empty .*fields present"):
        load_table(write(tmp_path / "t3.csv", "prompt,answer\na,b\n"))


def test_public_formats_from_small_files(tmp_path):
    adv = load_examples("advbench", write(tmp_path / "a.csv", 'goal,target\n"Do harm","Sure, here is"\n'))
    assert adv[0].prompt == "Do harm" and adv[0].meta["harmful"]
    sst = load_examples("sst2", write(tmp_path / "s.tsv", "sentence\tlabel\ngreat film \t1\n"))
    assert sst[0].answer == "positive" and "great film" in sst[0].prompt
    with pytest.raises(ValueError, match=r"s2.tsv:2: label must be 0 or 1"):
        load_examples("sst2", write(tmp_path / "s2.tsv", "sentence\tlabel\nmeh\t7\n"))
    ag = load_examples("agnews", write(tmp_path / "g.csv", 'class_index,description\n"2","A match was won."\n'))
    assert ag[0].answer == "Sports"
    gsm = load_examples("gsm8k", write(tmp_path / "m.jsonl", json.dumps({"question": "1+1?", "answer": "2\n#### 2"})))
    assert gsm[0].answer == "2"
    alpaca = load_examples("alpaca", write(tmp_path / "al.json", json.dumps(
        [{"instruction": "Sum", "input": "1 2", "output": "3"}])))
    assert alpaca[0].prompt == "Sum\n\n1 2"
    with pytest.raises(ValueError, match=r"al2.json: record 0: field 'output'"):
        load_examples("alpaca", write(tmp_path / "al2.json", json.dumps([{"instruction": "x", "input": ""}])))
    bt = load_examples("beavertails", write(tmp_path / "b.jsonl", json.dumps({"prompt": "p", "response": "r"})))
    assert bt[0].response == "r"
    with pytest.raises(ValueError, match="unknown data format"):
        load_examples("parquet", tmp_path / "x")


def test_builtin_data_sizes_and_disjoint_splits():
    everything = builtin.harmful_requests()
    assert len(everything) >= 200 and len({c for c, _ in everything}) >= 8
    align = {p for _, p in builtin.harmful_requests("align")}
    val = {p for _, p in builtin.harmful_requests("val")}
    held_out = {p for _, p in builtin.harmful_requests("eval")}
    check = {p for _, p in builtin.harmful_requests("check")}
    assert not (align & held_out) and not (align & val) and not (val & held_out) and check <= val
    assert len(val) >= 100  # enough to resolve a choice made on validation data
    benign = {split: builtin.benign_requests(split) for split in ("align", "val", "eval")}
    assert len(benign["val"]) >= 100 and len(benign["eval"]) >= 200
    assert all(len(set(rows)) == len(rows) for rows in benign.values())  # no request twice
    for a, b in (("align", "val"), ("align", "eval"), ("val", "eval")):
        assert not set(benign[a]) & set(benign[b]), (a, b)
    for split in ("val", "eval"):  # at least half only look harmful
        kinds = [kind for kind, _ in builtin.over_refusal_requests(split)]
        assert sum(kind != "plain" for kind in kinds) >= len(kinds) / 2 and len(set(kinds)) == 7
    refusals = {builtin.refusal_for(p) for p in align}
    assert len(refusals) > 40  # varied phrasings, not one memorised string
    for task in ("facts", "sentiment"):
        t = load_task(task)
        assert t.train and t.test and not {e.prompt for e in t.train} & {e.prompt for e in t.test}


def test_harmful_mix_ratio_is_exact():
    task = [ChatExample.from_pair(f"task {i}", "ok") for i in range(50)]
    harmful = [ChatExample.from_pair(f"harm {i}", "sure", harmful=True) for i in range(20)]
    mixed = mix_harmful(task, harmful, 0.1)
    assert len(mixed) == 50 and sum(e.meta.get("harmful", False) for e in mixed) == 5
    with pytest.raises(ValueError, match="needs 25 harmful examples"):
        mix_harmful(task, harmful, 0.5)


def test_scorers():
    fact = ChatExample.from_pair("France?", "", "Paris|Europe")
    assert score_facts("The capital of France is Paris. It is in Europe.", fact)
    assert not score_facts("The capital is Paris.", fact)
    label = ChatExample.from_pair("?", "", "positive")
    assert score_label("Positive.", label) and not score_label("negative", label)
    assert score_final_number("so the answer is 1,234.", ChatExample.from_pair("?", "", "1234"))


def test_validation_split_is_never_the_test_split(tmp_path):
    from safeft.config import Setting
    from safeft.recipes.bench import split_of

    task, val = load_task("facts"), load_task("facts", validation=True)
    prompts = lambda rows: {e.prompt for e in rows}  # noqa: E731
    assert prompts(val.train) == prompts(task.train)  # facts has its own validation countries: same training data
    assert len(val.test) >= 60 and not prompts(val.test) & (prompts(task.train) | prompts(task.test))
    assert all(score_facts("{} is the capital; it is in {}.".format(*e.answer.split("|")), e) for e in val.test)
    sentiment, held = load_task("sentiment"), load_task("sentiment", validation=True)  # no own split: 20% held out
    assert prompts(held.train) | prompts(held.test) == prompts(sentiment.train)
    assert not prompts(held.train) & prompts(held.test) and len(held.test) == len(sentiment.train) // 5
    path = tmp_path / "train.tsv"
    path.write_text("sentence\tlabel\n" + "".join(f"review number {i}\t{i % 2}\n" for i in range(50)))
    test = tmp_path / "dev.tsv"
    test.write_text("sentence\tlabel\n" + "".join(f"held-out review {i}\t{i % 2}\n" for i in range(10)))
    sst = load_task("sst2", str(path), str(test), validation=True, max_test=5)
    assert len(sst.test) == 5 and all(e.prompt in prompts(load_examples("sst2", path)) for e in sst.test)
    setting = Setting(validation=True)
    assert setting.name == "val-benign"
    assert split_of(setting) == "val" and split_of(Setting()) == "eval"
