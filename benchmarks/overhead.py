"""Cost of SPF against plain SFT, measured in one run on the default model (SmolLM2-135M-Instruct, real weights).

    python benchmarks/overhead.py --out benchmarks/results

For full fine-tuning and for LoRA r=8, three trainers (SFT, SPF project="grad", SPF project="update") step in turn,
one timed step each per round, so the machine's noise hits all three alike; the medians and their ratios go to
``overhead.json`` and ``overhead.md``. Each SPF trainer is set up by the `spf` method's own ``before_training``
(estimation from the safety samples, then freezing what SPF cannot project), as a fine-tuning run does it. Also:
the estimation time (as SFT steps), the subspace's size as a share of the model's weights, and the time spent
inside SPF's own hooks (``SPFProjector.hook_seconds``).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from safeft import SPFConfig, attach_spf
from safeft import projection as P
from safeft.config import TrainConfig
from safeft.data import DEFAULT_SAFETY_SAMPLES
from safeft.methods import RunContext, build_method
from safeft.models import load_model
from safeft.train import prepare_model

METHODS = ("sft", "spf_grad", "spf_update")


def make_trainer(base, tokenizer, method: str, lora: bool, spf_options: dict, scratch: Path):
    """Return ``(model, optimizer, projector, estimation seconds)``, set up as a fine-tuning run does: the training
    recipe's ``prepare_model``, then (SPF) the method's own ``before_training`` (estimate, freeze what it cannot
    project), then SPF attached to a plain AdamW loop."""
    model = prepare_model(copy.deepcopy(base), TrainConfig(lora_r=8 if lora else 0))
    projector, seconds = None, None
    if method != "sft":
        spf = build_method("spf", {**spf_options, "project": method.removeprefix("spf_"), "monitor_every": 0})
        start = time.perf_counter()
        spf.before_training(model, tokenizer, RunContext(out=scratch / method, cache=scratch))
        seconds = time.perf_counter() - start
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    if method != "sft":
        projector = attach_spf(optimizer, model, spf.subspace, spf.config).projector
    return model, optimizer, projector, seconds


def step(model, optimizer, batch) -> float:
    start = time.perf_counter()
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def profile_projection(model, subspace, side: str, repeats: int = 5) -> dict:
    """Split the cost of one grad-mode projection over all targets into its passes over the gradients."""
    pieces = [(t.base.weight.grad, subspace[name]) for name, t in subspace.check_model(model).items()]
    zeros = [torch.zeros_like(P.sketch(G, b.U, b.V, side)) for G, b in pieces]
    ones = [torch.ones_like(b.S) for _, b in pieces]

    def seconds(fn) -> float:
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats

    return {
        "sketch_s": seconds(lambda: [P.sketch(G, b.U, b.V, side) for G, b in pieces]),
        "subtract_addmm_s": seconds(lambda: [P.subtract_(G, z, b.U, b.V, m, side)
                                             for (G, b), z, m in zip(pieces, zeros, ones)]),
        "plain_read_pass_s": seconds(lambda: [G.sum() for G, _ in pieces]),
        "gradient_elements": sum(G.numel() for G, _ in pieces),
    }


def measure_setting(base, tokenizer, batch, lora: bool, rounds: int, warmup: int, spf_options: dict,
                    scratch: Path) -> dict:
    trainers = {m: make_trainer(base, tokenizer, m, lora, spf_options, scratch) for m in METHODS}
    times = {m: [] for m in METHODS}
    for r in tqdm(range(warmup + rounds), desc="lora" if lora else "full"):
        for m, (model, optimizer, _, _) in trainers.items():
            seconds = step(model, optimizer, batch)
            if r >= warmup:
                times[m].append(seconds)
    out = {f"{m}_step_s": statistics.median(times[m]) for m in METHODS}
    out["estimation_s"] = [trainers[m][3] for m in METHODS[1:]]
    for m in METHODS[1:]:
        out[f"{m}_hooks_s"] = statistics.median(trainers[m][2].hook_seconds[warmup:])
        out[f"{m}_median_step_ratio"] = out[f"{m}_step_s"] / out["sft_step_s"]
        # the headline: the median of per-round ratios (each pairs steps taken seconds apart), and its spread
        ratios = [a / b for a, b in zip(times[m], times["sft"])]
        quartiles = statistics.quantiles(ratios, n=4)
        out[f"{m}_step_ratio"] = quartiles[1]
        out[f"{m}_step_ratio_iqr"] = [quartiles[0], quartiles[2]]
        out[f"{m}_hooks_ratio"] = out[f"{m}_hooks_s"] / out["sft_step_s"]
    if not lora:
        model, _, projector, _ = trainers["spf_grad"]
        model(**batch).loss.backward()  # leave real gradients in place to time the passes on
        out["profile"] = profile_projection(model, projector.subspace, spf_options["side"])
        out["subspace"] = projector.subspace
    return out


def to_markdown(result: dict) -> str:
    lines = [
        "| setting | SFT step (s) | SPF grad step (s) | ratio [IQR] | SPF hooks | SPF update step (s) | ratio [IQR] "
        "| SPF hooks |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for setting in ("full", "lora"):
        s = result[setting]
        cells = [f"{s['sft_step_s']:.3f}"]
        for m in ("spf_grad", "spf_update"):
            lo, hi = s[f"{m}_step_ratio_iqr"]
            cells += [f"{s[f'{m}_step_s']:.3f}", f"{s[f'{m}_step_ratio']:.3f}x [{lo:.3f}, {hi:.3f}]",
                      f"{s[f'{m}_hooks_s']:.3f} s = {100 * s[f'{m}_hooks_ratio']:.1f}%"]
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    lines += ["", "Ratios: median over rounds of (SPF step / SFT step in the same round), with the interquartile "
              "range. SPF hooks: median time inside SPF's own pre/post-step hooks, as a share of the SFT step."]
    p = result["full"]["profile"]
    per_element = {k: 1e9 * p[k] / p["gradient_elements"] for k in ("sketch_s", "subtract_addmm_s",
                                                                       "plain_read_pass_s")}
    lines += [
        "",
        f"Where SPF's time goes (full fine-tuning, all {p['gradient_elements'] / 1e6:.0f}M target gradient "
        f"entries): the {result['spf']['side']} sketch takes {p['sketch_s']:.3f} s "
        f"({per_element['sketch_s']:.2f} ns per entry), the in-place removal {p['subtract_addmm_s']:.3f} s "
        f"({per_element['subtract_addmm_s']:.2f} ns), against {p['plain_read_pass_s']:.3f} s "
        f"({per_element['plain_read_pass_s']:.2f} ns) for one plain read of the same gradients.",
    ]
    e = result["estimation"]
    lines += [
        "",
        f"Subspace estimation from {result['spf']['samples']} samples: {e['seconds']:.2f} s = "
        f"{e['over_full_sft_step_ratio']:.2f} full-FT SFT steps; subspace size (rank {result['spf']['rank']}, "
        f"{e['targets']} targets): {e['percent_of_model_weights']:.2f}% of the "
        "model's weights.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--model", default="default")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    defaults = SPFConfig()
    parser.add_argument("--rank", type=int, default=defaults.rank)
    parser.add_argument("--side", default=defaults.side)
    parser.add_argument("--mode", default=defaults.mode)
    parser.add_argument("--samples", type=int, default=DEFAULT_SAFETY_SAMPLES)
    args = parser.parse_args()
    spf_options = {"rank": args.rank, "side": args.side, "mode": args.mode, "safety_samples": args.samples}
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    base, tokenizer = load_model(args.model)
    ids = torch.randint(0, base.config.vocab_size, (args.batch_size, args.seq_len))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    with tempfile.TemporaryDirectory() as scratch:
        full = measure_setting(base, tokenizer, batch, False, args.rounds, args.warmup, spf_options, Path(scratch))
        lora = measure_setting(base, tokenizer, batch, True, args.rounds, args.warmup, spf_options, Path(scratch))
    subspace = full.pop("subspace")
    estimates = full.pop("estimation_s") + lora.pop("estimation_s")
    result = {
        "command": "python " + shlex.join(sys.argv),
        "model": (f"{args.model} (SmolLM2-135M-Instruct, real weights, fp32)" if args.model == "default"
                  else args.model),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, CPU",
        "batch": [args.batch_size, args.seq_len],
        "rounds": args.rounds,
        "optimizer": "AdamW lr 1e-5",
        "spf": {"rank": args.rank, "side": args.side, "mode": args.mode, "samples": args.samples},
        "full": full,
        "lora": lora,
    }
    result["estimation"] = {  # each SPF trainer's before_training: estimation (+ freezing), as a run does it
        "seconds": statistics.median(estimates),
        "over_full_sft_step_ratio": statistics.median(estimates) / result["full"]["sft_step_s"],
        "targets": len(subspace),
        "percent_of_model_weights": 100 * subspace.numel() / sum(p.numel() for p in base.parameters()),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    table = to_markdown(result)
    (args.out / "overhead.md").write_text(f"Command: `{result['command']}`\n\n{table}")
    print(table)


if __name__ == "__main__":
    main()
