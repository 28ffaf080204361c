"""Model selection on the validation split: keep the best weights so far, stop when they stop improving.

At each evaluation the main process passes its validation metrics (lower is better) to
`BestModelSelector.update`, which broadcasts the value so that every process updates the same
counters in the registered `TrainState` (so `should_stop` agrees across processes and a resumed run
goes on with the same best). An improvement is written with `save_pretrained` to `output_dir/best`
(to `.tmp-best`, then renamed); pass `BEST_MODEL_DIR` to `CheckpointManager(carry=...)` so that
checkpoints keep a copy of it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import broadcast
from safetensors.torch import load_model
from transformers import PreTrainedModel

from dallekit.training.checkpointing import TrainState, write_directory
from dallekit.training.config import TrainingConfig

logger = get_logger(__name__)

BEST_MODEL_DIR = "best"


class BestModelSelector:
    """Tracks the validation metric named `metric` of `model` (the unwrapped model) over a run."""

    def __init__(
        self, accelerator: Accelerator, model: PreTrainedModel, state: TrainState, config: TrainingConfig, metric: str
    ) -> None:
        self.accelerator = accelerator
        self.model = model
        self.state = state
        self.metric = metric
        self.select_best = config.select_best
        self.patience = config.early_stopping_patience
        self.max_steps = config.max_steps
        self.directory = Path(config.output_dir) / BEST_MODEL_DIR

    @property
    def should_stop(self) -> bool:
        """True once `early_stopping_patience` evaluations in a row brought no improvement (same on every process)."""
        return self.patience is not None and self.state.evaluations_since_best >= self.patience

    @property
    def export_step(self) -> int:
        """The step whose weights the export holds: the best one with `select_best`, else the last."""
        if self.select_best and self.state.best_step is not None:
            return self.state.best_step
        return self.state.step

    def update(self, metrics: dict[str, float] | None) -> bool:
        """Record the validation `metrics` of the current step (main process; the others pass None).

        Saves the weights to `output_dir/best` when they are the best so far (with `select_best`);
        every process must call it. Returns whether the metric improved.
        """
        local = metrics[self.metric] if metrics is not None else math.nan
        value = broadcast(torch.tensor([local], dtype=torch.float64, device=self.accelerator.device)).item()
        state = self.state
        state.last_metric = value
        improved = math.isfinite(value) and (state.best_metric is None or value < state.best_metric)
        if improved:
            state.best_metric, state.best_step, state.evaluations_since_best = value, state.step, 0
            if self.select_best:
                self._save()
        else:
            state.evaluations_since_best += 1
            if self.should_stop:
                logger.info(
                    "stopping early at step %d: validation %s has not improved on %.4g (step %d) in %d evaluations",
                    state.step, self.metric, state.best_metric, state.best_step, state.evaluations_since_best,
                )
        return improved

    def _save(self) -> None:
        if self.accelerator.is_main_process:
            write_directory(self.directory, self.model.save_pretrained)
            logger.info("new best validation %s %.4g at step %d: saved to %s",
                        self.metric, self.state.best_metric, self.state.step, self.directory)
        self.accelerator.wait_for_everyone()

    def load_best(self) -> None:
        """Put the weights of `export_step` back into the model (a no-op when they are the current ones)."""
        if self.export_step != self.state.step:
            load_model(self.model, self.directory / "model.safetensors")  # copied onto the model's devices
            logger.info("restored the best weights (step %d, validation %s %.4g) for the export",
                        self.state.best_step, self.metric, self.state.best_metric)

    def summary(self) -> dict[str, float | int | bool | None]:
        """The best step and metric, the last evaluation's metric, and whether the run stopped early."""
        return {
            "best_step": self.state.best_step,
            f"best_{self.metric}": self.state.best_metric,
            f"final_{self.metric}": self.state.last_metric,
            "stopped_early": self.should_stop and self.state.step < self.max_steps,
        }
