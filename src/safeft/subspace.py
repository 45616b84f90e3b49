"""The safety subspace: per-target rank-r SVD of the safety gradient, estimated with hooks, saved with safetensors.

Estimation never materialises a full-weight gradient in ``.grad``: a forward hook keeps each target's input
``x: (tokens, n)``, a tensor hook on its output receives ``dL/dy: (tokens, m)``, and the weight gradient
``G = dL/dy^T x`` is kept as those two thin factors until it is factored by QR + a small SVD. This works when the
weights are frozen (LoRA) and does not touch the gradients of DDP or the optimizer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelHubMixin
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from safeft.chat import (
    IGNORE_INDEX,
    EncodedChat,
    collate,
    encode_chat,
    first_response_tokens,
    response_token_loss_sum,
    through_last_label,
)
from safeft.config import SPFConfig
from safeft.lowrank import LowRankSum, energy_rank
from safeft.progress import progress
from safeft.targets import Target, find_targets

FORMAT = "safeft.subspace/1"
TENSORS_FILE = "subspace.safetensors"
METADATA_FILE = "subspace.json"


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


def _sample_dict(sample: SafetySample) -> dict:
    return {k: v for k, v in asdict(sample).items() if v is not None}


def weights_fingerprint(targets: dict[str, Target]) -> str:
    """Return a content fingerprint of the targets' base weights: a hash of each one's name, shape and a strided
    sample of 4096 of its values (fp32). Weights trained or swapped for another checkpoint's differ in it; it costs
    a few reads per matrix, not a pass over the model."""
    from safeft.distributed import Collectives, local, shard_rows

    samples, sharded = {}, []
    for name, t in sorted(targets.items()):
        weight = t.base.weight.detach()
        step = max(1, weight.numel() // 4096)
        rows = shard_rows(weight)
        if rows is None:
            samples[name] = weight.reshape(-1)[::step][:4096].float().cpu()
            continue
        # FSDP2: this process's rows fill in their sampled entries; the sum over the processes is the whole sample
        index = torch.arange(0, weight.numel(), step)[:4096]
        n = weight.shape[1]
        held = (index // n >= rows.start) & (index // n < rows.stop)
        values = torch.zeros(len(index))
        values[held] = local(weight).reshape(-1)[(index[held] - rows.start * n).to(local(weight).device)].float().cpu()
        samples[name] = values
        sharded.append(name)
    for name, whole in zip(sharded, Collectives().sum([samples[n] for n in sharded])):
        samples[name] = whole
    digest = hashlib.sha256()
    for name, t in sorted(targets.items()):
        digest.update(f"{name}:{tuple(t.shape)}".encode())
        digest.update(samples[name].numpy().tobytes())
    return digest.hexdigest()[:16]


def samples_sha256(samples: Sequence[SafetySample]) -> str:
    """Return a stable hash of the safety samples (order-sensitive)."""
    payload = json.dumps([_sample_dict(s) for s in samples], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _as_samples(samples: Sequence[SafetySample | tuple[str, str] | dict]) -> list[SafetySample]:
    out = []
    for i, s in enumerate(samples):
        if isinstance(s, SafetySample):
            out.append(s)
        elif isinstance(s, dict) and {"prompt", "refusal"} <= s.keys():
            out.append(SafetySample(s["prompt"], s["refusal"], s.get("compliance")))
        elif isinstance(s, (tuple, list)) and len(s) in (2, 3):
            out.append(SafetySample(*s))
        else:
            raise ValueError(f"safety sample {i} must be a SafetySample, a (prompt, refusal[, compliance]) tuple or "
                             f"a dict with 'prompt' and 'refusal'; got {type(s).__name__}")
        sample = out[-1]
        if not (isinstance(sample.prompt, str) and sample.prompt.strip()
                and isinstance(sample.refusal, str) and sample.refusal.strip()):
            raise ValueError(f"safety sample {i} has an empty prompt or refusal; both must be non-empty text")
        if sample.compliance is not None and not (isinstance(sample.compliance, str) and sample.compliance.strip()):
            raise ValueError(f"safety sample {i} has an empty compliance; give a harmful answer or leave it out")
    if not out:
        raise ValueError("no safety samples given: SPF needs at least one (harmful prompt, refusal) pair")
    return out


def pad_id(tokenizer) -> int:
    """Return the tokenizer's padding id (its EOS id where it has no pad token)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


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


