"""Plain supervised fine-tuning: no defence, the reference every other method is compared with."""

from __future__ import annotations

from safeft.methods.base import Method


class SFT(Method):
    """No defence: every hook keeps its default (the data, the model and the steps are left as they are)."""
