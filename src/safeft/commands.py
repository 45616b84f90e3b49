"""The ``safeft`` commands: a thin layer over the recipes, their options generated from the run configuration.

:mod:`safeft.cli` is the entry point; it imports this module (and with it torch) only when a command runs or shows
its help. Every command takes ``--config FILE.yaml`` whose keys are its option names (flags on the line win),
validates everything through the same dataclasses as the Python API, and reports bad input as one line with exit
code 2.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import typer

from safeft.analysis import AnalysisConfig
from safeft.config import AlignConfig, DataConfig, Setting, TrainConfig
from safeft.data import DEFAULT_SAFETY_SAMPLES
from safeft.errors import UserError
from safeft.evaluate.gcg import GCGConfig
from safeft.options import FLAG_NAMES, command
from safeft.recipes.bench import BenchConfig
from safeft.spf.config import DEFAULT_MAX_RANK, SPFConfig

# the commands; the top level (`--version`, `--debug`) is safeft.cli's, and a new command needs its line in
# safeft.cli.COMMANDS too (a test checks the two agree)
app = typer.Typer(no_args_is_help=True)
subspace_app = typer.Typer(help="Estimate and inspect safety subspaces.", no_args_is_help=True)
app.add_typer(subspace_app, name="subspace")


def _cache(cache: str | None) -> Path:
    from safeft.models import cache_dir

    return Path(cache) if cache else cache_dir()


def _command_line() -> str:
    return "safeft " + shlex.join(sys.argv[1:])


# --- align -----------------------------------------------------------------------------------------------------


def method_options() -> dict[str, tuple]:
    """Return ``{option: (type, default)}`` over every registered method (one flag per option name)."""
    import typing

    from safeft.methods import REGISTRY

    options: dict[str, tuple] = {}
    for cls, _ in REGISTRY.values():
        hints = typing.get_type_hints(cls.Config)
        for f in fields(cls.Config):
            options.setdefault(f.name, (hints[f.name], f.default))
    return options


def method_help() -> dict[str, str]:
    """Return the help of every method option, from the methods' option dataclasses."""
    from safeft.methods import REGISTRY
    from safeft.options import field_help

    helps: dict[str, str] = {}
    for cls, _ in REGISTRY.values():
        helps = {**field_help(cls.Config), **helps}
    return helps


@dataclass
class AlignCommand:
    """Args:
    model: base model to align: 'default' (SmolLM2-135M-Instruct) or a local model directory.
    out: where to save the aligned model (default: in the cache, keyed by model and settings).
    cache: cache directory (default $SAFEFT_CACHE or ~/.cache/safeft).
    overwrite: re-align even if the aligned model exists.
    chat_template: a Jinja chat template file, for a tokenizer that has none.
    method: 'sft', or a method that changes the alignment stage ('vaccine', 'booster'); its options are flags.
    """

    model: str = "default"
    out: str | None = None
    cache: str | None = None
    overwrite: bool = False
    chat_template: str | None = None
    method: str = "sft"
    align: AlignConfig = field(default_factory=AlignConfig)


def _build_method(name: str, options: dict):
    from safeft.methods import build_method

    try:
        return build_method(name, options)
    except ValueError as error:
        raise UserError(str(error).replace("unknown key(s)", "options not taken by this method:")) from None


@command(app, "align", AlignCommand, extra=method_options(), extra_help=method_help(),
         panels={"model": "Model and data", "chat_template": "Model and data", "cache": "Model and data",
                 "config": "Model and data", "align": "Training", "method": "Method", "out": "Output",
                 "overwrite": "Output"},
         epilog="Example: safeft align --model default  (prints where the aligned model is cached)",
         help="Align a model: SFT on harmful -> varied refusals plus benign -> its own answers (cached).")
