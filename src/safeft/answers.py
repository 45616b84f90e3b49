"""Cached greedy answers of a model (JSONL, one prompt per line), and the harmful answers they give.

The unaligned base model's own answers serve twice: its benign answers are the alignment data's helpful side, and
its substantive answers to harmful requests make the default harmful mix of a threat setting.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from safeft.data import builtin
from safeft.data.examples import ChatExample
from safeft.io import write_text_atomic


def model_key(model_name: str) -> str:
    """Return a short file-name-safe key for a model: for a local directory its name and the fingerprint of its
    weights (another checkpoint at the same path gets another key, so caches never mix models); for the default
    model and hub ids, the name and a hash of it (their content is pinned by name)."""
    from safeft.models import DEFAULT_MODEL, dir_fingerprint

    path = Path(model_name)
    if model_name != DEFAULT_MODEL and path.is_dir():
        return f"{path.resolve().name}-{dir_fingerprint(path)[:8]}"
    return f"{path.name}-{hashlib.sha256(model_name.encode()).hexdigest()[:8]}"


def read_answers(cache_file: Path) -> dict[str, str]:
    """Return ``{prompt: response}`` from a JSONL answer cache ({} if it does not exist).

    A damaged cache (a line cut short by a kill or a full disk, or edited by hand) is not fatal: its readable rows
    are returned and a warning names the file; the answers it lost are generated again and the file rewritten
    (:func:`cached_answers`)."""
    return _read_cache(cache_file)[0]


def _read_cache(cache_file: Path, warn: bool = True) -> tuple[dict[str, str], int]:
    """Return ``({prompt: response}, number of damaged lines)`` of a JSONL answer cache; warn naming the file if
    lines are damaged (and ``warn``)."""
    if not cache_file.exists():
        return {}, 0
    try:
        lines = cache_file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        lines = ["\x00"]  # unreadable as a whole: every answer is generated again
    answers, damaged = {}, 0
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt, response = row["prompt"], row["response"]
        except (json.JSONDecodeError, KeyError, TypeError):
            damaged += 1
            continue
        if isinstance(prompt, str) and isinstance(response, str):
            answers[prompt] = response
        else:
            damaged += 1
    if damaged and warn:
        _warn_damaged(cache_file, damaged)
    return answers, damaged


def _warn_damaged(cache_file: Path, damaged: int) -> None:
    import warnings

    warnings.warn(f"{cache_file}: {damaged} damaged line(s) of this answer cache (cut short or edited) are ignored; "
                  "their answers are generated again and the file is rewritten", stacklevel=3)


def write_answers(cache_file: Path, answers: dict[str, str]) -> None:
    """Write ``answers`` as the JSONL answer cache ``cache_file``, atomically: a reader, or a run killed while it
    writes, sees the old file or the new one, never a line cut short."""
    write_text_atomic(cache_file, "".join(json.dumps({"prompt": prompt, "response": reply}, ensure_ascii=False) + "\n"
                                          for prompt, reply in answers.items()))


def cached_answers(model, tokenizer, prompts: Sequence[str], cache_file: Path, max_new_tokens: int = 96) -> dict:
    """Return ``{prompt: greedy answer}`` of ``model``, generating only the prompts not yet in ``cache_file`` (a
    damaged cache is rebuilt: its lost answers generated again, the file rewritten atomically)."""
    from safeft.evaluate import generate

    cache, damaged = _read_cache(cache_file)
    missing = [p for p in dict.fromkeys(prompts) if p not in cache]
    if missing:
        replies = generate(model, tokenizer, [[{"role": "user", "content": p}] for p in missing],
                           max_new_tokens=max_new_tokens, desc="base-model answers")
        cache.update(zip(missing, replies, strict=True))
    if missing or damaged:
        write_answers(cache_file, cache)
    return {p: cache[p] for p in prompts}


def compliant_examples(base_model: str, harmful_answers: str | None, cache: Path) -> list[ChatExample]:
    """Return harmful request -> compliant answer pairs: from the ``harmful_answers`` file or, by default, the
    unaligned ``base_model``'s own greedy answers to the alignment-split requests (only substantive compliance)."""
    from safeft.data.loaders import load_examples
    from safeft.evaluate.judges import COMPLIANCE, KeywordJudge

    if harmful_answers:
        return load_examples("beavertails", harmful_answers)
    prompts = [p for _, p in builtin.harmful_requests("align")]
    cache_file = cache / f"harmful_answers-{model_key(base_model)}.jsonl"
    answers, damaged = _read_cache(cache_file, warn=False)  # cached_answers warns, if it runs
    if not all(p in answers for p in prompts):  # load the base model only when something must be generated
        from safeft.models import load_model

        base, tokenizer = load_model(base_model)
        answers = cached_answers(base, tokenizer, prompts, cache_file)
    elif damaged:
        _warn_damaged(cache_file, damaged)
        write_answers(cache_file, answers)
    judge = KeywordJudge()
    return [ChatExample.from_pair(p, answers[p], harmful=True) for p in prompts
            if p in answers and judge.verdict(answers[p]) == COMPLIANCE]
