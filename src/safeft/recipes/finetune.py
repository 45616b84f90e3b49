"""Fine-tune an aligned model with any registered method, on a task and a threat setting; load the result back."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from safeft.answers import compliant_examples
from safeft.config import DataConfig, TrainConfig
from safeft.data.examples import ChatExample
from safeft.data.mixing import mix_harmful, user_turns
from safeft.data.tasks import Task, load_task
from safeft.distributed import barrier, is_main_process, world_size
from safeft.errors import UserError
from safeft.io import fill_defaults, write_json
from safeft.methods import Method, RunContext
from safeft.models import dir_fingerprint


def task_of(data: DataConfig) -> Task:
    """Return the task named by ``data`` (built-in, or read from its files)."""
    return load_task(data.task, data.task_train, data.task_test, max_train=data.max_train, max_test=data.max_test,
                     validation=data.validation)


def harmful_source(data: DataConfig, model_dir: str | Path) -> str:
    """Return the model whose substantive answers make a harmful mix without ``harmful_answers``: ``base_model`` if
    given, else the unaligned model ``model_dir`` was aligned from by ``safeft align`` (its ``align.json``), else the
    model being fine-tuned itself; never a model fetched for the purpose."""
    if data.base_model:
        return data.base_model
    record = Path(model_dir) / "align.json"
    if record.exists():
        return json.loads(record.read_text()).get("base_model") or str(model_dir)
    return str(model_dir)


def training_examples(task: Task, data: DataConfig, seed: int, cache: Path, model_dir: str | Path = "default"
                      ) -> list[ChatExample]:
    """Return the task's training data with the setting's harmful share mixed in (seeded): rows of
    ``data.harmful_answers``, or the substantive answers of :func:`harmful_source` to the built-in requests.

    Raises:
        UserError: if there are too few harmful answers for the ratio, naming where they came from and the fix.
    """
    examples = list(task.train)
    if data.harmful_ratio > 0:
        source = harmful_source(data, model_dir)
        harmful = compliant_examples(source, data.harmful_answers, cache)
        needed = round(data.harmful_ratio * len(examples))
        if needed > len(harmful):
            where = data.harmful_answers or (f"{source}'s answers: it complied with {len(harmful)} of the built-in "
                                             "harmful requests (an aligned model refuses them)")
            raise UserError(f"the harmful mix needs {needed} harmful answers, {len(harmful)} available from "
                            f"{where}. Pass --harmful-answers FILE (JSONL with prompt and response, e.g. BeaverTails) "
                            "or --base-model PATH (an unaligned model that answers them)")
        examples = mix_harmful(examples, harmful, data.harmful_ratio, seed)
    return examples


def finetune(model_dir: str | Path, data: DataConfig, method: Method, train_config: TrainConfig, out: Path,
             cache: Path, *, save_model: bool = True, chat_template: str | None = None,
             resume: bool | str | Path = False):
    """Fine-tune the model in ``model_dir`` with ``method`` on the setting ``data``.

    Runs the method's hooks in order (training data, before training, callbacks, after training; see
    :mod:`safeft.methods.base`). Writes ``out/config.json``, ``out/train_log.json``, any artefact of the method
    (SPF: ``out/subspace``), the reporters' logs (``out/logs``, e.g. TensorBoard) and, with ``save_model``,
    ``out/model`` (full model or LoRA adapter).

    With ``resume``, ``out`` holds an interrupted run of the same settings (its ``config.json`` is compared) and
    training continues from its newest intact checkpoint in ``out/trainer`` (or from the checkpoint folder ``resume``
    names, as it is; see :func:`safeft.train.checkpoint_to_resume`).

    Returns:
        ``(model, tokenizer, log)``: the trained model in memory, its tokenizer, and the training log (with
        ``prepare_seconds``: the time the method's hooks took before training, e.g. SPF's estimation).
    """
    from safeft.models import load_model
    from safeft.train import prepare_model, train

    model, tokenizer = load_model(str(model_dir), chat_template=chat_template)  # checks the path first
    source = Path(model_dir)
    _check_alignment_stage(source, method)
    record = {"model": str(source.resolve()) if source.exists() else str(model_dir),
              "model_fingerprint": dir_fingerprint(source) if source.is_dir() else None, "method": method.name,
              "method_options": method.options(train_config), "data": asdict(data), "train": train_config.to_dict(),
              "global_batch_size": train_config.batch_size * train_config.gradient_accumulation * world_size()}
    main = is_main_process()  # launched as several processes, only the main one writes
    if resume:
        _check_resumable(out, record, method)
    elif main:
        write_json(out / "config.json", record)
    task = task_of(data)
    examples = training_examples(task, data, train_config.seed, cache, model_dir)
    run = RunContext(out=out, cache=cache, seed=train_config.seed, base_model=harmful_source(data, model_dir),
                     harmful_answers=data.harmful_answers, task_prompts=user_turns(examples), resume=bool(resume),
                     examples=tuple(examples))
    examples = method.training_data(examples, run)
    model = prepare_model(model, train_config)
    start = time.perf_counter()
    method.before_training(model, tokenizer, run)
    prepare_seconds = time.perf_counter() - start
    log = train(model, tokenizer, examples, train_config, callbacks=method.callbacks(model, tokenizer, run),
                loss=method.training_loss(model, tokenizer, run), output_dir=str(out / "trainer"), resume=resume)
    barrier()
    if main and (out / "trainer" / "runs").is_dir():  # reporter logs (TensorBoard): kept, the checkpoints are not
        shutil.move(out / "trainer" / "runs", out / "logs")
    if main:
        shutil.rmtree(out / "trainer", ignore_errors=True)
    model = method.after_training(model, tokenizer, run)
    log["prepare_seconds"] = prepare_seconds
    log["method_facts"] = method.facts(model)
    if main:
        if save_model:
            from safeft.checkpoints import write_manifest

            model.save_pretrained(out / "model")
            tokenizer.save_pretrained(out / "model")
            write_manifest(out / "model")  # last: a reader can tell a damaged model (safeft bench --keep-models)
        write_json(out / "config.json", {**record, "examples": len(examples)})
        write_json(out / "train_log.json", log)
    return model, tokenizer, log


def _check_alignment_stage(model_dir: Path, method: Method) -> None:
    """Warn when a method that acts at the alignment stage fine-tunes a model it did not align (that is plain SFT)."""
    import warnings

    if not method.alignment_key():
        return
    record = model_dir / "align.json"
    aligned_by = json.loads(record.read_text()).get("method", {}).get("name") if record.exists() else None
    if aligned_by != method.name:
        warnings.warn(f"{method.name} acts at the alignment stage, so fine-tuning with it is plain SFT; fine-tune a "
                      f"model aligned by `safeft align --method {method.name}` (safeft bench does this itself)",
                      stacklevel=3)


def _check_resumable(out: Path, record: dict, method: Method) -> None:
    """Raise unless ``out`` holds an interrupted run whose recorded settings equal ``record`` (an option the record
    lacks was added to safeft later, and had its default when the run started)."""
    if not (out / "config.json").exists():
        raise FileNotFoundError(f"nothing to resume in {out}: no config.json of an interrupted run")
    before = json.loads((out / "config.json").read_text())
    fill_defaults(before, record, {"method_options": method.Config(), "data": DataConfig(), "train": TrainConfig()})
    differ = sorted(k for k, v in json.loads(json.dumps(record)).items() if before.get(k) != v)
    if differ:
        raise UserError(f"the interrupted run in {out} was started with other settings ({', '.join(differ)} "
                         "differ); resume it with the same options, or start a new run without --resume")


def load_finetuned(path: str | Path, chat_template: str | None = None):
    """Return ``(model, tokenizer)`` from a fine-tuning output (``path/model``, full or LoRA, merged) or a model
    dir; ``chat_template``: a template file for a tokenizer without one."""
    from safeft.models import load_model

    path = Path(path)
    model_dir = path / "model" if (path / "model").exists() else path
    if (model_dir / "adapter_config.json").exists():
        from peft import PeftModel

        record = json.loads((path / "config.json").read_text())
        base_dir, recorded = record["model"], record.get("model_fingerprint")
        if recorded and Path(base_dir).is_dir() and dir_fingerprint(base_dir) != recorded:
            raise UserError(f"the LoRA adapter in {model_dir} was trained on the model at {base_dir}, but that "
                             f"directory now holds other weights (fingerprint {dir_fingerprint(base_dir)}, trained "
                             f"on {recorded}); merging it there would give a model nobody trained. Restore that "
                             "model, or fine-tune again")
        base, tokenizer = load_model(base_dir, chat_template=chat_template)
        if (model_dir / "tokenizer_config.json").exists():  # the tokenizer the run saved (its template included)
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
            if chat_template:
                tokenizer.chat_template = Path(chat_template).read_text()
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
        return PeftModel.from_pretrained(base, str(model_dir)).merge_and_unload(), tokenizer
    return load_model(str(model_dir), chat_template=chat_template)
