"""Downstream tasks: train/test examples and the score that defines their accuracy.

Built-in:
- ``facts`` (generative): "Write two sentences about <country>: its capital and its continent." A response is
  correct when it names both the capital and the continent (case-insensitive). Test countries are disjoint from
  training countries, so the score measures the format learned plus what the model knows.
- ``sentiment`` (classification): short templated reviews; correct when the response starts with the gold label.
From files (``--task-format`` + paths): ``sst2``, ``agnews`` (label match), ``gsm8k`` (final number match) and
``alpaca`` (no automatic score: accuracy is reported as null, the task loss still is).
"""

from __future__ import annotations

import random
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from safeft.data import builtin
from safeft.data.examples import ChatExample, require_responses
from safeft.data.loaders import SENTIMENT_PROMPT, load_examples
from safeft.errors import UserError

Scorer = Callable[[str, ChatExample], bool]


@dataclass(frozen=True)
class Task:
    """A downstream task: training and test examples, and ``score(response, example) -> correct``.

    ``answer_tokens``: tokens to generate per test answer when fewer than the evaluation's ``max_new_tokens`` decide
    the score (a label task reads only the first word; greedy decoding makes the first tokens the same however
    many follow), None to generate them all."""

    name: str
    train: list[ChatExample]
    test: list[ChatExample]
    score: Scorer | None
    answer_tokens: int | None = None
    validation: list[ChatExample] | None = None  # the task's own validation split, disjoint from train and test

    def accuracy(self, responses: list[str], examples: list[ChatExample] | None = None) -> tuple[int, int] | None:
        """Return ``(correct, total)`` of ``responses`` against the test examples, or None if unscored."""
        examples = examples if examples is not None else self.test
        if self.score is None:
            return None
        return sum(self.score(r, e) for r, e in zip(responses, examples, strict=True)), len(examples)


def score_facts(response: str, example: ChatExample) -> bool:
    """Return True if the response names both the capital and the continent of the example's country."""
    capital, continent = example.answer.split("|")
    text = response.lower()
    return capital.lower() in text and continent.lower() in text


def score_label(response: str, example: ChatExample) -> bool:
    """Return True if the response's first word is the gold label (case-insensitive; punctuation ignored)."""
    words = re.findall(r"[\w/]+", response.lower())
    return bool(words) and words[0] == example.answer.lower()


def score_final_number(response: str, example: ChatExample) -> bool:
    """Return True if the last number in the response equals the gold final number."""
    numbers = re.findall(r"-?\d[\d,]*\.?\d*", response)
    return bool(numbers) and numbers[-1].replace(",", "").rstrip(".") == example.answer


def _facts_rows(countries: list[tuple[str, str, str]]) -> list[ChatExample]:
    """Return one facts example per ``(country, capital, continent)``."""
    return [ChatExample.from_pair(
        f"Write two sentences about {country}: say what its capital is and which continent it is on.",
        f"The capital of {country} is {capital}. {country} is a country in {continent}.",
        f"{capital}|{continent}", source="facts") for country, capital, continent in countries]


def facts_task() -> Task:
    """Return the built-in generative task: 60 train / 20 test countries, and 74 other countries as its own
    validation split."""
    rows = _facts_rows(builtin.COUNTRIES)
    random.Random(0).shuffle(rows)
    return Task("facts", rows[:60], rows[60:], score_facts, validation=_facts_rows(builtin.VALIDATION_COUNTRIES))


def sentiment_task() -> Task:
    """Return the built-in classification task (templated reviews; 160 train / 80 test, disjoint by subject)."""
    rows: dict[bool, list[ChatExample]] = {True: [], False: []}
    for i, subject in enumerate(builtin.SENTIMENT_SUBJECTS):
        for phrases, label in ((builtin.SENTIMENT_POSITIVE, "positive"), (builtin.SENTIMENT_NEGATIVE, "negative")):
            for phrase in phrases:
                text = f"{subject} {phrase}."
                rows[i < 10].append(ChatExample.from_pair(SENTIMENT_PROMPT.format(text=text), label, label,
                                                          source="sentiment"))
    for split in rows.values():
        random.Random(0).shuffle(split)
    return Task("sentiment", rows[True], rows[False], score_label, LABEL_TOKENS)


