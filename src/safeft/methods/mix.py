"""Mix safety data into the fine-tuning data: the standard baseline defence.

Adds harmful-request -> refusal pairs to the task data, the way alignment data is replayed during fine-tuning in
the harmful-fine-tuning literature (e.g. the "SFT + safety data" baselines of Lisa and Vaccine, Huang et al. 2024).
"""

from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass

from safeft.data.examples import ChatExample
from safeft.errors import UserError
from safeft.methods.base import Method, RunContext


@dataclass
class MixOptions:
    """Args:
    safety_ratio: refusal pairs added per training example: ``round(safety_ratio * n)`` pairs join the n
        examples (0.1 adds one per ten), so the count is exact.
    safety_data: a JSONL file of ``{prompt, refusal}`` to draw the pairs from; default: built-in harmful requests
        of the alignment split with varied refusals, never a request that is in the fine-tuning data. When it holds
        fewer pairs than the ratio asks for, they are replayed in rounds (each at most once more than any other),
        with a warning.
    """

    safety_ratio: float = 0.1
    safety_data: str | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.safety_ratio <= 10.0:
            raise UserError(f"safety_ratio must be in (0, 10] (refusal pairs per training example), got "
                             f"{self.safety_ratio}")


class Mix(Method):
    """Add ``round(safety_ratio * n)`` (harmful request, refusal) pairs to the n training examples, shuffled in.

    Returns the task examples and the pairs in a seeded order; the pairs are drawn without replacement while the
    pool lasts, then replayed in further rounds.
    """

    Config = MixOptions

    def training_data(self, examples: list[ChatExample], run: RunContext) -> list[ChatExample]:
        from safeft.data import builtin_safety_samples, load_safety_samples

        count = round(self.config.safety_ratio * len(examples))
        if self.config.safety_data:
            pool = [s for s in load_safety_samples(self.config.safety_data) if s.prompt not in run.task_prompts]
        else:
            pool = builtin_safety_samples(None, exclude=run.task_prompts)
        if not pool:
            raise UserError("mix has no refusal pairs outside the fine-tuning data; pass safety_data with rows whose "
                             "prompts are not in the task data")
        if count > len(pool):
            warnings.warn(f"safety_ratio {self.config.safety_ratio} asks for {count} refusal pairs and only "
                          f"{len(pool)} are available outside the fine-tuning data: each is used up to "
                          f"{math.ceil(count / len(pool))} times. Pass safety_data with more rows to avoid repeats.",
                          stacklevel=2)
        rng = random.Random(run.seed)
        picked = []
        while len(picked) < count:  # rounds without replacement; one round when the pool suffices
            picked += rng.sample(pool, min(len(pool), count - len(picked)))
        refusals = [ChatExample.from_pair(s.prompt, s.refusal, harmful=True, source="mix") for s in picked]
        mixed = list(examples) + refusals
        rng.shuffle(mixed)
        return mixed
