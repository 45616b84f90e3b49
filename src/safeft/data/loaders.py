"""Read chat examples from JSONL, CSV/TSV, JSON arrays, HF datasets, and the public sets' own formats.

Every reader reports a bad row with its file and line (or row index) and the fix; an empty result is an error.
Paths are always arguments: nothing here knows where a data set lives.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path

from safeft.data.examples import ChatExample, validate_messages
from safeft.errors import UserError


def _text(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        present = ", ".join(sorted(row)) or "none"
        raise UserError(f"{where}: field {key!r} is missing, empty or not text (fields present: {present})")
    return value


def _nonempty(examples: list[ChatExample], path: Path | str) -> list[ChatExample]:
    if not examples:
        raise UserError(f"{path}: the data set is empty; it must hold at least one example")
    return examples


def read_text(path: Path) -> str:
    """Return the text of a UTF-8 file (a leading byte-order mark, as spreadsheet programs write, dropped); raise
    ``UserError`` naming the file and the first bad byte if it is in another encoding."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        line = error.object[:error.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
                        f"{error.start}); save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict]]:
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{where}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{where}: each line must be a JSON object, got {type(row).__name__}")
        yield where, row


def _json_array_rows(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        rows = json.loads(read_text(path))
    except json.JSONDecodeError as error:
        raise UserError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(rows, list):
        raise UserError(f"{path}: expected a JSON array of objects")
    for i, row in enumerate(rows):
        where = f"{path}: record {i}"
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected an object, got {type(row).__name__}")
        yield where, row


def _table_rows(path: Path, delimiter: str | None, header: bool | list[str] = True) -> Iterator[tuple[str, dict]]:
    delimiter = delimiter or ("\t" if path.suffix == ".tsv" else ",")
    with io.StringIO(read_text(path), newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else
                            csv.QUOTE_MINIMAL)
        names = next(reader, None) if header is True else header
        if not names:
            raise UserError(f"{path}: the file is empty (no header row)")
        for cells in reader:
            where = f"{path}:{reader.line_num}"
            if not cells:
                continue
            if len(cells) != len(names):
                raise UserError(f"{where}: expected {len(names)} columns ({', '.join(names)}), got {len(cells)}")
            yield where, dict(zip(names, cells))


def load_jsonl(path: str | Path, prompt_field: str = "prompt", response_field: str = "response") -> list[ChatExample]:
    """Return examples from JSONL rows with ``messages``, or with ``prompt_field`` / ``response_field``."""
    path = Path(path)
    examples = []
    for where, row in _jsonl_rows(path):
        if "messages" in row:
            examples.append(ChatExample(validate_messages(row["messages"], where), row.get("answer")))
        else:
            examples.append(ChatExample.from_pair(_text(row, prompt_field, where), _text(row, response_field, where),
                                                  row.get("answer")))
    return _nonempty(examples, path)


def load_table(path: str | Path, prompt_column: str = "prompt", response_column: str = "response",
               delimiter: str | None = None) -> list[ChatExample]:
    """Return examples from a CSV or TSV file with a header row (delimiter from the suffix unless given)."""
    path = Path(path)
    examples = [ChatExample.from_pair(_text(row, prompt_column, where), _text(row, response_column, where))
                for where, row in _table_rows(path, delimiter)]
    return _nonempty(examples, path)


def load_hf(name_or_path: str, split: str = "train", prompt_field: str = "prompt",
            response_field: str = "response") -> list[ChatExample]:
    """Return examples from a local ``datasets`` directory (``save_to_disk``) or a dataset already in the HF cache."""
    import datasets

    path = Path(name_or_path)
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        data = datasets.load_from_disk(str(path))
        data = data[split] if isinstance(data, datasets.DatasetDict) else data
    else:
        data = datasets.load_dataset(name_or_path, split=split)
    examples = []
    for i, row in enumerate(data):
        where = f"{name_or_path}[{split}] row {i}"
        if "messages" in row:
            examples.append(ChatExample(validate_messages(row["messages"], where), row.get("answer")))
        else:
            examples.append(ChatExample.from_pair(_text(row, prompt_field, where), _text(row, response_field, where)))
    return _nonempty(examples, name_or_path)


# --- the public sets' own formats (see ../shared/data/README.md); each returns ChatExamples ----------------------

SENTIMENT_PROMPT = "Classify the sentiment of this review as positive or negative.\nReview: {text}"
TOPIC_PROMPT = "Classify the topic of this news article as World, Sports, Business or Sci/Tech.\nArticle: {text}"


def read_advbench(path: str | Path) -> list[ChatExample]:
    """AdvBench ``harmful_behaviors.csv`` (goal, target): harmful requests; the response is GCG's target opening."""
    path = Path(path)
    rows = _table_rows(path, ",")
    return _nonempty([ChatExample.from_pair(_text(r, "goal", w), _text(r, "target", w), harmful=True,
                                            source="advbench") for w, r in rows], path)


def read_sst2(path: str | Path) -> list[ChatExample]:
    """SST-2 TSV (sentence, label 0/1): sentiment classification, answer ``negative`` / ``positive``."""
    path = Path(path)
    examples = []
    for where, row in _table_rows(path, "\t"):
        label = {"0": "negative", "1": "positive"}.get(row.get("label", "").strip())
        if label is None:
            raise UserError(f"{where}: label must be 0 or 1, got {row.get('label')!r}")
        text = _text(row, "sentence", where).strip()
        examples.append(ChatExample.from_pair(SENTIMENT_PROMPT.format(text=text), label, label, source="sst2"))
    return _nonempty(examples, path)


def read_agnews(path: str | Path, classes: tuple[str, ...] = ("World", "Sports", "Business", "Sci/Tech")
                ) -> list[ChatExample]:
    """AG News CSV (class_index 1-4, [title,] description): topic classification from the description."""
    path = Path(path)
    examples = []
    for where, row in _table_rows(path, ","):
        try:
            label = classes[int(row.get("class_index", "")) - 1]
        except (ValueError, IndexError):
            got = row.get("class_index")
            raise UserError(f"{where}: class_index must be 1..{len(classes)}, got {got!r}") from None
        text = _text(row, "description", where).replace("\\", " ").strip()
        examples.append(ChatExample.from_pair(TOPIC_PROMPT.format(text=text), label, label, source="agnews"))
    return _nonempty(examples, path)


def read_gsm8k(path: str | Path) -> list[ChatExample]:
    """GSM8K JSONL (question, answer ending in ``#### N``): the answer is the final number."""
    path = Path(path)
    examples = []
    for where, row in _jsonl_rows(path):
        answer = _text(row, "answer", where)
        if "####" not in answer:
            raise UserError(f"{where}: answer has no '#### <number>' final line")
        final = answer.rsplit("####", 1)[1].strip().replace(",", "")
        examples.append(ChatExample.from_pair(_text(row, "question", where), answer, final, source="gsm8k"))
    return _nonempty(examples, path)


def _instruction_rows(path: Path, source: str, **meta) -> list[ChatExample]:
    examples = []
    for where, row in _json_array_rows(path):
        instruction = _text(row, "instruction", where)
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            raise UserError(f"{where}: field 'input' must be text")
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        examples.append(ChatExample.from_pair(prompt, _text(row, "output", where), source=source, **meta))
    return _nonempty(examples, path)


def read_alpaca(path: str | Path) -> list[ChatExample]:
    """Alpaca JSON array (instruction, input, output): instruction following."""
    return _instruction_rows(Path(path), "alpaca")


def read_safety_alignment(path: str | Path) -> list[ChatExample]:
    """Safety-Tuned LLaMAs JSON array (instruction, output): harmful request -> safe response."""
    return _instruction_rows(Path(path), "safety_alignment", harmful=True)


def read_beavertails(path: str | Path) -> list[ChatExample]:
    """BeaverTails JSONL (prompt, response, is_safe=false): harmful request -> harmful (compliant) answer."""
    path = Path(path)
    return _nonempty([ChatExample.from_pair(_text(r, "prompt", w), _text(r, "response", w), harmful=True,
                                            source="beavertails") for w, r in _jsonl_rows(path)], path)


FORMATS: dict[str, Callable[[str | Path], list[ChatExample]]] = {
    "jsonl": load_jsonl, "csv": load_table, "tsv": load_table, "advbench": read_advbench, "sst2": read_sst2,
    "agnews": read_agnews, "gsm8k": read_gsm8k, "alpaca": read_alpaca, "beavertails": read_beavertails,
    "safety_alignment": read_safety_alignment,
}


def load_examples(format_name: str, path: str | Path) -> list[ChatExample]:
    """Return the examples of ``path`` read as ``format_name`` (one of :data:`FORMATS`, or ``hf``)."""
    if format_name == "hf":
        return load_hf(str(path))
    if format_name not in FORMATS:
        raise UserError(f"unknown data format {format_name!r}; choose one of {sorted(FORMATS) + ['hf']}")
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} does not exist (format {format_name!r})")
    return FORMATS[format_name](path)