def align(c: AlignCommand, options: dict) -> None:
    from safeft.recipes.align import align as run_align
    from safeft.recipes.align import aligned_model_dir

    method = _build_method(c.method, options)
    if c.method != "sft" and not method.alignment_key():
        raise UserError(f"method {c.method!r} does not change the alignment stage; align with the default "
                         f"(--method sft) and fine-tune with --method {c.method}")
    own = method if method.alignment_key() else None
    target = Path(c.out) if c.out else aligned_model_dir(c.model, c.align, _cache(c.cache), own)
    if (target / "align.json").exists() and not c.overwrite:
        typer.echo(f"aligned model already at {target} (pass --overwrite to redo)")
        return
    report = run_align(c.model, target, c.align, _cache(c.cache), own, overwrite=c.overwrite,
                       command=_command_line(), chat_template=c.chat_template)
    typer.echo(f"aligned in {report['steps']} steps, {report['seconds']:.0f} s; validation refusal "
               f"{100 * report['checks'][-1]['val_refusal']:.0f}%, refusal loss {report['val_refusal_loss']:.3f} "
               f"-> {target}")


# --- finetune --------------------------------------------------------------------------------------------------


@dataclass
class FinetuneCommand:
    """Args:
    model: the (aligned) model directory to fine-tune.
    out: output directory (model, method artefacts such as the SPF subspace, config, training log).
    method: a registered method (see `safeft methods`); its options are flags too.
    cache: cache directory (default $SAFEFT_CACHE or ~/.cache/safeft).
    overwrite: replace an existing --out.
    chat_template: a Jinja chat template file, for a tokenizer that has none.
    resume: continue the interrupted run in --out (its <out>.partial) from its newest intact checkpoint, with the
        same options.
    resume_from: continue the interrupted run in --out from this checkpoint folder, used as it is (not verified).
    """

    model: str
    out: str
    method: str = "sft"
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=40))
    cache: str | None = None
    overwrite: bool = False
    chat_template: str | None = None
    resume: bool = False
    resume_from: str | None = None


FINETUNE_PANELS = {"model": "Model and data", "data": "Model and data", "chat_template": "Model and data",
                   "cache": "Model and data", "config": "Model and data", "train": "Training", "method": "Method",
                   "task_test": "Evaluation", "max_test": "Evaluation", "validation": "Evaluation",
                   "out": "Output", "overwrite": "Output", "resume": "Output",
                   "resume_from": "Output"}


@command(app, "finetune", FinetuneCommand, extra=method_options(), extra_help=method_help(), panels=FINETUNE_PANELS,
         epilog="Example: safeft finetune --model ALIGNED_DIR --out runs/spf --method spf --task jsonl --task-train "
                "my_data.jsonl --max-steps 100 (`safeft methods spf` lists SPF's options).",
         help="Fine-tune a model on a task (optionally with a harmful mix) with any registered method.")
def finetune(c: FinetuneCommand, options: dict) -> None:
    from safeft.checkpoints import check_restart
    from safeft.distributed import is_main_process
    from safeft.io import MARKER, writing_together
    from safeft.recipes.finetune import finetune as run_finetune

    method = _build_method(c.method, options)
    inputs = [c.model, c.data.task_train, c.data.task_test, c.data.harmful_answers, options.get("safety_data"),
              options.get("harmful_data"), c.chat_template]
    resume = c.resume_from or c.resume
    if resume and (Path(c.out) / MARKER).exists():
        raise UserError(f"{c.out} holds a finished run; there is nothing to resume")
    check_restart(c.out, resume=bool(resume), overwrite=c.overwrite)
    if is_main_process():
        typer.echo(global_batch(c.train), err=True)
    with writing_together(c.out, overwrite=c.overwrite, inputs=inputs, command=_command_line(),
                          keep_partial=bool(resume)) as tmp:
        _, _, log = run_finetune(c.model, c.data, method, c.train, tmp, _cache(c.cache),
                                 chat_template=c.chat_template, resume=resume)
    if is_main_process():
        typer.echo(f"{method.name}: {log['steps']} steps in {log['seconds']:.0f} s -> {c.out}")


