"""Endless, resumable iteration over a prepared DataLoader.

The data position is a pure function of the number of micro-batches already consumed: epoch
`e = n // len(loader)` (the seeded sampler reshuffles per epoch) and offset `n % len(loader)`,
so a resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from accelerate import Accelerator
from torch.utils.data import DataLoader

MIN_BATCH_SIZE = 2  # the scorer's contrastive loss needs a second pair in a batch to compare with
FITTED_STEPS_PER_EPOCH = 2  # batches per process and epoch that a fitted batch leaves, at least, where it can


def fitted_batch_size(num_examples: int, num_processes: int) -> int:
    """The batch per process for a training split smaller than a recipe's batch: the largest power of two
    that leaves each process `FITTED_STEPS_PER_EPOCH` batches per epoch, and at least `MIN_BATCH_SIZE`."""
    per_process = num_examples // num_processes
    batch = MIN_BATCH_SIZE
    while batch * 2 * FITTED_STEPS_PER_EPOCH <= per_process:
        batch *= 2
    return batch


def batches_per_epoch(loader: DataLoader) -> int | None:
    """How many batches one pass over `loader` yields; None for a stream (an iterable dataset without a length)."""
    try:
        return len(loader)
    except TypeError:
        return None


def iterate_batches(accelerator: Accelerator, loader: DataLoader, start: int = 0) -> Iterator[Any]:
    """Yield batches forever, starting after the first `start` micro-batches of the run."""
    per_epoch = batches_per_epoch(loader)  # None for a stream: skip by consuming
    if per_epoch == 0:
        raise ValueError("the training split yields no batches: it is empty or smaller than one batch")
    epoch, offset = divmod(start, per_epoch) if per_epoch else (0, start)
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(loader, offset) if offset and per_epoch else loader
        iterator = iter(epoch_loader)
        if offset and not per_epoch:
            for _ in range(offset):
                next(iterator)
        yielded = False
        for batch in iterator:
            yielded = True
            yield batch
        if not yielded:
            raise ValueError("the training split yields no batches: it is empty or smaller than one batch")
        epoch, offset = epoch + 1, 0
