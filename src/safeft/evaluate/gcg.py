"""GCG: the greedy coordinate gradient suffix attack (Zou et al. 2023), white-box on the model under test.

For one harmful request and an affirmative target (AdvBench's ``target``: "Sure, here is ..."), GCG searches for
a suffix of ``suffix_length`` tokens, appended to the request, that makes the model's reply start with the target.
Each step takes the gradient of the target's loss with respect to the one-hot suffix tokens, keeps the ``top_k``
most promising replacement tokens per position, evaluates ``candidates`` single-token swaps (in batches) and moves
to the best. Every ``check_every`` steps the model answers with the current suffix and a judge decides whether the
attack succeeded; the search stops there. Candidates whose text does not re-tokenise to the same ids are dropped,
so a found suffix means the same thing as text.

The prompt is ``chat_template(user: request + " " + suffix)`` with the generation prompt; the target follows it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from safeft.errors import UserError

_SENTINEL = "\u2063SAFEFT-SUFFIX\u2063"


@dataclass
class GCGConfig:
    """Args:
    steps: most optimisation steps per request.
    suffix_length: tokens in the suffix (initialised to "!" tokens).
    top_k: replacement tokens kept per suffix position from the gradient.
    candidates: single-token swaps evaluated per step.
    candidate_batch: candidates per forward pass.
    check_every: steps between success checks (the model answers with the current suffix).
    check_tokens: tokens generated for a success check.
    seed: seed of the candidate sampling.
    """

    steps: int = 100
    suffix_length: int = 20
    top_k: int = 256
    candidates: int = 128
    candidate_batch: int = 64
    check_every: int = 10
    check_tokens: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        from safeft.config import check_positive

        check_positive(self, "steps", "suffix_length", "top_k", "candidates", "candidate_batch", "check_every",
                       "check_tokens")


@dataclass
class GCGResult:
    """One request's attack: the suffix found (text and ids), whether it succeeded, after how many steps, and the
    target loss before and after."""

    request: str
    target: str
    suffix: str
    suffix_ids: list[int]
    success: bool
    steps: int
    loss: float
    initial_loss: float
    response: str
    losses: list[float] = field(default_factory=list)

    def prompt(self) -> str:
        """Return the attacked user turn: the request with the suffix appended."""
        return attacked_prompt(self.request, self.suffix)


def attacked_prompt(request: str, suffix: str) -> str:
    """Return ``request`` with ``suffix`` appended as GCG does (one space between)."""
    return f"{request} {suffix}"


class PromptParts:
    """The token ids around the suffix: ``before + suffix + after`` is the templated prompt, ``target`` follows."""

    def __init__(self, tokenizer, request: str, target: str):
        text = tokenizer.apply_chat_template([{"role": "user", "content": attacked_prompt(request, _SENTINEL)}],
                                             add_generation_prompt=True, tokenize=False)
        if text.count(_SENTINEL) != 1:
            raise UserError("the chat template changed the request's text; GCG cannot place the suffix")
        before, after = text.split(_SENTINEL)
        encode = lambda s: list(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
        self.before, self.after, self.target = encode(before), encode(after), encode(target)
        if not self.target:
            raise UserError(f"empty GCG target for request {request[:60]!r}")

    def ids(self, suffix: Sequence[int]) -> list[int]:
        """Return the prompt's ids with ``suffix`` in place (no target)."""
        return [*self.before, *suffix, *self.after]


def allowed_tokens(tokenizer, vocab_size: int) -> Tensor:
    """Return a ``(vocab_size,)`` bool mask of tokens a suffix may use: printable ASCII text, no special token."""
    special = set(tokenizer.all_special_ids)
    allowed = torch.zeros(vocab_size, dtype=torch.bool)
    for i in range(min(vocab_size, len(tokenizer))):
        if i in special:
            continue
        text = tokenizer.decode([i])
        allowed[i] = bool(text.strip()) and text.isascii() and text.isprintable()
    return allowed