def global_batch(train: TrainConfig) -> str:
    """Return the line announcing a run's global batch: per process x processes (``WORLD_SIZE``) x accumulation."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    total = train.batch_size * processes * train.gradient_accumulation
    return (f"global batch {total} examples per optimizer step = {train.batch_size} per process x {processes} "
            f"process(es) x {train.gradient_accumulation} accumulation step(s)")


@app.command("methods", epilog="Example: safeft methods spf")
def methods(name: str | None = typer.Argument(None, help="A method: list its options, defaults and helps.")) -> None:
    """List the registered methods, or one method's options with their defaults."""

    from safeft.methods import REGISTRY, build_method
    from safeft.options import field_help

    if name is None:
        for name in REGISTRY:
            method = build_method(name)
            options = ", ".join(f"{k}={v}" for k, v in asdict(method.config).items()) or "no options"
            typer.echo(f"{name:12s} {(type(method).__doc__ or '').strip().splitlines()[0]}\n{'':12s} {options}")
        typer.echo("\n`safeft methods NAME` lists a method's options with their helps.")
        return
    if name not in REGISTRY:
        typer.echo(f"Error: unknown method {name!r}; registered: {', '.join(REGISTRY)}", err=True)
        raise typer.Exit(2)
    method = build_method(name)
    helps = field_help(type(method.config))
    typer.echo(f"{name}: {(type(method).__doc__ or '').strip().splitlines()[0]}")
    for key, value in asdict(method.config).items():
        flag = "--" + FLAG_NAMES.get(key, key).replace("_", "-")
        text = textwrap.fill(helps.get(key, "").replace("``", ""), 100, initial_indent=" " * 6,
                             subsequent_indent=" " * 6)
        typer.echo(f"  {flag} (default: {'none' if value is None else value})\n{text}")
    if not method.config.__dataclass_fields__:
        typer.echo("  no options")


# --- eval ------------------------------------------------------------------------------------------------------


@dataclass
class EvalCommand:
    """Args:
    model: a model directory or a `safeft finetune` output.
    out: JSON file to write the results to.
    task: task whose test split gives the accuracy ('none' to skip).
    task_train, task_test: data files of a file-format task.
    max_test: use at most this many test examples.
    harmful: AdvBench-style CSV of harmful prompts (default: the built-in held-out requests).
    judge: 'keyword', 'prefix:PHRASES_FILE' (the GCG paper's rule), 'llamaguard:MODEL_DIR',
        'harmbench:MODEL_DIR[:TEMPLATE_FILE]', or the path of a local classifier.
    max_new_tokens: tokens generated per answer.
    overwrite: replace an existing --out.
    chat_template: a Jinja chat template file, for a tokenizer that has none.
    jailbreaks: 'builtin' or a template file (CSV/JSON): report each template family's attack success rate.
    jailbreak_requests: apply the templates to this many of the harmful requests (spread evenly); default all.
    suffixes: a `safeft gcg` result file: report the ASR of its suffixes on this model (transfer).
    """

    model: str
    out: str
    task: str = "facts"
    task_train: str | None = None
    task_test: str | None = None
    max_test: int | None = None
    harmful: str | None = None
    judge: str = "keyword"
    max_new_tokens: int = 64
    overwrite: bool = False
    chat_template: str | None = None
    jailbreaks: str | None = None
    jailbreak_requests: int | None = None
    suffixes: str | None = None


EVAL_PANELS = {**dict.fromkeys(["model", "task", "task_train", "task_test", "max_test", "harmful", "chat_template",
                                 "config"], "Model and data"),
               **dict.fromkeys(["judge", "max_new_tokens", "jailbreaks", "jailbreak_requests", "suffixes"],
                               "Evaluation"), "out": "Output", "overwrite": "Output"}


@command(app, "eval", EvalCommand, epilog="Example: safeft eval --model runs/spf --out runs/spf/eval.json",
         panels=EVAL_PANELS,
         help="Evaluate harmful score, over-refusal, task accuracy and safety loss (rates with 95% Wilson intervals).")
