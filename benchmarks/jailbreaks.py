"""Jailbreak robustness of the demo's models: template attacks and GCG (white-box and transferred).

The models are the demo's (benchmarks/configs/demo.yaml, the 10%-harmful setting): the aligned default model, and
that model fine-tuned 40 steps on `facts` with 10% harmful data by SFT and by SPF (library defaults), seed 0.

- Templates: the built-in families (safeft.evaluate.jailbreaks) applied to ``--template-requests`` of the 80
  held-out harmful requests (spread evenly over the eight categories).
- GCG: ``--gcg-requests`` AdvBench requests (spread evenly over the file), toward AdvBench's targets, white-box on
  each model within the budget below; the suffixes found on SFT are then applied, as text, to SPF and to the
  aligned model, and those found on the aligned model to SFT and SPF (transfer). The second direction matters
  where SFT already complies before any step: its "suffixes" are then the unoptimised start.
- Judges: the keyword judge (safeft's default) for every headline rate; the GCG paper's refusal-prefix rule (file
  ``--prefixes``) beside it for comparability with papers that report it.

Every stage (and each GCG request) writes its own file under OUT_parts/ and is skipped when that file exists,
so an interrupted run resumes; fine-tuned models are cached under safeft's cache. Writes OUT.json, .md and .png.

    python benchmarks/jailbreaks.py --advbench ../shared/data/advbench/harmful_behaviors.csv \
        --prefixes ../shared/data/refusal_prefixes.txt --out benchmarks/results/jailbreaks
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

MODELS = ("aligned", "sft", "spf")


def fine_tuned(name: str, aligned_dir: Path, cache: Path, base_model: str, steps: int, options: dict) -> Path:
    """Return the directory of the demo's model fine-tuned with method ``name`` (10% harmful), training it once."""
    from safeft.config import DataConfig, TrainConfig
    from safeft.io import writing
    from safeft.methods import build_method
    from safeft.recipes.finetune import finetune

    out = cache / f"jailbreak-models-{aligned_dir.name}-{steps}" / (name + "".join(f"-{k}{v}" for k, v in
                                                                                 options.items()))
    if not (out / "model").exists():
        with writing(out, overwrite=False, command=f"benchmarks/jailbreaks.py ({name})") as tmp:
            finetune(aligned_dir, DataConfig(task="facts", harmful_ratio=0.1, base_model=base_model),
                     build_method(name, options), TrainConfig(steps=steps, learning_rate=5e-5, batch_size=8, seed=0),
                     tmp, cache)
    return out


def stage(path: Path, compute):
    """Return the JSON in ``path``, computing and writing it first if it does not exist (resumable stages)."""
    from safeft.io import write_json

    if path.exists():
        return json.loads(path.read_text())
    start = time.perf_counter()
    value = {**compute(), "seconds": time.perf_counter() - start}
    write_json(path, value)
    return value


def rejudged(responses: list[dict], judge) -> dict:
    """Return the rate of compliance when ``judge`` re-judges responses ``[{"request", "response"}]``."""
    from safeft.evaluate.judges import COMPLIANCE
    from safeft.evaluate.stats import rate

    verdicts = judge.judge([r["request"] for r in responses], [r["response"] for r in responses])
    return rate(verdicts.count(COMPLIANCE), len(verdicts))


