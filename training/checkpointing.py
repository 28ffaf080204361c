"""Checkpoints of a whole training state: atomic `save_state` every N steps, keep the last k, resume.

Layout: `output_dir/checkpoints/step_N/` (accelerate's files: models, optimisers, schedulers, RNG
states, plus our `TrainState`). A checkpoint is written to `.tmp-step_N` and renamed when complete,
so a run killed mid-save never leaves a half checkpoint that `latest` would pick.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclasses.dataclass
class TrainState:
    """Counters that must survive a resume; registered with accelerate so `save_state` stores them."""

    step: int = 0
    images_seen: int = 0
    num_skipped: int = 0

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


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
    """Saves and restores the accelerator's full state under `output_dir/checkpoints`."""

    def __init__(self, accelerator: Accelerator, output_dir: str | Path, total_limit: int | None) -> None:
        self.accelerator = accelerator
        self.checkpoint_dir = Path(output_dir) / "checkpoints"
        self.total_limit = total_limit

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
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            self._prune()
            logger.info("saved checkpoint %s", final)
        self.accelerator.wait_for_everyone()
        return final

    def load(self, path: Path) -> None:
        """Restore models, optimisers, schedulers, RNG and registered objects from `path`."""
        self.accelerator.load_state(str(path))
        logger.info("resumed from checkpoint %s", path)

    def _prune(self) -> None:
        if self.total_limit is None:
            return
        for old in list_checkpoints(self.checkpoint_dir)[: -self.total_limit]:
            shutil.rmtree(old, ignore_errors=True)
