"""`safeft bench`: methods x settings x seeds on one aligned model, same data, budget and evaluation.

Layout of a bench directory::

    OUT/runs/aligned/<task>.json                    the aligned model's evaluation (the reference row)
    OUT/runs/<setting>/<method label>/seed<k>.json  one finished run: its config, metrics, sample responses, cost
    OUT/bench.json, bench.md, bench.png             the summary, built from the run files alone

Each run file is written atomically when its run ends, and a rerun skips every run whose file exists, so a grid
can be finished over several sittings (commit the run files as they land).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import signal
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from safeft.config import AlignConfig, Setting, TrainConfig, check_positive, check_types
from safeft.errors import UserError
from safeft.evaluate.stats import rate

RUN_FORMAT = "safeft.bench-run/1"
RATES = ("harmful_score", "refusal_rate", "off_task_rate", "over_refusal", "accuracy")
HEADLINE_KEYS = ("harmful_score", "harmful_score_ci", "accuracy", "accuracy_ci", "over_refusal", "over_refusal_ci",
                 "safety_loss", "task_loss")


@dataclass
class BenchConfig:
    """A grid of fine-tuning runs and where its results go.

    Args:
        out: the bench directory (run files and summary).
        model: the unaligned base model; it is aligned first (cached), and every run fine-tunes the aligned model.
        methods: registry names, ``"name key=value ..."`` strings or mappings ``{method, label, <options>}``. The
            key ``learning_rate`` gives that entry its own rate (chosen on validation: a method whose update is
            projected may need a larger one), used in every setting that does not fix its own.
        settings: threat settings (task, harmful ratio and answers, deep multiplier, LoRA rank).
        seeds: training seeds (data order, harmful mix, LoRA initialisation); every method runs every seed.
        train: the step budget and optimizer settings of every run (a setting's ``deep`` multiplies the steps;
            its ``lora_r`` and the seed are set per run).
        align: the alignment stage (flags and keys ``align_*``).
        max_new_tokens: tokens generated per answer at evaluation.
        judge: ``keyword`` or the path of a local classifier judge.
        keep_models: keep each run's model and method artefacts under ``OUT/models`` (large).
        title: the heading of ``bench.md``.
        cache: safeft's cache directory (default ``$SAFEFT_CACHE`` or ``~/.cache/safeft``).
        chat_template: a Jinja chat template file, for a base model whose tokenizer has none.
        jailbreaks: ``builtin`` or a template file: every run also reports its template jailbreak ASR.
        jailbreak_requests: how many of the harmful requests (spread evenly) the templates are applied to.
    """

    out: str = "runs/bench"
    model: str = "default"
    methods: list[str | dict] = field(default_factory=lambda: ["sft", "spf", "spf-random"])
    settings: list[Setting] = field(default_factory=lambda: [Setting(), Setting(harmful_ratio=0.1)])
    seeds: list[int] = field(default_factory=lambda: [0])
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=40))
    align: AlignConfig = field(default_factory=AlignConfig, metadata={"prefix": "align_"})
    max_new_tokens: int = 64
    judge: str = "keyword"
    keep_models: bool = False
    title: str = "safeft bench"
    cache: str | None = None
    chat_template: str | None = None
    jailbreaks: str | None = None
    jailbreak_requests: int = 20

    def __post_init__(self) -> None:
        check_types(self)
        check_positive(self, "jailbreak_requests")
        if not self.methods or not self.settings or not self.seeds:
            raise UserError("a bench needs at least one method, one setting and one seed")
        if self.train.lora_r or self.train.seed:
            raise UserError("set LoRA per setting (settings: lora_r) and seeds with `seeds`, not lora_r / seed")
        resolved = [_entry_and_rate(entry) for entry in self.methods]
        labels = [label for (label, _), _ in resolved]
        # resolved here, in the process that built the config: a run's process may lack a method registered at run
        # time (a plug-in, a test's), and it only needs the rate
        self._method_rates = {label: rate for (label, _), rate in resolved}
        names = [s.name for s in self.settings]
        for kind, values in (("method label", labels), ("setting name", names)):
            repeated = sorted({v for v in values if [slug(w) for w in values].count(slug(v)) > 1})
            if repeated:
                raise UserError(f"bench: {kind}s must be unique (also as file names), repeated: {repeated}")
        if self.max_new_tokens <= 0:
            raise UserError(f"max_new_tokens must be positive, got {self.max_new_tokens}")

    def method_entries(self) -> list:
        """Return ``[(label, Method)]`` for the configured methods (validated); an entry's own ``learning_rate`` is
        in its default label and in :meth:`method_rate`, not in the method's options."""
        return [_entry_and_rate(entry)[0] for entry in self.methods]

    def method_rate(self, label: str) -> float | None:
        """Return the learning rate the method entry labelled ``label`` asks for; None: the setting's or bench's."""
        return self._method_rates.get(label)

    def run_train_config(self, setting: Setting, seed: int, label: str | None = None) -> TrainConfig:
        """Return the training settings of one run: the budget times ``setting.deep``, its LoRA rank, the seed, and
        the learning rate of the setting, else of the method entry ``label``, else the bench's."""
        steps = max(1, round(self.train.steps * setting.deep)) if self.train.steps else 0
        rate = setting.learning_rate or (self.method_rate(label) if label else None) or self.train.learning_rate
        return replace(self.train, steps=steps, epochs=self.train.epochs * setting.deep, lora_r=setting.lora_r,
                       seed=seed, learning_rate=rate)


