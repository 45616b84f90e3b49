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
    """Return ``{prompt: response}`` from a JSONL answer cache ({} if it does not exist)."""
    if not cache_file.exists():
        return {}
    return {row["prompt"]: row["response"] for row in map(json.loads, cache_file.read_text().splitlines())}


def cached_answers(model, tokenizer, prompts: Sequence[str], cache_file: Path, max_new_tokens: int = 96) -> dict:
    """Return ``{prompt: greedy answer}`` of ``model``, generating only the prompts not yet in ``cache_file``."""
    from safeft.evaluate import generate

    cache = read_answers(cache_file)
    missing = [p for p in dict.fromkeys(prompts) if p not in cache]
    if missing:
        replies = generate(model, tokenizer, [[{"role": "user", "content": p}] for p in missing],
                           max_new_tokens=max_new_tokens, desc="base-model answers")
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with cache_file.open("a") as handle:
            for prompt, reply in zip(missing, replies):
                handle.write(json.dumps({"prompt": prompt, "response": reply}, ensure_ascii=False) + "\n")
                cache[prompt] = reply
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
    answers = read_answers(cache_file)
    if not all(p in answers for p in prompts):  # load the base model only when something must be generated
        from safeft.models import load_model

        base, tokenizer = load_model(base_model)
        answers = cached_answers(base, tokenizer, prompts, cache_file)
    judge = KeywordJudge()
    return [ChatExample.from_pair(p, answers[p], harmful=True) for p in prompts
            if p in answers and judge.verdict(answers[p]) == COMPLIANCE]
