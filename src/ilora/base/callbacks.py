"""Trainer callbacks of the base pretraining (a wall-clock budget)."""

from __future__ import annotations

import time

from transformers import TrainerCallback


class TimeBudgetCallback(TrainerCallback):
    """Ends training once a wall-clock budget is spent (``minutes <= 0``: no budget).

    ``stopped_at`` records the step at which it stopped, so the run's log can say so.
    """

    def __init__(self, minutes: float) -> None:
        self.deadline = time.time() + 60 * minutes if minutes > 0 else float("inf")
        self.stopped_at: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if time.time() > self.deadline:
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control