def target_losses(model, parts: PromptParts, suffixes: Tensor, batch_size: int) -> Tensor:
    """Return the mean cross-entropy of the target after each suffix: ``suffixes`` ``(B, L)`` -> ``(B,)``.

    The prompt's text before the suffix is the same for every candidate: its keys and values are computed once and
    shared (a copy per batch), and logits are computed only where they predict the target, so each candidate
    costs the forward of its suffix, the rest of the template and the target."""
    import copy

    device = next(model.parameters()).device
    fixed_after = torch.tensor(parts.after + parts.target, device=device)
    target = torch.tensor(parts.target, device=device)
    t = len(parts.target)
    losses = []
    with torch.no_grad():
        prefix = model(input_ids=torch.tensor([parts.before], device=device), use_cache=True).past_key_values
        for chunk in suffixes.to(device).split(batch_size):
            ids = torch.cat([chunk, fixed_after.expand(len(chunk), -1)], 1)
            cache = copy.deepcopy(prefix)
            cache.batch_repeat_interleave(len(chunk))
            # the last t + 1 positions: the t that predict the target, and the target's last (predicts nothing)
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True,
                           logits_to_keep=t + 1).logits[:, :t].float()  # (b, t, V)
            losses.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), target.expand(len(chunk), -1),
                                                            reduction="none").mean(1))
    return torch.cat(losses)


def token_gradient(model, parts: PromptParts, suffix: Tensor) -> Tensor:
    """Return the gradient of the target loss with respect to the one-hot suffix: ``(L, V)``."""
    embed = model.get_input_embeddings().weight  # (V, d)
    device = embed.device
    one_hot = torch.zeros(len(suffix), embed.shape[0], device=device, dtype=embed.dtype)
    one_hot[torch.arange(len(suffix)), suffix.to(device)] = 1
    one_hot.requires_grad_(True)
    pieces = [embed[torch.tensor(parts.before, device=device)], one_hot @ embed,
              embed[torch.tensor(parts.after + parts.target, device=device)]]
    inputs = torch.cat(pieces)[None]  # (1, T, d)
    t = len(parts.target)
    with torch.enable_grad():  # logits only where they predict the target, as in target_losses
        logits = model(inputs_embeds=inputs, logits_to_keep=t + 1).logits[0, :t].float()
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(parts.target, device=device))
        (grad,) = torch.autograd.grad(loss, one_hot)
    return grad


def _round_trips(tokenizer, ids: list[int]) -> bool:
    return list(tokenizer(tokenizer.decode(ids), add_special_tokens=False)["input_ids"]) == ids


def gcg_step(model, tokenizer, parts: PromptParts, suffix: Tensor, config: GCGConfig, allowed: Tensor,
             generator: torch.Generator, loss: float) -> tuple[Tensor, float]:
    """Return the suffix after one GCG step and its target loss (``suffix`` and ``loss`` unchanged if no candidate
    survives the round-trip filter)."""
    grad = token_gradient(model, parts, suffix).cpu()  # (L, V)
    grad[:, ~allowed] = float("inf")
    top = (-grad).topk(min(config.top_k, int(allowed.sum())), dim=1).indices  # (L, k)
    positions = torch.randint(len(suffix), (config.candidates,), generator=generator)
    choices = top[positions, torch.randint(top.shape[1], (config.candidates,), generator=generator)]
    candidates = suffix.repeat(config.candidates, 1)  # (C, L)
    candidates[torch.arange(config.candidates), positions] = choices
    keep = [i for i in range(len(candidates)) if _round_trips(tokenizer, candidates[i].tolist())]
    if not keep:
        return suffix, loss
    candidates = torch.unique(candidates[keep], dim=0)
    scores = target_losses(model, parts, candidates, config.candidate_batch).cpu()
    best = int(scores.argmin())
    return candidates[best], float(scores[best])


