"""Estimate the safety bases of a model's targets from gradients taken by hooks (SPEC §2, "Estimation").

Estimation never materialises a full-weight gradient in ``.grad``: a forward hook keeps each target's input
``x: (tokens, n)``, a tensor hook on its output receives ``dL/dy: (tokens, m)``, and the weight gradient
``G = dL/dy^T x`` is kept as those two thin factors (:class:`~safeft.spf.lowrank.LowRankSum`) until it is factored by
QR and a small SVD. This works when the weights are frozen (LoRA) and does not touch the gradients of DDP or the
optimizer. Ranks are then chosen per target (fixed, by energy) or over all targets (a budget).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from safeft.chat import EncodedChat, encode_response
from safeft.data.examples import SafetySample
from safeft.errors import UserError
from safeft.losses import batches, eval_without_param_grads, response_loss_sum
from safeft.progress import progress
from safeft.spf.config import SPFConfig
from safeft.spf.lowrank import LowRankSum, energy_rank
from safeft.spf.targets import Target, find_targets


@dataclass(frozen=True)
class Basis:
    """The rank-r safety basis of one target: ``U: (m, r)``, ``S: (r,)``, ``V: (n, r)``, fp32."""

    U: Tensor
    S: Tensor
    V: Tensor

    @property
    def rank(self) -> int:
        """Return r."""
        return self.S.shape[0]


def select_rank(S: Tensor, config: SPFConfig) -> int:
    """Return how many leading singular values of one target to keep under a fixed-rank or energy policy, or the
    most a budget may give it (``max_rank``); never numerical zeros."""
    if S.numel() == 0 or S[0] <= 0:
        return 0
    numerical = int((S > S[0] * 1e-6).sum())
    if config.rank is not None:
        return min(config.rank, numerical)
    if config.budget is not None:
        return min(config.max_rank, numerical)
    return min(energy_rank(S, config.energy), config.max_rank, numerical)


def allocate_ranks(spectra: dict[str, Tensor], config: SPFConfig) -> dict[str, int]:
    """Return the rank of each target (``spectra``: name -> its singular values, descending).

    Without a ``budget``, each target's own :func:`select_rank`. With one, the ``budget`` largest singular values
    over all targets (each target's eligible ones: at most ``max_rank``, no numerical zeros) decide: a target keeps
    as many directions as it has among them (ties go to the earlier target)."""
    ranks = {name: select_rank(S, config) for name, S in spectra.items()}
    if config.budget is None:
        return ranks
    pool = sorted(((float(S[i]), order, name) for order, (name, S) in enumerate(spectra.items())
                   for i in range(ranks[name])), key=lambda x: (-x[0], x[1]))
    kept = dict.fromkeys(spectra, 0)
    for _, _, name in pool[:config.budget]:
        kept[name] += 1
    return kept


def gradient_factors(model: nn.Module, targets: dict[str, Target], encoded: list[EncodedChat], tokenizer, *,
                     batch_size: int = 8, scale: float = 1.0,
                     sums: dict[str, LowRankSum] | None = None, show_progress: bool = False
                     ) -> dict[str, LowRankSum]:
    """Return each target's gradient of ``scale`` x the mean response-token loss over ``encoded``, as thin factors.

    ``L @ R.T`` for ``L, R = sums[name].factors()`` is the ``(m, n)`` weight gradient, exactly (see
    :class:`LowRankSum`: at most an fp32 ``(m, n)`` matrix per target). Given ``sums``, the gradient is added to
    them (and they are returned). Weights, ``requires_grad`` and ``.grad`` are untouched.
    """
    if sums is None:
        sums = {name: LowRankSum() for name in targets}
    inputs: dict[str, Tensor] = {}
    total_tokens = sum(sum(1 for label in e.labels[1:] if label != -100) for e in encoded)

    def on_forward(name):
        def hook(module, args, output):
            inputs[name] = args[0].detach().reshape(-1, args[0].shape[-1])  # (tokens, n)
            if not output.requires_grad:  # frozen weights and no grad upstream: make the output a leaf
                output.requires_grad_(True)
            output.register_hook(lambda grad: on_backward(name, grad))
        return hook

    def on_backward(name, grad):
        grad_out = grad.reshape(-1, grad.shape[-1]).float()  # (tokens, m)
        x = inputs.pop(name).float()  # (tokens, n)
        if not torch.isfinite(grad_out.sum() + x.sum()):  # a NaN or inf anywhere makes the sum non-finite
            raise FloatingPointError(
                f"non-finite gradient at target {name!r}: the model produces NaN/inf on these samples. "
                "Check the model loads correctly, estimate in float32 (not float16), and check the samples."
            )
        used = grad_out.abs().sum(-1) > 0  # tokens that influence the loss
        sums[name].add(grad_out[used].T, x[used].T)  # (m, t), (n, t)

    handles = [t.base.register_forward_hook(on_forward(name)) for name, t in targets.items()]
    try:
        # may run inside optimizer.step() (refresh); eager even on a torch.compile'd model: the hooks differ per
        # target, so compiling them recompiles per target up to the recompile limit, then runs uncompiled for good
        with eval_without_param_grads(model), torch.enable_grad(), _eager():
            by_length = sorted(encoded, key=lambda e: len(e.input_ids))  # less padding; the sum is order-free
            for batch in progress(list(batches(by_length, batch_size, tokenizer)), desc="gradient",
                                  show=show_progress):
                loss, _ = response_loss_sum(model, batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"safety loss is {float(loss.detach())}: the model produces NaN/inf on "
                                             "the safety samples; estimate in float32 and check the weights")
                (loss * (scale / total_tokens)).backward()
    finally:
        for h in handles:
            h.remove()
        inputs.clear()
    return sums


def _eager():
    """Return a context in which ``torch.compile``'d code runs eagerly (``torch.compiler.set_stance``, torch >= 2.6;
    before that, a no-op)."""
    import contextlib

    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def estimate_bases(model: nn.Module, tokenizer, samples: Sequence[SafetySample], config: SPFConfig, *,
                   show_progress: bool = True) -> tuple[dict[str, Target], dict[str, Basis], SPFConfig]:
    """Return the targets of ``model`` that ``config`` selects, the safety basis of each at its current weights, and
    the config in force (a rank left to the default given its value for the targets: LoRA's, or full
    fine-tuning's; :meth:`~safeft.spf.config.SPFConfig.rank_for`).

    The safety loss is the mean refusal-token cross-entropy (each refusal's first ``config.onset_tokens`` tokens, or
    all), minus the compliance loss for samples that carry one (the margin). Ranks follow ``config`` (fixed,
    energy or budget) and never exceed the numerical rank of a target's gradient. Weights, ``requires_grad`` and
    ``.grad`` are untouched.

    Raises:
        ValueError: if no target matches ``config.target_modules`` or a fixed rank exceeds a target's smaller side.
    """
    targets = find_targets(model, config.target_modules)
    if not targets:
        raise UserError(f"no target matrices match target_modules={config.target_modules!r}; "
                         "list the linear layers to guard by name (e.g. ['q_proj', 'v_proj'])")
    config = config.with_rank_for(lora=any(t.is_lora for t in targets.values()))
    if config.rank is not None:
        too_big = {n: t.shape for n, t in targets.items() if config.rank > min(t.shape)}
        if too_big:
            listed = ", ".join(f"{n} {m}x{k}" for n, (m, k) in list(too_big.items())[:5])
            raise UserError(f"rank {config.rank} exceeds the smaller dimension of {len(too_big)} target(s) "
                             f"({listed}); lower SPFConfig.rank or exclude them with target_modules")
    refusals = [encode_response(tokenizer, s.prompt, s.refusal, config.onset_tokens) for s in samples]
    sums = gradient_factors(model, targets, refusals, tokenizer, batch_size=config.estimate_batch_size,
                            show_progress=show_progress)
    compliances = [encode_response(tokenizer, s.prompt, s.compliance, config.onset_tokens)
                   for s in samples if s.compliance is not None]
    if compliances:  # the margin's gradient: d(-log p(refusal)) - d(-log p(compliance)), per-token means
        gradient_factors(model, targets, compliances, tokenizer, batch_size=config.estimate_batch_size,
                         scale=-1.0, sums=sums, show_progress=show_progress)
    bases = {}
    for name, target in targets.items():
        m, n = target.shape
        if sums[name].empty:  # the target never saw a gradient
            U, S, V = torch.zeros(m, 0), torch.zeros(0), torch.zeros(n, 0)
        else:
            U, S, V = sums[name].svd(config.rank or config.max_rank)
        r = select_rank(S, config)
        bases[name] = Basis(U[:, :r].contiguous().cpu(), S[:r].contiguous().cpu(), V[:, :r].contiguous().cpu())
        sums[name] = None  # free the factors as we go
    ranks = allocate_ranks({name: b.S for name, b in bases.items()}, config)
    bases = {name: Basis(b.U[:, :ranks[name]].contiguous(), b.S[:ranks[name]].contiguous(),
                         b.V[:, :ranks[name]].contiguous()) for name, b in bases.items()}
    return targets, bases, config


def task_gradients(model: nn.Module, tokenizer, examples: Sequence, targets: dict[str, Target], *,
                   batch_size: int = 8) -> dict[str, LowRankSum]:
    """Return each target's gradient of the mean response loss over ``examples``
    (:class:`~safeft.data.examples.ChatExample`, every assistant token) at the current weights, as thin factors: what
    the fine-tuning data's first steps would move."""
    from safeft.chat import encode_messages

    encoded = [encode_messages(tokenizer, e.messages) for e in examples]
    return gradient_factors(model, targets, encoded, tokenizer, batch_size=batch_size)


def span_energy(gradient: LowRankSum, basis: Basis, side: str) -> tuple[float, float]:
    """Return ``(||P(G)||^2, ||G||^2)`` for a factored gradient ``G = L R^T`` and the part ``P`` of it that ``side``
    removes with ``basis`` (right: ``G V V^T``, left: ``U U^T G``, two_sided: ``U U^T G V V^T``), through thin
    products."""
    if gradient.empty:
        return 0.0, 0.0
    L, R = gradient.factors()
    total = float(((L.T @ L) * (R.T @ R)).sum())
    U, V = basis.U.to(L.device, torch.float32), basis.V.to(L.device, torch.float32)
    left = L if side == "right" else U @ (U.T @ L)  # (m, t)
    right = R if side == "left" else V @ (V.T @ R)  # (n, t)
    return float(((left.T @ left) * (right.T @ right)).sum()), total


def task_overlaps(safety: Basis, task: Basis, side: str) -> Tensor:
    """Return, per safety direction ``i`` (r,), the share of it that lies in the task's span on ``side``:
    ``||V_t^T v_i||^2`` (right), ``||U_t^T u_i||^2`` (left), the larger of the two (two_sided)."""
    left = (task.U.float().T @ safety.U.float()).pow(2).sum(0)
    right = (task.V.float().T @ safety.V.float()).pow(2).sum(0)
    return {"left": left, "right": right, "two_sided": torch.maximum(left, right)}[side]
