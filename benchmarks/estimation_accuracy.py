"""How exact is the estimator's randomized SVD? Its subspaces against LAPACK's, on the default model's gradients.

    python benchmarks/estimation_accuracy.py --out benchmarks/results/estimation_accuracy

Computes each target's safety gradient (the library defaults: 20 built-in samples, the refusal onset) as
``SafetySubspace.estimate`` sums it, then takes its top-``rank`` singular triplets twice: with
:func:`safeft.spf.lowrank.dense_svd` (what estimation uses for a sum held as a matrix) and with LAPACK's full SVD.
Writes per-target subspace overlaps (mean squared cosine of the principal angles, 1 = the same span) of U and V,
the largest singular-value error relative to the first value, and the seconds each took.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from safeft import SPFConfig
from safeft.chat import encode_response
from safeft.data import DEFAULT_SAFETY_SAMPLES, builtin_safety_samples
from safeft.models import load_model
from safeft.spf.estimate import gradient_factors
from safeft.spf.lowrank import dense_svd, subspace_overlap
from safeft.spf.targets import find_targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    parser.add_argument("--model", default="default")
    parser.add_argument("--rank", type=int, default=SPFConfig().rank_for(lora=False))
    parser.add_argument("--samples", type=int, default=DEFAULT_SAFETY_SAMPLES)
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    config = SPFConfig(rank=args.rank)
    encoded = [encode_response(tokenizer, s.prompt, s.refusal, config.onset_tokens)
               for s in builtin_safety_samples(args.samples)]
    sums = gradient_factors(model, find_targets(model), encoded, tokenizer, batch_size=config.estimate_batch_size)
    rows, seconds = [], {"randomized": 0.0, "lapack": 0.0}
    for name, running in sums.items():
        left, right = running.factors()
        G = left @ right.T
        start = time.perf_counter()
        U, S, V = dense_svd(G, args.rank)
        seconds["randomized"] += time.perf_counter() - start
        start = time.perf_counter()
        Ue, Se, Vh = torch.linalg.svd(G, full_matrices=False)
        seconds["lapack"] += time.perf_counter() - start
        q = S.numel()
        rows.append({"target": name, "shape": list(G.shape), "rank": q,
                     "overlap_U": subspace_overlap(U, Ue[:, :q]), "overlap_V": subspace_overlap(V, Vh[:q].T),
                     "max_singular_value_error": float((S - Se[:q]).abs().max() / Se[0]),
                     "last_kept_over_first": float(Se[q - 1] / Se[0])})
    summary = {key: {"min": min(r[key] for r in rows), "mean": statistics.mean(r[key] for r in rows)}
               for key in ("overlap_U", "overlap_V")}
    summary["max_singular_value_error"] = max(r["max_singular_value_error"] for r in rows)
    result = {"command": "python " + shlex.join(sys.argv), "model": args.model, "rank": args.rank,
              "samples": args.samples, "tokens": sum(len(e.input_ids) for e in encoded), "targets": len(rows),
              "summary": summary, "seconds": seconds, "per_target": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    table = (f"Command: `{result['command']}`\n\n"
             f"Randomized SVD (`safeft.spf.lowrank.dense_svd`) against LAPACK on {len(rows)} safety gradients of "
             f"`{args.model}` (rank {args.rank}, {args.samples} samples, {result['tokens']} tokens):\n\n"
             "| | min | mean |\n|---|---|---|\n"
             f"| U subspace overlap | {summary['overlap_U']['min']:.5f} | {summary['overlap_U']['mean']:.5f} |\n"
             f"| V subspace overlap | {summary['overlap_V']['min']:.5f} | {summary['overlap_V']['mean']:.5f} |\n\n"
             f"Largest singular-value error: {summary['max_singular_value_error']:.1e} of the first value. Time: "
             f"{seconds['randomized']:.2f} s randomized against {seconds['lapack']:.2f} s LAPACK for all targets.\n")
    args.out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
