"""The one example type: a chat (list of messages) with the loss on assistant turns, plus an optional gold answer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from safeft.errors import UserError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatExample:
    """A chat exchange. Training takes the loss on assistant turns only.

    Args:
        messages: ``({"role": ..., "content": ...}, ...)``, ending with an assistant turn for training data.
        answer: the gold answer a scorer compares against (a class label, a final number), if any.
        meta: free-form tags (``category``, ``source``, ``harmful``).
    """

    messages: tuple[dict, ...]
    answer: str | None = None
    meta: dict = field(default_factory=dict, compare=False)

    @classmethod
    def from_pair(cls, prompt: str, response: str, answer: str | None = None, **meta) -> ChatExample:
        """Return a one-turn example ``user: prompt`` -> ``assistant: response``."""
        return cls(({"role": "user", "content": prompt}, {"role": "assistant", "content": response}), answer, meta)

    @property
    def prompt(self) -> str:
        """Return the last user turn."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")

    @property
    def response(self) -> str:
        """Return the last assistant turn ("" if there is none)."""
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "assistant"), "")

    def prompt_messages(self) -> list[dict]:
        """Return the messages up to (without) the final assistant turn: what a model is asked at evaluation."""
        messages = list(self.messages)
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
        return messages


def validate_messages(messages, where: str) -> tuple[dict, ...]:
    """Return ``messages`` as a tuple after checking roles and non-empty text; ``ValueError`` names ``where``."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise UserError(f"{where}: message {i} needs a 'role' in {ROLES}")
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            raise UserError(f"{where}: message {i} ({m.get('role')}) has empty or non-text 'content'")
    if not any(m["role"] == "user" for m in messages):
        raise UserError(f"{where}: no user turn in 'messages'")
    return tuple({"role": m["role"], "content": m["content"]} for m in messages)


def require_responses(examples: Sequence[ChatExample], source) -> Sequence[ChatExample]:
    """Return ``examples`` if every one has an assistant turn (the answer training learns, or analysis measures);
    else raise ``UserError`` naming ``source`` (a file), how many lack one and the first of them."""
    missing = [i for i, e in enumerate(examples) if not e.response.strip()]
    if missing:
        raise UserError(f"{source}: {len(missing)} of {len(examples)} examples have no answer (no assistant turn in "
                        f"'messages', first: example {missing[0] + 1}); give every example the response to learn")
    return examples


def to_dataset(examples: Sequence[ChatExample]):
    """Return ``examples`` as a ``datasets.Dataset`` with one ``messages`` column (a list of ``{role, content}``),
    the conversational format TRL's ``SFTTrainer`` takes as it is (loss on the assistant turns)."""
    from datasets import Dataset

    return Dataset.from_list([{"messages": [dict(m) for m in e.messages]} for e in examples])


@dataclass(frozen=True)
class SafetySample:
    """One (harmful prompt, refusal) pair; the safety loss is taken on the refusal tokens only.

    ``compliance``, if given, is a harmful answer to the same prompt. Estimation then uses the gradient of the
    margin ``log p(refusal) - log p(compliance)``, which also spans the directions that fine-tuning on harmful
    answers trains through (see :meth:`SafetySubspace.estimate`).
    """

    prompt: str
    refusal: str
    compliance: str | None = None


def as_safety_samples(samples: Sequence[SafetySample | tuple[str, str] | dict]) -> list[SafetySample]:
    """Return ``samples`` as SafetySample objects (each given as one, as a ``(prompt, refusal[, compliance])`` tuple
    or as a dict with ``prompt`` and ``refusal``).

    Raises:
        ValueError: naming the first sample of another type or with empty text, or if there are none.
    """
    out = []
    for i, s in enumerate(samples):
        if isinstance(s, SafetySample):
            out.append(s)
        elif isinstance(s, dict) and {"prompt", "refusal"} <= s.keys():
            out.append(SafetySample(s["prompt"], s["refusal"], s.get("compliance")))
        elif isinstance(s, (tuple, list)) and len(s) in (2, 3):
            out.append(SafetySample(*s))
        else:
            raise UserError(f"safety sample {i} must be a SafetySample, a (prompt, refusal[, compliance]) tuple or "
                             f"a dict with 'prompt' and 'refusal'; got {type(s).__name__}")
        sample = out[-1]
        if not (isinstance(sample.prompt, str) and sample.prompt.strip()
                and isinstance(sample.refusal, str) and sample.refusal.strip()):
            raise UserError(f"safety sample {i} has an empty prompt or refusal; both must be non-empty text")
        if sample.compliance is not None and not (isinstance(sample.compliance, str) and sample.compliance.strip()):
            raise UserError(f"safety sample {i} has an empty compliance; give a harmful answer or leave it out")
    if not out:
        raise UserError("no safety samples given: SPF needs at least one (harmful prompt, refusal) pair")
    return out