def _batches(encoded: list[EncodedChat], batch_size: int, tokenizer):
    for start in range(0, len(encoded), batch_size):
        yield collate(encoded[start:start + batch_size], pad_id(tokenizer))


@contextmanager
def _eval_without_param_grads(model: nn.Module):
    """Eval mode (no dropout) and no parameter gradients; both restored on exit."""
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


def device_of(model: nn.Module) -> torch.device:
    """Return the device of the model's first parameter."""
    return next(model.parameters()).device


def encode_response(tokenizer, prompt: str, response: str, onset_tokens: int | None = None) -> EncodedChat:
    """Return the templated exchange with labels on the response, or on only its first ``onset_tokens`` tokens
    (and then cut after them: the tokens that follow change no loss that counts)."""
    chat = encode_chat(tokenizer, prompt, response)
    return through_last_label(first_response_tokens(chat, onset_tokens)) if onset_tokens else chat


def safety_loss(model: nn.Module, tokenizer, samples: Sequence[SafetySample], batch_size: int = 8, *,
                onset_tokens: int | None = None) -> float:
    """Return the mean cross-entropy (nats per token) of the refusals given the prompts, in eval mode, no grad.

    With ``onset_tokens``, only each refusal's first that many tokens count (what an onset estimate guards).
    """
    encoded = [encode_response(tokenizer, s.prompt, s.refusal, onset_tokens) for s in _as_samples(samples)]
    total, count = 0.0, 0
    with _eval_without_param_grads(model), torch.no_grad():
        for batch in _batches(encoded, batch_size, tokenizer):
            loss, n = response_loss_sum(model, batch)
            total, count = total + float(loss), count + n
    return total / max(count, 1)


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
        with _eval_without_param_grads(model), torch.enable_grad():  # may run inside optimizer.step() (refresh)
            by_length = sorted(encoded, key=lambda e: len(e.input_ids))  # less padding; the sum is order-free
            for batch in progress(list(_batches(by_length, batch_size, tokenizer)), desc="gradient",
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


class SafetySubspace(ModelHubMixin, library_name="safeft", tags=["safeft", "safety-subspace"],
                     repo_url="https://github.com/safeft/safeft", paper_url="https://arxiv.org/abs/2601.10141"):
    """Per-target safety bases ``{name: Basis}`` plus the metadata that says where they came from.

    A Hub-style artifact: ``save_pretrained(dir)`` writes the tensors, the metadata and a model card (README.md);
    ``from_pretrained(dir or repo id)`` reads them back (a repo id is fetched from the Hub, so only on purpose);
    ``push_to_hub(repo_id)`` uploads them. :meth:`save` / :meth:`load` are the same files without the card.
    """

    def __init__(self, bases: dict[str, Basis], metadata: dict):
        self.bases = bases
        self.metadata = metadata
        self._hub_mixin_config = {"format": FORMAT}  # the rest is in subspace.json

    def __len__(self) -> int:
        return len(self.bases)

    def __getitem__(self, name: str) -> Basis:
        return self.bases[name]

    def __repr__(self) -> str:
        ranks = [b.rank for b in self.bases.values()]
        return (f"SafetySubspace({len(self)} targets, rank {min(ranks, default=0)}..{max(ranks, default=0)}, "
                f"{self.metadata.get('num_samples')} samples)")

    @property
    def samples(self) -> list[SafetySample]:
        """Return the safety samples the subspace was estimated from."""
        return [SafetySample(**s) for s in self.metadata["samples"]]

    @property
    def config(self) -> SPFConfig:
        """Return the SPFConfig this subspace was estimated with (side, mode and project included; files written
        before those were stored give the rank policy with the other fields at their defaults)."""
        if "spf_config" in self.metadata:
            known = {f.name for f in fields(SPFConfig)}
            return SPFConfig(**{k: v for k, v in self.metadata["spf_config"].items() if k in known})
        policy = self.metadata["rank_policy"]
        return SPFConfig(rank=policy["rank"], energy=policy["energy"], budget=policy.get("budget"),
                         max_rank=policy["max_rank"],
                         target_modules=policy["target_modules"], onset_tokens=policy.get("onset_tokens"))

    def numel(self) -> int:
        """Return the number of stored scalars (all U, S, V)."""
        return sum(b.U.numel() + b.S.numel() + b.V.numel() for b in self.bases.values())

    @classmethod
    def estimate(cls, model: nn.Module, tokenizer, samples: Sequence[SafetySample | tuple[str, str] | dict],
                 config: SPFConfig | None = None, *, show_progress: bool = True) -> SafetySubspace:
        """Estimate the safety subspace of ``model`` at its current weights.

        Args:
            model: a causal LM (plain, peft-LoRA or DDP-wrapped); its weights and ``requires_grad`` are unchanged.
            tokenizer: its tokenizer, with a chat template.
            samples: one or more (harmful prompt, refusal) pairs. Samples that carry a ``compliance`` answer add
                the gradient of its loss with the opposite sign: the basis then spans the gradient of the margin
                ``log p(refusal) - log p(compliance)`` (refusal and compliance tokens each averaged).
            config: the rank policy, targets and tokens (``rank`` / ``energy`` / ``max_rank`` / ``target_modules`` /
                ``onset_tokens``: the loss on each response's first tokens only).

        Returns:
            A SafetySubspace with a Basis per target. A target's rank never exceeds the numerical rank of its
            safety gradient (one short sample gives at most as many directions as it has tokens).
        """
        config = config or SPFConfig()
        samples = _as_samples(samples)
        targets = find_targets(model, config.target_modules)
        if not targets:
            raise ValueError(f"no target matrices match target_modules={config.target_modules!r}; "
                             "list the linear layers to guard by name (e.g. ['q_proj', 'v_proj'])")
        if config.rank is not None:
            too_big = {n: t.shape for n, t in targets.items() if config.rank > min(t.shape)}
            if too_big:
                listed = ", ".join(f"{n} {m}x{k}" for n, (m, k) in list(too_big.items())[:5])
                raise ValueError(f"rank {config.rank} exceeds the smaller dimension of {len(too_big)} target(s) "
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
        from safeft import __version__

        metadata = {
            "format": FORMAT,
            "safeft_version": __version__,
            "model": {"name_or_path": getattr(getattr(model, "config", None), "name_or_path", None),
                      "fingerprint": weights_fingerprint(targets),
                      "targets": {name: list(t.shape) for name, t in targets.items()}},
            "rank_policy": config.rank_policy(),
            "spf_config": {f.name: getattr(config, f.name) for f in fields(SPFConfig)},  # not a method's extras
            "ranks": {name: b.rank for name, b in bases.items()},
            "num_samples": len(samples),
            "samples_sha256": samples_sha256(samples),
            "samples": [_sample_dict(s) for s in samples],
        }
        return cls(bases, metadata)

    def with_random_bases(self, seed: int = 0) -> SafetySubspace:
        """Return a control subspace: the same targets, ranks and singular values, random orthonormal ``U`` and ``V``.

        Bases are the Q factors of Gaussian matrices from a generator seeded with ``seed`` (the same seed gives
        the same bases). The metadata records ``random_bases: {"seed": seed}``.
        """
        generator = torch.Generator().manual_seed(seed)
        bases = {}
        for name, b in self.bases.items():
            (m, r), n = b.U.shape, b.V.shape[0]
            U = torch.linalg.qr(torch.randn(m, r, generator=generator))[0] if r else b.U.clone()
            V = torch.linalg.qr(torch.randn(n, r, generator=generator))[0] if r else b.V.clone()
            bases[name] = Basis(U.contiguous(), b.S.clone(), V.contiguous())
        return SafetySubspace(bases, {**self.metadata, "random_bases": {"seed": seed}})

    def _save_pretrained(self, save_directory: Path) -> None:
        self.save(save_directory, overwrite=True)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision, cache_dir, force_download: bool, local_files_only: bool,
                         token, model: nn.Module | None = None, **kwargs) -> SafetySubspace:
        path = Path(model_id)
        if not path.is_dir():  # a repo id: fetch the two files (and the card) from the Hub or its local cache
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(model_id, revision=revision, cache_dir=cache_dir, token=token,
                                          force_download=force_download, local_files_only=local_files_only,
                                          allow_patterns=[TENSORS_FILE, METADATA_FILE, "README.md"]))
        return cls.load(path, model=model)

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        """Return the README.md of a saved subspace: what it was estimated on and from, and for what settings."""
        meta = self.metadata
        ranks = list(meta["ranks"].values())
        config = self.config
        samples = meta.get("samples", [])
        rank_range = f"{min(ranks, default=0)}..{max(ranks, default=0)} (mean {sum(ranks) / max(len(ranks), 1):.1f})"
        shown = "\n".join(f"- {s['prompt']!r} -> {s['refusal'][:80]!r}" for s in samples[:5])
        card = f"""---
library_name: safeft
tags: [safeft, safety-subspace, spf]
---

# Safety subspace for `{meta['model'].get('name_or_path')}`

A low-rank safety subspace for Safety-Preserving Fine-Tuning (SPF, arXiv 2601.10141), made with safeft
{meta.get('safeft_version')}. Fine-tune the model it was estimated on with it, and SPF removes from every update the
part that acts on these directions.

| | |
|---|---|
| base model | `{meta['model'].get('name_or_path')}` (weights fingerprint `{meta['model'].get('fingerprint')}`) |
| targets | {len(ranks)} matrices, rank {rank_range}, {self.numel():,} numbers |
| rank policy | {json.dumps(meta['rank_policy'])} |
| made for | side `{config.side or 'right (two_sided under LoRA)'}`, mode `{config.mode}`, project `{config.project}` |
| safety samples | {meta.get('num_samples')} (sha256 `{meta.get('samples_sha256')}`) |

First samples:
{shown}

```python
from safeft import SafetySubspace, SPFCallback

subspace = SafetySubspace.from_pretrained("THIS_REPO_OR_DIR", model=model)  # checks targets and shapes
trainer = SFTTrainer(..., callbacks=[SPFCallback(subspace, subspace.config)])
```
"""
        return ModelCard(card)

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write ``subspace.safetensors`` and ``subspace.json`` into directory ``path`` and return it.

        Refuses to replace an existing subspace unless ``overwrite=True``.
        """
        path = Path(path)
        if (path / TENSORS_FILE).exists() and not overwrite:
            raise FileExistsError(f"{path} already holds a subspace; choose another path or pass overwrite=True")
        path.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, b in self.bases.items():
            tensors.update({f"{name}.{key}": getattr(b, key).contiguous() for key in "USV"})
        save_file(tensors, str(path / TENSORS_FILE), metadata={"format": FORMAT})
        (path / METADATA_FILE).write_text(json.dumps(self.metadata, indent=2, ensure_ascii=False) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None) -> SafetySubspace:
        """Read a subspace saved by :meth:`save`; with ``model``, check that it fits (see :meth:`check_model`).

        Raises ``ValueError`` naming the file if it is unreadable, or its tensors are missing, mis-shaped,
        non-finite or not orthonormal, or its samples do not match their recorded hash.
        """
        path = Path(path)
        if not (path / TENSORS_FILE).exists() or not (path / METADATA_FILE).exists():
            raise FileNotFoundError(f"{path} is not a saved subspace: expected {TENSORS_FILE} and {METADATA_FILE}")
        fix = "re-estimate it (safeft subspace estimate)"
        try:
            metadata = json.loads((path / METADATA_FILE).read_text())
            tensors = load_file(str(path / TENSORS_FILE))
        except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError) as error:
            raise ValueError(f"{path}: cannot read the subspace ({type(error).__name__}: "
                             f"{str(error).splitlines()[0] if str(error) else ''}); the file is truncated or "
                             f"corrupt: {fix}") from None
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path}: unknown subspace format {metadata.get('format')!r}, expected {FORMAT!r}")
        bases = {}
        for name, (m, n) in metadata["model"]["targets"].items():
            U, S, V = (tensors.get(f"{name}.{k}") for k in "USV")
            r = metadata["ranks"][name]
            if U is None or S is None or V is None or U.shape != (m, r) or S.shape != (r,) or V.shape != (n, r):
                raise ValueError(f"{path}: tensors of target {name!r} are missing or do not match its metadata "
                                 f"({m}x{n}, rank {r}); the file is corrupt or was edited: {fix}")
            problem = _basis_problem(U, S, V)
            if problem:
                raise ValueError(f"{path}: the basis of {name!r} {problem}; the file is corrupt or was edited: {fix}")
            bases[name] = Basis(U, S, V)
        samples = metadata.get("samples", [])
        if samples_sha256([SafetySample(**x) for x in samples]) != metadata.get("samples_sha256"):
            raise ValueError(f"{path}: the safety samples in {METADATA_FILE} do not match their recorded hash "
                             f"(edited after estimation?); {fix}")
        subspace = cls(bases, metadata)
        if model is not None:
            subspace.check_model(model, warn_other_weights=True)
        return subspace

    def check_model(self, model: nn.Module, *, warn_other_weights: bool = False) -> dict[str, Target]:
        """Return the model's targets for this subspace; raise ``ValueError`` listing every name or shape mismatch.

        With ``warn_other_weights``, warn when the targets' weights are not the ones the subspace was estimated at
        (another checkpoint of the same shapes, or weights trained since): its directions then describe another
        model's safety gradient.
        """
        found = find_targets(model, self.metadata["rank_policy"]["target_modules"])
        missing = [n for n in self.bases if n not in found]
        shapes = [f"{n}: subspace {tuple(self.metadata['model']['targets'][n])} vs model {found[n].shape}"
                  for n in self.bases if n in found and tuple(self.metadata["model"]["targets"][n]) != found[n].shape]
        if missing or shapes:
            lines = []
            if missing:
                lines.append(f"{len(missing)} target(s) not in the model: " + ", ".join(missing[:10])
                             + (" ..." if len(missing) > 10 else ""))
            if shapes:
                lines.append(f"{len(shapes)} shape mismatch(es): " + "; ".join(shapes[:10])
                             + (" ..." if len(shapes) > 10 else ""))
            origin = self.metadata["model"].get("name_or_path") or "another model"
            raise ValueError("safety subspace does not fit this model (it was estimated on "
                             f"{origin}):\n  " + "\n  ".join(lines)
                             + "\nEstimate a new subspace on this model (safeft subspace estimate).")
        targets = {n: found[n] for n in self.bases}
        recorded = self.metadata["model"].get("fingerprint")
        if warn_other_weights and recorded and weights_fingerprint(targets) != recorded:
            import warnings

            warnings.warn(f"this safety subspace was estimated on other weights than this model's (fingerprint "
                          f"{recorded} vs {weights_fingerprint(targets)}; estimated on "
                          f"{self.metadata['model'].get('name_or_path')}). Its directions describe that model's "
                          "safety gradient: estimate a subspace on this model unless that is what you mean.",
                          stacklevel=3)
        return targets


def _basis_problem(U: Tensor, S: Tensor, V: Tensor, tol: float = 1e-3) -> str | None:
    """Return what is wrong with a stored basis (non-finite, negative S, columns not orthonormal), or None."""
    if not all(torch.isfinite(t).all() for t in (U, S, V)):
        return "holds NaN or inf"
    if (S < 0).any():
        return "has negative singular values"
    for label, X in (("U", U), ("V", V)):
        gram = X.float().T @ X.float()
        if gram.numel() and (gram - torch.eye(gram.shape[0])).abs().max() > tol:
            return f"has {label} columns that are not orthonormal"
    return None
