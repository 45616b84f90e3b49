"""Choose every method's learning rate on validation data only (issue 35), by the rule SPF's own options follow.

    python benchmarks/choose_learning_rates.py benchmarks/results/validation --out benchmarks/results/learning_rates

reads a validation bench's run files, pools the settings that differ only in their learning rate
(:data:`safeft.recipes.selection.LEARNING_RATE_RULE`: SFT at its most accurate rate is every method's accuracy
reference), and decides, for each method label that ran at another rate than the bench's, its rate by
:data:`safeft.recipes.selection.FACTOR_RULE` with the bench's rate as the default. Writes ``OUT.json`` and ``OUT.md``
(per method: the choice, why, and each setting's rule-B table). A headline grid then gives each method entry the
chosen ``learning_rate``.
"""

from __future__ import annotations

import sys

from choose_spf_defaults import validation_runs, write_choices
from safeft.recipes.selection import FACTOR_RULE, LEARNING_RATE_RULE, choose_learning_rates

TITLE = "Learning rates chosen on validation data"


def main() -> None:
    args, aligned, runs = validation_runs(__doc__.split("\n")[0], "learning rates")
    sft_rates, methods = choose_learning_rates(runs, aligned)
    result = {"title": TITLE, "command": "python " + " ".join(sys.argv), "rule": FACTOR_RULE,
              "learning_rate_rule": LEARNING_RATE_RULE, "sft_rates": sft_rates, "factors": methods}
    for label, m in methods.items():
        print(f"{label}: {m['choice'] or 'pending'} - {m['why']}")
    write_choices(args.out, result)


if __name__ == "__main__":
    main()