def evaluate(c: EvalCommand, _: dict) -> None:
    from safeft.data.loaders import read_advbench
    from safeft.data.tasks import load_task
    from safeft.evaluate.gcg import load_results
    from safeft.evaluate.jailbreaks import templates_from
    from safeft.evaluate.judges import load_judge
    from safeft.io import check_output_file, write_json
    from safeft.recipes.evaluate import evaluate_dir

    check_output_file(c.out, overwrite=c.overwrite, inputs=[c.model, c.task_train, c.task_test, c.harmful,
                                                            c.judge, c.chat_template, c.jailbreaks, c.suffixes])
    if c.jailbreak_requests is not None and c.jailbreak_requests <= 0:
        raise UserError(f"--jailbreak-requests must be positive, got {c.jailbreak_requests}")
    task = None if c.task == "none" else load_task(c.task, c.task_train, c.task_test, max_test=c.max_test)
    prompts = [e.prompt for e in read_advbench(c.harmful)] if c.harmful else None
    templates = templates_from(c.jailbreaks) if c.jailbreaks else None
    suffixes = load_results(c.suffixes) if c.suffixes else None
    result = evaluate_dir(c.model, task, max_new_tokens=c.max_new_tokens, judge=load_judge(c.judge),
                          harmful_prompts=prompts, chat_template=c.chat_template, jailbreaks=templates,
                          jailbreak_requests=c.jailbreak_requests, suffixes=suffixes)
    write_json(Path(c.out), {**result, "judge": c.judge})
    harmful, refusal, off_task = (result[k]["rate"] for k in ("harmful_score", "refusal_rate", "off_task_rate"))
    message = (f"harmful score {harmful:.1f}% (95% CI {result['harmful_score']['ci'][0]:.1f}"
               f"-{result['harmful_score']['ci'][1]:.1f}), refusal {refusal:.1f}%, off-task {off_task:.1f}% of the "
               f"harmful requests; over-refusal {result['over_refusal']['rate']:.1f}%")
    if result["accuracy"]:
        message += f", accuracy {result['accuracy']['rate']:.1f}%"
    if "jailbreaks" in result:
        message += f", template jailbreak ASR {result['jailbreaks']['overall']['rate']:.1f}%"
    if "gcg_transfer" in result:
        message += f", GCG suffix ASR {result['gcg_transfer']['asr']['rate']:.1f}%"
    typer.echo(f"{message} -> {c.out}")
    if off_task > max(refusal, harmful):
        typer.echo(f"Warning: {off_task:.1f}% of the answers to harmful requests are off-task (neither a refusal nor "
                   f"compliance, by judge {c.judge!r}), more than either: the low harmful score may mean a broken "
                   "model rather than a safe one; read the samples in the output file.", err=True)


@dataclass
class GcgCommand:
    """Args:
    model: the model to attack (white-box): a model directory or a `safeft finetune` output.
    harmful: AdvBench-style CSV with 'goal' (the request) and 'target' (the affirmative opening to reach).
    out: JSON file for the results (per request: suffix, success, steps used, final loss).
    requests: attack this many requests of the file, spread evenly over it.
    judge: decides success from the model's reply (see `safeft eval --judge`).
    overwrite: replace an existing --out.
    chat_template: a Jinja chat template file, for a tokenizer that has none.
    """

    model: str
    harmful: str
    out: str
    requests: int = 10
    judge: str = "keyword"
    overwrite: bool = False
    chat_template: str | None = None
    gcg: GCGConfig = field(default_factory=GCGConfig)


@command(app, "gcg", GcgCommand, epilog="Example: safeft gcg --model runs/spf --harmful advbench.csv --out "
                                              "runs/spf/gcg.json --requests 5",
         help="Attack a model with GCG suffixes (Zou et al. 2023) toward AdvBench targets; "
                                      "apply the suffixes to other models with `safeft eval --suffixes`.")
