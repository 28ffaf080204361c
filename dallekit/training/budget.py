"""Fitting a run's learning-rate schedule to its time budget (`training.max_train_seconds`).

A budget alone would stop a run mid-cosine, at a high learning rate, with the last steps unannealed.
`BudgetFit` times the run's first steps instead and, where `max_steps` would not fit in the budget,
shortens the run so the cosine ends when the budget does: a slow machine trains fewer steps on a
complete schedule, a fast one trains all of `max_steps`. The first step of a run is not timed (it
compiles under `training.compile`); after `CALIBRATION_STEPS` more, the seconds per step so far (the
main process's, broadcast so every process agrees) give the steps left. The warmup does not depend on
the length, so where it is longer than the calibration the schedule is exactly the one a run started
with the shortened `max_steps` would follow. The decision is kept in the checkpointed `TrainState`:
a resumed run follows the same schedule. The budget itself still stops a run whose steps slow down later.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import broadcast

from dallekit.training.checkpointing import TrainState
from dallekit.training.config import TrainingConfig
from dallekit.training.optim import create_lr_scheduler

logger = get_logger(__name__)

CALIBRATION_STEPS = 20  # timed steps (after a run's first) that the seconds per step are measured over


class BudgetFit:
    """The run's planned length: `max_steps`, or fewer where `max_train_seconds` would not hold them."""

    def __init__(self, run: TrainingConfig, state: TrainState, accelerator: Accelerator) -> None:
        self.run, self.state, self.accelerator = run, state, accelerator
        self.first_step = state.step + 1  # this run's first step, untimed
        self.timer_start: float | None = None  # training seconds at the end of the first step

    @property
    def max_steps(self) -> int:
        return self.state.planned_steps or self.run.max_steps

    def apply(self, lr_scheduler: torch.optim.lr_scheduler.LambdaLR, optimizer: torch.optim.Optimizer) -> None:
        """Give `lr_scheduler` the cosine that ends at the planned step (after a resume of a shortened run)."""
        if self.state.planned_steps is not None:
            shortened = dataclasses.replace(self.run, max_steps=self.state.planned_steps)
            # created at the current step, the new schedule sets the learning rate of the next optimiser step
            lr_scheduler.lr_lambdas = create_lr_scheduler(optimizer, shortened, last_epoch=self.state.step - 1).lr_lambdas

    def observe(self, seconds: float, lr_scheduler: torch.optim.lr_scheduler.LambdaLR,
                optimizer: torch.optim.Optimizer, name: str) -> bool:
        """Called after each optimiser step with the training seconds of this run so far (`seconds_before` not
        included); returns True when this step shortened the run."""
        budget = self.run.max_train_seconds
        if budget is None or self.state.planned_steps is not None:
            return False
        if self.state.step == self.first_step:
            self.timer_start = seconds
        if self.timer_start is None or self.state.step != self.first_step + CALIBRATION_STEPS:
            return False
        per_step = torch.tensor([(seconds - self.timer_start) / CALIBRATION_STEPS], device=self.accelerator.device)
        per_step = float(broadcast(per_step, from_process=0))
        left = budget - self.state.train_seconds - seconds
        fits = self.state.step + max(1, math.floor(left / per_step))
        if fits >= self.run.max_steps:
            logger.info("%s: %d steps at %.3g s/step fit training.max_train_seconds (%g s)", name,
                        self.run.max_steps, per_step, budget)
            return False
        self.state.planned_steps = fits
        self.apply(lr_scheduler, optimizer)
        logger.warning("%s: %d steps at %.3g s/step would take %.0f s; training.max_train_seconds (%g s) holds %d: "
                       "the learning-rate schedule now ends at step %d", name, self.run.max_steps, per_step,
                       self.state.train_seconds + seconds + (self.run.max_steps - self.state.step) * per_step,
                       budget, fits, fits)
        return True
