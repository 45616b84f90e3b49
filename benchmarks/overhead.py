"""Cost of SPF against plain SFT, measured in one run on the default model (SmolLM2-135M-Instruct, real weights).

    python benchmarks/overhead.py --out benchmarks/results

For full fine-tuning and for LoRA r=8, three trainers (SFT, SPF project="grad", SPF project="update") step in turn,
one timed step each per round, so the machine's noise hits all three alike; the medians and their ratios go to
``overhead.json`` and ``overhead.md``. Each SPF trainer is set up by the `spf` method's own ``before_training``
(estimation from the safety samples, then freezing what SPF cannot project), as a fine-tuning run does it. Also:
the estimation time (as SFT steps, split into the gradient pass and the factorisation), the subspace's size as a
share of the model's weights (and of what each side needs), and the time spent inside SPF's own hooks
(``SPFProjector.hook_seconds``).

Cost where users train (``--tokens``): SFT against SPF (``--rank``/``--side``/``--mode``, the library defaults
unless given) at several tokens per optimizer
step (sequences of ``--sweep-seq-len`` tokens, micro-batches of at most ``--micro-batch`` sequences, gradient
accumulation beyond), paired per round like the above, with the ``1 + 2r/(3T)`` floor beside each ratio: right-side
SPF adds about ``4 r m n`` flops per matrix (two sketches and a removal) to a step's ``6 T m n``. ``--dtype
bfloat16`` and a CUDA device, when present, measure the same on an accelerator; the JSON names the device.
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
from safeft.config import TrainConfig
from safeft.data import DEFAULT_SAFETY_SAMPLES
from safeft.methods import RunContext, build_method
from safeft.models import load_model
from safeft.spf import projection as P
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


def step(model, optimizer, batch, accumulation: int = 1) -> float:
    """Time one optimizer step over ``accumulation`` micro-batches (each ``batch``), synchronised on CUDA."""
    sync()
    start = time.perf_counter()
    for _ in range(accumulation):
        (model(**batch).loss / accumulation).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync()
    return time.perf_counter() - start


def alternating(trainers: dict, round_index: int) -> list:
    """The trainers' items in turn, reversed on odd rounds, so that whatever the first step of a round pays
    falls on SFT and on SPF equally."""
    items = list(trainers.items())
    return items[::-1] if round_index % 2 else items


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def random_batch(vocab_size: int, sequences: int, length: int, device) -> dict:
    ids = torch.randint(0, vocab_size, (sequences, length), device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def state_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure_tokens(base, tokenizer, tokens: int, lora: bool, rounds: int, warmup: int, args, spf_options: dict,
                   scratch: Path) -> dict:
    """SFT against SPF with ``spf_options`` (the run's ``--rank``/``--side``/``--mode``; estimated as a run does it)
    at ``tokens`` per optimizer step."""
    per_step = max(tokens // args.sweep_seq_len, 1)
    micro = min(per_step, args.micro_batch)
    if per_step % micro:
        raise SystemExit(f"--tokens {tokens}: {per_step} sequences per step are not a multiple of --micro-batch "
                         f"{micro}")
    batch = random_batch(base.config.vocab_size, micro, args.sweep_seq_len, base.device)
    trainers = {m: make_trainer(base, tokenizer, m, lora, spf_options, scratch) for m in ("sft", "spf_update")}
    times = {m: [] for m in trainers}
    memory = {m: [] for m in trainers}
    for r in tqdm(range(warmup + rounds), desc=f"{'lora' if lora else 'full'} {tokens} tokens/step"):
        for m, (model, optimizer, _, _) in alternating(trainers, r):
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            seconds = step(model, optimizer, batch, per_step // micro)
            if r >= warmup:
                times[m].append(seconds)
                if torch.cuda.is_available():
                    memory[m].append(torch.cuda.max_memory_allocated())
    ratios = [a / b for a, b in zip(times["spf_update"], times["sft"])]
    q = statistics.quantiles(ratios, n=4)
    model, optimizer, projector, _ = trainers["spf_update"]
    stats = projector.stats()
    rank = max(g.rank for g in stats.targets)
    trained = [p for p in model.parameters() if p.requires_grad]
    spf_state = stats.state_bytes  # the bases it holds, and the update mode's one sketch per target between steps
    out = {"sequences_per_step": per_step, "micro_batch": micro, "accumulation": per_step // micro,
           "sft_step_s": statistics.median(times["sft"]), "spf_step_s": statistics.median(times["spf_update"]),
           "step_ratio": q[1], "step_ratio_iqr": [q[0], q[2]],
           "step_s_by_round": times,
           "hooks_s": statistics.median(stats.hook_seconds[warmup:]),
           "model_floor": None if lora else 1 + 2 * rank / (3 * tokens),  # LoRA projects only the small factors
           # SPF's state (bases held for the projection) against the training state it sits beside: weights,
           # gradients and AdamW's two moments of what trains, plus the frozen weights
           "spf_state_bytes": spf_state,
           "training_state_bytes": state_bytes(model.parameters()) + 3 * state_bytes(trained)}
    out["hooks_share"] = out["hooks_s"] / out["sft_step_s"]
    out["memory_ratio"] = 1 + spf_state / out["training_state_bytes"]
    if torch.cuda.is_available():
        out["peak_memory_bytes"] = {m: max(v) for m, v in memory.items()}
    return out


def profile_projection(projector, repeats: int = 5) -> dict:
    """Split the cost of one grad-mode projection over all targets into its passes over the gradients, with the
    bases as the projector holds them (fp32, on each target's device)."""
    side = projector.config.side
    targets = projector.subspace.check_model(projector.model)
    pieces = [(t.base.weight.grad, _on(projector.subspace[name], t.base.weight.device)) for name, t in targets.items()
              if t.base.weight.grad is not None]
    zeros = [torch.zeros_like(P.sketch(G, b.U, b.V, side)) for G, b in pieces]
    ones = [torch.ones_like(b.S) for _, b in pieces]

    def seconds(fn) -> float:
        fn()
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync()
        return (time.perf_counter() - start) / repeats

    return {
        "sketch_s": seconds(lambda: [P.sketch(G, b.U, b.V, side) for G, b in pieces]),
        "subtract_addmm_s": seconds(lambda: [P.subtract_(G, z, b.U, b.V, m, side)
                                             for (G, b), z, m in zip(pieces, zeros, ones)]),
        "plain_read_pass_s": seconds(lambda: [G.sum() for G, _ in pieces]),
        "gradient_elements": sum(G.numel() for G, _ in pieces),
    }


def _on(basis, device):
    """Return the basis in fp32 on ``device``, as the projector holds it."""
    from safeft.spf import Basis

    return Basis(*(x.to(device=device, dtype=torch.float32) for x in (basis.U, basis.S, basis.V)))


def measure_setting(base, tokenizer, batch, lora: bool, rounds: int, warmup: int, spf_options: dict,
                    scratch: Path) -> dict:
    trainers = {m: make_trainer(base, tokenizer, m, lora, spf_options, scratch) for m in METHODS}
    times = {m: [] for m in METHODS}
    for r in tqdm(range(warmup + rounds), desc="lora" if lora else "full"):
        for m, (model, optimizer, _, _) in alternating(trainers, r):
            seconds = step(model, optimizer, batch)
            if r >= warmup:
                times[m].append(seconds)
    out = {f"{m}_step_s": statistics.median(times[m]) for m in METHODS}
    out["estimation_s"] = [trainers[m][3] for m in METHODS[1:]]
    for m in METHODS[1:]:
        out[f"{m}_hooks_s"] = statistics.median(trainers[m][2].stats().hook_seconds[warmup:])
        out[f"{m}_median_step_ratio"] = out[f"{m}_step_s"] / out["sft_step_s"]
        # the headline: the median of per-round ratios (each pairs steps taken seconds apart), and its spread
        ratios = [a / b for a, b in zip(times[m], times["sft"])]
        quartiles = statistics.quantiles(ratios, n=4)
        out[f"{m}_step_ratio"] = quartiles[1]
        out[f"{m}_step_ratio_iqr"] = [quartiles[0], quartiles[2]]
        out[f"{m}_hooks_ratio"] = out[f"{m}_hooks_s"] / out["sft_step_s"]
    out["side"] = trainers["spf_grad"][2].config.side  # the side in force (the default differs under LoRA)
    if not lora:
        model, _, projector, _ = trainers["spf_grad"]
        model(**batch).loss.backward()  # leave real gradients in place to time the passes on
        out["profile"] = profile_projection(projector)
        out["subspace"] = projector.subspace
    return out


def random_llama(spec: str, dtype):
    """Return ``(model, tokenizer)``: a randomly initialised Llama of the shape ``random:HIDDEN,INTER,LAYERS,HEADS,
    KV_HEADS[,VOCAB]`` (e.g. ``random:4096,11008,4,32,32,32000``: Llama-2-7B's matrices, 4 of its 32 blocks) and
    the byte tokenizer, so that the cost at a large model's shapes is measured without its checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from safeft.testing import byte_tokenizer

    hidden, inter, layers, heads, kv, *rest = (int(x) for x in spec.removeprefix("random:").split(","))
    config = LlamaConfig(vocab_size=rest[0] if rest else 32000, hidden_size=hidden, intermediate_size=inter,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                         max_position_embeddings=4096, tie_word_embeddings=False, pad_token_id=258,
                         eos_token_id=257, bos_token_id=None)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype), byte_tokenizer()


def time_estimation_parts(base, tokenizer, samples: int, config: SPFConfig) -> dict:
    """Return the estimation's split under ``config`` (the run's rank, side and mode): seconds in the gradient pass
    (forward, backward, the gradient sums) and in the factorisation (everything else ``SafetySubspace.estimate``
    does), each measured once."""
    from safeft.chat import encode_response
    from safeft.data import builtin_safety_samples
    from safeft.spf.estimate import gradient_factors
    from safeft.spf.subspace import SafetySubspace
    from safeft.spf.targets import find_targets

    pairs = builtin_safety_samples(samples)
    sync()
    start = time.perf_counter()
    SafetySubspace.estimate(base, tokenizer, pairs, config, show_progress=False)
    sync()
    total = time.perf_counter() - start
    encoded = [encode_response(tokenizer, s.prompt, s.refusal, config.onset_tokens) for s in pairs]
    start = time.perf_counter()
    gradient_factors(base, find_targets(base), encoded, tokenizer, batch_size=config.estimate_batch_size)
    sync()
    gradient = time.perf_counter() - start
    return {"gradient_pass_s": gradient, "factorisation_s": max(total - gradient, 0.0),
            "tokens": sum(len(e.input_ids) for e in encoded)}


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
    lines += ["", "Ratios: median over rounds of (SPF step / SFT step in the same round; the methods take turns "
              "going first), with the interquartile range. SPF hooks: median time inside SPF's own pre/post-step "
              "hooks, as a share of the SFT step"
              + (" (host time: on CUDA the hooks only launch their kernels, so this is the launch cost)."
                 if result["device"] == "cuda" else ".")]
    p = result["full"]["profile"]
    per_element = {k: 1e9 * p[k] / p["gradient_elements"] for k in ("sketch_s", "subtract_addmm_s",
                                                                       "plain_read_pass_s")}
    lines += [
        "",
        f"Where SPF's time goes (full fine-tuning, all {p['gradient_elements'] / 1e6:.0f}M target gradient "
        f"entries): the {result['full']['side']} sketch takes {p['sketch_s']:.3f} s "
        f"({per_element['sketch_s']:.3g} ns per entry), the in-place removal {p['subtract_addmm_s']:.3f} s "
        f"({per_element['subtract_addmm_s']:.3g} ns), against {p['plain_read_pass_s']:.3f} s "
        f"({per_element['plain_read_pass_s']:.3g} ns) for one plain read of the same gradients.",
    ]
    e = result["estimation"]
    lines += [
        "",
        f"Subspace estimation from {result['spf']['samples']} samples: {e['seconds']:.2f} s = "
        f"{e['over_full_sft_step_ratio']:.2f} full-FT SFT steps; subspace size (rank {result['spf']['rank']}, "
        f"{e['targets']} targets): {e['percent_of_model_weights']:.2f}% of the "
        "model's weights." + ("" if not result.get("estimation_sft_steps_by_tokens") else " In SFT steps of "
                              + ", ".join(f"{t} tokens: {v:.1f}"
                                          for t, v in result["estimation_sft_steps_by_tokens"].items()) + "."),
    ]
    if "gradient_pass_s" in e:
        lines += ["", f"Where the estimation's time goes ({e['tokens']} tokens of safety samples): the gradient pass "
                  f"(forward, backward, the per-target gradient sums) {e['gradient_pass_s']:.2f} s, the "
                  f"factorisation {e['factorisation_s']:.2f} s."]
    if "subspace_fraction_by_side" in result:
        shares = ", ".join(f"{side} {100 * v:.2f}%" for side, v in result["subspace_fraction_by_side"].items())
        lines += ["", f"What each side reads of the subspace, as a share of the model's weights: {shares}."]
    for setting in ("full", "lora"):
        sweep = result[setting].get("by_tokens")
        if not sweep:
            continue
        spf = result.get("spf", {})
        options = f"rank {spf.get('rank')}, side {spf.get('side')}, mode {spf.get('mode')}" if spf else "the defaults"
        lines += ["", f"Cost by tokens per optimizer step ({setting}, {options}, SPF project=update):", "",
                  "| tokens/step | sequences x length (accumulation) | SFT step (s) | SPF step (s) | ratio [IQR] | "
                  "floor 1 + 2r/(3T) | SPF hooks | SPF state vs training state |",
                  "|---|---|---|---|---|---|---|---|"]
        for tokens, r in sweep.items():
            lo, hi = r["step_ratio_iqr"]
            lines.append(f"| {tokens} | {r['sequences_per_step']} x {result['sweep_seq_len']} ({r['accumulation']}) "
                         f"| {r['sft_step_s']:.2f} | {r['spf_step_s']:.2f} | {r['step_ratio']:.3f}x [{lo:.3f}, "
                         f"{hi:.3f}] | {'-' if r['model_floor'] is None else format(r['model_floor'], '.3f') + 'x'} | "
                         f"{100 * r['hooks_share']:.1f}% | "
                         f"{r['memory_ratio']:.3f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--model", default="default", help="default, a model directory, or random:HIDDEN,INTER,"
                        "LAYERS,HEADS,KV_HEADS[,VOCAB] (random weights of that shape, byte tokenizer)")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    defaults = SPFConfig()
    parser.add_argument("--rank", type=int, default=None,
                        help="fixed rank per target (default: SPF's for each kind of training, 128 full, 64 LoRA)")
    parser.add_argument("--side", default=defaults.side)
    parser.add_argument("--mode", default=defaults.mode)
    parser.add_argument("--samples", type=int, default=DEFAULT_SAFETY_SAMPLES)
    parser.add_argument("--tokens", default="512,2048,8192",
                        help="tokens per optimizer step for the sweep (comma-separated; '' skips it)")
    parser.add_argument("--sweep-seq-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per forward pass in the sweep")
    parser.add_argument("--sweep-rounds", type=int, default=6)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    if min(args.rounds, args.sweep_rounds) < 2:  # the ratios' quartiles need two rounds at least
        parser.error(f"--rounds {args.rounds} and --sweep-rounds {args.sweep_rounds}: give 2 or more rounds each")
    spf_options = {"rank": args.rank, "side": args.side, "mode": args.mode, "safety_samples": args.samples}
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    base, tokenizer = (random_llama(args.model, getattr(torch, args.dtype)) if args.model.startswith("random:")
                       else load_model(args.model, dtype=getattr(torch, args.dtype)))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base.to(device)
    batch = random_batch(base.config.vocab_size, args.batch_size, args.seq_len, device)
    sweep = [int(t) for t in args.tokens.split(",") if t.strip()]

    with tempfile.TemporaryDirectory() as scratch:
        full = measure_setting(base, tokenizer, batch, False, args.rounds, args.warmup, spf_options, Path(scratch))
        lora = measure_setting(base, tokenizer, batch, True, args.rounds, args.warmup, spf_options, Path(scratch))
        estimation_split = time_estimation_parts(base, tokenizer, args.samples,
                                                 SPFConfig(rank=args.rank, side=args.side, mode=args.mode))
        for key, lora_on in (("full", False), ("lora", True)):
            by_tokens = {t: measure_tokens(base, tokenizer, t, lora_on, args.sweep_rounds, 1, args, spf_options,
                                        Path(scratch))
                         for t in sweep}
            result_part = full if key == "full" else lora
            result_part["by_tokens"] = by_tokens
            result_part["step_ratio_by_tokens"] = {t: r["step_ratio"] for t, r in by_tokens.items()}
    subspace = full.pop("subspace")
    estimates = full.pop("estimation_s") + lora.pop("estimation_s")
    result = {
        "command": "python " + shlex.join(sys.argv),
        "model": (f"{args.model} (SmolLM2-135M-Instruct, real weights, {args.dtype})" if args.model == "default"
                  else f"{args.model} ({args.dtype})"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
                   + (torch.cuda.get_device_name() if device == "cuda" else "CPU"),
        "device": device,
        "dtype": args.dtype,
        "batch": [args.batch_size, args.seq_len],
        "rounds": args.rounds,
        "sweep_seq_len": args.sweep_seq_len,
        "sweep_rounds": args.sweep_rounds,
        "optimizer": "AdamW lr 1e-5",
        "spf": {"rank": args.rank or "default", "side": args.side or "default", "mode": args.mode,
                "samples": args.samples},
        "full": full,
        "lora": lora,
    }
    weights = sum(p.numel() for p in base.parameters())
    result["estimation"] = {  # each SPF trainer's before_training: estimation (+ freezing), as a run does it
        "seconds": statistics.median(estimates),
        "over_full_sft_step_ratio": statistics.median(estimates) / result["full"]["sft_step_s"],
        "targets": len(subspace),
        "percent_of_model_weights": 100 * subspace.numel() / weights,
        **estimation_split,
    }
    result["estimation_sft_steps"] = result["estimation"]["over_full_sft_step_ratio"]
    # estimation is a fixed number of tokens' forward and backward: in steps, it shrinks as the steps grow
    result["estimation_sft_steps_by_tokens"] = {t: result["estimation"]["seconds"] / r["sft_step_s"]
                                                for t, r in full.get("by_tokens", {}).items()}
    result["subspace_fraction"] = subspace.numel() / weights
    needs = {"right": ("V",), "left": ("U",), "two_sided": ("U", "V")}  # what each side's projection reads, with S
    result["subspace_fraction_by_side"] = {
        side: sum(b.S.numel() + sum(getattr(b, f).numel() for f in factors) for b in subspace.bases.values()) / weights
        for side, factors in needs.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    table = to_markdown(result)
    (args.out / "overhead.md").write_text(f"Command: `{result['command']}`\n\n{table}")
    print(table)


if __name__ == "__main__":
    main()
