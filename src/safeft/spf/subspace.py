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
from safeft.spf.targets import Target, find_targets, matches, weights_fingerprint

FORMAT = "safeft.subspace/1"
TENSORS_FILE = "subspace.safetensors"
METADATA_FILE = "subspace.json"
MANIFEST_FILE = "manifest.json"  # what was saved: targets, shapes, ranks, counts, sha256 of the two files above
MANIFEST_FORMAT = "safeft.subspace.manifest/1"
FIX = "re-estimate it (safeft subspace estimate)"
_REQUIRED_KEYS = ("model", "rank_policy", "ranks", "num_samples", "samples_sha256", "samples")


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
            if not _is_hub_error(error):
                raise
            raise UserError(f"cannot fetch subspace {name!r} from the Hub ({_hub_problem(error)}); if it is a local "
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
            if not _is_hub_error(error):
                raise
            raise UserError(f"cannot push to {repo_id!r} ({_hub_problem(error)}); check the network and your token "
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
        manifest = {"format": MANIFEST_FORMAT,
                    "files": {name: {"sha256": _file_sha256(path / name), "bytes": (path / name).stat().st_size}
                              for name in (TENSORS_FILE, METADATA_FILE)},
                    "targets": {name: {"shape": list(metadata["model"]["targets"][name]), "rank": b.rank}
                                for name, b in self.bases.items()},
                    "num_targets": len(self.bases), "num_samples": metadata.get("num_samples"),
                    "samples_sha256": metadata.get("samples_sha256")}
        (path / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")  # last: it vouches for the rest
        return path

    @classmethod
    def read_metadata(cls, path: str | Path) -> dict:
        """Return the metadata of the subspace saved in ``path``, checked against its manifest and for its own
        consistency (targets, ranks, sample count, target patterns), without reading the tensors.

        Raises ``UserError`` naming the file and "re-estimate" for anything edited, damaged or missing.
        """
        path = Path(path)
        metadata = _read_json(path / METADATA_FILE, path)
        manifest = _read_manifest(path, metadata)
        _check_metadata(path, metadata)
        if manifest is not None:
            _check_file_hash(path, METADATA_FILE, manifest)
            _check_against_manifest(path, metadata, manifest)
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
        metadata = _read_json(path / METADATA_FILE, path)
        try:
            tensors = load_file(str(path / TENSORS_FILE))
        except (SafetensorError, OSError) as error:
            raise UserError(f"{path / TENSORS_FILE}: cannot read the subspace ({type(error).__name__}: "
                            f"{str(error).splitlines()[0] if str(error) else ''}); the file is truncated or "
                            f"corrupt: {FIX}") from None
        manifest = _read_manifest(path, metadata)
        _check_metadata(path, metadata)
        bases = {}
        for name, (m, n) in metadata["model"]["targets"].items():
            U, S, V = (tensors.get(f"{name}.{k}") for k in "USV")
            r = metadata["ranks"][name]
            if U is None or S is None or V is None or U.shape != (m, r) or S.shape != (r,) or V.shape != (n, r):
                raise UserError(f"{path}: tensors of target {name!r} are missing or do not match its metadata "
                                f"({m}x{n}, rank {r}); the file is corrupt or was edited: {FIX}")
            problem = _basis_problem(U, S, V)
            if problem:
                raise UserError(f"{path}: the basis of {name!r} {problem}; the file is corrupt or was edited: {FIX}")
            bases[name] = Basis(U, S, V)
        extra = sorted({key.rsplit(".", 1)[0] for key in tensors} - set(bases))
        if extra:
            raise UserError(f"{path / METADATA_FILE}: {len(extra)} target(s) have tensors in {TENSORS_FILE} but are "
                            f"not in the metadata ({', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}); it was "
                            f"edited: {FIX}")
        if manifest is not None:
            _check_against_manifest(path, metadata, manifest)
            for name in (METADATA_FILE, TENSORS_FILE):
                _check_file_hash(path, name, manifest)
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


def _is_hub_error(error: Exception) -> bool:
    """Return True for a failure of the Hub or of the network under it (not a bug of safeft's)."""
    module = type(error).__module__.split(".")[0]
    return isinstance(error, OSError) or module.startswith(("huggingface_hub", "httpx", "requests", "urllib3"))


def _hub_problem(error: Exception) -> str:
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return "offline mode is on: HF_HUB_OFFLINE=1"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else 'no message'}"


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _read_json(file: Path, path: Path) -> dict:
    """Return the JSON object in ``file`` (part of the subspace in ``path``); ``UserError`` naming it otherwise."""
    try:
        value = json.loads(file.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is not a saved subspace: expected {TENSORS_FILE} and {METADATA_FILE}"
                                ) from None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as error:
        raise UserError(f"{file}: cannot read the subspace ({type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''}); the file is truncated or corrupt: "
                        f"{FIX}") from None
    if not isinstance(value, dict):
        raise UserError(f"{file}: cannot read the subspace (not a JSON object); the file is corrupt: {FIX}")
    return value


def _read_manifest(path: Path, metadata: dict) -> dict | None:
    """Return the manifest of the subspace in ``path``, or None (with a warning) for one saved before manifests."""
    file = path / MANIFEST_FILE
    if not file.exists():
        if metadata.get("integrity"):
            raise UserError(f"{file} is missing: the subspace was saved with a manifest, so the directory is "
                            f"incomplete (an interrupted save or a partial copy): {FIX}")
        import warnings

        warnings.warn(f"{path} has no {MANIFEST_FILE} (saved by safeft {metadata.get('safeft_version')}, before "
                      "subspaces carried one): it is checked for consistency only, not against edits. Save it again "
                      "(SafetySubspace.load(path).save(path, overwrite=True)) to add one, or re-estimate it.",
                      stacklevel=3)
        return None
    manifest = _read_json(file, path)
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("files"), dict) or \
            not isinstance(manifest.get("targets"), dict):
        raise UserError(f"{file}: not a subspace manifest of format {MANIFEST_FORMAT!r}; it was edited or damaged: "
                        f"{FIX}")
    return manifest


def _check_metadata(path: Path, metadata: dict) -> None:
    """Raise ``UserError`` naming ``subspace.json`` if its fields are missing or disagree with each other."""
    file = path / METADATA_FILE

    def refuse(problem: str) -> None:
        raise UserError(f"{file}: {problem}; the file was edited or damaged: {FIX}")

    if metadata.get("format") != FORMAT:
        raise UserError(f"{file}: unknown subspace format {metadata.get('format')!r}, expected {FORMAT!r}")
    missing = [key for key in _REQUIRED_KEYS if key not in metadata]
    if missing:
        refuse(f"missing key(s) {', '.join(missing)}")
    model, ranks, samples = metadata["model"], metadata["ranks"], metadata["samples"]
    if not isinstance(model, dict) or not isinstance(model.get("targets"), dict) or "fingerprint" not in model:
        refuse("'model' must hold 'targets' (name -> shape) and 'fingerprint'")
    targets = model["targets"]
    if not targets:
        refuse("the target list is empty (a subspace guards at least one matrix)")
    if not isinstance(ranks, dict) or set(ranks) != set(targets):
        diff = sorted(set(targets) ^ set(ranks if isinstance(ranks, dict) else {}))
        refuse(f"'ranks' and 'model.targets' name different targets ({', '.join(diff[:5])})")
    for name, shape in targets.items():
        if not (isinstance(shape, list) and len(shape) == 2 and all(type(d) is int and d > 0 for d in shape)):
            refuse(f"target {name!r} has shape {shape!r}, not [rows, columns]")
        if type(ranks[name]) is not int or not 0 <= ranks[name] <= min(shape):
            refuse(f"target {name!r} has rank {ranks[name]!r}, not an integer in [0, {min(shape)}]")
    if not isinstance(samples, list) or type(metadata["num_samples"]) is not int or \
            metadata["num_samples"] != len(samples):
        refuse(f"num_samples is {metadata['num_samples']!r} but {len(samples) if isinstance(samples, list) else 0} "
               "sample(s) are stored")
    try:
        sample_objects = [SafetySample(**x) for x in samples]
    except TypeError:
        refuse("the stored samples are not {prompt, refusal[, compliance]} objects")
    if samples_sha256(sample_objects) != metadata["samples_sha256"]:
        raise UserError(f"{file}: the safety samples do not match their recorded hash (edited after estimation?); "
                        f"{FIX}")
    policy = metadata["rank_policy"]
    if not isinstance(policy, dict):
        refuse("'rank_policy' is not a mapping")
    patterns = policy.get("target_modules")
    if patterns is not None and (not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns)):
        refuse(f"rank_policy.target_modules is {patterns!r}, not a list of names or patterns")
    stray = [name for name in targets if not matches(name, patterns)]
    if stray:
        refuse(f"{len(stray)} target(s) are not matched by rank_policy.target_modules {patterns!r} "
               f"({', '.join(stray[:3])}{' ...' if len(stray) > 3 else ''})")
    recorded = metadata.get("spf_config")
    if isinstance(recorded, dict):
        differ = [key for key, value in policy.items() if key in recorded and recorded[key] != value]
        if differ:
            refuse(f"rank_policy and spf_config disagree on {', '.join(differ)}")