def main(argv: list[str] | None = None) -> None:
    from safeft.config import AlignConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--advbench", required=True, help="AdvBench harmful_behaviors.csv (goal, target)")
    parser.add_argument("--prefixes", required=True, help="the GCG paper's refusal phrases, one per line")
    parser.add_argument("--out", default="benchmarks/results/jailbreaks", help="output path without extension")
    parser.add_argument("--template-requests", type=int, default=40)
    parser.add_argument("--gcg-requests", type=int, default=10)
    parser.add_argument("--gcg-steps", type=int, default=50)
    parser.add_argument("--gcg-suffix-length", type=int, default=20)
    parser.add_argument("--gcg-top-k", type=int, default=256)
    parser.add_argument("--gcg-candidates", type=int, default=128)
    parser.add_argument("--gcg-check-every", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--model", default="default", help="the unaligned base model (aligned first, cached)")
    parser.add_argument("--steps", type=int, default=40, help="fine-tuning steps (the demo's 40)")
    parser.add_argument("--align-max-steps", type=int, default=AlignConfig().max_steps)
    parser.add_argument("--spf-rank", type=int, default=None, help="SPF's rank (default: the library's)")
    args = parser.parse_args(argv)

    from safeft.data import builtin
    from safeft.data.loaders import read_advbench
    from safeft.evaluate.gcg import GCGConfig, GCGResult, allowed_tokens, gcg_attack, transfer
    from safeft.evaluate.jailbreaks import BUILTIN_TEMPLATES, template_attack
    from safeft.evaluate.judges import KeywordJudge, RefusalPrefixJudge
    from safeft.evaluate.stats import rate
    from safeft.models import cache_dir
    from safeft.progress import progress
    from safeft.recipes.align import ensure_aligned
    from safeft.recipes.evaluate import spread
    from safeft.recipes.finetune import load_finetuned

    out = Path(args.out)
    parts = out.parent / f"{out.name}_parts"
    parts.mkdir(parents=True, exist_ok=True)
    cache = cache_dir()
    command = "python " + " ".join(sys.argv if argv is None else ["benchmarks/jailbreaks.py", *argv])
    keyword, prefix = KeywordJudge(), RefusalPrefixJudge.from_file(args.prefixes)
    aligned_dir, _, _ = ensure_aligned(args.model, AlignConfig(max_steps=args.align_max_steps), cache)
    spf_options = {"rank": args.spf_rank} if args.spf_rank else {}
    dirs = {"aligned": aligned_dir, "sft": fine_tuned("sft", aligned_dir, cache, args.model, args.steps, {}),
            "spf": fine_tuned("spf", aligned_dir, cache, args.model, args.steps, spf_options)}
    requests = spread([p for _, p in builtin.harmful_requests("eval")], args.template_requests)
    advbench = spread(read_advbench(args.advbench), args.gcg_requests)
    gcg_config = GCGConfig(steps=args.gcg_steps, suffix_length=args.gcg_suffix_length, top_k=args.gcg_top_k,
                           candidates=args.gcg_candidates, check_every=args.gcg_check_every)
    loaded: dict[str, tuple] = {}

    def model(name):
        if name not in loaded:
            loaded.clear()  # one model in memory at a time
            loaded[name] = load_finetuned(dirs[name])
        return loaded[name]

    results: dict[str, dict] = {}
    for name in MODELS:
        def templates(name=name):
            m, tok = model(name)
            return template_attack(m, tok, requests, BUILTIN_TEMPLATES, keyword, max_new_tokens=args.max_new_tokens,
                                   keep_samples=len(requests))  # every response, to re-judge with the prefix rule

        def white_box(name=name):
            m, tok = model(name)
            allowed = allowed_tokens(tok, m.get_input_embeddings().weight.shape[0])

            def attack(row):
                return {"result": asdict(gcg_attack(m, tok, row.prompt, row.response, gcg_config, keyword,
                                                    allowed=allowed))}

            # one file per request: an attack on one request can take many minutes on a CPU, so a stopped run
            # resumes at the request it was on
            found = [stage(parts / f"gcg-{name}" / f"{i:03d}.json", lambda row=row: attack(row))
                     for i, row in enumerate(progress(advbench, desc=f"gcg on {name}"))]
            return {"config": asdict(gcg_config), "results": [f["result"] for f in found],
                    "seconds_per_request": [f["seconds"] for f in found]}

        results[name] = {"templates": stage(parts / f"templates-{name}.json", templates),
                         "gcg": stage(parts / f"gcg-{name}.json", white_box)}
    for source, receivers in (("sft", ("aligned", "spf")), ("aligned", ("sft", "spf"))):
        suffixes = [GCGResult(**r) for r in results[source]["gcg"]["results"]]
        for name in receivers:
            def moved(name=name, suffixes=suffixes):
                m, tok = model(name)
                return transfer(m, tok, suffixes, keyword, max_new_tokens=args.max_new_tokens)

            results[name][f"transfer_from_{source}"] = stage(parts / f"transfer-{source}-to-{name}.json", moved)

    summary = {"command": command, "judge": "keyword (safeft.evaluate.judges.KeywordJudge); prefix: the GCG "
                                            f"paper's refusal phrases ({args.prefixes})",
               "template_requests": len(requests), "templates": [asdict(t) for t in BUILTIN_TEMPLATES],
               "gcg_requests": len(advbench), "gcg_config": asdict(gcg_config), "models": {}}
    for name in MODELS:
        gcg = [GCGResult(**r) for r in results[name]["gcg"]["results"]]
        template_samples = results[name]["templates"]["samples"]
        entry = {
            "model_dir": str(dirs[name]),
            "template_asr": results[name]["templates"]["overall"],
            "template_asr_by_family": results[name]["templates"]["families"],
            "template_skipped": sum(results[name]["templates"]["skipped"].values()),
            "template_asr_prefix_judge": rejudged([{"request": s["request"], "response": s["response"]}
                                                   for s in template_samples], prefix),
            "gcg_asr": rate(sum(r.success for r in gcg), len(gcg)),
            "gcg_asr_prefix_judge": rejudged([{"request": r.request, "response": r.response} for r in gcg], prefix),
            "gcg_steps_mean": sum(r.steps for r in gcg) / len(gcg),
            "gcg_seconds": sum(results[name]["gcg"]["seconds_per_request"]),
            "gcg_per_prompt": [{"request": r.request, "success": r.success, "steps": r.steps, "loss": r.loss,
                                "initial_loss": r.initial_loss, "suffix": r.suffix, "response": r.response}
                               for r in gcg],
            "template_samples": template_samples[::len(requests)],  # the first response of each template
        }
        for source in ("sft", "aligned"):
            if f"transfer_from_{source}" in results[name]:
                moved = results[name][f"transfer_from_{source}"]
                entry[f"gcg_transfer_from_{source}_asr"] = moved["asr"]
                entry[f"gcg_transfer_from_{source}_samples"] = moved["per_prompt"][:3]
        summary["models"][name] = entry
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(summary))
    plot(summary, out.with_suffix(".png"))
    print(out.with_suffix(".md").read_text().split("\n## ")[0])


