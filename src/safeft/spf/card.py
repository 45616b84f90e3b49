"""The Hub side of a saved safety subspace: its model card (README.md, a standard Hub model card), Hub repo ids,
and Hub failures said in a few words.

Its YAML front matter comes from ``huggingface_hub.ModelCardData``; its text says what the subspace was estimated
on and from, and for what settings.

No local path goes into the card (a Hub page must not show the estimating machine's directories), and the harmful
safety prompts appear as a count and a sha256 unless ``include_samples=True``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

TAGS = ["safeft", "safety-subspace", "spf", "safety"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")


def hub_model_id(name_or_path: str | None) -> str | None:
    """Return ``name_or_path`` if it reads as a Hub repo id (``owner/name``) that is not a local path, else None."""
    if not name_or_path or not _REPO_ID.match(name_or_path) or Path(name_or_path).expanduser().exists():
        return None
    return name_or_path


def model_card(subspace, *, repo_id: str | None = None, base_model: str | None = None, license_id: str = "other",
               include_samples: bool = False) -> ModelCard:
    """Return the README.md of a saved subspace.

    Args:
        subspace: the :class:`~safeft.spf.subspace.SafetySubspace`.
        repo_id: the Hub repo (or folder name) the card's loading snippet names; None: ``"path/to/subspace"``.
        base_model: the Hub id of the model it was estimated on, for the front matter's ``base_model``; None: the
            recorded model name if it is a Hub id (a local path is never written).
        license_id: the front matter's ``license`` (a Hub licence id; ``other`` by default: the base model's licence
            applies to what is derived from it).
        include_samples: list the safety samples (harmful prompts and refusals) verbatim; by default only their
            count and sha256.
    """
    meta = subspace.metadata
    ranks = list(meta["ranks"].values())
    config = subspace.config
    base = base_model or hub_model_id(meta["model"].get("name_or_path"))
    data = ModelCardData(base_model=base, license=license_id, library_name="safeft", tags=TAGS)
    rank_range = f"{min(ranks, default=0)}..{max(ranks, default=0)} (mean {sum(ranks) / max(len(ranks), 1):.1f})"
    policy = {k: v for k, v in meta["rank_policy"].items() if v is not None}
    title = f"Safety subspace for `{base}`" if base else "Safety subspace"
    samples = meta.get("samples", [])
    if include_samples:
        listed = "\n".join(f"- {s['prompt']!r} -> {s['refusal']!r}" for s in samples)
        samples_part = f"\nThe safety samples (harmful prompt -> refusal):\n\n{listed}\n"
    else:
        samples_part = ("\nThe safety samples themselves (harmful prompts) are stored in `subspace.json`, not shown "
                        "here.\n")
    where = repo_id or "path/to/subspace"
    shown_base = f"`{base}`" if base else "not a Hub model"
    body = f"""
# {title}

A low-rank safety subspace for Safety-Preserving Fine-Tuning (SPF, arXiv 2601.10141), made with safeft
{meta.get('safeft_version')}. Fine-tune the model it was estimated on with it, and SPF removes from every update the
part that acts on these directions.

| | |
|---|---|
| base model | {shown_base} (weights fingerprint `{meta['model'].get('fingerprint')}`) |
| targets | {len(ranks)} matrices, rank {rank_range}, {subspace.numel():,} numbers |
| rank policy | `{json.dumps(policy)}` |
| made for | side `{config.side or 'right (left under LoRA)'}`, mode `{config.mode}`, project `{config.project}` |
| safety samples | {meta.get('num_samples')} (sha256 `{meta.get('samples_sha256')}`) |
{samples_part}
Files: `subspace.safetensors` (per target `U`, `S`, `V`), `subspace.json` (the metadata above), `manifest.json`
(targets, shapes, ranks, counts and the sha256 of both files, checked on loading: an edited or damaged file is
refused).

```python
from transformers import AutoModelForCausalLM
from trl import SFTTrainer

from safeft import SPFCallback, SafetySubspace

model = AutoModelForCausalLM.from_pretrained({json.dumps(base or 'the/model-it-was-estimated-on')})
subspace = SafetySubspace.from_pretrained({json.dumps(where)}, model=model)  # checks targets and shapes
trainer = SFTTrainer(model=model, train_dataset=..., callbacks=[SPFCallback(subspace, subspace.config)])
```

or from the command line: `safeft finetune --method spf --subspace DIR ...` with the subspace downloaded to `DIR`.
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def is_hub_error(error: Exception) -> bool:
    """Return True for a failure of the Hub or of the network under it (not a bug of safeft's)."""
    module = type(error).__module__.split(".")[0]
    return isinstance(error, OSError) or module.startswith(("huggingface_hub", "httpx", "requests", "urllib3"))


def hub_problem(error: Exception) -> str:
    """Return a Hub failure in a few words for a message (offline mode named as such)."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return "offline mode is on: HF_HUB_OFFLINE=1"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else 'no message'}"