LABEL_TOKENS = 8  # a class label is its first word: "Sci/Tech" is 3 tokens of SmolLM2's tokenizer, "negative" 1

BUILTIN_TASKS = {"facts": facts_task, "sentiment": sentiment_task}
FILE_SCORERS: dict[str, Scorer | None] = {"sst2": score_label, "agnews": score_label, "gsm8k": score_final_number,
                                          "alpaca": None, "jsonl": None, "csv": None, "tsv": None}


def _check_held_out(train: list[ChatExample], source, alternative: str) -> None:
    """Raise ``UserError`` unless ``train`` is large enough to hold 20% out and train on the rest (2 examples)."""
    if len(train) < 2:
        raise UserError(f"{source}: {len(train)} example is too few to hold out a test share (20%) and train on the "
                        f"rest; give at least 2 examples, or {alternative}")


def load_task(name: str, train_path: str | None = None, test_path: str | None = None, *, max_train: int | None = None,
              max_test: int | None = None, seed: int = 0, validation: bool = False) -> Task:
    """Return a built-in task by name, or a task read from files in format ``name``.

    Args:
        name: ``facts`` / ``sentiment`` (built-in), or a format of :data:`FILE_SCORERS` with ``train_path``.
        train_path, test_path: data files; without ``test_path`` 20% of the training file is held out.
        max_train, max_test: keep a random subset of this size (seeded).
        validation: return a validation split as the test split, so that hyper-parameters are chosen without the
            test split: the task's own (``facts``: 74 countries that are in neither train nor test; the training
            examples are the evaluation's), else 20% of the training examples held out (seeded) and not trained on.
            ``max_test`` then subsets it.
    """
    if name in BUILTIN_TASKS and train_path is not None:
        raise UserError(f"the built-in task {name!r} has its own data; --task-train is for a task read from files: "
                        f"name the file's format with --task (one of {sorted(FILE_SCORERS)})")
    if name in BUILTIN_TASKS:
        if test_path is not None:
            raise UserError(f"the built-in task {name!r} has its own test split; --task-test is for a task read "
                             f"from files (give --task-train too, with a format: {sorted(FILE_SCORERS)})")
        task = BUILTIN_TASKS[name]()
    elif name in FILE_SCORERS:
        if train_path is None:
            raise UserError(f"task format {name!r} needs a training file (--task-train PATH)")
        train = require_responses(load_examples(name, train_path), train_path)
        if test_path:
            test = load_examples(name, test_path)
        else:
            _check_held_out(train, train_path, "--task-test FILE")
            train = list(train)
            random.Random(seed).shuffle(train)
            cut = max(1, len(train) // 5)
            train, test = train[cut:], train[:cut]
            warnings.warn(f"task {name!r}: no test file (--task-test), so {cut} of the {len(train) + cut} examples of "
                          f"{train_path} (20%, seeded) are held out as the test split and not trained on",
                          UserWarning, stacklevel=2)
        task = Task(name, train, test, FILE_SCORERS[name], LABEL_TOKENS if FILE_SCORERS[name] is score_label else None)
    else:
        raise UserError(f"unknown task {name!r}: built-in {sorted(BUILTIN_TASKS)} or a file format "
                         f"{sorted(FILE_SCORERS)} with --task-train")
    if validation and task.validation:
        task = Task(task.name, task.train, task.validation, task.score, task.answer_tokens)
    elif validation:
        _check_held_out(task.train, train_path or f"task {name!r}", "turn --validation off")
        train = list(task.train)
        random.Random(f"validation-{seed}").shuffle(train)
        cut = max(1, len(train) // 5)
        warnings.warn(f"validation: {cut} of the {len(train)} training examples of task {name!r} (20%, seeded) are "
                      "held out as the test split and not trained on", UserWarning, stacklevel=2)
        task = Task(task.name, train[cut:], train[:cut], task.score, task.answer_tokens)
    rng = random.Random(seed)
    train = rng.sample(task.train, max_train) if max_train and max_train < len(task.train) else task.train
    test = rng.sample(task.test, max_test) if max_test and max_test < len(task.test) else task.test
    return Task(task.name, train, test, task.score, task.answer_tokens)
