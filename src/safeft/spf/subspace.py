"""The safety subspace as an artifact: per-target bases ``U, S, V`` (safetensors) plus metadata (JSON) that says
where they came from, checked on load against the files and against the model; Hub-style save, load and push."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelHubMixin
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from safeft.data.examples import SafetySample, as_safety_samples
from safeft.errors import UserError
from safeft.spf import files
from safeft.spf.card import hub_problem, is_hub_error
from safeft.spf.config import SPFConfig
from safeft.spf.estimate import Basis, estimate_bases
from safeft.spf.files import FIX, FORMAT, MANIFEST_FILE, METADATA_FILE, TENSORS_FILE, sample_dict, samples_sha256
from safeft.spf.targets import Target, find_targets, weights_fingerprint


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
        self._hub_mixin_config = None  # no config.json: everything is in subspace.json

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
        samples = as_safety_samples(samples)
        targets, bases, config = estimate_bases(model, tokenizer, samples, config or SPFConfig(),
                                                show_progress=show_progress)  # config: the rank in force
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
            "samples": [sample_dict(s) for s in samples],
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
        """Return the README.md of a saved subspace; keyword arguments go to :func:`safeft.spf.card.model_card`
        (``repo_id``, ``base_model``, ``license_id``, ``include_samples``)."""
        from safeft.spf.card import model_card

        return model_card(self, **kwargs)

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

    def overlap(self, other: SafetySubspace, side: str) -> float:
        """Return how much of this subspace's span ``other`` keeps: the mean over the targets both hold of the mean
        squared cosine of the principal angles between their spans on ``side`` (``right``: V, ``left``: U,
        ``two_sided``: the mean of both; :func:`~safeft.spf.lowrank.subspace_overlap`). 1 where every span is the
        same, 0 where all are orthogonal; 0.0 when no target is shared."""
        from safeft.spf.lowrank import subspace_overlap

        factors = {"right": ("V",), "left": ("U",), "two_sided": ("U", "V")}[side]
        values = [subspace_overlap(getattr(mine, f).float(), getattr(theirs, f).to(getattr(mine, f)).float())
                  for name, theirs in other.bases.items() if (mine := self.bases.get(name)) is not None
                  for f in factors]
        return sum(values) / len(values) if values else 0.0

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
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *, model: nn.Module | None = None,
                        revision: str | None = None, cache_dir: str | Path | None = None, token: str | None = None,
                        force_download: bool = False, local_files_only: bool = False) -> SafetySubspace:
        """Load a subspace from a local directory or a Hub repo id (fetched, or read from the local Hub cache).

        A path that names no existing directory is refused at once ("no such directory"), without asking the Hub:
        an absolute or ``./``-relative path, one whose parent folder exists here, or anything that is not an
        ``owner/name`` repo id. Hub failures (offline, unknown repo, no access) are a ``UserError`` saying which.
        """
        name = str(pretrained_model_name_or_path)
        path = Path(name).expanduser()
        if path.is_dir():
            return cls.load(path, model=model)
        from safeft.spf.card import hub_model_id

        if isinstance(pretrained_model_name_or_path, Path) or hub_model_id(name) is None or path.is_absolute() \
                or name.startswith(".") or path.parent.is_dir() and path.parent != Path("."):
            raise FileNotFoundError(f"{name}: no such directory (to load from the Hub, give a repo id "
                                    "'owner/name')")
        from huggingface_hub import snapshot_download

        try:
            local = snapshot_download(name, revision=revision, cache_dir=cache_dir, token=token,
                                      force_download=force_download, local_files_only=local_files_only,
                                      allow_patterns=[TENSORS_FILE, METADATA_FILE, MANIFEST_FILE, "README.md"])
        except Exception as error:  # noqa: BLE001 -- every Hub/transport failure is the user's setting or network
            if not is_hub_error(error):
                raise
            raise UserError(f"cannot fetch subspace {name!r} from the Hub ({hub_problem(error)}); if it is a local "
                            "directory, check the path") from None
        return cls.load(local, model=model)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload safety subspace (safeft)", include_samples: bool = False,
                    base_model: str | None = None, license_id: str = "other", **kwargs) -> str:
        """Upload the subspace (its three files and a model card naming ``repo_id``) to Hub repo ``repo_id`` and
        return the commit's URL. The card options are :func:`safeft.spf.card.model_card`'s.

        Raises ``UserError`` when the Hub cannot be reached (``HF_HUB_OFFLINE`` set, no network) or refuses the
        upload (no token, no write access), saying which.
        """
        from huggingface_hub import constants

        if constants.is_offline_mode():
            raise UserError(f"cannot push to {repo_id!r}: offline mode is on (HF_HUB_OFFLINE=1); unset it, or "
                            "copy the saved directory instead")
        card = {"include_samples": include_samples, "base_model": base_model, "license_id": license_id,
                **(kwargs.pop("model_card_kwargs", None) or {}), "repo_id": repo_id}  # save_pretrained passes some
        try:
            return super().push_to_hub(repo_id, private=private, token=token, commit_message=commit_message,
                                       model_card_kwargs=card, **kwargs)
        except Exception as error:  # noqa: BLE001 -- every Hub/transport failure is the user's setting or network
            if not is_hub_error(error):
                raise
            raise UserError(f"cannot push to {repo_id!r} ({hub_problem(error)}); check the network and your token "
                            "(hf auth login)") from None

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write ``subspace.safetensors``, ``subspace.json`` and ``manifest.json`` into directory ``path`` and return
        it. The manifest records the targets, their shapes and ranks, the sample count and the sha256 of the two other
        files; :meth:`load` checks all of it, so a file edited or damaged after saving is refused.

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
        metadata = {**self.metadata, "integrity": MANIFEST_FILE}  # a file with this key is refused without it
        (path / METADATA_FILE).write_text(json.dumps(metadata, indent=2, ensure_ascii=False) + "\n")
        files.write_manifest(path, metadata, {name: b.rank for name, b in self.bases.items()})
        return path

    @classmethod
    def read_metadata(cls, path: str | Path) -> dict:
        """Return the metadata of the subspace saved in ``path``, checked against its manifest and for its own
        consistency (targets, ranks, sample count, target patterns), without reading the tensors.

        Raises ``UserError`` naming the file and "re-estimate" for anything edited, damaged or missing.
        """
        path = Path(path)
        metadata = files.read_json(path / METADATA_FILE, path)
        manifest = files.read_manifest(path, metadata)
        files.check_metadata(path, metadata)
        if manifest is not None:
            files.check_file_hash(path, METADATA_FILE, manifest)
            files.check_against_manifest(path, metadata, manifest)
        return metadata

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None) -> SafetySubspace:
        """Read a subspace saved by :meth:`save`; with ``model``, check that it fits (see :meth:`check_model`).

        Raises ``UserError`` naming the file (and the fix: re-estimate) if it is unreadable; if its metadata is
        incomplete or inconsistent (targets, ranks, sample count, target patterns); if its tensors are missing,
        extra, mis-shaped, non-finite or not orthonormal; if its samples do not match their recorded hash; or if a
        file differs from what its manifest recorded at saving. A subspace saved before manifests existed (no
        ``manifest.json``) loads with a warning, checked for consistency only.
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such directory (a saved subspace is a directory holding "
                                    f"{TENSORS_FILE} and {METADATA_FILE})")
        if not (path / TENSORS_FILE).exists() or not (path / METADATA_FILE).exists():
            raise FileNotFoundError(f"{path} is not a saved subspace: expected {TENSORS_FILE} and {METADATA_FILE}")
        metadata = files.read_json(path / METADATA_FILE, path)
        try:
            tensors = load_file(str(path / TENSORS_FILE))
        except (SafetensorError, OSError) as error:
            raise UserError(f"{path / TENSORS_FILE}: cannot read the subspace ({type(error).__name__}: "
                            f"{str(error).splitlines()[0] if str(error) else ''}); the file is truncated or "
                            f"corrupt: {FIX}") from None
        manifest = files.read_manifest(path, metadata)
        files.check_metadata(path, metadata)
        bases = {}
        for name, (m, n) in metadata["model"]["targets"].items():
            U, S, V = (tensors.get(f"{name}.{k}") for k in "USV")
            r = metadata["ranks"][name]
            if U is None or S is None or V is None or U.shape != (m, r) or S.shape != (r,) or V.shape != (n, r):
                raise UserError(f"{path}: tensors of target {name!r} are missing or do not match its metadata "
                                f"({m}x{n}, rank {r}); the file is corrupt or was edited: {FIX}")
            problem = files.basis_problem(U, S, V)
            if problem:
                raise UserError(f"{path}: the basis of {name!r} {problem}; the file is corrupt or was edited: {FIX}")
            bases[name] = Basis(U, S, V)
        extra = sorted({key.rsplit(".", 1)[0] for key in tensors} - set(bases))
        if extra:
            raise UserError(f"{path / METADATA_FILE}: {len(extra)} target(s) have tensors in {TENSORS_FILE} but are "
                            f"not in the metadata ({', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}); it was "
                            f"edited: {FIX}")
        if manifest is not None:
            files.check_against_manifest(path, metadata, manifest)
            for name in (METADATA_FILE, TENSORS_FILE):
                files.check_file_hash(path, name, manifest)
        subspace = cls(bases, {k: v for k, v in metadata.items() if k != "integrity"})
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
