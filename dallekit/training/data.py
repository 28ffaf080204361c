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


def iterate_batches(accelerator: Accelerator, loader: DataLoader, start: int = 0) -> Iterator[Any]:
    """Yield batches forever, starting after the first `start` micro-batches of the run."""
    try:
        per_epoch = len(loader)
    except TypeError:  # an iterable (streaming) dataset: no length, so skip by consuming
        per_epoch = None
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