def gcg(c: GcgCommand, _: dict) -> None:
    from safeft.data.loaders import read_advbench
    from safeft.evaluate.gcg import allowed_tokens, gcg_attack, save_results
    from safeft.evaluate.judges import load_judge
    from safeft.io import check_output_file
    from safeft.progress import progress
    from safeft.recipes.evaluate import spread
    from safeft.recipes.finetune import load_finetuned

    check_output_file(c.out, overwrite=c.overwrite, inputs=[c.model, c.harmful, c.judge, c.chat_template])
    if c.requests <= 0:
        raise UserError(f"--requests must be positive, got {c.requests}")
    rows = spread(read_advbench(c.harmful), c.requests)
    judge = load_judge(c.judge)
    model, tokenizer = load_finetuned(c.model, chat_template=c.chat_template)
    allowed = allowed_tokens(tokenizer, model.get_input_embeddings().weight.shape[0])
    start, results = time.perf_counter(), []
    for row in progress(rows, desc="gcg requests"):
        results.append(gcg_attack(model, tokenizer, row.prompt, row.response, c.gcg, judge, allowed=allowed))
    save_results(c.out, results, {"model": c.model, "harmful": c.harmful, "judge": c.judge,
                                  "config": asdict(c.gcg), "seconds": time.perf_counter() - start,
                                  "command": _command_line()})
    wins = sum(r.success for r in results)
    typer.echo(f"GCG: {wins}/{len(results)} requests jailbroken, {sum(r.steps for r in results)} steps in "
               f"{time.perf_counter() - start:.0f} s -> {c.out}")


# --- bench and demo --------------------------------------------------------------------------------------------


def _run_bench(config) -> None:
    from safeft.recipes.bench import bench as run_bench

    summary = run_bench(config, command=_command_line())
    typer.echo((Path(config.out) / "bench.md").read_text().split("\n## ")[0])
    typer.echo(f"{len(summary['runs'])} runs -> {config.out}/bench.md, bench.json, bench.png")


@command(app, "bench", BenchConfig, epilog="Example: safeft bench --config benchmarks/configs/bench_facts.yaml",
         help="Run a grid of methods x settings x seeds (resumable: finished runs "
                                             "are skipped) and summarise it in bench.json, bench.md, bench.png.")
def bench(c, _: dict) -> None:
    _run_bench(c)


DEMO_LORA_LEARNING_RATE = 2e-4


DEMO_METHODS = ["sft", "spf"]
DEMO_FULL_METHODS = ["sft", "spf", "spf-random"]


@dataclass
class DemoCommand(BenchConfig):
    """The demo: SFT against SPF with 10% harmful data (seed 0) on the default model, aligned first (cached); with
    ``--full``, the bench's default grid (SFT, SPF and SPF with random bases as a control; benign and with 10%
    harmful data).

    Args:
        full: run the full demo grid (three methods, benign and 10% harmful) instead of SFT vs SPF at 10% harmful;
            the quick demo's runs are reused.
        smoke: check the install in about a minute: the same pipeline on a tiny random Llama (written to the cache),
            one step per stage and 4 new tokens; its numbers say nothing about SPF.
        lora_r: also run every setting under LoRA of this rank (all block linears, learning rate 2e-4), as a
            second set of rows; 0 = full fine-tuning only.
    """

    out: str = "runs/demo"
    methods: list[str | dict] = field(default_factory=lambda: list(DEMO_METHODS))
    settings: list[Setting] = field(default_factory=lambda: [Setting(harmful_ratio=0.1)])
    title: str = "safeft demo: SFT vs SPF on SmolLM2-135M-Instruct, 10% harmful data"
    full: bool = False
    smoke: bool = False

    def __post_init__(self) -> None:
        if self.full:  # the full grid, unless methods or settings were given
            if self.methods == DEMO_METHODS:
                self.methods = list(DEMO_FULL_METHODS)
            if self.settings == [Setting(harmful_ratio=0.1)]:
                self.settings = [Setting(), Setting(harmful_ratio=0.1)]
            if self.title == DemoCommand.title:
                self.title = "safeft demo: SFT vs SPF (and its random-basis control) on SmolLM2-135M-Instruct"
        if self.smoke and self.model not in ("default", str(_tiny_model_dir(self.cache))):
            raise UserError("--smoke runs on its own tiny random model; drop --model (or drop --smoke to use yours)")
        if self.smoke and self.model == "default":
            self.model = str(_tiny_model_dir(self.cache))
            # SPF's default rank 128 exceeds the tiny model's 32-wide matrices
            self.methods = [f"{m} rank=4" if isinstance(m, str) and m.startswith("spf") else m for m in self.methods]
            self.settings = [replace(s, name=None, task="sentiment", max_train=20, max_test=8) for s in self.settings]
            self.train = replace(self.train, steps=1, batch_size=4)
            self.align = replace(self.align, max_steps=1, check_every=1)
            self.max_new_tokens = 4
            self.out = "runs/demo-smoke" if self.out == DemoCommand.out else self.out
            self.title = "safeft demo --smoke: the pipeline on a tiny random model (numbers mean nothing)"
        if self.train.lora_r:  # the demo's --lora-r adds LoRA rows instead of replacing the full fine-tuning ones
            rank, self.train = self.train.lora_r, replace(self.train, lora_r=0)
            lora = [replace(s, name=None, lora_r=rank, learning_rate=DEMO_LORA_LEARNING_RATE)
                    for s in self.settings if not s.lora_r]
            self.settings = [*self.settings, *lora]
        super().__post_init__()