def _entry_and_rate(entry: str | dict) -> tuple[tuple, float | None]:
    """Return ``((label, Method), learning_rate or None)`` for one bench method entry (see ``BenchConfig.methods``)."""
    from safeft.config import parse_pairs
    from safeft.methods import method_entry

    if isinstance(entry, str):
        name, _, rest = entry.strip().partition(" ")
        options = parse_pairs(rest, f"method {name!r}")
        rate = options.pop("learning_rate", None)
        if rate is None:
            return method_entry(entry), None
        entry = {"method": name, "label": entry.strip(), **options}
    else:
        entry = dict(entry)
        rate = entry.pop("learning_rate", None)
        if rate is None:
            return method_entry(entry), None
    try:
        rate = float(rate)
    except (TypeError, ValueError):
        rate = math.nan
    if not (rate > 0 and math.isfinite(rate)):
        raise UserError(f"method entry {entry.get('label') or entry.get('method')!r}: learning_rate must be a finite "
                        f"number > 0, got {rate}")
    label, method = method_entry(entry)
    return (label if "label" in entry else f"{label} lr={rate:g}", method), rate


def slug(text: str) -> str:
    """Return ``text`` as a file-name-safe string."""
    return re.sub(r"[^A-Za-z0-9._=+-]+", "-", text.strip()).strip("-") or "run"


def _short_hash(value) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:8]


def own_validation_split(setting: Setting) -> str | None:
    """Return ``"<n> examples <hash>"`` naming a validation setting's test examples when its built-in task has a
    validation split of its own (facts), else None; run files and the aligned row record it, so that runs scored on
    an older split (facts held out 12 training countries until issue 35) are never mixed with today's."""
    from safeft.data.tasks import BUILTIN_TASKS

    if not setting.validation or setting.task not in BUILTIN_TASKS:
        return None
    rows = BUILTIN_TASKS[setting.task]().validation
    return f"{len(rows)} examples {_short_hash([e.prompt for e in rows])}" if rows else None


def run_path(out: Path, setting: Setting, label: str, seed: int) -> Path:
    """Return the run file of one (setting, method, seed)."""
    return out / "runs" / slug(setting.name) / slug(label) / f"seed{seed}.json"


