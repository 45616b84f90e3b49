"""Batched greedy generation under the chat template."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from safeft.chat import IGNORE_INDEX, encode_messages, pad_id, require_chat_template, response_token_loss_sum
from safeft.data.examples import ChatExample
from safeft.errors import UserError
from safeft.losses import eval_without_param_grads
from safeft.progress import progress


def generate(model, tokenizer, conversations: Sequence[list[dict]], *, max_new_tokens: int = 64,
             batch_size: int = 16, desc: str = "generating") -> list[str]:
    """Return the model's greedy reply to each conversation (a list of messages ending in a user turn)."""
    require_chat_template(tokenizer)
    encoded = [prompt_ids(tokenizer, c) for c in conversations]
    return generate_from_ids(model, tokenizer, encoded, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             desc=desc)


def prompt_ids(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Return the token ids of ``messages`` under the chat template, ending in the generation prompt."""
    return list(tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])


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


@torch.no_grad()
def answer_and_loss(model, tokenizer, examples: Sequence[ChatExample], *, max_new_tokens: int = 64,
                    batch_size: int = 16, desc: str = "answering") -> tuple[list[str], float]:
    """Return the model's greedy reply to each example's prompt (its messages up to the final assistant turn) and the
    mean cross-entropy (nats per token) of the examples' final assistant turns given the same prompts, from one pass.

    Each batch is one forward over ``[left padding, prompt, reference reply, right padding]`` whose positions count
    from each row's first token: its logits give the loss, and its cache, cut back to the prompts, starts the
    generation, so the prompts are run through the model once instead of twice (once for the loss, once for the
    replies). The replies are :func:`generate`'s, and for one-turn examples the loss is
    :func:`~safeft.losses.safety_loss` of (prompt, reply) pairs, up to float rounding. Assumes every example ends
    with an assistant turn and that the chat template renders the prompt as a prefix of the whole exchange."""
    require_chat_template(tokenizer)
    pad = pad_id(tokenizer)
    prompts, replies_ids = [], []
    for example in examples:
        prompt = prompt_ids(tokenizer, example.prompt_messages())
        whole = encode_messages(tokenizer, list(example.messages))
        if whole.input_ids[:len(prompt)] != prompt:
            raise UserError("the chat template does not render the prompt as a prefix of the exchange, so the "
                             "reference reply cannot be scored after it; use a ChatML-style --chat-template")
        prompts.append(prompt)
        replies_ids.append(whole.input_ids[len(prompt):])
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: -len(prompts[i]))
    replies: list[str] = [""] * len(examples)
    total, count = 0.0, 0
    with eval_without_param_grads(model):
        for start in progress(range(0, len(order), batch_size), desc=desc, leave=False):
            index = order[start:start + batch_size]
            length = max(len(prompts[i]) for i in index)  # L: every prompt ends at position L - 1
            tail = max(len(replies_ids[i]) for i in index)
            rows, mask = [], []
            for i in index:
                left, right = length - len(prompts[i]), tail - len(replies_ids[i])
                rows.append([pad] * left + prompts[i] + replies_ids[i] + [pad] * right)
                mask.append([0] * left + [1] * (len(prompts[i]) + len(replies_ids[i])) + [0] * right)
            ids = torch.tensor(rows, device=device)  # (B, L + tail)
            attention = torch.tensor(mask, device=device)
            positions = (attention.cumsum(-1) - 1).clamp(min=0)
            out = model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True,
                        logits_to_keep=tail + 1)
            labels = ids[:, length - 1:].masked_fill(attention[:, length - 1:] == 0, IGNORE_INDEX)
            labels[:, 0] = IGNORE_INDEX  # logits from position L - 1 on: the first predicts the reply's first token
            loss, n = response_token_loss_sum(out.logits[:, -(tail + 1):], labels)
            total, count = total + float(loss), count + n
            name = "cache" if hasattr(out, "cache") else "past_key_values"  # renamed within transformers 5
            cache = getattr(out, name)
            cache.crop(-(tail + 1))  # keep the prompts without their last token, which generate() runs to start
            generated = model.generate(input_ids=ids[:, :length], attention_mask=attention[:, :length],
                                       **{name: cache}, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
            for row, i in enumerate(index):
                replies[i] = tokenizer.decode(generated[row, length:], skip_special_tokens=True).strip()
    return replies, total / max(count, 1)