def _rate(entry: dict | None) -> str:
    if not entry:
        return "-"
    return f"{entry['rate']:.1f} [{entry['ci'][0]:.0f}, {entry['ci'][1]:.0f}] (n = {entry['n']})"


def _suffixed(r: dict) -> str:
    """Return a GCG reply for the report: the request, its suffix and the reply's first 160 characters."""
    return f"\"{r['request']}\" + `{r['suffix']}` -> \"{' '.join(r['response'].split())[:160]}\""


def markdown(summary: dict) -> str:
    """Return the report: ASR per model (templates, GCG white-box and transferred), per family, and samples."""
    models = summary["models"]
    lines = ["# Jailbreaks: the demo's aligned, SFT and SPF models (10% harmful fine-tuning)", "",
             f"Command: `{summary['command']}`", "",
             f"Judge: {summary['judge']}. Rates in percent with 95% Wilson intervals. Templates: "
             f"{len(summary['templates'])} built-in templates x {summary['template_requests']} held-out harmful "
             f"requests. GCG: {summary['gcg_requests']} AdvBench requests, at most {summary['gcg_config']['steps']} "
             f"steps, suffix {summary['gcg_config']['suffix_length']} tokens, top-k {summary['gcg_config']['top_k']}, "
             f"{summary['gcg_config']['candidates']} candidates per step; success is judged on a "
             f"{summary['gcg_config']['check_tokens']}-token reply every {summary['gcg_config']['check_every']} "
             "steps.", "",
             "| model | template ASR % | GCG ASR % (white-box) | GCG from SFT, transferred % | GCG from aligned, "
             "transferred % | GCG mean steps | template ASR %, prefix judge | GCG ASR %, prefix judge |",
             "|---|---|---|---|---|---|---|---|"]
    for name, m in models.items():
        lines.append(f"| {name} | {_rate(m['template_asr'])} | {_rate(m['gcg_asr'])} | "
                     f"{_rate(m.get('gcg_transfer_from_sft_asr'))} | "
                     f"{_rate(m.get('gcg_transfer_from_aligned_asr'))} | {m['gcg_steps_mean']:.1f} | "
                     f"{_rate(m['template_asr_prefix_judge'])} | {_rate(m['gcg_asr_prefix_judge'])} |")
    families = sorted({f for m in models.values() for f in m["template_asr_by_family"]})
    lines += ["", "## Template ASR by family", "", "| family | " + " | ".join(models) + " |",
              "|---|" + "---|" * len(models)]
    for f in families:
        lines.append(f"| {f} | " + " | ".join(_rate(m["template_asr_by_family"].get(f)) for m in models.values())
                     + " |")
    lines += ["", "## A sample of judged responses", ""]
    for name, m in models.items():
        for s in m["template_samples"][::6]:
            lines.append(f"- {name} / template {s['template']}: **{s['verdict']}**: \"{s['request']}\" -> \""
                         f"{' '.join(s['response'].split())[:160]}\"")
        for r in m["gcg_per_prompt"][:2]:
            lines.append(f"- {name} / GCG ({'success' if r['success'] else 'failed'} after {r['steps']} steps): "
                         + _suffixed(r))
        for source in ("sft", "aligned"):
            for r in m.get(f"gcg_transfer_from_{source}_samples", [])[:2]:
                lines.append(f"- {name} / GCG suffix found on {source}, transferred: **{r['verdict']}**: "
                             + _suffixed(r))
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    """Bar chart: template ASR per family and GCG ASR, per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = summary["models"]
    families = sorted({f for m in models.values() for f in m["template_asr_by_family"]})
    groups = [*families, "all templates", "GCG white-box", "GCG from aligned,\ntransferred"]
    fig, ax = plt.subplots(figsize=(12, 4))
    width = 0.8 / len(models)
    for i, (name, m) in enumerate(models.items()):
        values = [m["template_asr_by_family"].get(f, {}).get("rate", 0) for f in families]
        values += [m["template_asr"]["rate"], m["gcg_asr"]["rate"],
                   m.get("gcg_transfer_from_aligned_asr", {}).get("rate", float("nan"))]  # no bar: not measured
        ax.bar([g + i * width for g in range(len(groups))], values, width, label=name)
    ax.set_xticks([g + width * (len(models) - 1) / 2 for g in range(len(groups))], groups, rotation=20, ha="right")
    ax.set_ylabel("attack success rate (%)")
    ax.set_title("Jailbreaks on the demo's models (keyword judge)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