def _tiny_model_dir(cache: str | None) -> Path:
    """Return where the smoke demo's tiny random Llama lives: ``tiny-random-llama`` in the cache directory."""
    from safeft.models import cache_dir

    return (Path(cache) if cache else cache_dir()) / "tiny-random-llama"


def _write_tiny_model(path: Path) -> None:
    """Write safeft.testing's tiny random Llama (byte tokenizer, ChatML template) to ``path`` unless it is there."""
    from safeft.testing import save_tiny_model

    if not path.is_dir():
        partial = path.with_name(f"{path.name}.partial-{os.getpid()}")  # renamed when whole: a kill leaves no half
        save_tiny_model(partial)
        os.replace(partial, path)


@command(app, "demo", DemoCommand,
         epilog="Examples: safeft demo --smoke (a minute); safeft demo; then safeft demo --full for the whole grid",
         help="Align (cached) -> fine-tune with SFT and SPF on a 10% harmful mix -> evaluate -> report; --smoke "
              "checks the install on a tiny random model in a minute; --full adds benign data and SPF's random-basis "
              "control (a bench with the demo grid).")
def demo(c, _: dict) -> None:
    start = time.perf_counter()
    if c.smoke:
        _write_tiny_model(Path(c.model))
    _run_bench(c)
    typer.echo(f"demo finished in {(time.perf_counter() - start) / 60:.1f} min")


# --- subspace --------------------------------------------------------------------------------------------------


@dataclass
class EstimateCommand:
    """Args:
    out: directory to write subspace.safetensors and subspace.json into.
    model: 'default' (SmolLM2-135M-Instruct), a local directory or an HF id in the local cache.
    samples: JSONL of {prompt, refusal[, compliance]}; default: built-in samples.
    num_samples: built-in samples to use without --samples.
    rank: fixed rank per target unless --energy or --budget is set (default 128, full fine-tuning's; give 64, LoRA's
        default, for a subspace that will guard LoRA training).
    energy: keep this fraction of the squared spectrum instead of a fixed rank.
    budget: keep this many directions over all targets, where the safety gradients' singular values are largest.
    max_rank: cap on a target's rank under --energy or --budget.
    onset_tokens: estimate from the first N tokens of each refusal, where the model decides to refuse ('none':
        every token).
    target_modules: names or regexes of the linear layers to guard (default: every linear inside the blocks).
    chat_template: Jinja chat template file for tokenizers without one.
    overwrite: replace a subspace already at --out.
    """

    out: str
    model: str = "default"
    samples: str | None = None
    num_samples: int = DEFAULT_SAFETY_SAMPLES
    rank: int | None = None
    energy: float | None = None
    budget: int | None = None
    max_rank: int = DEFAULT_MAX_RANK
    onset_tokens: int | None = 4
    target_modules: list[str] | None = None
    chat_template: str | None = None
    overwrite: bool = False


