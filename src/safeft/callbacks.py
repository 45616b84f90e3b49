"""Trainer callbacks and log helpers shared by the training loop, SPF's callback and the methods: step time and
peak memory, a stop on a non-finite loss, and adding metrics to a Trainer log entry."""

from __future__ import annotations

import math
import statistics
import sys
import time

import torch
from transformers import TrainerCallback


def peak_memory_bytes() -> int | None:
    """Return the peak memory so far: ``torch.cuda.max_memory_allocated`` on a GPU, else the process's peak
    resident memory (``ru_maxrss``; None where the platform does not report it)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):
        return None
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


class CostMeter(TrainerCallback):
    """Measures each optimizer step's wall time, and the peak memory (:func:`peak_memory_bytes`) at the end.

    On a CPU the peak is the whole process's so far (model loading and what ran before training included): run
    one training per process, as ``safeft bench`` does, to make it the run's own.
    """

    def __init__(self):
        self.step_seconds: list[float] = []
        self.peak_bytes: int | None = None
        self._start = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_seconds.append(time.perf_counter() - self._start)

    def on_train_end(self, args, state, control, **kwargs):
        self.peak_bytes = peak_memory_bytes()

    def summary(self) -> dict:
        """Return ``{"step_seconds_median", "peak_memory_mb"}`` (None where not measured)."""
        return {"step_seconds_median": statistics.median(self.step_seconds) if self.step_seconds else None,
                "peak_memory_mb": self.peak_bytes / 2**20 if self.peak_bytes else None}


class FiniteCheck(TrainerCallback):
    """Stops training with ``FloatingPointError`` when a logged loss or gradient norm is NaN or infinite."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if value is not None and not math.isfinite(float(value)):
                raise FloatingPointError(
                    f"training diverged by step {state.global_step}: {key} is {value}. Lower the learning rate "
                    f"(it is {args.learning_rate:g}), or train in float32/bfloat16 instead of float16.")


def add_to_log(state, logs: dict | None, metrics: dict) -> None:
    """Add ``metrics`` to a Trainer log entry (``on_log``'s ``logs``, which reporters read) and to the kept history."""
    if logs is None:
        return
    logs.update(metrics)
    if state.log_history:
        state.log_history[-1].update(metrics)
