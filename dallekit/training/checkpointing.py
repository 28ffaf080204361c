"""Checkpoints of a whole training state: atomic `save_state` every N steps, keep the last k, resume.

Layout: `output_dir/checkpoints/step_N/` (accelerate's files: models, optimisers, schedulers, RNG
states, plus our `TrainState`), and a copy of each carried directory of `output_dir` (the best model
so far, `best/`), restored into `output_dir` on resume. A checkpoint is written to `.tmp-step_N` and
renamed when complete, so a run killed mid-save never leaves a half checkpoint that `latest` would pick.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from accelerate import Accelerator

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclasses.dataclass
class TrainState:
    """Counters that must survive a resume; registered with accelerate so `save_state` stores them."""

    step: int = 0
    micro_batches: int = 0  # the data position: micro-batches consumed, skipped ones included
    data_positions: list[list[int]] = dataclasses.field(default_factory=list)  # a stream's [epoch, offset] by process
    images_seen: int = 0
    tokens_seen: int = 0
    num_skipped: int = 0  # unreadable images dropped from training batches
    train_seconds: float = 0.0  # training time of the runs before the last resume
    planned_steps: int | None = None  # fewer than max_steps where training.max_train_seconds holds fewer (budget)
    schedule_anchor: list[float] | None = None  # [step, cosine progress] a re-planned schedule goes on from (budget)
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # every validation: step, seconds, metrics
    # model selection (training.loop.ModelSelection): the best and the latest validation metric, and the wait since the best
    best_metric: float | None = None
    best_step: int | None = None
    last_metric: float | None = None
    evaluations_since_best: int = 0

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def replace_directory(tmp: Path, final: Path) -> None:
    """Put the complete directory `tmp` in place of `final` (whatever `final` held is removed)."""
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def write_directory(final: Path, write: Callable[[Path], object]) -> None:
    """`write(scratch)` into `.tmp-<name>` beside `final`, then put it in place: `final` is never half-written."""
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    replace_directory(tmp, final)


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Complete checkpoints in `checkpoint_dir`, oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoint_dir.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [path for _, path in sorted(found)]


def resolve_checkpoint(resume_from_checkpoint: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint directory to resume from: `latest` (None if the run has none yet) or a path."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(Path(output_dir) / "checkpoints")
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(
            f"--resume_from_checkpoint {resume_from_checkpoint!r} is not a directory; "
            f"pass 'latest' or a path like {Path(output_dir) / 'checkpoints' / 'step_500'}"
        )
    return path


class CheckpointManager:
    """Saves and restores the accelerator's full state under `output_dir/checkpoints`.

    `carry` names directories of `output_dir` that are part of the training state (the best model so
    far): each checkpoint holds a copy, and resuming from it puts that copy back (or removes the
    directory when the checkpoint has none), so a resumed run continues from the same best.
    """

    def __init__(
        self, accelerator: Accelerator, output_dir: str | Path, total_limit: int | None, carry: Sequence[str] = ()
    ) -> None:
        self.accelerator = accelerator
        self.output_dir = Path(output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.total_limit = total_limit
        self.carry = tuple(carry)

    def save(self, step: int) -> Path:
        """Write the state of step `step` atomically and prune old checkpoints; returns the directory."""
        final = self.checkpoint_dir / f"step_{step}"
        tmp = self.checkpoint_dir / f".tmp-step_{step}"
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            for name in self.carry:
                if (self.output_dir / name).is_dir():
                    shutil.copytree(self.output_dir / name, tmp / name)
            replace_directory(tmp, final)
            self._prune()
            logger.info("saved checkpoint %s", final)
        self.accelerator.wait_for_everyone()
        return final

    def load(self, path: Path) -> None:
        """Restore models, optimisers, schedulers, RNG, registered objects and carried directories from `path`."""
        self.accelerator.load_state(str(path))
        if self.accelerator.is_main_process:
            for name in self.carry:
                target = self.output_dir / name
                if (path / name).is_dir():
                    write_directory(target, partial(shutil.copytree, path / name))
                else:
                    shutil.rmtree(target, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        logger.info("resumed from checkpoint %s", path)

    def _prune(self) -> None:
        if self.total_limit is None:
            return
        for old in list_checkpoints(self.checkpoint_dir)[: -self.total_limit]:
            shutil.rmtree(old, ignore_errors=True)
