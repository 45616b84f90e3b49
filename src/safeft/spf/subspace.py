"""The safety subspace as an artifact: per-target bases ``U, S, V`` (safetensors) plus metadata (JSON) that says
where they came from, checked on load against the files and against the model; Hub-style save, load and push."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelHubMixin
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from safeft.data.examples import SafetySample, as_safety_samples
from safeft.errors import UserError
from safeft.spf.config import SPFConfig
from safeft.spf.estimate import Basis, estimate_bases
from safeft.spf.targets import Target, find_targets, weights_fingerprint

FORMAT = "safeft.subspace/1"
TENSORS_FILE = "subspace.safetensors"
METADATA_FILE = "subspace.json"


def _sample_dict(sample: SafetySample) -> dict:
    return {k: v for k, v in asdict(sample).items() if v is not None}


def samples_sha256(samples: Sequence[SafetySample]) -> str:
    """Return a stable hash of the safety samples (order-sensitive)."""
    payload = json.dumps([_sample_dict(s) for s in samples], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


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
        samples = as_safety_samples(samples)
        targets, bases = estimate_bases(model, tokenizer, samples, config, show_progress=show_progress)
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

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        """Return the README.md of a saved subspace (see :func:`safeft.spf.card.model_card`)."""
        from safeft.spf.card import model_card

        return model_card(self)

    def without_task_directions(self, task: dict[str, Basis], side: str, threshold: float) -> SafetySubspace:
        """Return this subspace without the directions the fine-tuning task needs: per target, every safety direction
        whose share in ``task[name]``'s span on ``side`` (:func:`~safeft.spf.estimate.task_overlaps`) exceeds
        ``threshold`` is dropped (its U, S and V columns together). The metadata records ``task_aware``: the
        threshold, the task rank and the directions kept and dropped."""
        from safeft.spf.estimate import task_overlaps

        bases, dropped = {}, 0
        for name, b in self.bases.items():
            keep = task_overlaps(b, task[name], side) <= threshold if name in task and b.rank else \
                torch.ones(b.rank, dtype=torch.bool)
            dropped += int((~keep).sum())
            bases[name] = Basis(b.U[:, keep].contiguous(), b.S[keep].contiguous(), b.V[:, keep].contiguous())
        kept = sum(b.rank for b in bases.values())
        metadata = {**self.metadata, "ranks": {name: b.rank for name, b in bases.items()},
                    "task_aware": {"threshold": threshold, "side": side,
                                   "task_rank": max((t.rank for t in task.values()), default=0),
                                   "directions_kept": kept, "directions_dropped": dropped}}
        return SafetySubspace(bases, metadata)

    def union(self, fresh: SafetySubspace, side: str, max_rank: int) -> SafetySubspace:
        """Return the subspace that guards both this one's and ``fresh``'s directions on ``side`` (``left``: the
        spans of U, ``right``: of V), each target's union cut to its ``max_rank`` strongest directions
        (:func:`~safeft.spf.lowrank.weighted_span`). The other side's bases are merged the same way (completed to as
        many orthonormal columns), so the artifact stays valid, but their columns no longer pair with this side's as
        an SVD's do: use the result with ``mode="always"`` on ``side``. Metadata: ``fresh``'s, with ``accumulated``
        counting the merges."""
        from safeft.spf.lowrank import complete_columns, weighted_span

        if side not in ("left", "right"):
            raise UserError(f"a union of subspaces keeps one side's span: side 'left' or 'right', got {side!r}")
        bases = {}
        for name, new in fresh.bases.items():
            old = self.bases.get(name, new)
            pairs = {"U": [(old.U, old.S), (new.U, new.S)], "V": [(old.V, old.S), (new.V, new.S)]}
            kept, other = ("V", "U") if side == "right" else ("U", "V")
            limit = min(max_rank, new.U.shape[0], new.V.shape[0])
            X, S = weighted_span(pairs[kept], limit)
            Y = complete_columns(weighted_span(pairs[other], S.shape[0])[0], S.shape[0])
            U, V = (Y, X) if side == "right" else (X, Y)
            bases[name] = Basis(U, S, V)
        metadata = {**fresh.metadata, "ranks": {name: b.rank for name, b in bases.items()},
                    "accumulated": self.metadata.get("accumulated", 0) + 1}
        return SafetySubspace(bases, metadata)

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
            raise UserError(f"{path}: cannot read the subspace ({type(error).__name__}: "
                             f"{str(error).splitlines()[0] if str(error) else ''}); the file is truncated or "
                             f"corrupt: {fix}") from None
        if metadata.get("format") != FORMAT:
            raise UserError(f"{path}: unknown subspace format {metadata.get('format')!r}, expected {FORMAT!r}")
        bases = {}
        for name, (m, n) in metadata["model"]["targets"].items():
            U, S, V = (tensors.get(f"{name}.{k}") for k in "USV")
            r = metadata["ranks"][name]
            if U is None or S is None or V is None or U.shape != (m, r) or S.shape != (r,) or V.shape != (n, r):
                raise UserError(f"{path}: tensors of target {name!r} are missing or do not match its metadata "
                                 f"({m}x{n}, rank {r}); the file is corrupt or was edited: {fix}")
            problem = _basis_problem(U, S, V)
            if problem:
                raise UserError(f"{path}: the basis of {name!r} {problem}; the file is corrupt or was edited: {fix}")
            bases[name] = Basis(U, S, V)
        samples = metadata.get("samples", [])
        if samples_sha256([SafetySample(**x) for x in samples]) != metadata.get("samples_sha256"):
            raise UserError(f"{path}: the safety samples in {METADATA_FILE} do not match their recorded hash "
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
            raise UserError("safety subspace does not fit this model (it was estimated on "
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
