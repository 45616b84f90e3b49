"""A saved safety subspace's files: their names and formats, the manifest written last, and the checks that refuse
a directory edited, damaged or left incomplete, each naming the file and the fix (re-estimate).

Pure file and tensor checks: the artifact itself (:class:`~safeft.spf.subspace.SafetySubspace`) reads and writes
through them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from safeft.data.examples import SafetySample
from safeft.errors import UserError
from safeft.spf.targets import matches

FORMAT = "safeft.subspace/1"
TENSORS_FILE = "subspace.safetensors"
METADATA_FILE = "subspace.json"
MANIFEST_FILE = "manifest.json"  # what was saved: targets, shapes, ranks, counts, sha256 of the two files above
MANIFEST_FORMAT = "safeft.subspace.manifest/1"
FIX = "re-estimate it (safeft subspace estimate)"
REQUIRED_KEYS = ("model", "rank_policy", "ranks", "num_samples", "samples_sha256", "samples")


def sample_dict(sample: SafetySample) -> dict:
    """Return ``sample`` as the JSON object stored in ``subspace.json`` (fields that are None left out)."""
    return {k: v for k, v in asdict(sample).items() if v is not None}


def samples_sha256(samples: Sequence[SafetySample]) -> str:
    """Return a stable hash of the safety samples (order-sensitive)."""
    payload = json.dumps([sample_dict(s) for s in samples], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(path: Path, metadata: dict, ranks: dict[str, int]) -> None:
    """Write ``manifest.json`` into ``path`` beside the two files it vouches for (call it last: a directory with a
    manifest is a complete save): their sha256 and sizes, the targets' shapes and ``ranks``, the sample count."""
    manifest = {"format": MANIFEST_FORMAT,
                "files": {name: {"sha256": file_sha256(path / name), "bytes": (path / name).stat().st_size}
                          for name in (TENSORS_FILE, METADATA_FILE)},
                "targets": {name: {"shape": list(metadata["model"]["targets"][name]), "rank": rank}
                            for name, rank in ranks.items()},
                "num_targets": len(ranks), "num_samples": metadata.get("num_samples"),
                "samples_sha256": metadata.get("samples_sha256")}
    (path / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


def read_json(file: Path, path: Path) -> dict:
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


def read_manifest(path: Path, metadata: dict) -> dict | None:
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
    manifest = read_json(file, path)
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("files"), dict) or \
            not isinstance(manifest.get("targets"), dict):
        raise UserError(f"{file}: not a subspace manifest of format {MANIFEST_FORMAT!r}; it was edited or damaged: "
                        f"{FIX}")
    return manifest


def check_metadata(path: Path, metadata: dict) -> None:
    """Raise ``UserError`` naming ``subspace.json`` if its fields are missing or disagree with each other."""
    file = path / METADATA_FILE

    def refuse(problem: str) -> None:
        raise UserError(f"{file}: {problem}; the file was edited or damaged: {FIX}")

    if metadata.get("format") != FORMAT:
        raise UserError(f"{file}: unknown subspace format {metadata.get('format')!r}, expected {FORMAT!r}")
    missing = [key for key in REQUIRED_KEYS if key not in metadata]
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


def check_file_hash(path: Path, name: str, manifest: dict) -> None:
    entry = manifest["files"].get(name)
    if not isinstance(entry, dict) or file_sha256(path / name) != entry.get("sha256"):
        raise UserError(f"{path / name} differs from what was saved (its sha256 does not match {MANIFEST_FILE}): "
                        f"it was edited or damaged after saving; {FIX}")


def check_against_manifest(path: Path, metadata: dict, manifest: dict) -> None:
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


def basis_problem(U: Tensor, S: Tensor, V: Tensor, tol: float = 1e-3) -> str | None:
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
