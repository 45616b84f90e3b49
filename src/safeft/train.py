"""Supervised fine-tuning with the transformers Trainer: the one training loop every method and recipe uses."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import TrainerCallback

from safeft.callbacks import CostMeter, FiniteCheck
from safeft.chat import encode_messages, truncate
from safeft.checkpoints import KEEP, ManifestCallback, disk_full, logger
from safeft.config import TrainConfig
from safeft.data.examples import ChatExample
from safeft.errors import UserError
from safeft.spf.targets import in_blocks

# A method's training objective: ``loss(model, inputs, task_loss, share) -> scalar tensor`` replaces the task loss
# on one micro-batch. ``task_loss()`` computes the usual loss on ``inputs`` (already scaled for gradient
# accumulation); ``share`` (1 / accumulation steps) is the part of the optimizer step this micro-batch carries, by
# which a term meant once per step (a penalty, an extra batch's mean loss) must be multiplied.
StepLoss = Callable[[torch.nn.Module, dict, Callable[[], torch.Tensor], float], torch.Tensor]


def prepare_model(model, config: TrainConfig):
    """Return the model set up for training: LoRA (``config.lora_r > 0``) on ``config.lora_targets`` (default:
    every linear layer of the blocks), or full fine-tuning of every parameter inside the blocks (embeddings, final
    norm and LM head frozen)."""
    if config.lora_r:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(config.seed)  # the adapter's initialisation is the run's seed's, whatever ran before
        targets = config.lora_targets or "all-linear"
        return get_peft_model(model, LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha or 2 * config.lora_r,
                                                lora_dropout=0.0, target_modules=targets,
                                                exclude_modules=None if config.lora_targets else ["lm_head"]))
    for name, p in model.named_parameters():
        p.requires_grad_(in_blocks(name))
    return model


def first_non_finite(model) -> str | None:
    """Return the name of the first parameter of ``model`` that holds NaN or inf, or None if all are finite."""
    return next((name for name, p in model.named_parameters() if not torch.isfinite(p).all()), None)


def encode_for_training(model, tokenizer, examples: Sequence[ChatExample], max_length: int) -> list:
    """Return the examples encoded for training, cut to ``max_length`` and to the model's position limit.

    Warns how many examples were cut, and skips (with a warning) examples left without an assistant token.
    Raises ``ValueError`` if no example keeps one: there would be nothing to train on.
    """
    import warnings

    from safeft.chat import IGNORE_INDEX

    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or max_length
    length = min(max_length, limit)
    full = [encode_messages(tokenizer, e.messages) for e in examples]
    cut = sum(len(e.input_ids) > length for e in full)
    encoded = [truncate(e, length) for e in full]
    kept = [e for e in encoded if any(label != IGNORE_INDEX for label in e.labels)]
    if not kept:
        raise UserError(f"no trainable tokens: none of the {len(examples)} examples has an assistant turn within "
                         f"the first {length} tokens. Give every example an assistant response, or raise "
                         "--max-length")
    if cut:
        why = f"--max-length {max_length}" if length == max_length else f"the model's position limit {limit}"
        warnings.warn(f"{cut} of {len(examples)} training examples are longer than {length} tokens and were cut "
                      f"to {why}", stacklevel=2)
    if len(kept) < len(encoded):
        warnings.warn(f"{len(encoded) - len(kept)} of {len(examples)} training examples have no assistant token "
                      f"within {length} tokens and are skipped", stacklevel=2)
    return kept


def last_checkpoint(output_dir: str | Path) -> Path | None:
    """Return the newest intact Trainer checkpoint in ``output_dir`` (one whose files match the manifest written last,
    see :mod:`safeft.checkpoints`), or None if there is no checkpoint; raises ``UserError`` if none is intact."""
    from safeft.checkpoints import resume_checkpoint

    return resume_checkpoint(output_dir, remove_damaged=False)


def checkpoint_to_resume(output_dir: str | Path, resume: bool | str | Path) -> Path | None:
    """Return the checkpoint a run resumes from: with ``resume=True`` the newest intact one in ``output_dir`` (damaged
    newer ones are removed, and the fallback is reported); with a path, that checkpoint as it is (unverified, copied
    into ``output_dir`` if it lies elsewhere; checkpoints after it are removed); None without ``resume``."""
    import shutil

    from safeft.checkpoints import check_checkpoint, checkpoint_folders, resume_checkpoint, step_of
    from safeft.distributed import is_main_process

    if not resume:
        return None
    if resume is True:
        checkpoint = resume_checkpoint(output_dir, remove_damaged=is_main_process())
        if checkpoint is None:
            raise FileNotFoundError(f"nothing to resume: no checkpoint in {output_dir} (was the run saving "
                                    "checkpoints? see --save-every)")
        return checkpoint
    given = Path(resume)
    if step_of(given) is None or not (given / "trainer_state.json").is_file():
        raise UserError(f"--resume-from {given} is not a Trainer checkpoint (a checkpoint-<step> folder with "
                        "trainer_state.json)")
    problems = check_checkpoint(given)
    if problems:
        logger.warning("resuming from %s as asked, although %s", given, "; ".join(problems))
    checkpoint = Path(output_dir) / given.name
    if is_main_process():
        for later in checkpoint_folders(output_dir):
            if step_of(later) > step_of(given):
                shutil.rmtree(later, ignore_errors=True)
        if checkpoint.resolve() != given.resolve():
            shutil.rmtree(checkpoint, ignore_errors=True)
            shutil.copytree(given, checkpoint)
    return checkpoint


def trainer_class(loss: StepLoss | None = None):
    """Return the ``SFTTrainer`` subclass every safeft run trains with: TRL's trainer, config, collator and dataset
    handling, with the task loss computed by the model itself (``Trainer.compute_loss``) instead of TRL's fused LM
    head, which cost 26% more per step on the default model on a CPU (forward and backward of one batch of 8,
    measured) and gives the same loss. With ``loss`` (a method's objective, :data:`StepLoss`) that objective replaces
    the task loss in training."""
    from transformers import Trainer
    from trl import SFTTrainer

    class SafeftTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if loss is None or return_outputs or not model.training:
                return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

            def task_loss():
                return Trainer.compute_loss(self, model, inputs, num_items_in_batch=num_items_in_batch)

            return loss(model, inputs, task_loss, 1.0 / self.current_gradient_accumulation_steps)

    return SafeftTrainer


def warmup_steps(config: TrainConfig, steps: int) -> int:
    """Return the learning-rate warm-up in optimizer steps: ``config.warmup_steps``, else ``warmup_ratio`` of the run's
    ``steps`` (rounded)."""
    return config.warmup_steps or round(config.warmup_ratio * steps)


def train(model, tokenizer, examples: Sequence[ChatExample], config: TrainConfig, *,
          output_dir: str = "/tmp/safeft-trainer", callbacks: Sequence[TrainerCallback] = (),
          loss: StepLoss | None = None, resume: bool | str | Path = False) -> dict:
    """Fine-tune ``model`` in place on ``examples`` (loss on assistant turns) with TRL's ``SFTTrainer`` and return the
    training log.

    The examples are encoded under the chat template (labels on the assistant turns) and handed to the trainer as a
    tokenized dataset (``input_ids``, ``labels``). ``callbacks`` (e.g. a method's
    :class:`~safeft.spf.SPFCallback`, an early stop) run ahead of the trainer's own callbacks and loggers, so metrics
    they add to a log entry reach every reporter. Checkpoints go to ``output_dir`` every ``config.save_every`` steps;
    each gets a manifest of its files, written last, and the last two are kept. With ``resume`` training continues from
    the newest intact one there (weights, optimizer, schedule, data position and the callbacks' own state; see
    :func:`checkpoint_to_resume`, which also takes a checkpoint's path), and ends where an uninterrupted run would
    have. ``loss`` (a method's objective, :data:`StepLoss`) replaces the task loss.

    Returns:
        ``{"log_history": [...], "seconds": float, "steps": int, "step_seconds_median": float,
        "peak_memory_mb": float | None}``.
    """
    from datasets import Dataset
    from trl import SFTConfig

    if not examples:
        raise UserError("no training examples: the data set is empty")
    encoded = encode_for_training(model, tokenizer, examples, config.max_length)
    per_step = config.batch_size * config.gradient_accumulation
    steps = config.steps or math.ceil(config.epochs * len(encoded) / per_step)
    args = SFTConfig(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate, weight_decay=config.weight_decay,
        warmup_steps=warmup_steps(config, steps), lr_scheduler_type=config.schedule,
        logging_steps=config.logging_steps or max(1, steps // 20), report_to=config.report_to,
        gradient_accumulation_steps=config.gradient_accumulation, bf16=config.bf16, gradient_checkpointing=False,
        save_strategy="steps" if config.save_every else "no", save_steps=config.save_every or 500,
        save_total_limit=KEEP,
        seed=config.seed, data_seed=config.seed, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
        max_grad_norm=1.0, max_length=None, dataset_num_proc=None,
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset = Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in encoded])
    trainer = trainer_class(loss)(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    meter = CostMeter()
    for callback in reversed([*callbacks, meter]):
        trainer.callback_handler.callbacks.insert(0, callback)
    trainer.callback_handler.callbacks.append(FiniteCheck())
    trainer.callback_handler.callbacks.append(ManifestCallback())  # last: after every file of a checkpoint is saved
    checkpoint = checkpoint_to_resume(output_dir, resume)
    try:
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except Exception as error:
        full = disk_full(error, output_dir)
        if full is None:
            raise
        raise full from None
    bad = first_non_finite(model)
    if bad:
        raise FloatingPointError(f"training diverged: non-finite weights after {trainer.state.global_step} steps, "
                                 f"first in {bad}. Lower the learning rate (it is {config.learning_rate:g}).")
    return {"log_history": trainer.state.log_history, "seconds": output.metrics.get("train_runtime"),
            "steps": trainer.state.global_step, **meter.summary()}
