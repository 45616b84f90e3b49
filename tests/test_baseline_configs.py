"""benchmarks/write_baseline_configs.py: the baselines' configs carry exactly the options and rates chosen on
validation, and a pending choice writes nothing."""

import json
import runpy
import shutil
from pathlib import Path

from safeft.options import merge
from safeft.recipes.bench import BenchConfig

ROOT = Path(__file__).parent.parent
SCRIPT = ROOT / "benchmarks" / "write_baseline_configs.py"


def selection(tmp_path, **chosen) -> Path:
    """A select_options.py JSON choosing ``chosen[method] = (label, options, other candidates' options)``."""
    result = {"chosen": {m: {"label": label, "options": options, "why": "",
                             "candidates": [{"options": o} for o in [options, *others]]}
                         for m, (label, options, others) in chosen.items()}}
    path = tmp_path / "selection.json"
    path.write_text(json.dumps(result))
    return path


def configs(tmp_path) -> Path:
    folder = tmp_path / "configs"
    (folder / "headline").mkdir(parents=True)
    for name in ("validation_baselines_lr.yaml", "headline/sft.yaml", "headline/sft_agnews.yaml"):
        shutil.copy(ROOT / "benchmarks" / "configs" / name, folder / name)
    return folder


def run(monkeypatch, *args) -> int:
    """Run the script in this process (no second import of torch); return its exit code."""
    monkeypatch.setattr("sys.argv", [str(SCRIPT), *map(str, args)])
    try:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    except SystemExit as exit:
        return exit.code
    return 0


def load(path: Path) -> BenchConfig:
    config, _ = merge(BenchConfig, {}, path)
    return config


def test_configs_carry_the_chosen_options_and_rates(tmp_path, monkeypatch):
    folder = configs(tmp_path)
    mix = ("mix 0.05", {"safety_ratio": 0.05, "safety_data": None}, [{"safety_ratio": 0.1}])
    chosen = selection(tmp_path, mix=mix,
                       booster=("booster 1", {"harmful_weight": 1.0}, []),
                       safelora=("safelora 0.3", {"threshold": 0.3}, [{"threshold": 0.2}]),
                       spf=("spf rank=8", {"rank": 8}, []))
    assert run(monkeypatch, "--selection", chosen, "--configs", folder) == 0
    grid = load(folder / "validation_baselines_lr.yaml")
    entries = dict(grid.method_entries())
    assert set(entries) == {"mix", "booster"}  # SafeLoRA is LoRA-only, SPF's options are the library's defaults
    assert entries["mix"].config.safety_ratio == 0.05 and entries["booster"].config.harmful_weight == 1.0
    assert len(grid.settings) == 4 and not (folder / "headline" / "baselines.yaml").exists()

    rates = tmp_path / "rates.json"
    rates.write_text(json.dumps({"factors": {"mix": {"choice": "mix lr=0.0002"}, "booster": {"choice": "booster"}}}))
    assert run(monkeypatch, "--selection", chosen, "--learning-rates", rates, "--configs", folder) == 0
    headline, sft = load(folder / "headline" / "baselines.yaml"), load(folder / "headline" / "sft.yaml")
    assert headline.settings == sft.settings and headline.seeds == sft.seeds
    assert dict(headline.method_entries())["mix"].config.safety_ratio == 0.05
    safelora = load(folder / "headline" / "safelora.yaml")
    assert [label for label, _ in safelora.method_entries()] == ["safelora"]
    assert safelora.settings and all(s.lora_r for s in safelora.settings)
    assert dict(safelora.method_entries())["safelora"].config.threshold == 0.3
    agnews = load(folder / "headline" / "baselines_agnews.yaml")
    assert agnews.method_rate("mix") == 2e-4 and agnews.method_rate("booster") is None  # None: the bench's rate
    assert agnews.settings == load(folder / "headline" / "sft_agnews.yaml").settings


def test_a_pending_rate_is_an_error_that_writes_no_headline_part(tmp_path, monkeypatch, capsys):
    folder = configs(tmp_path)
    chosen = selection(tmp_path, mix=("mix 0.05", {"safety_ratio": 0.05}, []))
    rates = tmp_path / "rates.json"
    rates.write_text(json.dumps({"factors": {"mix": {"choice": None, "why": "pending"}}}))
    assert run(monkeypatch, "--selection", chosen, "--learning-rates", rates, "--configs", folder) == 2
    assert "mix: no learning rate chosen" in capsys.readouterr().err
    assert not list((folder / "headline").glob("baselines*.yaml"))
