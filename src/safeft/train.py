"""Supervised fine-tuning with the transformers Trainer, with SPF as an optional callback."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from safeft.chat import collate, encode_messages, truncate
from safeft.config import SPFConfig
from safeft.data.examples import ChatExample
from safeft.subspace import SafetySubspace


@dataclass
class TrainConfig:
    """How to fine-tune.

    Args:
        steps: optimizer steps; 0 means ``epochs`` passes over the data.
        epochs: passes over the data when ``steps`` is 0.
        learning_rate, weight_decay, warmup_ratio: AdamW and its linear schedule.
        batch_size: examples per optimizer step.
        max_length: tokens per example (longer ones are cut).
        lora_r: LoRA rank; 0 = full fine-tuning of the transformer-block matrices (embeddings and head frozen).
        seed: data order and initialisation.
    """

    steps: int = 0
    epochs: float = 1.0
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    batch_size: int = 8
    max_length: int = 256
    lora_r: int = 0
    seed: int = 0
    schedule: str = "linear"  # or "constant"

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"TrainConfig.steps must be >= 0, got {self.steps}")
        if self.steps == 0 and self.epochs <= 0:
            raise ValueError(f"TrainConfig.epochs must be > 0 when steps is 0, got {self.epochs}")
        if self.learning_rate <= 0:
            raise ValueError(f"TrainConfig.learning_rate must be > 0, got {self.learning_rate}")
        for name in ("batch_size", "max_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}")
        if self.schedule not in ("linear", "constant"):
            raise ValueError(f"TrainConfig.schedule must be 'linear' or 'constant', got {self.schedule!r}")
        if self.lora_r < 0:
            raise ValueError(f"TrainConfig.lora_r must be >= 0 (0 = full fine-tuning), got {self.lora_r}")

    def to_dict(self) -> dict:
        """Return the config as a plain dict."""
        return asdict(self)


def prepare_model(model, config: TrainConfig):
    """Return the model set up for training: LoRA on all linear layers of the blocks, or full fine-tuning of them."""
    if config.lora_r:
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=config.lora_r, lora_alpha=2 * config.lora_r, lora_dropout=0.0,
                                                target_modules="all-linear", exclude_modules=["lm_head"]))
    for name, p in model.named_parameters():
        p.requires_grad_(".layers." in name or ".h." in name or ".blocks." in name)
    return model


def train(model, tokenizer, examples: Sequence[ChatExample], config: TrainConfig,
          spf: tuple[SafetySubspace, SPFConfig] | None = None, output_dir: str = "/tmp/safeft-trainer",
          callbacks: Sequence = ()) -> dict:
    """Fine-tune ``model`` in place on ``examples`` (loss on assistant turns) and return the training log.

    With ``spf=(subspace, spf_config)`` every optimizer step is SPF-projected through :class:`SPFCallback`.
    ``callbacks`` are extra ``TrainerCallback`` objects (e.g. an early stop).

    Returns:
        ``{"log_history": [...], "seconds": float, "steps": int}`` from the Trainer.
    """
    from transformers import Trainer, TrainingArguments

    from safeft.spf import add_spf_callback

    if not examples:
        raise ValueError("no training examples: the data set is empty")
    encoded = [truncate(encode_messages(tokenizer, e.messages), config.max_length) for e in examples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    steps = config.steps or math.ceil(config.epochs * len(encoded) / config.batch_size)
    args = TrainingArguments(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate, weight_decay=config.weight_decay, warmup_steps=config.warmup_ratio,
        lr_scheduler_type=config.schedule, logging_steps=max(1, steps // 20), report_to="none", save_strategy="no",
        seed=config.seed, data_seed=config.seed, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
        remove_unused_columns=False, max_grad_norm=1.0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=encoded, processing_class=tokenizer,
                      data_collator=lambda batch: collate(batch, pad), callbacks=list(callbacks))
    if spf is not None:
        add_spf_callback(trainer, spf[0], spf[1], tokenizer)
    output = trainer.train()
    return {"log_history": trainer.state.log_history, "seconds": output.metrics.get("train_runtime"),
            "steps": trainer.state.global_step}
