"""The stages of the default pipeline (SPEC §4): base answers -> align -> fine-tune (SFT / SPF) -> evaluate.

Each stage reads and writes a directory, so the CLI can run them alone and the demo can chain and cache them.
An existing output directory is never replaced unless ``overwrite=True``.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from transformers import TrainerCallback

from safeft.config import SPFConfig
from safeft.data import DEFAULT_SAFETY_SAMPLES, builtin, builtin_safety_samples
from safeft.data.examples import ChatExample
from safeft.data.loaders import load_examples
from safeft.data.tasks import Task
from safeft.evaluate import evaluate_model, generate
from safeft.evaluate.judges import COMPLIANCE, REFUSAL, KeywordJudge
from safeft.spf import freeze_unguarded
from safeft.subspace import SafetySample, SafetySubspace, safety_loss
from safeft.train import TrainConfig, prepare_model, train


def prepare_output(path: str | Path, overwrite: bool) -> Path:
    """Return ``path`` ready to write into; refuse a non-empty existing directory unless ``overwrite``."""
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{path} already exists and is not empty; choose another --out or pass --overwrite")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: Path, data) -> None:
    """Write ``data`` as indented JSON."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def read_answers(cache_file: Path) -> dict[str, str]:
    """Return ``{prompt: response}`` from a JSONL answer cache ({} if it does not exist)."""
    if not cache_file.exists():
        return {}
    return {row["prompt"]: row["response"] for row in map(json.loads, cache_file.read_text().splitlines())}


def cached_answers(model, tokenizer, prompts: Sequence[str], cache_file: Path, max_new_tokens: int = 96) -> dict:
    """Return ``{prompt: greedy answer}`` of ``model``, generating only the prompts not yet in ``cache_file``."""
    cache = read_answers(cache_file)
    missing = [p for p in dict.fromkeys(prompts) if p not in cache]
    if missing:
        replies = generate(model, tokenizer, [[{"role": "user", "content": p}] for p in missing],
                           max_new_tokens=max_new_tokens, desc="base-model answers")
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with cache_file.open("a") as handle:
            for prompt, reply in zip(missing, replies):
                handle.write(json.dumps({"prompt": prompt, "response": reply}, ensure_ascii=False) + "\n")
                cache[prompt] = reply
    return {p: cache[p] for p in prompts}


# --- alignment ------------------------------------------------------------------------------------------------


@dataclass
class AlignConfig:
    """The alignment stage: SFT on harmful -> varied refusals plus benign -> the base model's own answers.

    Training runs in chunks of ``check_every`` steps and stops at the first check where the refusal rate on the
    validation harmful prompts reaches ``target_refusal`` (or at ``max_steps``): enough to refuse, and no more.
    """

    learning_rate: float = 5e-5
    batch_size: int = 8
    check_every: int = 8
    max_steps: int = 64
    target_refusal: float = 0.9
    seed: int = 0


def model_key(model_name: str) -> str:
    """Return a short file-name-safe key for a model name or path."""
    return f"{Path(model_name).name}-{hashlib.sha256(model_name.encode()).hexdigest()[:8]}"


def alignment_examples(base, tokenizer, model_name: str, cache: Path) -> list[ChatExample]:
    """Return the alignment data: 80 harmful requests with varied refusals and 60 benign requests with the base
    model's own greedy answers (self-distillation keeps its helpfulness)."""
    harmful = [ChatExample.from_pair(p, builtin.refusal_for(p), harmful=True, category=c)
               for c, p in builtin.harmful_requests("align")]
    benign_prompts = builtin.benign_requests("align")
    answers = cached_answers(base, tokenizer, benign_prompts, cache / f"benign_answers-{model_key(model_name)}.jsonl")
    benign = [ChatExample.from_pair(p, answers[p]) for p in benign_prompts if answers[p].strip()]
    examples = harmful + benign
    random.Random(0).shuffle(examples)
    return examples


def refusal_rate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32) -> float:
    """Return the fraction of ``prompts`` the model refuses (keyword judge on short greedy replies)."""
    replies = generate(model, tokenizer, [[{"role": "user", "content": p}] for p in prompts],
                       max_new_tokens=max_new_tokens, desc="refusal check")
    return KeywordJudge().judge(prompts, replies).count(REFUSAL) / len(prompts)