def _check_file_hash(path: Path, name: str, manifest: dict) -> None:
    entry = manifest["files"].get(name)
    if not isinstance(entry, dict) or _file_sha256(path / name) != entry.get("sha256"):
        raise UserError(f"{path / name} differs from what was saved (its sha256 does not match {MANIFEST_FILE}): "
                        f"it was edited or damaged after saving; {FIX}")


def _check_against_manifest(path: Path, metadata: dict, manifest: dict) -> None:
    """Raise ``UserError`` if the metadata's targets, shapes, ranks or counts are not the manifest's."""
    saved = {name: (tuple(t.get("shape", ())), t.get("rank")) for name, t in manifest["targets"].items()}
    now = {name: (tuple(shape), metadata["ranks"][name]) for name, shape in metadata["model"]["targets"].items()}
    if saved != now or manifest.get("num_targets") != len(now):
        diff = sorted(set(saved) ^ set(now)) or sorted(n for n in now if saved.get(n) != now[n])
        raise UserError(f"{path / METADATA_FILE}: its targets are not the {len(saved)} saved in {MANIFEST_FILE} "
                        f"(they differ at {', '.join(diff[:5])}{' ...' if len(diff) > 5 else ''}); it was edited "
                        f"after saving: {FIX}")
    for key in ("num_samples", "samples_sha256"):
        if manifest.get(key) != metadata.get(key):
            raise UserError(f"{path / METADATA_FILE}: {key} is {metadata.get(key)!r}, {MANIFEST_FILE} recorded "
                            f"{manifest.get(key)!r} at saving; it was edited after saving: {FIX}")


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
