"""The model card (README.md) of a saved safety subspace."""

from __future__ import annotations

import json

from huggingface_hub import ModelCard


def model_card(subspace) -> ModelCard:
    """Return the README.md of a saved subspace: what it was estimated on and from, and for what settings."""
    meta = subspace.metadata
    ranks = list(meta["ranks"].values())
    config = subspace.config
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
| targets | {len(ranks)} matrices, rank {rank_range}, {subspace.numel():,} numbers |
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
