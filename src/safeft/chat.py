"""Encode (prompt, response) pairs under a tokenizer's chat template, with the loss on response tokens only."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from safeft.errors import UserError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class EncodedChat:
    """Token ids of one templated exchange and its labels (``IGNORE_INDEX`` outside the response)."""

    input_ids: list[int]
    labels: list[int]


def require_chat_template(tokenizer) -> None:
    """Raise ``ValueError`` with the fix if ``tokenizer`` has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__} has no chat template, so "
            "prompts cannot be formatted the way the model was aligned. Use the model's instruct/chat tokenizer, or "
            "set `tokenizer.chat_template` (CLI: --chat-template FILE with a Jinja template)."
        )


def check_chat_template(tokenizer, source: str) -> None:
    """Raise ``UserError`` naming ``source`` (the template file, or the model whose tokenizer holds the template) if
    the template cannot render a plain exchange: a Jinja syntax error, or a template that raises on it."""
    from jinja2 import TemplateError

    exchange = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]
    try:
        tokenizer.apply_chat_template(exchange, tokenize=False)
        tokenizer.apply_chat_template(exchange[:1], add_generation_prompt=True, tokenize=False)
    except TemplateError as error:
        line = f" (line {error.lineno})" if getattr(error, "lineno", None) else ""
        raise UserError(f"the chat template {source} cannot render a user -> assistant exchange: "
                        f"{type(error).__name__}: {error}{line}; fix the template or pass a working one with "
                        "--chat-template FILE") from None


def _ids(encoded) -> list[int]:
    # apply_chat_template returns a list or, in newer transformers, a BatchEncoding
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def encode_chat(tokenizer, prompt: str, response: str) -> EncodedChat:
    """Return the ids of ``[user: prompt, assistant: response]`` under the chat template, labels on the response."""
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return encode_messages(tokenizer, messages)


def encode_messages(tokenizer, messages: Sequence[dict]) -> EncodedChat:
    """Return the ids of a chat under the tokenizer's chat template, with labels on every assistant turn.

    Assumes the template renders a conversation so that each prefix of it (ending in a generation prompt) is a
    prefix of the whole, as ChatML-style templates do. For one exchange whose template breaks that (some
    templates rewrite earlier turns), the response tokens are appended to the generation prompt instead.
    """
    require_chat_template(tokenizer)
    messages = list(messages)
    full = _ids(tokenizer.apply_chat_template(messages, tokenize=True))
    labels = [IGNORE_INDEX] * len(full)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_ids(tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=True)))
        upto = _ids(tokenizer.apply_chat_template(messages[: i + 1], tokenize=True))
        if full[:len(upto)] != upto or start >= len(upto):
            if len(messages) == 2 and i == 1:
                return _append_response(tokenizer, messages)
            raise UserError("the chat template does not render turns incrementally, so assistant turns cannot be "
                             "located; use single-turn examples or a ChatML-style --chat-template")
        labels[start:len(upto)] = full[start:len(upto)]
    return EncodedChat(input_ids=full, labels=labels)


def _append_response(tokenizer, messages: list[dict]) -> EncodedChat:
    prompt_ids = _ids(tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=True))
    tail = list(tokenizer(messages[1]["content"], add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        tail.append(tokenizer.eos_token_id)
    return EncodedChat(input_ids=prompt_ids + tail, labels=[IGNORE_INDEX] * len(prompt_ids) + tail)


def truncate(example: EncodedChat, max_length: int) -> EncodedChat:
    """Return ``example`` cut to at most ``max_length`` tokens (from the right)."""
    return EncodedChat(example.input_ids[:max_length], example.labels[:max_length])


def through_last_label(example: EncodedChat) -> EncodedChat:
    """Return ``example`` cut after its last labelled token: a causal model's loss on the labelled tokens does not
    depend on what follows them, so the cut changes no logit that counts and saves computing the rest."""
    last = max((i for i, label in enumerate(example.labels) if label != IGNORE_INDEX), default=len(example.labels) - 1)
    return EncodedChat(example.input_ids[:last + 1], example.labels[:last + 1])


def first_response_tokens(example: EncodedChat, count: int) -> EncodedChat:
    """Return ``example`` with labels kept on only its first ``count`` labelled tokens (the response's onset)."""
    labels, kept = [], 0
    for label in example.labels:
        keep = label != IGNORE_INDEX and kept < count
        kept += keep
        labels.append(label if keep else IGNORE_INDEX)
    return EncodedChat(example.input_ids, labels)


def collate(examples: Sequence[EncodedChat], pad_token_id: int) -> dict[str, Tensor]:
    """Right-pad examples into ``input_ids``, ``attention_mask`` and ``labels``, each ``(B, T)`` int64."""
    length = max(len(e.input_ids) for e in examples)
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for e in examples:
        pad = length - len(e.input_ids)
        batch["input_ids"].append(e.input_ids + [pad_token_id] * pad)
        batch["attention_mask"].append([1] * len(e.input_ids) + [0] * pad)
        batch["labels"].append(e.labels + [IGNORE_INDEX] * pad)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


def response_token_loss_sum(logits: Tensor, labels: Tensor) -> tuple[Tensor, int]:
    """Return the summed next-token cross-entropy over labelled positions and their count.

    Args:
        logits: ``(B, T, vocab)`` model outputs.
        labels: ``(B, T)`` targets aligned with the inputs, ``IGNORE_INDEX`` where no loss is taken.
    """
    shift_logits = logits[:, :-1].float()  # (B, T-1, vocab)
    shift_labels = labels[:, 1:].to(logits.device)  # (B, T-1)
    loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, int((shift_labels != IGNORE_INDEX).sum())


def pad_id(tokenizer) -> int:
    """Return the tokenizer's padding id (its EOS id where it has no pad token)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


def encode_response(tokenizer, prompt: str, response: str, onset_tokens: int | None = None) -> EncodedChat:
    """Return the templated exchange with labels on the response, or on only its first ``onset_tokens`` tokens
    (and then cut after them: the tokens that follow change no loss that counts)."""
    chat = encode_chat(tokenizer, prompt, response)
    return through_last_label(first_response_tokens(chat, onset_tokens)) if onset_tokens else chat