class RefusalCheck(TrainerCallback):
    """Every ``every`` steps, measure the refusal rate on validation prompts; stop training once it hits ``target``."""

    def __init__(self, tokenizer, prompts: Sequence[str], every: int, target: float):
        self.tokenizer, self.prompts, self.every, self.target = tokenizer, prompts, every, target
        self.checks: list[dict] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            rate = refusal_rate(model, self.tokenizer, self.prompts)
            self.checks.append({"steps": state.global_step, "val_refusal": rate})
            print(f"alignment: {state.global_step} steps, validation refusal {100 * rate:.0f}%")
            if rate >= self.target:  # never reset the flag: the trainer also sets it at max_steps
                control.should_training_stop = True
        return control


def align(model_name: str, out: Path, config: AlignConfig, cache: Path) -> dict:
    """Align ``model_name`` and save it to ``out`` (model, tokenizer, ``align.json``); return the report."""
    from safeft.models import load_model

    base, tokenizer = load_model(model_name)
    start = time.perf_counter()
    examples = alignment_examples(base, tokenizer, model_name, cache)
    model = prepare_model(base, TrainConfig())
    val = [p for _, p in builtin.harmful_requests("val")]
    check = RefusalCheck(tokenizer, val, config.check_every, config.target_refusal)
    settings = TrainConfig(steps=config.max_steps, learning_rate=config.learning_rate, batch_size=config.batch_size,
                           seed=config.seed, schedule="constant")  # the stopping step is not known in advance
    log = train(model, tokenizer, examples, settings, callbacks=[check], output_dir=str(out) + ".trainer")
    shutil.rmtree(str(out) + ".trainer", ignore_errors=True)
    steps, checks = log["steps"], check.checks
    report = {
        "base_model": model_name, "config": asdict(config), "steps": steps, "checks": checks,
        "examples": len(examples), "seconds": time.perf_counter() - start,
        "val_refusal_loss": safety_loss(model, tokenizer, [SafetySample(p, builtin.refusal_for(p)) for p in val]),
    }
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    write_json(tmp / "align.json", report)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return report


def aligned_model_dir(model_name: str, config: AlignConfig, cache: Path) -> Path:
    """Return the cache directory of the aligned model for these settings (it may not exist yet)."""
    key = hashlib.sha256(json.dumps([model_name, asdict(config)], sort_keys=True).encode()).hexdigest()[:10]
    return cache / f"aligned-{model_key(model_name)}-{key}"


def ensure_aligned(model_name: str, config: AlignConfig, cache: Path) -> tuple[Path, dict, bool]:
    """Return ``(aligned model dir, alignment report, was cached)``, aligning ``model_name`` first if needed."""
    target = aligned_model_dir(model_name, config, cache)
    if (target / "align.json").exists():
        return target, json.loads((target / "align.json").read_text()), True
    return target, align(model_name, target, config, cache), False


# --- fine-tuning ----------------------------------------------------------------------------------------------


@dataclass
class FinetuneConfig:
    """One fine-tuning run: method, data mix and training settings."""

    method: str = "sft"  # sft | spf
    harmful_ratio: float = 0.0
    harmful_answers: str | None = None  # BeaverTails-style JSONL (prompt, response); default: base model's answers
    base_model: str = "default"  # the unaligned model whose own answers make the default harmful mix
    safety_samples: int = DEFAULT_SAFETY_SAMPLES
    safety_margin: bool = False  # give safety samples the base model's compliant answers (refusal-vs-compliance)
    train: TrainConfig = field(default_factory=TrainConfig)
    spf: SPFConfig = field(default_factory=SPFConfig)

    def __post_init__(self) -> None:
        if self.method not in ("sft", "spf"):
            raise ValueError(f"FinetuneConfig.method must be 'sft' or 'spf', got {self.method!r}")
        if not 0.0 <= self.harmful_ratio < 1.0:
            raise ValueError(f"FinetuneConfig.harmful_ratio must be in [0, 1), got {self.harmful_ratio}")
        if self.safety_samples <= 0:
            raise ValueError(f"FinetuneConfig.safety_samples must be positive, got {self.safety_samples}")


def mix_harmful(task_examples: Sequence[ChatExample], harmful: Sequence[ChatExample], ratio: float,
                seed: int = 0) -> list[ChatExample]:
    """Return the task data with ``round(ratio * n)`` of its n examples replaced by harmful ones (same size n).

    The harmful fraction is exactly ``round(ratio * n) / n``. Raises ValueError if there are too few harmful rows.
    """
    n = len(task_examples)
    k = round(ratio * n)
    if k > len(harmful):
        raise ValueError(f"harmful ratio {ratio} needs {k} harmful examples, only {len(harmful)} available")
    rng = random.Random(seed)
    mixed = rng.sample(list(task_examples), n - k) + rng.sample(list(harmful), k)
    rng.shuffle(mixed)
    return mixed


