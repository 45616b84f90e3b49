"""Response-token losses of a causal LM in eval mode: the safety loss, and the summed loss of a batch that SPF's
estimation, the monitor, evaluation and several defences share."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from safeft.chat import IGNORE_INDEX, EncodedChat, collate, encode_response, pad_id, response_token_loss_sum
from safeft.data.examples import SafetySample, as_safety_samples


def device_of(model: nn.Module) -> torch.device:
    """Return the device of the model's first parameter."""
    return next(model.parameters()).device


def response_loss_sum(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
    """Return the summed cross-entropy of ``batch``'s labelled tokens and their count (see
    :func:`~safeft.chat.response_token_loss_sum`), computing logits only from the first position that predicts a
    label on: the LM head and the loss over a 49k vocabulary cost as much as several blocks, and onset samples
    label only their last few tokens. Models whose forward takes no ``logits_to_keep`` get every position."""
    labels = batch["labels"]
    labelled = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero()
    keep = labels.shape[1] - int(labelled[0]) if len(labelled) else 0  # predictions from position `first - 1` on
    inputs = {"input_ids": batch["input_ids"].to(device_of(model)),
              "attention_mask": batch["attention_mask"].to(device_of(model))}
    try:
        logits = model(**inputs, logits_to_keep=keep).logits
    except TypeError as error:  # an architecture without logits_to_keep
        if "logits_to_keep" not in str(error):
            raise
        logits, keep = model(**inputs).logits, labels.shape[1]
    if keep and logits.shape[1] > keep:  # a forward that took the argument but not its meaning
        logits = logits[:, -keep:]
    return response_token_loss_sum(logits, labels[:, labels.shape[1] - keep:] if keep else labels)


def batches(encoded: list[EncodedChat], batch_size: int, tokenizer) -> Iterator[dict[str, Tensor]]:
    """Yield ``encoded`` in order as collated batches of at most ``batch_size`` (``(B, T)`` int64, right-padded)."""
    for start in range(0, len(encoded), batch_size):
        yield collate(encoded[start:start + batch_size], pad_id(tokenizer))


@contextmanager
def eval_without_param_grads(model: nn.Module) -> Iterator[None]:
    """Hold ``model`` in eval mode (no dropout) with no parameter gradients for the block; both restored on exit."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def safety_loss(model: nn.Module, tokenizer, samples: Sequence[SafetySample], batch_size: int = 8, *,
                onset_tokens: int | None = None) -> float:
    """Return the mean cross-entropy (nats per token) of the refusals given the prompts, in eval mode, no grad.

    With ``onset_tokens``, only each refusal's first that many tokens count (what an onset estimate guards).
    Samples are batched by length (less padding, and logits kept from a later position; the mean does not depend on
    the order).
    """
    encoded = [encode_response(tokenizer, s.prompt, s.refusal, onset_tokens) for s in as_safety_samples(samples)]
    total, count = 0.0, 0
    with eval_without_param_grads(model), torch.no_grad():
        for batch in batches(sorted(encoded, key=lambda e: len(e.input_ids)), batch_size, tokenizer):
            loss, n = response_loss_sum(model, batch)
            total, count = total + float(loss), count + n
    return total / max(count, 1)
