"""The ``safeft`` command: a thin layer over the Python API."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click
import typer

from safeft.config import SPFConfig
from safeft.data import DEFAULT_SAFETY_SAMPLES

app = typer.Typer(help="Fine-tune safety-aligned LLMs without losing their safety (SPF).", no_args_is_help=True)
subspace_app = typer.Typer(help="Estimate and inspect safety subspaces.", no_args_is_help=True)
app.add_typer(subspace_app, name="subspace")


@app.callback()
def main() -> None:
    """safeft: Safety-Preserving Fine-Tuning."""


def resolve(ctx: typer.Context, config: Path | None) -> dict[str, Any]:
    """Return the command's parameters: values from ``--config run.yaml``, overridden by flags given on the line."""
    values = dict(ctx.params)
    values.pop("config", None)
    if config is None:
        return values
    import yaml

    loaded = yaml.safe_load(config.read_text()) or {}
    if not isinstance(loaded, dict):
        raise typer.BadParameter(f"{config} must hold a mapping of option names to values", param_hint="--config")
    unknown = sorted(set(k.replace("-", "_") for k in loaded) - set(values))
    if unknown:
        raise typer.BadParameter(f"{config}: unknown keys {unknown}; valid keys: {sorted(values)}",
                                 param_hint="--config")
    for key, value in loaded.items():
        key = key.replace("-", "_")
        if ctx.get_parameter_source(key) is not click.core.ParameterSource.COMMANDLINE:
            values[key] = value
    return values


SPF_DEFAULTS = SPFConfig()
CONFIG_OPTION = typer.Option(None, "--config", help="YAML file of option values; flags on the line win.")
CACHE_HELP = "Cache directory (default $SAFEFT_CACHE or ~/.cache/safeft)."


def _cache(cache: str | None) -> Path:
    from safeft.models import cache_dir

    return Path(cache) if cache else cache_dir()


def _train_config(v: dict):
    from safeft.train import TrainConfig

    return TrainConfig(steps=v["steps"], epochs=v["epochs"], learning_rate=v["lr"], batch_size=v["batch_size"],
                       max_length=v["max_length"], lora_r=v["lora_r"], seed=v["seed"])


ONSET_HELP = "Estimate from the first N tokens of each refusal, where the model decides to refuse (0: all tokens)."


def _spf_config(v: dict):
    """Return the SPFConfig of a command's options."""
    energy = v.get("energy")
    return SPFConfig(rank=None if energy is not None else v["rank"], energy=energy, side=v["side"],
                     mode=v["mode"], project=v["project"], refresh_every=v.get("refresh_every", 0),
                     onset_tokens=v["onset_tokens"] or None)