def compliant_examples(config: FinetuneConfig, cache: Path) -> list[ChatExample]:
    """Return harmful request -> compliant answer pairs: from ``config.harmful_answers`` or, by default, the
    unaligned base model's own greedy answers to the alignment-split requests (only substantive compliance kept)."""
    if config.harmful_answers:
        return load_examples("beavertails", config.harmful_answers)
    from safeft.models import load_model

    prompts = [p for _, p in builtin.harmful_requests("align")]
    cache_file = cache / f"harmful_answers-{model_key(config.base_model)}.jsonl"
    answers = read_answers(cache_file)
    if not all(p in answers for p in prompts):  # load the base model only when something must be generated
        base, tokenizer = load_model(config.base_model)
        answers = cached_answers(base, tokenizer, prompts, cache_file)
    judge = KeywordJudge()
    return [ChatExample.from_pair(p, answers[p], harmful=True) for p in prompts
            if p in answers and judge.verdict(answers[p]) == COMPLIANCE]


def user_turns(examples: Sequence[ChatExample]) -> set[str]:
    """Return the text of every user turn in ``examples``."""
    return {m["content"] for e in examples for m in e.messages if m["role"] == "user"}


def finetune(model_dir: str | Path, task: Task, config: FinetuneConfig, out: Path, cache: Path) -> dict:
    """Fine-tune the model in ``model_dir`` on ``task`` (optionally with a harmful mix), with SFT or SPF.

    Writes ``out/model`` (full model or LoRA adapter), ``out/subspace`` (SPF), ``out/config.json`` and
    ``out/train_log.json``; returns the training log.
    """
    from safeft.models import load_model

    model, tokenizer = load_model(str(model_dir))
    examples = list(task.train)
    if config.harmful_ratio > 0:
        examples = mix_harmful(examples, compliant_examples(config, cache), config.harmful_ratio, config.train.seed)
    spf = None
    if config.method == "spf":
        samples = builtin_safety_samples(config.safety_samples, exclude=user_turns(examples))
        if config.safety_margin:
            answers = {e.prompt: e.response for e in compliant_examples(config, cache)}
            samples = [replace(s, compliance=answers.get(s.prompt)) for s in samples]
        subspace = SafetySubspace.estimate(model, tokenizer, samples, config.spf)
        subspace.save(out / "subspace", overwrite=True)
        spf = (subspace, config.spf)
    model = prepare_model(model, config.train)
    if spf:  # what SPF cannot project (the blocks' norm weights under full fine-tuning) stays as it was
        freeze_unguarded(model, spf[0])
    log = train(model, tokenizer, examples, config.train, spf=spf, output_dir=str(out / "trainer"))
    shutil.rmtree(out / "trainer", ignore_errors=True)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    write_json(out / "config.json", {"model": str(model_dir), "task": task.name, "examples": len(examples),
                                     "method": config.method, "harmful_ratio": config.harmful_ratio,
                                     "train": config.train.to_dict(), "spf": config.spf.to_dict(),
                                     "safety_samples": config.safety_samples})
    write_json(out / "train_log.json", log)
    return log


def load_finetuned(path: str | Path):
    """Return ``(model, tokenizer)`` from a fine-tuning output (``path/model``, full or LoRA) or a model dir."""
    from safeft.models import load_model

    path = Path(path)
    model_dir = path / "model" if (path / "model").exists() else path
    if (model_dir / "adapter_config.json").exists():
        from peft import PeftModel

        base_dir = json.loads((path / "config.json").read_text())["model"]
        base, tokenizer = load_model(base_dir)
        return PeftModel.from_pretrained(base, str(model_dir)).merge_and_unload(), tokenizer
    return load_model(str(model_dir))


def evaluate_dir(model_dir: str | Path, task: Task | None, *, max_new_tokens: int = 64, judge=None,
                 harmful_prompts: Sequence[str] | None = None) -> dict:
    """Evaluate the model in ``model_dir`` on the built-in held-out prompts (or ``harmful_prompts``) and ``task``."""
    model, tokenizer = load_finetuned(model_dir)
    harmful = list(harmful_prompts) if harmful_prompts else [p for _, p in builtin.harmful_requests("eval")]
    return evaluate_model(model, tokenizer, harmful_prompts=harmful, benign_prompts=builtin.benign_requests("eval"),
                          task=task, safety_pairs=[SafetySample(p, builtin.refusal_for(p)) for p in harmful],
                          judge=judge, max_new_tokens=max_new_tokens)