@command(subspace_app, "estimate", EstimateCommand,
         epilog="Example: safeft subspace estimate --model default --out runs/subspace --rank 16",
         help="Estimate the safety subspace of a model from (harmful prompt, refusal) samples.")
def estimate(c: EstimateCommand, _: dict) -> None:
    from safeft.data import builtin_safety_samples, load_safety_samples
    from safeft.io import writing
    from safeft.models import load_model
    from safeft.spf.subspace import SafetySubspace

    config = SPFConfig(rank=c.rank, energy=c.energy, budget=c.budget, max_rank=c.max_rank,
                       target_modules=c.target_modules, onset_tokens=c.onset_tokens)
    pairs = load_safety_samples(c.samples) if c.samples else builtin_safety_samples(c.num_samples)
    inputs = [c.model, c.samples, c.chat_template]
    with writing(c.out, overwrite=c.overwrite, inputs=inputs, command=_command_line()) as out:
        lm, tokenizer = load_model(c.model, chat_template=c.chat_template)
        start = time.perf_counter()
        subspace = SafetySubspace.estimate(lm, tokenizer, pairs, config)
        seconds = time.perf_counter() - start
        subspace.save(out, overwrite=True)
    out = Path(c.out)
    ranks = list(subspace.metadata["ranks"].values())
    share = subspace.numel() / sum(p.numel() for p in lm.parameters())
    typer.echo(f"{len(subspace)} targets, rank {min(ranks)}..{max(ranks)} (mean {sum(ranks) / len(ranks):.1f}) from "
               f"{len(pairs)} sample(s) in {seconds:.1f} s; {100 * share:.2f}% of the model's parameters -> {out}")


def _load_subspace(path: Path):
    """Return the subspace saved in ``path`` (checked against its manifest); exit 2 with one line if it is not."""
    from safeft.spf.subspace import SafetySubspace

    try:
        return SafetySubspace.load(path)
    except (FileNotFoundError, ValueError) as error:
        typer.echo(f"Error: {error}", err=True)
        raise typer.Exit(2) from None


@subspace_app.command("show")
def show(path: Path = typer.Argument(..., help="A directory written by `safeft subspace estimate`.")) -> None:
    """Print what a saved subspace holds."""
    subspace = _load_subspace(path)
    meta = subspace.metadata
    typer.echo(json.dumps({k: meta[k] for k in ("safeft_version", "rank_policy", "num_samples", "samples_sha256")},
                          indent=2))
    typer.echo(f"model: {meta['model']['name_or_path']}")
    for name, basis in subspace.bases.items():
        top = ", ".join(f"{s:.3g}" for s in basis.S[:3].tolist())
        typer.echo(f"  {name:50s} {tuple(meta['model']['targets'][name])!s:14s} rank {basis.rank:3d}  sigma {top}")


CARD_OPTIONS = {"base_model": "The Hub id of the model it was estimated on, for the card's base_model (default: the "
                              "recorded model name if it is a Hub id; a local path is never written).",
                "license_id": "The card's license (a Hub licence id).",
                "include_samples": "List the safety samples (harmful prompts) verbatim in the card; default: their "
                                   "count and sha256 only."}