def bench(config: BenchConfig, *, command: str | None = None) -> dict:
    """Run every (setting, seed, method) of the grid whose run file does not exist yet; return the summary.

    The aligned model is evaluated once per task (``runs/aligned/<task>.json``). Runs execute in order setting ->
    seed -> method, each in a fresh process (:func:`run_in_subprocess`) that writes its file when it ends; the
    summary is then rebuilt from the files.
    """
    from tqdm.auto import tqdm

    from safeft.io import check_not_input, locked
    from safeft.models import cache_dir
    from safeft.progress import progress
    from safeft.recipes.align import aligned_model_dir, ensure_aligned

    out = Path(config.out)
    check_not_input(out, [config.model, config.chat_template, config.jailbreaks,
                          *[p for s in config.settings for p in (s.task_train, s.task_test, s.harmful_answers)]])
    cache = Path(config.cache) if config.cache else cache_dir()
    entries = config.method_entries()
    plan = [(setting, seed, label, method) for setting in config.settings for seed in config.seeds
            for label, method in entries]
    todo = [p for p in plan if not _finished(config, out, *p)]
    print(f"bench: {len(plan)} runs, {len(plan) - len(todo)} already finished, {len(todo)} to run -> {out}")
    with locked(out):  # a second bench on the same directory would run the same grid twice
        for setting, method in {(s.name, json.dumps(m.alignment_key(), sort_keys=True)): (s, m)
                                for s, _, _, m in plan}.values():  # the aligned rows the summary reads
            row = aligned_row_path(config, aligned_model_dir(config.model, config.align, cache, method), setting, out)
            _check_scored_on_today(row, setting)
            if not _valid_row(row):  # missing, or damaged (said so): evaluated (again)
                aligned_dir, report, _ = ensure_aligned(config.model, config.align, cache, method,
                                                        chat_template=config.chat_template)
                _evaluate_aligned(config, aligned_dir, report, setting, row)
        for setting, seed, label, method in progress(todo, desc="bench runs"):
            aligned_dir, _, _ = ensure_aligned(config.model, config.align, cache, method,
                                               chat_template=config.chat_template)  # cached after the first
            path = run_path(out, setting, label, seed)
            run_in_subprocess(config, setting, seed, label, method, aligned_dir, cache, command, path)
            h = json.loads(path.read_text())["headline"]
            tqdm.write(f"{setting.name} seed {seed} | {label}: harmful score {h['harmful_score']:.1f}%, accuracy "
                       f"{'n/a' if h['accuracy'] is None else format(h['accuracy'], '.1f') + '%'}, safety loss "
                       f"{h['safety_loss']:.3f}")
    return summarize(out, config.title, command)


def run_identity(config: BenchConfig, setting: Setting, seed: int, method, label: str | None = None) -> dict:
    """Return what decides a run's numbers, as recorded in its run file (a finished run is reused only if equal);
    ``label`` is the method entry's (its own learning rate, if it has one)."""
    from safeft.recipes.evaluate import scored_requests

    train_config = config.run_train_config(setting, seed, label)
    train = {k: v for k, v in train_config.to_dict().items() if k != "save_every"}
    identity = {"setting": asdict(setting), "method": method.name, "method_options": method.options(train_config),
                "seed": seed, "model": config.model, "train": train, "judge": config.judge,
                "max_new_tokens": config.max_new_tokens, "scored_requests": scored_requests(split_of(setting))}
    if split := own_validation_split(setting):  # only then: the other run files stay valid
        identity["validation_split"] = split
    if config.jailbreaks:  # only then: run files written before jailbreaks existed stay valid
        identity["jailbreaks"] = {"templates": config.jailbreaks, "requests": config.jailbreak_requests}
    return identity


def _jailbreak_options(config: BenchConfig) -> dict:
    """Return the jailbreak keyword arguments of :func:`safeft.recipes.evaluate.evaluate` for this bench."""
    from safeft.evaluate.jailbreaks import templates_from

    if not config.jailbreaks:
        return {}
    return {"jailbreaks": templates_from(config.jailbreaks), "jailbreak_requests": config.jailbreak_requests}


