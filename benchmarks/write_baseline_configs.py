"""Write the baselines' bench configs from the choices made on validation data, so that no option is typed by hand.

    python benchmarks/write_baseline_configs.py --selection benchmarks/results/baselines_selection74.json
    python benchmarks/write_baseline_configs.py --selection benchmarks/results/baselines_selection74.json \
        --learning-rates benchmarks/results/learning_rates.json

The first form writes ``benchmarks/configs/validation_baselines_lr.yaml``: every chosen baseline (its options from
``--selection``) at four learning rates on the AG News validation slice. The second form, once
``benchmarks/choose_learning_rates.py`` has chosen every rate, also writes the headline's baseline parts:
``headline/baselines.yaml`` (the settings of ``headline/sft.yaml``, at the bench's rate), ``headline/safelora.yaml``
(its LoRA settings only: SafeLoRA projects LoRA updates) and ``headline/baselines_agnews.yaml`` (the settings of
``headline/sft_agnews.yaml``, each method at its chosen rate). A method whose choice is still pending is an error:
a headline run must not start with a guessed option. Settings are copied from the SFT parts, so every part of the
headline scores the same settings.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

import yaml

from safeft.errors import UserError
from safeft.methods import REGISTRY

CONFIGS = Path(__file__).parent / "configs"
LORA_ONLY = {"safelora"}
BENCH_KEYS = ("seeds", "steps", "learning_rate", "batch_size", "max_new_tokens")


def chosen_options(selection: dict) -> dict[str, dict]:
    """Return ``{method: options}`` for every baseline of a ``select_options.py`` JSON (SPF's options are the library's
    defaults, chosen by ``choose_spf_defaults.py``), each with only the options its candidates varied or that differ
    from the method's registered defaults, so the config reads like the selection's labels. Raises UserError where a
    method has no choice."""
    chosen = {}
    for method, choice in selection["chosen"].items():
        if method.startswith("spf"):
            continue
        if not choice.get("label"):
            raise UserError(f"{method}: no option chosen in the selection ({choice.get('why', 'pending')}); run its "
                            "validation candidates first")
        cls, preset = REGISTRY[method]
        defaults = {f.name: getattr(cls.Config(), f.name) for f in fields(cls.Config)} | preset
        options = choice["options"]
        varied = {k for c in choice["candidates"] for k, v in c["options"].items() if options.get(k) != v}
        chosen[method] = {k: v for k, v in options.items() if k in varied or defaults.get(k) != v}
    return chosen


def chosen_rates(learning_rates: dict, methods: list[str]) -> dict[str, float | None]:
    """Return ``{method: rate}`` from a ``choose_learning_rates.py`` JSON (None: the bench's own rate, the plain
    label). Raises UserError for a method with no rate chosen."""
    rates = {}
    for method in methods:
        factor = learning_rates["factors"].get(method)
        if not factor or not factor.get("choice"):
            raise UserError(f"{method}: no learning rate chosen in the learning-rate file; run "
                            "benchmarks/configs/validation_baselines_lr.yaml and choose_learning_rates.py first")
        _, _, rate = factor["choice"].partition(" lr=")
        rates[method] = float(rate) if rate else None
    return rates


def entry(method: str, options: dict, rate: float | None = None) -> dict:
    """Return one bench method entry, labelled with the registry name."""
    return {"label": method, "method": method, **options, **({"learning_rate": rate} if rate else {})}


def render(header: str, base: dict, methods: list[dict], settings: list[dict]) -> str:
    """Return a bench config as YAML text: ``header`` as comments, then the title, out, model and bench keys of
    ``base`` with ``methods`` and ``settings``, one flow mapping per method entry and per setting."""
    doc = {key: base[key] for key in ("title", "out", "model")} | {"methods": methods, "settings": settings}
    doc |= {key: base[key] for key in BENCH_KEYS if key in base}
    comments = [f"# {line}".rstrip() for line in header.strip().splitlines()]
    return "\n".join(comments) + "\n" + yaml.safe_dump(doc, default_flow_style=None, sort_keys=False, width=116)


def write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` and say whether it changed."""
    before = path.read_text(encoding="utf-8") if path.exists() else None
    path.write_text(text, encoding="utf-8")
    print(f"{path}: {'unchanged' if before == text else 'written'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--selection", required=True, help="select_options.py JSON of the baselines' options")
    parser.add_argument("--learning-rates", help="choose_learning_rates.py JSON; given: also write the headline parts")
    parser.add_argument("--configs", type=Path, default=CONFIGS, help="the bench configs' folder")
    args = parser.parse_args()
    command = "python " + " ".join(sys.argv)
    try:
        options = chosen_options(json.loads(Path(args.selection).read_text()))
        full = [m for m in options if m not in LORA_ONLY]
        grid = args.configs / "validation_baselines_lr.yaml"
        base = yaml.safe_load(grid.read_text())
        write(grid, render(f"""
Every baseline's learning rate on validation data (issue 35), as SPF's was: AG News 10% harmful (300 articles held
out of train.csv, never test.csv), the bench's 5e-5 and 1e-4, 1.5e-4, 2e-4, seeds 0-2, each baseline with the
options chosen for it on validation, in
  {args.selection}
SFT's runs at these rates are already in benchmarks/results/validation, so a bench with this config runs the
baselines only. Written by
  {command}
then
  safeft bench --config benchmarks/configs/validation_baselines_lr.yaml
  python benchmarks/choose_learning_rates.py benchmarks/results/validation --out benchmarks/results/learning_rates
chooses each method's rate by the factor rule SPF's options follow (resumable; commit the run files as they land).
""", base, [entry(m, options[m]) for m in full], base["settings"]))
        if not args.learning_rates:
            return
        rates = chosen_rates(json.loads(Path(args.learning_rates).read_text()), full)
        sft = yaml.safe_load((args.configs / "headline" / "sft.yaml").read_text())
        agnews = yaml.safe_load((args.configs / "headline" / "sft_agnews.yaml").read_text())
        note = ("The headline rerun's baselines (issue 35, item 5; the parts are listed in headline/sft.yaml):\n"
                f"the options chosen in\n  {args.selection}\n"
                f"and the AG News rates chosen in\n  {args.learning_rates}\n"
                f"Written by\n  {command}\nRun with safeft bench --config <this file>; resumable.")
        headline = args.configs / "headline"
        write(headline / "baselines.yaml", render(note, sft, [entry(m, options[m]) for m in full], sft["settings"]))
        lora = [s for s in sft["settings"] if s.get("lora_r")]
        write(headline / "safelora.yaml", render(note, sft, [entry(m, options[m]) for m in options
                                                             if m in LORA_ONLY], lora))
        write(headline / "baselines_agnews.yaml", render(note, agnews, [entry(m, options[m], rates[m]) for m in full],
                                                         agnews["settings"]))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
