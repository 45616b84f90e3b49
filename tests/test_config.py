"""The run configuration: YAML values and flags through one validation path, with errors that name the key."""

from pathlib import Path

import pytest

from safeft.config import TrainConfig, coerce, flat_fields, from_dict
from safeft.errors import UsageError
from safeft.options import merge, option_help
from safeft.recipes.bench import BenchConfig
from safeft.spf.config import SPFConfig

CONFIGS = sorted(Path(__file__).parent.parent.joinpath("benchmarks", "configs").rglob("*.yaml"))


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_flags_win_over_the_file_for_flat_nested_and_prefixed_keys(tmp_path):
    file = write(tmp_path, "steps: 10\nlearning_rate: 1.0e-3\nalign_max_steps: 5\nseeds: [0, 1]\n"
                           "methods: [sft, spf rank=8]\n")
    config, _ = merge(BenchConfig, {"steps": "3", "align_max_steps": "7", "seeds": ["2,3"]}, file)
    assert config.train.steps == 3 and config.align.max_steps == 7 and config.seeds == [2, 3]  # the flags
    assert config.train.learning_rate == 1e-3 and config.method_entries()[1][1].config.rank == 8  # the file
    assert config.train.batch_size == 8 and config.align.check_every == 8  # defaults where neither says


def test_errors_name_the_key_as_written(tmp_path):
    with pytest.raises(UsageError, match=r"align_max_steps: expected int, got 'x' \(in --config"):
        merge(BenchConfig, {}, write(tmp_path, "align_max_steps: x\n"))
    with pytest.raises(UsageError, match="^steps: expected int, got 'many'$"):
        merge(BenchConfig, {"steps": "many"}, None)  # a flag's value: no file to blame
    with pytest.raises(UsageError, match="unknown key.*stepz.*valid keys: .*steps"):
        merge(BenchConfig, {}, write(tmp_path, "stepz: 3\n"))
    with pytest.raises(UsageError, match="not valid YAML"):
        merge(BenchConfig, {}, write(tmp_path, "steps: [\n"))
    with pytest.raises(UsageError, match=r"settings\[0\].harmful_ratio: expected float"):
        merge(BenchConfig, {}, write(tmp_path, "settings: [{harmful_ratio: lots}]\n"))
    with pytest.raises(UsageError, match="side must be one of left, right, two_sided; got 'up'"):
        merge(BenchConfig, {}, write(tmp_path, "methods: ['spf side=up']\n"))
    with pytest.raises(UsageError, match="schedule must be one of linear, constant"):
        merge(BenchConfig, {"schedule": "cosine"}, None)


def test_coercion_of_yaml_and_cli_values():
    assert coerce("1e-4", float, "lr") == 1e-4  # YAML reads 1e-4 (no dot) as a string
    assert coerce("none", int | None, "onset") is None and coerce(4, int | None, "onset") == 4
    assert coerce("a,b", list[str] | None, "targets") == ["a", "b"]
    assert coerce("yes", bool, "flag") is True
    for value, tp in ((True, int), ("4", bool), (3.5, int), ([1], str)):
        with pytest.raises(ValueError, match="key: expected"):
            coerce(value, tp, "key")
    assert from_dict(TrainConfig, {"steps": "5"}).steps == 5


def test_required_options_may_come_from_the_file(tmp_path):
    from safeft.cli import FinetuneCommand

    with pytest.raises(UsageError, match=r"missing required option\(s\): --out"):
        merge(FinetuneCommand, {"model": "m"}, None)
    config, options = merge(FinetuneCommand, {"model": "m"}, write(tmp_path, "out: runs/x\nrank: 8\n"),
                            extra={"rank": int})
    assert config.out == "runs/x" and options == {"rank": 8}


def test_spf_rank_defaults_by_the_kind_of_training_only_without_another_policy():
    assert (SPFConfig().rank_for(lora=False), SPFConfig().rank_for(lora=True)) == (128, 64)
    assert SPFConfig(rank=8).rank_for(lora=True) == 8
    assert SPFConfig(energy=0.9).rank_for(lora=False) is None and SPFConfig(budget=100).rank_for(lora=True) is None
    with pytest.raises(ValueError, match="not rank and energy"):
        SPFConfig(rank=8, energy=0.9)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_committed_bench_configs_load(path):
    config, _ = merge(BenchConfig, {}, path)
    assert config.method_entries() and config.settings and config.out.startswith("benchmarks/results/")


def test_every_option_has_help_and_flat_keys_are_unique():
    from safeft.cli import AlignCommand, AnalyzeCommand, EstimateCommand, EvalCommand, FinetuneCommand

    for cls in (BenchConfig, AlignCommand, FinetuneCommand, EvalCommand, EstimateCommand, AnalyzeCommand):
        helps = option_help(cls)
        undocumented = [key for key, (path, _, _) in flat_fields(cls).items() if not helps.get(path[-1])]
        assert not undocumented, f"{cls.__name__}: {undocumented}"