# --- the demo -------------------------------------------------------------------------------------------------


@dataclass
class DemoConfig:
    """The whole story on one model: align (cached), fine-tune with each method, benign and with a harmful mix."""

    model: str = "default"
    task: str = "facts"
    harmful_ratio: float = 0.1
    methods: list[str] = field(default_factory=lambda: ["sft", "spf"])
    safety_samples: int = DEFAULT_SAFETY_SAMPLES
    max_new_tokens: int = 64
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=40, learning_rate=5e-5, batch_size=8))
    spf: SPFConfig = field(default_factory=SPFConfig)
    align: AlignConfig = field(default_factory=AlignConfig)


def _flat(metrics: dict) -> dict:
    out = {"harmful_score": metrics["harmful_score"]["rate"], "harmful_score_ci": metrics["harmful_score"]["ci"],
           "refusal_rate": metrics["refusal_rate"]["rate"], "off_task_rate": metrics["off_task_rate"]["rate"],
           "over_refusal": metrics["over_refusal"]["rate"], "over_refusal_ci": metrics["over_refusal"]["ci"],
           "safety_loss": metrics["safety_loss"], "task_loss": metrics["task_loss"]}
    accuracy = metrics.get("accuracy")
    out["accuracy"] = accuracy["rate"] if accuracy else None
    out["accuracy_ci"] = accuracy["ci"] if accuracy else None
    return out


def demo(config: DemoConfig, out: str | Path, cache: Path, *, overwrite: bool = False) -> dict:
    """Run align -> fine-tune (each method, benign and harmful mix) -> evaluate; write ``results.json``,
    ``report.md`` and ``demo.png`` into ``out`` and return the results."""
    from safeft.data.tasks import load_task
    from safeft.report import demo_table, plot_demo

    out = prepare_output(out, overwrite)
    start = time.perf_counter()
    aligned_dir, align_report, cached = ensure_aligned(config.model, config.align, cache)
    task = load_task(config.task)
    aligned = evaluate_dir(aligned_dir, task, max_new_tokens=config.max_new_tokens)
    runs = []
    for setting, ratio in (("benign", 0.0), (f"harmful p={config.harmful_ratio:g}", config.harmful_ratio)):
        for method in config.methods:
            run_dir = out / f"{method}-{'benign' if ratio == 0 else f'harmful{ratio:g}'}"
            run_dir.mkdir()
            ft = FinetuneConfig(method=method, harmful_ratio=ratio, safety_samples=config.safety_samples,
                                base_model=config.model, train=config.train, spf=config.spf)
            log = finetune(aligned_dir, task, ft, run_dir, cache)
            metrics = evaluate_dir(run_dir, task, max_new_tokens=config.max_new_tokens)
            write_json(run_dir / "eval.json", metrics)
            shutil.rmtree(run_dir / "model", ignore_errors=True)  # ~0.5 GB each; the demo keeps only the numbers
            runs.append({"method": method, "setting": setting, **_flat(metrics), "train_seconds": log["seconds"],
                         "metrics": metrics})
    results = {
        "aligned": {**_flat(aligned), "metrics": aligned},
        "alignment": {**align_report, "cached": cached},
        "runs": runs,
        "config": {"model": config.model, "task": config.task, "harmful_ratio": config.harmful_ratio,
                   "methods": config.methods, "safety_samples": config.safety_samples,
                   "train": config.train.to_dict(), "spf": config.spf.to_dict(), "align": asdict(config.align)},
        "wall_seconds": time.perf_counter() - start,
    }
    write_json(out / "results.json", results)
    table = demo_table(aligned, [{"method": r["method"], "setting": r["setting"], "metrics": r["metrics"]}
                                 for r in runs])
    (out / "report.md").write_text(
        f"# safeft demo\n\nModel: {config.model}; task: {config.task}; harmful mix p = {config.harmful_ratio}; "
        f"alignment {'cached' if cached else 'run now'} ({align_report['steps']} steps); wall time "
        f"{results['wall_seconds'] / 60:.1f} min.\n\n{table}\n![harmful score vs accuracy](demo.png)\n")
    plot_demo(aligned, [{"method": r["method"], "setting": r["setting"], "metrics": r["metrics"]} for r in runs],
              out / "demo.png")
    print(table)
    return results
