"""SPFCallback inside the transformers Trainer and TRL's SFTTrainer, unchanged."""

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments
from trl import SFTConfig, SFTTrainer

from conftest import BENIGN_PAIRS, snapshot
from safeft import SafetySubspace, SPFCallback, SPFConfig
from safeft.chat import collate, encode_chat

METRICS = {"spf/conflict_rate", "spf/removed_norm", "spf/safety_drift", "spf/safety_loss"}


def logged_spf_metrics(trainer):
    return [entry for entry in trainer.state.log_history if "spf/conflict_rate" in entry]


def test_sft_trainer_trains_and_logs_monitor_metrics(model, tokenizer, safety_pairs, tmp_path):
    subspace = SafetySubspace.estimate(model, tokenizer, safety_pairs[:1], SPFConfig(rank=4), show_progress=False)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p}],
                               "completion": [{"role": "assistant", "content": r}]} for p, r in BENIGN_PAIRS])
    args = SFTConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2,
                     logging_steps=100, report_to="none", save_strategy="no", use_cpu=True, max_length=128,
                     dataloader_num_workers=0, bf16=False)
    config = SPFConfig(rank=4, mode="always", project="update", monitor_every=2)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         callbacks=[SPFCallback(subspace, config)])
    before = snapshot(model)
    trainer.train()
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    logged = logged_spf_metrics(trainer)
    assert [e["step"] for e in logged] == [2, 4]
    for entry in logged:
        assert METRICS <= entry.keys()
        assert entry["spf/conflict_rate"] == 1.0  # always mode
        assert abs(entry["spf/safety_drift"]) < 1e-5 and entry["spf/safety_loss"] > 0


def test_trainer_with_grad_accumulation_and_a_callback_added_late(model, tokenizer, safety_pairs, benign_batch,
                                                                  tmp_path):
    subspace = SafetySubspace.estimate(model, tokenizer, safety_pairs[:1], SPFConfig(rank=4), show_progress=False)
    rows = [{k: v[i] for k, v in benign_batch.items()} for i in range(len(BENIGN_PAIRS))]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=1e-2, logging_steps=1, report_to="none",
                             save_strategy="no", use_cpu=True, max_grad_norm=1.0)
    trainer = Trainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
    callback = SPFCallback(subspace, SPFConfig(rank=4, mode="conflict", project="grad", monitor_every=1))
    trainer.add_callback(callback)  # appended after the reporters ...
    trainer.train()
    assert trainer.callback_handler.callbacks[0] is callback  # ... and moved ahead of them when training starts
    assert callback.projector.step == 3  # one projection per optimizer step, not per micro-batch
    logged = logged_spf_metrics(trainer)
    assert len(logged) == 3 and all(0 <= e["spf/removed_norm_frac"] <= 1 for e in logged)
    assert all("loss" in e for e in logged)  # merged into the trainer's own log entries


def test_missing_chat_template_in_the_trainer_path(model, safety_pairs):
    from safeft.testing import byte_tokenizer

    with pytest.raises(ValueError, match="no chat template"):
        collate([encode_chat(byte_tokenizer(chat_template=None), *safety_pairs[0])], 0)


def test_spf_metrics_reach_tensorboard_from_a_plain_sft_trainer(model, tokenizer, safety_pairs, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    subspace = SafetySubspace.estimate(model, tokenizer, safety_pairs[:1], SPFConfig(rank=4), show_progress=False)
    data = Dataset.from_list([{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]}
                              for p, r in BENIGN_PAIRS])
    args = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                     logging_steps=1, report_to="tensorboard", save_strategy="no",
                     use_cpu=True, max_length=128, dataloader_num_workers=0, bf16=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         callbacks=[SPFCallback(subspace, SPFConfig(rank=4, monitor_every=1))])  # the README's way
    trainer.train()
    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents*")).parent))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/spf/conflict_rate", "train/spf/safety_drift", "train/spf/safety_loss"} <= scalars, scalars
    assert len(events.Scalars("train/spf/safety_drift")) == 2
