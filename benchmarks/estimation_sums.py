"""Where subspace estimation spends its time, and what exact gradient sums cost against truncated ones.

Until this benchmark, estimation cut each target's running gradient sum to its top ``4 r`` directions whenever its
factors grew past twice that while still thinner than the matrix. This script measures, on one model and device,
the two policies side by side: the gradient pass (forward, backward and the sums, with the truncations timed on
their own), the final factorisation, peak memory, and how far the truncated sums move the rank-``r`` bases from the
exact sums' (mean ``||V_exact^T V||_F^2 / r`` per target). It also times the final factorisation of the dense sums
one target at a time (what ``SafetySubspace.estimate`` does) against batched over targets of equal shape.

    python benchmarks/estimation_sums.py --model random:2048,8192,16,32,8,32000 --dtype bfloat16 \
        --out benchmarks/results/overhead_cuda/estimation_sums_llama1b_shape

Writes ``estimation_sums.json`` and ``estimation_sums.md`` under ``--out``. The model is built as in
``benchmarks/overhead.py`` (``default``, a directory, or ``random:...`` shapes); on CUDA when present.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from safeft import SPFConfig
from safeft.chat import encode_response
from safeft.data import builtin_safety_samples
from safeft.models import load_model
from safeft.spf.estimate import gradient_factors
from safeft.spf.lowrank import LowRankSum, dense_svd, factor_svd, small_svd, subspace_overlap
from safeft.spf.subspace import SafetySubspace
from safeft.spf.targets import find_targets

sys.path.insert(0, str(Path(__file__).parent))
from overhead import random_llama  # noqa: E402


class TruncatedSum(LowRankSum):
    """The former policy: factors wider than ``2 * width`` (still thinner than the matrix) are cut to the top
    ``width`` directions of the partial sum."""

    width = 256
    seconds = 0.0
    calls = 0

    def add(self, left, right):
        super().add(left, right)
        if self.left is not None and self.left.shape[1] > 2 * self.width:
            sync()
            start = time.perf_counter()
            U, S, V = factor_svd(self.left, self.right, self.width)
            self.left, self.right = U * S, V
            sync()
            TruncatedSum.seconds += time.perf_counter() - start
            TruncatedSum.calls += 1


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def batched_dense_svd(G: torch.Tensor, q: int, oversample: int = 16, power_iterations: int = 4) -> torch.Tensor:
    """Return ``V: (B, n, q)`` of ``G: (B, m, n)``: :func:`safeft.spf.lowrank.dense_svd` over equal shapes."""
    B, m, n = G.shape
    if q >= min(m, n) // 4:
        return torch.stack([small_svd(g, q)[2] for g in G])
    generator = torch.Generator(device=G.device).manual_seed(0)
    sketch = torch.randn(n, min(q + oversample, m, n), generator=generator, device=G.device)
    Q = torch.linalg.qr(G @ sketch)[0]
    for _ in range(power_iterations):
        Q = torch.linalg.qr(G @ torch.linalg.qr(G.transpose(1, 2) @ Q)[0])[0]
    return torch.stack([small_svd(s, q)[2] for s in Q.transpose(1, 2) @ G])


def measure(policy: str, model, targets, encoded, tokenizer, rank: int, batch_size: int) -> dict:
    """Return the timings of one gradient pass and final factorisation under ``policy`` and the bases' ``V``."""
    TruncatedSum.seconds, TruncatedSum.calls = 0.0, 0
    sums = {name: (TruncatedSum() if policy == "truncated" else LowRankSum()) for name in targets}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    gradient_factors(model, targets, encoded, tokenizer, batch_size=batch_size, sums=sums)
    sync()
    gradient = time.perf_counter() - start
    held = defaultdict(int)
    for s in sums.values():
        held["matrix" if s.dense is not None else "factors"] += 1
    start = time.perf_counter()
    V = {name: s.svd(rank)[2] for name, s in sums.items()}
    sync()
    return {"gradient_pass_s": gradient, "truncation_s": TruncatedSum.seconds, "truncations": TruncatedSum.calls,
            "factorisation_s": time.perf_counter() - start, "held_as": dict(held),
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
            "V": V, "sums": sums}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2, help="each measurement's best of this many")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    model, tokenizer = (random_llama(args.model, dtype) if args.model.startswith("random:")
                        else load_model(args.model, dtype=dtype))
    model.to(device)
    config, pairs = SPFConfig(), builtin_safety_samples(args.samples)
    rank = config.rank_for(lora=False)  # full fine-tuning's default
    encoded = [encode_response(tokenizer, s.prompt, s.refusal, config.onset_tokens) for s in pairs]
    targets = find_targets(model, config.target_modules)

    runs = {}
    for policy in ("truncated", "exact"):
        best = None
        for _ in range(args.repeats):
            run = measure(policy, model, targets, encoded, tokenizer, rank, config.estimate_batch_size)
            if best is None or run["gradient_pass_s"] + run["factorisation_s"] < \
                    best["gradient_pass_s"] + best["factorisation_s"]:
                best = run
        runs[policy] = best
    exact_V = runs["exact"].pop("V")
    truncated_V = runs["truncated"].pop("V")
    overlaps = [subspace_overlap(exact_V[n], truncated_V[n]) for n in targets]
    runs["truncated"].pop("sums")
    dense = {n: s.dense for n, s in runs["exact"].pop("sums").items() if s.dense is not None}
    groups = defaultdict(list)
    for name, G in dense.items():
        groups[tuple(G.shape)].append(name)
    one_by_one = batched = float("inf")
    for _ in range(args.repeats):
        sync()
        start = time.perf_counter()
        for G in dense.values():
            dense_svd(G, rank)
        sync()
        one_by_one = min(one_by_one, time.perf_counter() - start)
        start = time.perf_counter()
        for names in groups.values():
            batched_dense_svd(torch.stack([dense[n] for n in names]), rank)
        sync()
        batched = min(batched, time.perf_counter() - start)
    del dense
    start = time.perf_counter()
    SafetySubspace.estimate(model, tokenizer, pairs, config, show_progress=False)
    sync()
    result = {
        "command": "python " + shlex.join(["benchmarks/estimation_sums.py", *(argv or sys.argv[1:])]),
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({args.threads} threads)",
        "torch": torch.__version__, "model": args.model, "dtype": args.dtype, "samples": args.samples,
        "tokens": sum(len(e.input_ids) for e in encoded), "targets": len(targets), "rank": rank,
        "truncation_width": TruncatedSum.width, "truncated": runs["truncated"], "exact": runs["exact"],
        "truncated_vs_exact_overlap": {"min": min(overlaps), "mean": sum(overlaps) / len(overlaps)},
        "dense_factorisation": {"targets": sum(len(v) for v in groups.values()), "shapes": len(groups),
                                "one_by_one_s": one_by_one, "batched_by_shape_s": batched},
        "estimate_s": time.perf_counter() - start,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "estimation_sums.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "estimation_sums.md").write_text(markdown(result))
    print(markdown(result))
    return result


def markdown(r: dict) -> str:
    rows = []
    for policy in ("truncated", "exact"):
        p = r[policy]
        peak = "-" if p["peak_memory_gib"] is None else f"{p['peak_memory_gib']:.1f}"
        rows.append(f"| {policy} | {p['gradient_pass_s']:.2f} | {p['truncation_s']:.2f} ({p['truncations']}) | "
                    f"{p['factorisation_s']:.2f} | {p['gradient_pass_s'] + p['factorisation_s']:.2f} | {peak} | "
                    f"{p['held_as']} |")
    d, o = r["dense_factorisation"], r["truncated_vs_exact_overlap"]
    return "\n".join([
        f"Command: `{r['command']}`", "",
        f"{r['device']}, torch {r['torch']}, {r['model']} in {r['dtype']}: {r['targets']} targets, rank {r['rank']}, "
        f"{r['samples']} safety samples ({r['tokens']} tokens). Best of the repeats.", "",
        "| sums | gradient pass (s) | of which truncation (s, calls) | factorisation (s) | total (s) | peak GiB | "
        "held as |",
        "|---|---|---|---|---|---|---|",
        *rows, "",
        f"Truncated sums (top {r['truncation_width']} directions whenever wider than twice that) against exact: "
        f"rank-{r['rank']} bases overlap min {o['min']:.4f}, mean {o['mean']:.4f}.", "",
        f"Final factorisation of the {d['targets']} dense sums: one by one {d['one_by_one_s']:.2f} s, batched over "
        f"{d['shapes']} equal shapes {d['batched_by_shape_s']:.2f} s.", "",
        f"`SafetySubspace.estimate` as the library now does it: {r['estimate_s']:.2f} s.", ""])


if __name__ == "__main__":
    main()
