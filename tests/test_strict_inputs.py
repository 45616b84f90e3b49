"""Options reach training as given, and settings of the wrong type or given twice are refused, never guessed."""

import pytest

from safeft.config import AlignConfig, DataConfig, TrainConfig, from_dict
from safeft.errors import UserError
from safeft.options import merge
from safeft.recipes.bench import BenchConfig
from safeft.spf.config import SPFConfig
from safeft.testing import byte_tokenizer, tiny_llama


def learning_rates(config: TrainConfig, tmp_path) -> list[float]:
    """Return the learning rate of every optimizer step of a tiny run (the scheduler's, as the trainer logs it)."""
    from safeft.data.examples import ChatExample
    from safeft.train import train

    examples = [ChatExample.from_pair(f"Say {i}.", f"{i}.") for i in range(4)]
    log = train(tiny_llama(), byte_tokenizer(), examples, config, output_dir=str(tmp_path / "trainer"))
    return [entry["learning_rate"] for entry in log["log_history"] if "learning_rate" in entry]


BASE = {"steps": 6, "batch_size": 2, "logging_steps": 1, "save_every": 0, "learning_rate": 1e-3}


def test_warmup_ratio_one_warms_up_over_the_whole_run(tmp_path):
    rates = learning_rates(TrainConfig(**BASE, warmup_ratio=1.0), tmp_path)
    assert len(rates) == 6 and all(a < b for a, b in zip(rates, rates[1:])), rates  # rises at every step
    assert rates[-1] == pytest.approx(1e-3 * 5 / 6)  # linear: step k of 6 runs at k/6 of the peak (k from 0)


def test_warmup_ratio_is_a_share_and_warmup_steps_a_count(tmp_path):
    half = learning_rates(TrainConfig(**BASE, warmup_ratio=0.5), tmp_path / "a")
    steps = learning_rates(TrainConfig(**BASE, warmup_steps=3), tmp_path / "b")
    assert half == pytest.approx(steps)  # half of 6 steps is 3 steps
    assert half[:3] == pytest.approx([0.0, 1e-3 / 3, 2e-3 / 3]) and half[3] == pytest.approx(1e-3)  # then decays


def test_warmup_from_flags_and_yaml(tmp_path):
    config, _ = merge(BenchConfig, {"warmup_ratio": "1.0"}, None)
    assert config.train.warmup_ratio == 1.0 and config.run_train_config(config.settings[0], 0).warmup_ratio == 1.0
    file = tmp_path / "run.yaml"
    file.write_text("warmup_steps: 3\n")
    assert merge(BenchConfig, {}, file)[0].train.warmup_steps == 3
    for bad in ("-1", "1.5", "nan"):
        with pytest.raises(UserError, match="warmup_ratio is a share of the run's steps, in \\[0, 1\\]"):
            merge(BenchConfig, {"warmup_ratio": bad}, None)


@pytest.mark.parametrize(("build", "field"), [
    (lambda: SPFConfig(rank=True), "SPFConfig.rank must be int or None, got True (bool)"),
    (lambda: TrainConfig(steps=True), "TrainConfig.steps must be int, got True (bool)"),
    (lambda: TrainConfig(learning_rate=False), "TrainConfig.learning_rate must be float, got False"),
    (lambda: TrainConfig(bf16=1), "TrainConfig.bf16 must be bool, got 1 (int)"),
    (lambda: TrainConfig(batch_size="8"), "TrainConfig.batch_size must be int, got '8' (str)"),
    (lambda: AlignConfig(max_steps=2.5), "AlignConfig.max_steps must be int, got 2.5 (float)"),
    (lambda: DataConfig(max_train=True), "DataConfig.max_train must be int or None, got True"),
    (lambda: BenchConfig(max_new_tokens=True), "BenchConfig.max_new_tokens must be int, got True"),
])
def test_a_bool_is_not_a_number(build, field):
    with pytest.raises(UserError, match=field.replace("(", r"\(").replace(")", r"\)")):
        build()


def test_numbers_are_still_numbers():
    assert TrainConfig(epochs=2, weight_decay=0).epochs == 2 and SPFConfig(rank=4).rank == 4
    assert SPFConfig(energy=1).energy == 1 and DataConfig(max_train=None).max_train is None


def test_weight_decay_must_be_finite():
    for bad in (float("nan"), float("inf"), -0.1):
        with pytest.raises(UserError, match="weight_decay must be a finite number >= 0"):
            TrainConfig(weight_decay=bad)
    with pytest.raises(UserError, match="weight_decay must be a finite number >= 0, got nan"):
        merge(BenchConfig, {"weight_decay": "nan"}, None)


def test_one_option_under_two_spellings_is_refused(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("max-length: 8\nmax_length: 64\n")
    with pytest.raises(UserError, match="'max-length' and 'max_length' are the same option given twice"):
        merge(BenchConfig, {}, file)
    file.write_text("steps: 8\nsteps: 64\n")
    with pytest.raises(UserError, match=r"key 'steps' is given twice \(lines 1 and 2\)"):
        merge(BenchConfig, {}, file)
    file.write_text("settings: [{harmful-ratio: 0.1, harmful_ratio: 0.2}]\n")
    with pytest.raises(UserError, match="'harmful-ratio' and 'harmful_ratio' are the same option"):
        merge(BenchConfig, {}, file)
    with pytest.raises(UserError, match="'max-length' and 'max_length'"):
        from_dict(TrainConfig, {"max-length": 8, "max_length": 64})
