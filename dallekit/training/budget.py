"""Fitting a run's learning-rate schedule to its time budget (`training.max_train_seconds`).

A budget alone would stop a run mid-cosine, at a high learning rate, with the last steps unannealed.
`BudgetFit` times the run's steps instead and, where `max_steps` would not fit in the budget, plans fewer
so the cosine ends when the budget does: a slow machine trains fewer steps on a complete schedule, a fast
one trains all of `max_steps`. The first step of a run is not timed (it compiles under `training.compile`);
after `CALIBRATION_STEPS` more, the seconds per step so far (the main process's, broadcast so every process
agrees) give the steps left. The warmup does not depend on the length, so where it is longer than the
calibration the schedule is exactly the one a run started with the planned `max_steps` would follow.
Steps often run at another speed later (data loaders warm up, caches fill, other work starts), so the plan
is remade every `REPLAN_STEPS` steps from all the steps timed so far, up to `max_steps`; a plan remade after
the warmup goes on from the cosine's progress at that step (`optim.decay_progress`), so the learning rate
never jumps and still ends at its minimum on the last planned step. The plan is kept in the checkpointed
`TrainState`: a resumed run follows it. The budget itself still stops a run whose last steps slow down.
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
from dallekit.training.optim import create_lr_scheduler, decay_progress

logger = get_logger(__name__)

CALIBRATION_STEPS = 20  # timed steps (after a run's first) that the first plan is made from
REPLAN_STEPS = 100  # steps between two plans


class BudgetFit:
    """The run's planned length: `max_steps`, or fewer where `max_train_seconds` would not hold them."""

    def __init__(self, run: TrainingConfig, state: TrainState, accelerator: Accelerator) -> None:
        self.run, self.state, self.accelerator = run, state, accelerator
        self.first_step = state.step + 1  # this run's first step, untimed
        self.seconds_before = state.train_seconds  # spent by the runs this one resumes (checkpoints update the state's)
        self.timer_start: float | None = None  # training seconds at the end of the first step

    @property
    def max_steps(self) -> int:
        return self.state.planned_steps or self.run.max_steps

    def _schedule(self) -> tuple[TrainingConfig, tuple[int, float] | None]:
        """The run's config with the planned length, and the re-planned cosine's anchor (None: from the warmup)."""
        anchor = tuple(self.state.schedule_anchor) if self.state.schedule_anchor else None
        return dataclasses.replace(self.run, max_steps=self.max_steps), anchor

    def apply(self, lr_scheduler: torch.optim.lr_scheduler.LambdaLR, optimizer: torch.optim.Optimizer) -> None:
        """Give `lr_scheduler` the cosine that ends at the planned step (after a resume of a re-planned run)."""
        if self.state.planned_steps is not None:
            planned, anchor = self._schedule()
            # created at the current step, the new schedule sets the learning rate of the next optimiser step
            lr_scheduler.lr_lambdas = create_lr_scheduler(
                optimizer, planned, last_epoch=self.state.step - 1, anchor=anchor).lr_lambdas

    def observe(self, seconds: float, lr_scheduler: torch.optim.lr_scheduler.LambdaLR,
                optimizer: torch.optim.Optimizer, name: str) -> bool:
        """Called after each optimiser step with the training seconds of this run so far (`seconds_before` not
        included); returns True when this step changed the planned length."""
        budget = self.run.max_train_seconds
        if budget is None:
            return False
        timed = self.state.step - self.first_step
        if timed == 0:
            self.timer_start = seconds
        if self.timer_start is None or timed < CALIBRATION_STEPS or (timed - CALIBRATION_STEPS) % REPLAN_STEPS:
            return False
        per_step = torch.tensor([(seconds - self.timer_start) / timed], device=self.accelerator.device)
        per_step = float(broadcast(per_step, from_process=0))
        left = budget - self.seconds_before - seconds
        fits = min(self.run.max_steps, self.state.step + max(1, math.floor(left / per_step)))
        if fits == self.max_steps:
            if timed == CALIBRATION_STEPS and self.state.planned_steps is None:
                logger.info("%s: %d steps at %.3g s/step fit training.max_train_seconds (%g s)", name,
                            self.run.max_steps, per_step, budget)
            return False
        first_plan = self.state.planned_steps is None
        if self.state.step > self.run.warmup_steps:  # go on from where the cosine is now
            progress = decay_progress(self.state.step, *self._schedule())
            self.state.schedule_anchor = [self.state.step, progress]
        self.state.planned_steps = fits
        self.apply(lr_scheduler, optimizer)
        message = ("%s: %d steps at %.3g s/step would take %.0f s; training.max_train_seconds (%g s) holds %d: "
                   "the learning-rate schedule now ends at step %d")
        (logger.warning if first_plan else logger.info)(
            message, name, self.run.max_steps, per_step,
            self.seconds_before + seconds + (self.run.max_steps - self.state.step) * per_step, budget, fits, fits)
        return True