def _finished(config: BenchConfig, out: Path, setting: Setting, seed: int, label: str, method) -> bool:
    """Return True if the run's file exists, validates and was made with the same settings; False (saying so) if it
    is damaged, so that the run is done again; raise if its settings differ."""
    path = run_path(out, setting, label, seed)
    if not path.exists():
        return False
    from safeft.io import fill_defaults

    try:
        record = read_run_file(path)
    except DamagedRunFile as error:
        print(f"bench: {error.path} is damaged ({error.problems}); running it again")
        return False
    if config.keep_models:
        from safeft.checkpoints import check_checkpoint

        model = kept_dir(out, setting, label, seed) / "model"
        problems = check_checkpoint(model) if model.is_dir() else ["it is missing"]
        if problems:
            print(f"bench: the kept model {model} is damaged ({'; '.join(problems)}); running it again")
            return False
    expected = run_identity(config, setting, seed, method, label)
    fill_defaults(record, expected, {"setting": Setting(), "train": TrainConfig(), "method_options": method.Config()})
    record["scored_requests"] = _scored_requests_of(record, expected["scored_requests"])
    differ = sorted(k for k, v in expected.items() if json.loads(json.dumps(v)) != record.get(k))
    if differ:
        raise UserError(f"{path} holds a finished run made with other settings ({', '.join(differ)} differ); "
                         "give this grid another --out, or delete that file to rerun it")
    return True


class DamagedRunFile(UserError):
    """A bench run file that is not valid JSON or not a run record (cut short, edited by hand)."""

    def __init__(self, path: Path, problems: str):
        self.path, self.problems = path, problems
        super().__init__(f"{path} is not a valid bench run file ({problems}); rerun the bench (it runs a damaged "
                         "run again) or delete that file")


def _is_number(value, optional: bool = True) -> bool:
    return (value is None and optional) or (isinstance(value, (int, float)) and not isinstance(value, bool))


def run_file_problems(record) -> list[str]:
    """Return what keeps ``record`` (a parsed run file) from being a bench run or aligned-model record: the format,
    the kind, and the fields the summary reads, with their types."""
    if not isinstance(record, dict):
        return ["not a JSON object"]
    if record.get("format") != RUN_FORMAT:
        return [f"format {record.get('format')!r}, not {RUN_FORMAT!r}"]
    kind = record.get("kind")
    if kind not in ("run", "aligned"):
        return [f"kind {kind!r}, not 'run' or 'aligned'"]
    problems = []
    fields = {"run": {"label": str, "method": str, "seed": int, "setting": dict, "train": dict, "cost": dict,
                      "method_options": dict},
              "aligned": {"task": str, "aligned_model": str}}[kind]
    for key, kind_of in {"headline": dict, "metrics": dict, **fields}.items():
        value = record.get(key)
        if not isinstance(value, kind_of) or isinstance(value, bool):
            problems.append(f"{key} is {type(value).__name__}, not {kind_of.__name__}")
    headline, metrics = record.get("headline"), record.get("metrics")
    if isinstance(headline, dict):
        for key in HEADLINE_KEYS:
            value = headline.get(key)
            ok = (value is None or (isinstance(value, list) and len(value) == 2 and all(map(_is_number, value)))
                  if key.endswith("_ci") else _is_number(value, optional=key != "harmful_score"))
            if not ok:
                problems.append(f"headline.{key} is {value!r}")
    if isinstance(metrics, dict):
        for key in RATES:
            value = metrics.get(key)
            if value is not None and not (isinstance(value, dict) and all(_is_number(value.get(f), False)
                                                                        for f in ("k", "n", "rate"))):
                problems.append(f"metrics.{key} is {value!r}"[:120])
    if isinstance(record.get("setting"), dict) and not isinstance(record["setting"].get("name"), str):
        problems.append("setting.name is missing")
    return problems