@app.command()
def align(
    ctx: typer.Context,
    model: str = typer.Option("default", help="Base model to align: 'default' or a local model dir."),
    out: Path | None = typer.Option(None, help="Where to save the aligned model (default: in the cache)."),
    lr: float = typer.Option(5e-5, help="Learning rate."),
    max_steps: int = typer.Option(64, help="Upper bound on alignment steps."),
    check_every: int = typer.Option(8, help="Check the validation refusal rate every this many steps."),
    target_refusal: float = typer.Option(0.9, help="Stop once this fraction of validation prompts is refused."),
    cache: str | None = typer.Option(None, help=CACHE_HELP),
    overwrite: bool = typer.Option(False, help="Re-align even if the aligned model exists."),
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Align a model: SFT on harmful -> varied refusals plus benign -> its own answers (cached)."""
    from safeft.pipeline import AlignConfig, aligned_model_dir
    from safeft.pipeline import align as run_align

    v = resolve(ctx, config)
    settings = AlignConfig(learning_rate=v["lr"], max_steps=v["max_steps"], check_every=v["check_every"],
                           target_refusal=v["target_refusal"])
    target = Path(v["out"]) if v["out"] else aligned_model_dir(v["model"], settings, _cache(v["cache"]))
    if (target / "align.json").exists() and not v["overwrite"]:
        typer.echo(f"aligned model already at {target} (pass --overwrite to redo)")
        return
    report = run_align(v["model"], target, settings, _cache(v["cache"]))
    typer.echo(f"aligned in {report['steps']} steps, {report['seconds']:.0f} s; validation refusal "
               f"{100 * report['checks'][-1]['val_refusal']:.0f}%, refusal loss {report['val_refusal_loss']:.3f} "
               f"-> {target}")


@app.command()
def finetune(
    ctx: typer.Context,
    model: Path = typer.Option(..., help="The (aligned) model directory to fine-tune."),
    out: Path = typer.Option(..., help="Output directory (model, subspace, config, training log)."),
    method: str = typer.Option("sft", help="sft or spf."),
    task: str = typer.Option("facts", help="Built-in task (facts, sentiment) or a file format (sst2, agnews, ...)."),
    task_train: Path | None = typer.Option(None, help="Training file for a file-format task."),
    task_test: Path | None = typer.Option(None, help="Test file for a file-format task."),
    max_train: int | None = typer.Option(None, help="Use at most this many training examples."),
    harmful_ratio: float = typer.Option(0.0, help="Fraction of the training data replaced by harmful pairs."),
    harmful_answers: Path | None = typer.Option(None, help="JSONL (prompt, response) of compliant answers."),
    base_model: str = typer.Option("default", help="Unaligned model whose answers make the default harmful mix."),
    steps: int = typer.Option(40, help="Optimizer steps (0: use --epochs)."),
    epochs: float = typer.Option(1.0, help="Epochs when --steps is 0."),
    lr: float = typer.Option(5e-5, help="Learning rate."),
    batch_size: int = typer.Option(8, help="Batch size."),
    max_length: int = typer.Option(256, help="Max tokens per example."),
    lora_r: int = typer.Option(0, help="LoRA rank (0: full fine-tuning of the block matrices)."),
    seed: int = typer.Option(0, help="Seed."),
    rank: int = typer.Option(SPF_DEFAULTS.rank, help="SPF rank."),
    energy: float | None = typer.Option(None, help="SPF energy fraction instead of a fixed rank."),
    side: str = typer.Option(SPF_DEFAULTS.side, help="SPF side: left, right, two_sided."),
    mode: str = typer.Option(SPF_DEFAULTS.mode, help="SPF mode: conflict, always, directional."),
    project: str = typer.Option(SPF_DEFAULTS.project, help="SPF acts on: grad or update."),
    refresh_every: int = typer.Option(0, help="Re-estimate the subspace every K steps (0 = never)."),
    onset_tokens: int = typer.Option(SPF_DEFAULTS.onset_tokens or 0, help=ONSET_HELP),
    safety_samples: int = typer.Option(DEFAULT_SAFETY_SAMPLES, help="Built-in safety samples for the subspace."),
    cache: str | None = typer.Option(None, help=CACHE_HELP),
    overwrite: bool = typer.Option(False, help="Replace an existing --out."),
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Fine-tune a model on a task with plain SFT or with SPF."""
    from safeft.data.tasks import load_task
    from safeft.pipeline import FinetuneConfig, prepare_output
    from safeft.pipeline import finetune as run_finetune

    v = resolve(ctx, config)
    settings = FinetuneConfig(method=v["method"], harmful_ratio=v["harmful_ratio"],
                              harmful_answers=str(v["harmful_answers"]) if v["harmful_answers"] else None,
                              base_model=v["base_model"], safety_samples=v["safety_samples"],
                              train=_train_config(v), spf=_spf_config(v))
    the_task = load_task(v["task"], v["task_train"] and str(v["task_train"]), v["task_test"] and str(v["task_test"]),
                         max_train=v["max_train"])
    out_dir = prepare_output(v["out"], v["overwrite"])
    log = run_finetune(v["model"], the_task, settings, out_dir, _cache(v["cache"]))
    typer.echo(f"{v['method']}: {log['steps']} steps in {log['seconds']:.0f} s -> {out_dir}")


@app.command("eval")
def evaluate(
    ctx: typer.Context,
    model: Path = typer.Option(..., help="A model directory or a `safeft finetune` output."),
    out: Path = typer.Option(..., help="JSON file to write the results to."),
    task: str | None = typer.Option("facts", help="Task whose test split gives the accuracy ('none' to skip)."),
    task_train: Path | None = typer.Option(None, help="Training file for a file-format task."),
    task_test: Path | None = typer.Option(None, help="Test file for a file-format task."),
    max_test: int | None = typer.Option(None, help="Use at most this many test examples."),
    harmful: Path | None = typer.Option(None, help="AdvBench-style CSV of harmful prompts (default: built-in)."),
    judge: str = typer.Option("keyword", help="'keyword' or the path of a local classifier judge."),
    max_new_tokens: int = typer.Option(64, help="Tokens generated per answer."),
    overwrite: bool = typer.Option(False, help="Replace an existing --out."),
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Evaluate harmful score, over-refusal, task accuracy and safety loss (rates with 95% Wilson intervals)."""
    from safeft.data.loaders import read_advbench
    from safeft.data.tasks import load_task
    from safeft.evaluate.judges import load_judge
    from safeft.pipeline import evaluate_dir, write_json

    v = resolve(ctx, config)
    if Path(v["out"]).exists() and not v["overwrite"]:
        raise typer.BadParameter(f"{v['out']} exists; pass --overwrite to replace it", param_hint="--out")
    the_task = None if v["task"] in (None, "none") else load_task(
        v["task"], v["task_train"] and str(v["task_train"]), v["task_test"] and str(v["task_test"]),
        max_test=v["max_test"])
    prompts = [e.prompt for e in read_advbench(v["harmful"])] if v["harmful"] else None
    result = evaluate_dir(v["model"], the_task, max_new_tokens=v["max_new_tokens"], judge=load_judge(v["judge"]),
                          harmful_prompts=prompts)
    Path(v["out"]).parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(v["out"]), result)
    message = (f"harmful score {result['harmful_score']['rate']:.1f}% (95% CI {result['harmful_score']['ci'][0]:.1f}"
               f"-{result['harmful_score']['ci'][1]:.1f}), over-refusal {result['over_refusal']['rate']:.1f}%")
    if result["accuracy"]:
        message += f", accuracy {result['accuracy']['rate']:.1f}%"
    typer.echo(f"{message} -> {v['out']}")


@app.command()
def demo(
    ctx: typer.Context,
    out: Path = typer.Option(Path("runs/demo"), help="Output directory (report.md, results.json, demo.png)."),
    model: str = typer.Option("default", help="Base model."),
    task: str = typer.Option("facts", help="Built-in task."),
    harmful_ratio: float = typer.Option(0.1, help="Harmful fraction in the attacked setting."),
    steps: int = typer.Option(40, help="Fine-tuning steps per run."),
    lr: float = typer.Option(5e-5, help="Fine-tuning learning rate."),
    batch_size: int = typer.Option(8, help="Fine-tuning batch size."),
    lora_r: int = typer.Option(0, help="LoRA rank (0 = full fine-tuning)."),
    rank: int = typer.Option(SPF_DEFAULTS.rank, help="SPF rank."),
    side: str = typer.Option(SPF_DEFAULTS.side, help="SPF side."),
    mode: str = typer.Option(SPF_DEFAULTS.mode, help="SPF mode."),
    project: str = typer.Option(SPF_DEFAULTS.project, help="SPF acts on grad or update."),
    onset_tokens: int = typer.Option(SPF_DEFAULTS.onset_tokens or 0, help=ONSET_HELP),
    safety_samples: int = typer.Option(DEFAULT_SAFETY_SAMPLES, help="Built-in safety samples for the subspace."),
    max_new_tokens: int = typer.Option(64, help="Tokens generated per answer at evaluation."),
    align_max_steps: int = typer.Option(64, help="Upper bound on alignment steps (if not cached)."),
    cache: str | None = typer.Option(None, help=CACHE_HELP),
    overwrite: bool = typer.Option(False, help="Replace an existing --out."),
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Align (cached) -> fine-tune with SFT and SPF, benign and with a harmful mix -> evaluate -> report."""
    from safeft.pipeline import AlignConfig, DemoConfig
    from safeft.pipeline import demo as run_demo
    from safeft.train import TrainConfig

    v = resolve(ctx, config)
    settings = DemoConfig(model=v["model"], task=v["task"], harmful_ratio=v["harmful_ratio"],
                          safety_samples=v["safety_samples"], max_new_tokens=v["max_new_tokens"],
                          train=TrainConfig(steps=v["steps"], learning_rate=v["lr"], batch_size=v["batch_size"],
                                            lora_r=v["lora_r"]),
                          spf=_spf_config(v),
                          align=AlignConfig(max_steps=v["align_max_steps"],
                                            check_every=min(8, v["align_max_steps"])))
    results = run_demo(settings, v["out"], _cache(v["cache"]), overwrite=v["overwrite"])
    typer.echo(f"demo finished in {results['wall_seconds'] / 60:.1f} min -> {v['out']}/report.md")


@subspace_app.command("estimate")
def estimate(
    out: Path = typer.Option(..., help="Directory to write subspace.safetensors and subspace.json into."),
    model: str = typer.Option("default", help="'default' (SmolLM2-135M-Instruct), a local dir or a cached HF id."),
    samples: Path | None = typer.Option(None, help="JSONL of {prompt, refusal[, compliance]}; default: built-in."),
    num_samples: int = typer.Option(DEFAULT_SAFETY_SAMPLES, help="Built-in samples to use without --samples."),
    rank: int | None = typer.Option(SPF_DEFAULTS.rank, help="Fixed rank per target (ignored when --energy is set)."),
    energy: float | None = typer.Option(None, help="Keep this fraction of the squared spectrum instead."),
    max_rank: int = typer.Option(SPF_DEFAULTS.max_rank, help="Cap on the rank chosen by --energy."),
    onset_tokens: int = typer.Option(SPF_DEFAULTS.onset_tokens or 0, help=ONSET_HELP),
    targets: list[str] | None = typer.Option(None, "--target", help="Target module name/regex (repeatable)."),
    chat_template: Path | None = typer.Option(None, help="Jinja chat template for tokenizers without one."),
    overwrite: bool = typer.Option(False, help="Replace a subspace already at --out."),
) -> None:
    """Estimate the safety subspace of a model from (harmful prompt, refusal) samples."""
    from safeft.data import builtin_safety_samples, load_safety_samples
    from safeft.models import load_model
    from safeft.subspace import TENSORS_FILE, SafetySubspace

    if (out / TENSORS_FILE).exists() and not overwrite:
        raise typer.BadParameter(f"{out} already holds a subspace; pass --overwrite to replace it", param_hint="--out")
    config = SPFConfig(rank=None if energy is not None else rank, energy=energy, max_rank=max_rank,
                       target_modules=targets or None, onset_tokens=onset_tokens or None)
    pairs = load_safety_samples(samples) if samples else builtin_safety_samples(num_samples)
    lm, tokenizer = load_model(model, chat_template=str(chat_template) if chat_template else None)
    start = time.perf_counter()
    subspace = SafetySubspace.estimate(lm, tokenizer, pairs, config)
    seconds = time.perf_counter() - start
    subspace.save(out, overwrite=overwrite)
    ranks = list(subspace.metadata["ranks"].values())
    share = subspace.numel() / sum(p.numel() for p in lm.parameters())
    typer.echo(f"{len(subspace)} targets, rank {min(ranks)}..{max(ranks)} (mean {sum(ranks) / len(ranks):.1f}) from "
               f"{len(pairs)} sample(s) in {seconds:.1f} s; {100 * share:.2f}% of the model's parameters -> {out}")


@subspace_app.command("show")
def show(path: Path = typer.Argument(..., help="A directory written by `safeft subspace estimate`.")) -> None:
    """Print what a saved subspace holds."""
    from safeft.subspace import SafetySubspace

    subspace = SafetySubspace.load(path)
    meta = subspace.metadata
    typer.echo(json.dumps({k: meta[k] for k in ("safeft_version", "rank_policy", "num_samples", "samples_sha256")},
                          indent=2))
    typer.echo(f"model: {meta['model']['name_or_path']}")
    for name, basis in subspace.bases.items():
        top = ", ".join(f"{s:.3g}" for s in basis.S[:3].tolist())
        typer.echo(f"  {name:50s} {tuple(meta['model']['targets'][name])!s:14s} rank {basis.rank:3d}  sigma {top}")


@app.command()
def analyze(
    ctx: typer.Context,
    out: Path = typer.Option(Path("runs/analysis"), help="Output directory (analysis.json, analysis.png, .md)."),
    model: str = typer.Option("default", help="'default', a local model dir, or a `safeft finetune` output."),
    safety_data: Path | None = typer.Option(None, help="Harmful prompts (default: built-in, with refusals)."),
    safety_format: str = typer.Option("advbench", help="advbench (refusals are written for it), safety_alignment, "
                                                       "jsonl (prompt, response = refusal)."),
    task: str = typer.Option("facts", help="Built-in task (facts, sentiment) or a format (sst2, agnews, gsm8k, "
                                           "alpaca, jsonl) read from --task-data."),
    task_data: Path | None = typer.Option(None, help="Utility data file for a file-format task."),
    num_samples: int = typer.Option(16, help="N: samples per set."),
    ranks: str = typer.Option("1,2,4,8,16,32", help="Comma-separated r grid for subspace overlaps."),
    reference_rank: int = typer.Option(8, help="r of the headline numbers."),
    target: list[str] | None = typer.Option(None, "--target", help="Target module name/regex (repeatable)."),
    seed: int = typer.Option(0, help="Which samples are drawn."),
    overwrite: bool = typer.Option(False, help="Replace an existing --out."),
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Measure the paper's three findings (low rank, conflict, one sample is enough) on a model."""
    from safeft.analysis import AnalysisConfig, analysis_inputs, plot, summary_markdown
    from safeft.analysis import analyze as run_analysis
    from safeft.models import load_model
    from safeft.pipeline import load_finetuned, prepare_output, write_json

    v = resolve(ctx, config)
    settings = AnalysisConfig(num_samples=v["num_samples"], ranks=[int(r) for r in str(v["ranks"]).split(",")],
                              reference_rank=v["reference_rank"], target_modules=v["target"] or None)
    safety, utility = analysis_inputs(v["safety_data"], v["safety_format"], v["task"], v["task_data"],
                                      settings.num_samples, v["seed"])
    out_dir = prepare_output(v["out"], v["overwrite"])
    lm, tokenizer = load_finetuned(v["model"]) if Path(v["model"]).exists() else load_model(v["model"])
    result = run_analysis(lm, tokenizer, safety, utility, settings)
    result["inputs"] = {"model": v["model"], "safety_data": str(v["safety_data"] or "built-in"),
                        "task": v["task"], "task_data": str(v["task_data"] or "built-in")}
    write_json(out_dir / "analysis.json", result)
    plot(result, out_dir / "analysis.png")
    summary = summary_markdown(result, f"{v['model']}: safety {result['inputs']['safety_data']}, "
                                       f"utility {v['task']}")
    (out_dir / "analysis.md").write_text(summary)
    typer.echo(summary)