@subspace_app.command("card")
def card(path: Path = typer.Argument(..., help="A saved subspace directory."),
         out: Path | None = typer.Option(None, "--out", help="Where to write the card (default: PATH/README.md)."),
         repo_id: str | None = typer.Option(None, "--repo-id", help="The Hub repo the card's snippet loads from."),
         base_model: str | None = typer.Option(None, "--base-model", help=CARD_OPTIONS["base_model"]),
         license_id: str = typer.Option("other", "--license", help=CARD_OPTIONS["license_id"]),
         include_samples: bool = typer.Option(False, "--include-samples", help=CARD_OPTIONS["include_samples"]),
         overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing card.")) -> None:
    """Write the Hub model card (README.md with YAML front matter) of a saved subspace."""
    subspace = _load_subspace(path)
    target = out or path / "README.md"
    if target.exists() and not overwrite:
        typer.echo(f"Error: {target} exists; pass --overwrite to replace it, or --out FILE", err=True)
        raise typer.Exit(2)
    if target.is_dir() or not target.parent.is_dir():
        typer.echo(f"Error: --out {target}: {'a directory' if target.is_dir() else 'its folder does not exist'}; "
                   "give a file path", err=True)
        raise typer.Exit(2)
    subspace.generate_model_card(repo_id=repo_id, base_model=base_model, license_id=license_id,
                                 include_samples=include_samples).save(target)
    typer.echo(f"model card -> {target}")


@subspace_app.command("push")
def push(path: Path = typer.Argument(..., help="A saved subspace directory."),
         repo_id: str = typer.Argument(..., help="The Hub repo to upload to (owner/name; created if missing)."),
         private: bool = typer.Option(False, "--private", help="Create the repo private."),
         base_model: str | None = typer.Option(None, "--base-model", help=CARD_OPTIONS["base_model"]),
         license_id: str = typer.Option("other", "--license", help=CARD_OPTIONS["license_id"]),
         include_samples: bool = typer.Option(False, "--include-samples", help=CARD_OPTIONS["include_samples"])
         ) -> None:
    """Upload a saved subspace (its files and a model card) to the Hugging Face Hub."""
    subspace = _load_subspace(path)
    try:
        url = subspace.push_to_hub(repo_id, private=private or None, base_model=base_model, license_id=license_id,
                                   include_samples=include_samples)
    except UserError as error:
        typer.echo(f"Error: {error}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"pushed {path} -> {url}")


# --- analyze ---------------------------------------------------------------------------------------------------


@dataclass
class AnalyzeCommand:
    """Args:
    out: output directory (analysis.json, analysis.png, analysis.md).
    model: 'default', a local model directory, or a `safeft finetune` output.
    safety_data: harmful prompts (default: built-in, with refusals).
    safety_format: advbench (refusals are written for it), safety_alignment, jsonl (prompt, response = refusal).
    task: built-in task (facts, sentiment) or a format (sst2, agnews, gsm8k, alpaca, jsonl) read from --task-data.
    task_data: utility data file for a file-format task.
    seed: which samples are drawn.
    overwrite: replace an existing --out.
    chat_template: a Jinja chat template file, for a tokenizer that has none.
    """

    out: str = "runs/analysis"
    model: str = "default"
    safety_data: str | None = None
    safety_format: str = "advbench"
    task: str = "facts"
    task_data: str | None = None
    seed: int = 0
    overwrite: bool = False
    chat_template: str | None = None
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)


@command(app, "analyze", AnalyzeCommand, epilog="Example: safeft analyze --model default --out runs/analysis",
         help="Measure the paper's three findings (low rank, conflict, one sample is enough) on a model.")
def analyze(c: AnalyzeCommand, _: dict) -> None:
    from safeft.analysis import analysis_inputs, plot, summary_markdown
    from safeft.analysis import analyze as run_analysis
    from safeft.io import write_json, writing
    from safeft.models import load_model
    from safeft.recipes.finetune import load_finetuned

    safety, utility = analysis_inputs(c.safety_data, c.safety_format, c.task, c.task_data,
                                      c.analysis.num_samples, c.seed)
    inputs = [c.model, c.safety_data, c.task_data, c.chat_template]
    with writing(c.out, overwrite=c.overwrite, inputs=inputs, command=_command_line()) as out:
        lm, tokenizer = (load_finetuned(c.model, chat_template=c.chat_template) if Path(c.model).exists()
                         else load_model(c.model, chat_template=c.chat_template))
        result = run_analysis(lm, tokenizer, safety, utility, c.analysis)
        result["inputs"] = {"model": c.model, "safety_data": c.safety_data or "built-in", "task": c.task,
                            "task_data": c.task_data or "built-in"}
        write_json(out / "analysis.json", result)
        plot(result, out / "analysis.png")
        summary = summary_markdown(result, f"{c.model}: safety {result['inputs']['safety_data']}, utility {c.task}")
        (out / "analysis.md").write_text(summary)
    typer.echo(summary)