def read_run_file(path: str | Path) -> dict:
    """Return the record in the run file ``path``; raise :class:`DamagedRunFile` (naming it) if it is not valid JSON
    or does not validate (:func:`run_file_problems`)."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise DamagedRunFile(path, f"not valid JSON: {error}") from None
    problems = run_file_problems(record)
    if problems:
        raise DamagedRunFile(path, "; ".join(problems))
    return record


def kept_dir(out: Path, setting: Setting, label: str, seed: int) -> Path:
    """Return the folder where a run works and, with ``keep_models``, keeps its model (``model/``) and artefacts."""
    return out / "models" / f"{slug(setting.name)}--{slug(label)}--seed{seed}"


def run_in_subprocess(config: BenchConfig, setting: Setting, seed: int, label: str, method, aligned_dir: Path,
                      cache: Path, command: str | None, path: Path) -> None:
    """Run one (setting, seed, method) in a fresh process that writes its run file ``path`` when it ends.

    A process per run isolates the runs (nothing one leaves in memory or in global state reaches the next) and
    makes its peak memory its own. Raises ``ValueError`` if the run stopped on bad input (its message is printed
    above) and ``RuntimeError`` if it failed otherwise (its traceback is printed above).
    """
    import multiprocessing

    process = multiprocessing.get_context("spawn").Process(
        target=_run_and_write, args=(config, setting, seed, label, method, aligned_dir, cache, command, path),
        name=f"safeft-bench {setting.name} {label} seed {seed}")
    process.start()
    previous = _stop_on_sigterm()
    try:
        process.join()
    finally:
        if process.is_alive():  # the parent was interrupted: stop the run too, so it writes nothing
            process.terminate()
            process.join()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if process.exitcode == _BAD_INPUT:
        raise UserError(f"bench run {setting.name} / {label} / seed {seed} stopped on bad input (the error above); "
                         "fix it and rerun the bench: finished runs are kept")
    if process.exitcode != 0 or not path.exists():
        raise RuntimeError(f"bench run {setting.name} / {label} / seed {seed} failed (exit code {process.exitcode}); "
                           "its error is printed above. Finished runs are kept: rerun the bench to continue.")


def _stop_on_sigterm():
    """Make SIGTERM (``kill PID``) raise KeyboardInterrupt in the main thread, so that an interrupted bench stops
    its run's process instead of leaving it orphaned (still computing, then writing its run file); return the
    previous handler (None off the main thread, where handlers cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    return signal.signal(signal.SIGTERM, interrupt)


_BAD_INPUT = 2  # a run's exit code when it stopped on one of the user errors the CLI reports without a traceback


def _run_and_write(config, setting, seed, label, method, aligned_dir, cache, command, path) -> None:
    from safeft.errors import USER_ERRORS
    from safeft.io import write_json

    try:
        record = run_one(config, setting, seed, label, method, aligned_dir, cache, command)
    except USER_ERRORS as error:
        print(f"Error: {error}", file=sys.stderr, flush=True)
        sys.exit(_BAD_INPUT)
    write_json(path, record)


def _evaluate_aligned(config: BenchConfig, aligned_dir: Path, report: dict | None, setting: Setting,
                      path: Path) -> None:
    """Evaluate the aligned model on the setting's task (the reference row) and write it to ``path``."""
    from safeft.evaluate.judges import load_judge
    from safeft.io import write_json
    from safeft.recipes.evaluate import evaluate_dir, headline, scored_requests
    from safeft.recipes.finetune import task_of

    metrics = evaluate_dir(aligned_dir, task_of(setting), max_new_tokens=config.max_new_tokens,
                           judge=load_judge(config.judge), split=split_of(setting),
                           **_jailbreak_options(config))
    split = own_validation_split(setting)
    own_split = {"validation_split": split} if split else {}
    write_json(path, {"format": RUN_FORMAT, "kind": "aligned", "task": setting.task, "split": split_of(setting),
                      **own_split, "scored_requests": scored_requests(split_of(setting)), "model": config.model,
                      "aligned_model": str(aligned_dir), "alignment": report, "metrics": metrics,
                      "headline": headline(metrics)})


def aligned_row_path(config: BenchConfig, aligned_dir: Path, setting: Setting, out: Path) -> Path:
    """Return the run file of the aligned model's row for ``setting`` (one per task, test data and jailbreaks)."""
    data = (setting.task_train, setting.task_test, setting.max_train, setting.max_test)  # these pick the test set
    task = slug(setting.task) if data == (None,) * 4 else f"{slug(setting.task)}-{_short_hash(data)}"
    task = f"val-{task}" if setting.validation else task
    if split := own_validation_split(setting):
        task += f"-{split.split()[-1]}"  # the split's hash
    if config.jailbreaks:
        task += f"-jailbreaks-{_short_hash([config.jailbreaks, config.jailbreak_requests])}"
    return out / "runs" / "aligned" / f"{task}-{slug(aligned_dir.name)}.json"


def _scored_requests_of(record: dict, today: dict) -> dict | None:
    """Return the built-in requests a run file or aligned row was scored on: its ``scored_requests``; for a file
    written before they were named, ``today`` when its metrics' counts are today's (the splits have only ever
    changed in size: 40 to 200 benign evaluation requests, 40 to 160 harmful validation ones), else None."""
    if "scored_requests" in record:
        return record["scored_requests"]
    return today if _counts(record) == (today["harmful"], today["benign"]) else None


def _counts(record: dict) -> tuple:
    """Return ``(harmful, benign)``: the requests a run file's or aligned row's metrics counted."""
    metrics = record.get("metrics", {})
    return (metrics.get("harmful_score") or {}).get("n"), (metrics.get("over_refusal") or {}).get("n")


def _check_scored_on_today(row: Path, setting: Setting) -> None:
    """Raise if the aligned model's row ``row`` exists and was scored on other built-in requests than the
    setting's split holds today (it is every run's reference: runs scored on other requests are never mixed)."""
    from safeft.recipes.evaluate import scored_requests

    try:
        record = read_run_file(row) if row.exists() else None
    except DamagedRunFile:
        return  # evaluated again by the caller
    today = scored_requests(split_of(setting))
    if record is None or _scored_requests_of(record, today) == today:
        return
    harmful, benign = _counts(record)
    raise UserError(f"{row}: the aligned model's row was scored on other requests ({harmful} harmful, {benign} "
                     f"benign) than today's {split_of(setting)!r} split ({today['harmful']} and {today['benign']}, "
                     f"hash {today['hash']}); give this grid another --out, or delete that file and the runs beside "
                     "it to rerun them")


def _valid_row(path: Path) -> bool:
    """Return True if the aligned model's row ``path`` exists and validates; a damaged one is reported and counts
    as missing."""
    if not path.exists():
        return False
    try:
        read_run_file(path)
        return True
    except DamagedRunFile as error:
        print(f"bench: {error.path} is damaged ({error.problems}); evaluating the aligned model again")
        return False


def split_of(setting: Setting) -> str:
    """Return the split of built-in requests a setting is scored on: ``"val"`` for a validation setting (where
    hyper-parameters are chosen), else ``"eval"``."""
    return "val" if setting.validation else "eval"


def run_one(config: BenchConfig, setting: Setting, seed: int, label: str, method, aligned_dir: Path, cache: Path,
            command: str | None) -> dict:
    """Fine-tune the aligned model with ``method`` in ``setting`` and evaluate it; return the run's record."""
    import shutil

    from safeft import __version__
    from safeft.evaluate.judges import load_judge
    from safeft.recipes.evaluate import evaluate, headline
    from safeft.recipes.finetune import finetune, task_of

    train_config = config.run_train_config(setting, seed, label)
    data = replace(setting.data(), base_model=setting.base_model or config.model)
    scratch = kept_dir(Path(config.out), setting, label, seed)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    start = time.perf_counter()
    model, tokenizer, log = finetune(aligned_dir, data, method, train_config, scratch, cache,
                                     save_model=config.keep_models)
    metrics = evaluate(model, tokenizer, task_of(setting), max_new_tokens=config.max_new_tokens,
                       judge=load_judge(config.judge), split=split_of(setting),
                       **_jailbreak_options(config))
    if not config.keep_models:  # ~0.5 GB of weights (and SPF's subspace) per run: the bench keeps the numbers
        shutil.rmtree(scratch, ignore_errors=True)
        with contextlib.suppress(OSError):
            scratch.parent.rmdir()  # the models folder, once no run keeps anything there
    monitor = [e for e in log["log_history"] if any(k.startswith("spf/") for k in e)]
    return {
        "format": RUN_FORMAT, "kind": "run", "label": label, **run_identity(config, setting, seed, method, label),
        "aligned_model": str(aligned_dir), "headline": headline(metrics), "metrics": metrics,
        "cost": {"train_seconds": log["seconds"], "prepare_seconds": log["prepare_seconds"], "steps": log["steps"],
                 "step_seconds_median": log["step_seconds_median"], "peak_memory_mb": log["peak_memory_mb"],
                 **machine_info()},
        "monitor_last": monitor[-1] if monitor else None, "method_facts": log.get("method_facts", {}),
        "wall_seconds": time.perf_counter() - start, "safeft_version": __version__, "command": command,
    }


# --- the summary: built from the run files alone ---------------------------------------------------------------


def read_runs(out: str | Path) -> tuple[list[dict], list[dict]]:
    """Return ``(aligned records, run records)`` from the run files under ``out/runs`` (sorted by path).

    Raises:
        DamagedRunFile: for a run file that is not valid JSON or does not validate (never counted), naming it.
    """
    aligned, runs = [], []
    for path in sorted(Path(out, "runs").rglob("*.json")):
        record = read_run_file(path)
        (aligned if record["kind"] == "aligned" else runs).append(record)
    return aligned, runs


def machine_name() -> str:
    """Return what a run's steps ran on: the CUDA device's name, else the CPU's model and core count."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "CPU"
    return f"{cpu} x{os.cpu_count()}"


def machine_info() -> dict:
    """Return what a run's cost was measured on: ``machine`` (:func:`machine_name`), ``torch`` (its version) and
    ``threads`` (torch's intra-op threads); ratios between runs are only taken where all three agree."""
    import torch

    return {"machine": machine_name(), "torch": torch.__version__, "threads": torch.get_num_threads()}


def run_ratio_to_sft(runs: list[dict], run: dict, key: str) -> float | None:
    """Return the run's ``cost[key]`` / SFT's in the same setting and seed, or None where there is no such SFT run
    or it ran on another machine (a grid finished over several sittings)."""
    reference = next((r["cost"] for r in runs if r["method"] == "sft" and r["seed"] == run["seed"]
                      and r["setting"]["name"] == run["setting"]["name"]), None)
    if reference is None or any(reference.get(k) != run["cost"].get(k) for k in ("machine", "torch", "threads")):
        return None
    return run["cost"][key] / reference[key] if reference[key] and run["cost"][key] else None


def _ratio_to_sft(runs: list[dict], key: str) -> dict[tuple[str, str], float | None]:
    """Return, per (setting, label), the median over seeds of :func:`run_ratio_to_sft`; a (setting, label) without
    any SFT run to compare with is absent."""
    ratios: dict[tuple[str, str], list[float]] = {}
    for r in runs:
        ratio = run_ratio_to_sft(runs, r, key)
        if ratio is not None:
            ratios.setdefault((r["setting"]["name"], r["label"]), []).append(ratio)
    return {k: statistics.median(v) for k, v in ratios.items()}


def _check_one_recipe(setting: str, label: str, group: list[dict]) -> None:
    """Raise ``ValueError`` if the seeds about to be pooled were trained or judged differently (a run file left by an
    earlier grid with other options in the same directory); fields one record lacks are not compared."""
    first = group[0]
    for run in group[1:]:
        differ = []
        for key in ("model", "judge", "max_new_tokens", "train", "method_options"):
            a, b = first.get(key), run.get(key)
            if isinstance(a, dict) and isinstance(b, dict):
                differ += [f"{key}.{k}" for k in sorted(a.keys() & b.keys()) if k != "seed" and a[k] != b[k]]
            elif a is not None and b is not None and a != b:
                differ.append(key)
        if differ:
            raise UserError(f"{setting}/{label}: seeds {first['seed']} and {run['seed']} were made with different "
                             f"{', '.join(differ)}, so they cannot be pooled; give each grid its own out directory "
                             "or delete the stale run files")


def pooled(runs: list[dict]) -> list[dict]:
    """Return one row per (setting, method label): counts pooled over seeds (rates with Wilson intervals), mean
    losses, and step time / peak memory as ratios to SFT in the same bench. Rows are ordered by setting name, then
    SFT first and the other labels alphabetically."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in sorted(runs, key=lambda r: (r["setting"]["name"], r["method"] != "sft", r["label"], r["seed"])):
        groups.setdefault((r["setting"]["name"], r["label"]), []).append(r)
    step_ratio, memory_ratio = _ratio_to_sft(runs, "step_seconds_median"), _ratio_to_sft(runs, "peak_memory_mb")
    rows = []
    for (setting, label), group in groups.items():
        _check_one_recipe(setting, label, group)
        row = {"setting": setting, "task": group[0]["setting"]["task"], "label": label, "method": group[0]["method"],
               "seeds": sorted(r["seed"] for r in group)}
        for key in RATES:
            entries = [r["metrics"][key] for r in group if r["metrics"].get(key)]
            row[key] = rate(sum(e["k"] for e in entries), sum(e["n"] for e in entries)) if entries else None
        jailbreaks = [r["metrics"]["jailbreaks"]["overall"] for r in group if r["metrics"].get("jailbreaks")]
        row["jailbreak_asr"] = rate(sum(e["k"] for e in jailbreaks), sum(e["n"] for e in jailbreaks)) \
            if jailbreaks else None
        for key in ("safety_loss", "task_loss"):
            values = [r["metrics"][key] for r in group if r["metrics"].get(key) is not None]
            row[key] = statistics.mean(values) if values else None
        steps = [r["cost"]["step_seconds_median"] for r in group if r["cost"]["step_seconds_median"]]
        row["step_seconds_median"] = statistics.median(steps) if steps else None
        row["step_time_vs_sft"] = step_ratio.get((setting, label))
        row["peak_memory_vs_sft"] = memory_ratio.get((setting, label))
        row["per_seed_harmful_score"] = {r["seed"]: r["metrics"]["harmful_score"]["rate"] for r in group}
        rows.append(row)
    return rows


def summarize(out: str | Path, title: str = "safeft bench", command: str | None = None) -> dict:
    """Build ``bench.json`` (with a ``runs`` list), ``bench.md`` and ``bench.png`` in ``out`` from its run files
    alone, and return the summary."""
    from safeft.io import write_json
    from safeft.report import aligned_labels, bench_markdown, plot_tradeoff
    from safeft.rules import RULES, decide

    out = Path(out)
    aligned, runs = read_runs(out)
    rows = pooled(runs)
    summary = {
        "title": title, "command": command,
        "aligned": [{"label": name, "task": a["task"], "aligned_model": a["aligned_model"],
                     "alignment_method": (a.get("alignment") or {}).get("method"), **a["headline"],
                     "metrics": {k: a["metrics"][k] for k in RATES + ("safety_loss", "task_loss")}}
                    for a, name in zip(aligned, aligned_labels(aligned))],
        "rows": rows,
        "verdicts": {rule: decide(runs, aligned, rule) for rule in RULES},
        "runs": [{"setting": r["setting"]["name"], "task": r["setting"]["task"], "method": r["method"],
                  "label": r["label"], "seed": r["seed"], **{k: r["headline"][k] for k in HEADLINE_KEYS},
                  "jailbreak_asr": r["headline"].get("jailbreak_asr"),
                  "step_time_ratio": run_ratio_to_sft(runs, r, "step_seconds_median"),
                  "peak_memory_ratio": run_ratio_to_sft(runs, r, "peak_memory_mb"),
                  **{k: r[k] for k in ("method_options", "train", "headline", "cost", "judge")},
                  "setting_config": r["setting"]} for r in runs],
    }
    write_json(out / "bench.json", summary)
    (out / "bench.md").write_text(bench_markdown(summary, aligned, runs))
    if rows:
        plot_tradeoff(aligned, rows, out / "bench.png")
    return summary
