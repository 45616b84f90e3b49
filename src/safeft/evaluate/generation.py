"""Batched greedy generation under the chat template."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from safeft.chat import require_chat_template
from safeft.progress import progress


def generate(model, tokenizer, conversations: Sequence[list[dict]], *, max_new_tokens: int = 64,
             batch_size: int = 16, desc: str = "generating") -> list[str]:
    """Return the model's greedy reply to each conversation (a list of messages ending in a user turn)."""
    require_chat_template(tokenizer)
    encoded = [list(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"]) for c in conversations]
    return generate_from_ids(model, tokenizer, encoded, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             desc=desc)


@torch.no_grad()
def generate_from_ids(model, tokenizer, encoded: Sequence[list[int]], *, max_new_tokens: int = 64,
                      batch_size: int = 16, desc: str = "generating", show: bool = True) -> list[str]:
    """Return the model's greedy continuation of each token-id prompt, decoded without special tokens.

    Batches are left-padded; the model is put in eval mode and restored. Longest prompts go first so that
    batches hold similar lengths.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    replies: list[str] = [""] * len(encoded)
    try:
        for start in progress(range(0, len(order), batch_size), desc=desc, show=show, leave=False):
            index = order[start:start + batch_size]
            length = max(len(encoded[i]) for i in index)
            ids = torch.tensor([[pad] * (length - len(encoded[i])) + list(encoded[i]) for i in index], device=device)
            mask = torch.tensor([[0] * (length - len(encoded[i])) + [1] * len(encoded[i]) for i in index],
                                device=device)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
            for row, i in enumerate(index):
                replies[i] = tokenizer.decode(out[row, length:], skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return replies
