"""Lisa: lazy safety alignment by bi-state optimisation (Huang et al., NeurIPS 2024).

Training alternates between an alignment state (``alignment_steps`` optimizer steps on refusal pairs) and a task
state (``task_steps`` steps on the fine-tuning data), starting with alignment. In each state a proximal term
``rho / 2 * sum ||w - w_switch||^2`` pulls the weights toward where they were at the last switch, so neither state
drifts far from what the other one reached. As in the authors' code, the proximal term is off during the first 10%
of the steps, an alignment step takes the place of a task step (the step budget is unchanged), and optimizer state
and schedule are shared by both states.

Departures from the paper, and why: the alignment data are built-in refusals (or ``safety_data``), not BeaverTails
safe answers (no hub); the default schedule keeps the authors' 1:9 split of steps but in cycles of 10 steps (they
use 100 + 900), since safeft's budget is 40 steps, not thousands.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import TrainerCallback

from safeft.config import check_positive
from safeft.errors import UserError
from safeft.methods.base import Method, RunContext

PROXIMAL_OFF_SHARE = 0.1  # the authors' code leaves the proximal term out for the first 10% of the steps


@dataclass
class LisaOptions:
    """Args:
    alignment_steps: optimizer steps of each alignment phase (on refusal pairs).
    task_steps: optimizer steps of each task phase (on the fine-tuning data).
    rho: weight of the proximal term to the weights at the last switch.
    safety_batch_size: refusal pairs per alignment step.
    safety_data: a JSONL file of ``{prompt, refusal}`` for the alignment steps instead of the built-in ones.
    """

    alignment_steps: int = 1
    task_steps: int = 9
    rho: float = 1.0
    safety_batch_size: int = 4
    safety_data: str | None = None

    def __post_init__(self) -> None:
        if self.alignment_steps < 0 or self.task_steps <= 0:
            raise UserError(f"alignment_steps must be >= 0 and task_steps > 0, got {self.alignment_steps} and "
                             f"{self.task_steps}")
        if self.rho < 0:
            raise UserError(f"rho must be >= 0, got {self.rho}")
        check_positive(self, "safety_batch_size")


def in_alignment(step: int, alignment_steps: int, task_steps: int) -> bool:
    """Return True if optimizer step ``step`` (0-based) is an alignment step: each cycle starts with alignment."""
    return step % (alignment_steps + task_steps) < alignment_steps


class LisaState(TrainerCallback):
    """Tracks the state of every step and snapshots the weights at each switch; computes the step's objective."""

    def __init__(self, config: LisaOptions, stream):
        self.config, self.stream = config, stream
        self.aligning = False
        self.anchor: dict[str, torch.Tensor] = {}
        self.proximal_from = self.step = 0
        self.states: list[str] = []  # "alignment" / "task" per optimizer step, in order

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.proximal_from = int(PROXIMAL_OFF_SHARE * state.max_steps)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        aligning = in_alignment(state.global_step, self.config.alignment_steps, self.config.task_steps)
        if aligning != self.aligning or not self.anchor:  # a switch (or the first step, or a resumed run)
            self.anchor = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.aligning = aligning
        self.states.append("alignment" if aligning else "task")
        self.step = state.global_step

    def proximal(self, model) -> torch.Tensor:
        """Return ``sum ||w - w_switch||^2`` over the trainable parameters."""
        return sum(((p - self.anchor[n]) ** 2).sum() for n, p in model.named_parameters() if n in self.anchor)

    def loss(self, model, inputs, task_loss, share: float) -> torch.Tensor:
        from safeft.losses import device_of
        from safeft.methods.common import batch_loss

        if self.aligning:  # the step trains on refusal pairs; the task batch is left out
            loss = share * batch_loss(model, self.stream.next(device_of(model)))
        else:
            loss = task_loss()
        if self.config.rho and self.step >= self.proximal_from:
            loss = loss + share * self.config.rho / 2 * self.proximal(model)
        return loss

    def on_log(self, args, state, control, logs=None, **kwargs):
        from safeft.callbacks import add_to_log

        if self.states:
            add_to_log(state, logs, {"lisa/alignment_share": self.states.count("alignment") / len(self.states)})


class Lisa(Method):
    """Alternate alignment and task phases with a proximal term to the last switching point."""

    Config = LisaOptions

    def __init__(self, config=None, name: str | None = None):
        super().__init__(config, name or "lisa")
        self.state: LisaState | None = None

    def before_training(self, model, tokenizer, run: RunContext) -> None:
        from safeft.chat import pad_id
        from safeft.methods.common import BatchStream, encode_all, refusal_examples

        examples = refusal_examples(run, self.config.safety_data)
        stream = BatchStream(encode_all(tokenizer, examples), self.config.safety_batch_size, pad_id(tokenizer),
                             seed=run.seed)
        self.state = LisaState(self.config, stream)  # one per run

    def callbacks(self, model, tokenizer, run: RunContext) -> list:
        return [self.state]

    def training_loss(self, model, tokenizer, run: RunContext):
        return self.state.loss
