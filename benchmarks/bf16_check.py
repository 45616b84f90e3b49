"""Precision of SPF's low-precision path: on CUDA a bf16 weight is sketched and corrected in its own dtype.

Checks (1) the sketch ``U^T W`` / ``W V`` / ``U^T W V`` against the product of W's fp32 copy, (2) the in-place
subtraction against the fp32 path cast back (how many entries differ, by how much), and (3) SPF's invariant on a
tiny random bf16 Llama after 20 AdamW steps: ``max ||dW V|| / ||dW||`` over the targets (0 in exact arithmetic;
the weights' bf16 rounding sets its floor). Runs on the CPU too (where the fp32 path is used), as the reference.

    python benchmarks/bf16_check.py --out benchmarks/results/overhead_cuda
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from safeft.spf import attach_spf, freeze_unguarded
from safeft.spf import projection as P
from safeft.spf.config import SPFConfig
from safeft.spf.subspace import SafetySubspace
from safeft.testing import byte_tokenizer, tiny_llama


def matrix_checks(device: str) -> dict:
    """Return, per side, the fused sketch's relative error and the subtraction's differing entries."""
    torch.manual_seed(0)
    W = torch.randn(2048, 8192, device=device).to(torch.bfloat16)
    U = torch.linalg.qr(torch.randn(2048, 64, device=device))[0]
    V = torch.linalg.qr(torch.randn(8192, 64, device=device))[0]
    out = {}
    for side in ("left", "right", "two_sided"):
        reference = {"left": U.T @ W.float(), "right": W.float() @ V, "two_sided": U.T @ W.float() @ V}[side]
        got = P.sketch(W, U, V, side)
        X, sk = W.clone(), 1e-2 * torch.randn_like(reference)
        P.subtract_(X, sk, U, V, None, side)
        expected = (W.float() - P.removed_part(sk, U, V, None, side)).to(torch.bfloat16)
        out[side] = {"sketch_dtype": str(got.dtype),
                     "sketch_relative_error": float((got - reference).norm() / reference.norm()),
                     "subtract_entries_differing": float((X != expected).float().mean()),
                     "subtract_max_difference": float((X.float() - expected.float()).abs().max())}
    return out


def invariant_check(device: str, steps: int = 20) -> float:
    """Return ``max ||dW V|| / ||dW||`` over the targets of a bf16 tiny Llama after ``steps`` SPF AdamW steps."""
    torch.manual_seed(0)
    model = tiny_llama(hidden=256, layers=2).to(device, torch.bfloat16)
    samples = [("how do I build a bomb", "I can't help with that."), ("steal a car", "I won't help with that.")]
    subspace = SafetySubspace.estimate(model, byte_tokenizer(), samples, SPFConfig(rank=8), show_progress=False)
    freeze_unguarded(model, subspace)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    attach_spf(optimizer, model, subspace)
    targets = subspace.check_model(model)
    start = {name: t.base.weight.detach().float().clone() for name, t in targets.items()}
    ids = torch.randint(0, 256, (4, 64), device=device)
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    worst = 0.0
    for name, t in targets.items():
        dW = t.base.weight.detach().float() - start[name]
        worst = max(worst, float((dW @ subspace[name].V.to(dW.device)).norm() / dW.norm()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = {"command": "python " + shlex.join(sys.argv), "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if device == "cuda" else "CPU",
              "matrix_2048x8192_rank64": matrix_checks(device), "invariant_max_dWV_over_dW": invariant_check(device)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bf16_check.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Command: `{result['command']}` on {result['device']} (torch {result['torch']})", "",
             "| side | sketch dtype | sketch rel. error vs fp32 copy | subtraction: entries differing | max diff. |",
             "|---|---|---|---|---|"]
    for side, r in result["matrix_2048x8192_rank64"].items():
        lines.append(f"| {side} | {r['sketch_dtype']} | {r['sketch_relative_error']:.2e} | "
                     f"{r['subtract_entries_differing']:.2e} | {r['subtract_max_difference']:.2e} |")
    lines += ["", f"SPF on a bf16 tiny Llama, 20 AdamW steps: max over targets ||dW V|| / ||dW|| = "
              f"{result['invariant_max_dWV_over_dW']:.2e}."]
    (args.out / "bf16_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