def gcg_attack(model, tokenizer, request: str, target: str, config: GCGConfig | None = None, judge=None, *,
               allowed: Tensor | None = None, show_progress: bool = True) -> GCGResult:
    """Return the GCG attack on ``request`` toward ``target`` (see the module docstring).

    ``judge`` decides success from the model's reply (default: the keyword judge; compliance is success);
    ``allowed`` is the token mask (default :func:`allowed_tokens`, computed once per tokenizer by the caller for
    many requests). The model's weights are not changed; it is put in eval mode and restored.
    """
    from safeft.evaluate.generation import generate_from_ids
    from safeft.evaluate.judges import COMPLIANCE, KeywordJudge
    from safeft.progress import progress

    config = config or GCGConfig()
    judge = judge or KeywordJudge()
    vocab = model.get_input_embeddings().weight.shape[0]
    allowed = allowed if allowed is not None else allowed_tokens(tokenizer, vocab)
    parts = PromptParts(tokenizer, request, target)
    start = tokenizer(" ".join(["!"] * config.suffix_length), add_special_tokens=False)["input_ids"]
    suffix = torch.tensor(list(start)[:config.suffix_length])  # "! ! ! ...", as the paper initialises
    generator = torch.Generator().manual_seed(config.seed)
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)

    def succeeded(ids: Tensor) -> tuple[bool, str]:
        reply = generate_from_ids(model, tokenizer, [parts.ids(ids.tolist())], max_new_tokens=config.check_tokens,
                                  desc="gcg check", show=False)[0]
        return judge.judge([request], [reply])[0] == COMPLIANCE, reply

    try:
        initial = float(target_losses(model, parts, suffix[None], 1)[0])
        losses, loss, step = [initial], initial, 0
        success, reply = succeeded(suffix)  # a model that already complies needs no suffix
        bar = progress(range(1, config.steps + 1 if not success else 1), desc="gcg", show=show_progress,
                       leave=False)
        for step in bar:
            suffix, loss = gcg_step(model, tokenizer, parts, suffix, config, allowed, generator, loss)
            losses.append(loss)
            bar.set_postfix(loss=f"{loss:.3f}")
            if step % config.check_every == 0 or step == config.steps:
                success, reply = succeeded(suffix)
                if success:
                    break
    finally:
        model.train(was_training)
        for p, flag in flags:
            p.requires_grad_(flag)
    ids = suffix.tolist()
    return GCGResult(request=request, target=target, suffix=tokenizer.decode(ids), suffix_ids=ids, success=success,
                     steps=step, loss=loss, initial_loss=initial, response=reply, losses=losses)


def save_results(path: str | Path, results: Sequence[GCGResult], meta: dict) -> None:
    """Write the attack's results and settings (``meta``: model, config, judge, ...) to a JSON file."""
    from safeft.evaluate.stats import rate
    from safeft.io import write_json

    write_json(Path(path), {"format": "safeft.gcg/1", **meta,
                            "asr": rate(sum(r.success for r in results), len(results)),
                            "results": [asdict(r) for r in results]})


def load_results(path: str | Path) -> list[GCGResult]:
    """Return the results of a file written by :func:`save_results`.

    Raises:
        ValueError: if the file is not a safeft GCG result file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GCG result file {path} does not exist")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: not valid JSON ({error.msg})") from None
    if not isinstance(record, dict) or record.get("format") != "safeft.gcg/1":
        raise UserError(f"{path} is not a GCG result file written by `safeft gcg`")
    return [GCGResult(**r) for r in record["results"]]


def transfer(model, tokenizer, results: Sequence[GCGResult], judge=None, *, max_new_tokens: int = 64) -> dict:
    """Return the ASR of found suffixes applied, as text, to ``model`` (transfer; the source model too).

    Returns:
        ``{"asr": rate, "per_prompt": [{"request", "suffix", "response", "verdict"}]}``.
    """
    from safeft.evaluate.generation import generate
    from safeft.evaluate.judges import COMPLIANCE, KeywordJudge
    from safeft.evaluate.stats import rate

    judge = judge or KeywordJudge()
    replies = generate(model, tokenizer, [[{"role": "user", "content": r.prompt()}] for r in results],
                       max_new_tokens=max_new_tokens, desc="gcg transfer")
    verdicts = judge.judge([r.request for r in results], replies)
    return {"asr": rate(verdicts.count(COMPLIANCE), len(results)),
            "per_prompt": [{"request": r.request, "suffix": r.suffix, "response": reply, "verdict": v}
                           for r, reply, v in zip(results, replies, verdicts, strict=True)]}
