"""The training batches: built from a map-style dataset or a stream, iterated endlessly, resumed exactly.

A process's data position is the pass (epoch) it is in and the batches of that pass it has consumed.
A map-style dataset's order is a function of (seed, epoch) (accelerate's seedable sampler), the same
on every process, and its position a function of the micro-batches consumed: epoch `n // len(loader)`,
offset `n % len(loader)`, skipped to directly. A stream (`datasets.IterableDataset`) has no length:
each process reads its own shards (accelerate splits them, `DataLoaderConfiguration(dispatch_batches=False)`),
so passes end at different times on different processes; each process's position is checkpointed
(`TrainState.data_positions`), and a resumed process replays its pass, a function of (seed, epoch), up to it.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from accelerate import Accelerator, PartialState
from accelerate.logging import get_logger
from torch.utils.data import DataLoader, Dataset

from dallekit.training.config import TrainingConfig

logger = get_logger(__name__)

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


def count_examples(split: Dataset | datasets.IterableDataset, enough: int) -> int:
    """How many examples `split` holds; a stream's are counted (read past, not decoded) up to `enough` only, which
    is all a check of batch sizes against the data needs."""
    if isinstance(split, datasets.IterableDataset):
        return sum(1 for _ in itertools.islice(split.select_columns(["text"]), enough))
    return len(split)


def training_loader(dataset: Dataset | datasets.IterableDataset, run: TrainingConfig, shuffle_buffer_size: int,
                    collate_fn: Callable[[list[Any]], Any] | None = None) -> DataLoader:
    """`run.batch_size` examples of `dataset` a batch (the last incomplete one dropped), shuffled with `run.seed`.

    A map-style dataset is shuffled by its sampler; a stream through a buffer of `shuffle_buffer_size`
    examples, its shards' order shuffled too, anew each epoch (`set_epoch`). The loader has a generator
    of its own: starting an epoch must not draw from the global RNG the model samples from.
    """
    streamed = isinstance(dataset, datasets.IterableDataset)
    if streamed:
        dataset = dataset.shuffle(seed=run.seed, buffer_size=shuffle_buffer_size)
        num_processes = PartialState().num_processes
        if dataset.num_shards < num_processes:
            logger.warning("the training stream has %d shard(s), fewer than the %d processes: every process reads "
                           "all of it and keeps its share of the batches; write at least %d shards (processes x "
                           "data-loading workers) so that each reads only its own", dataset.num_shards,
                           num_processes, num_processes * max(run.num_workers, 1))
    return DataLoader(dataset, batch_size=run.batch_size, shuffle=not streamed, drop_last=True, collate_fn=collate_fn,
                      num_workers=run.num_workers, generator=torch.Generator().manual_seed(run.seed))


def batches_per_epoch(loader: DataLoader) -> int | None:
    """How many batches one pass over `loader` yields; None for a stream (an iterable dataset without a length)."""
    try:
        return len(loader)
    except TypeError:
        return None


@dataclass
class DataPosition:
    """Where a process is in its training data: the pass, and the batches of it already consumed."""

    epoch: int = 0
    offset: int = 0


def resume_position(loader: DataLoader, micro_batches: int, saved: Sequence[Sequence[int]],
                    process_index: int) -> DataPosition:
    """The position of this process after `micro_batches` micro-batches: for a stream, its entry of `saved`
    (`gather_positions` at the checkpoint), at the start where there is none (a fresh run).

    A stream checkpointed by another number of processes split its shards otherwise: each process then
    starts the pass after the latest one saved (an approximation: what remained of the saved passes is not
    seen, and nothing is seen twice within a pass), with a warning.
    """
    per_epoch = batches_per_epoch(loader)
    if per_epoch is not None:
        return DataPosition(*divmod(micro_batches, per_epoch)) if per_epoch else DataPosition()
    if not saved:
        return DataPosition()
    if len(saved) != PartialState().num_processes:
        epoch = max(epoch for epoch, _ in saved) + 1
        logger.warning("the checkpoint's stream positions are those of %d processes, and this run has %d: the "
                       "shards split otherwise, so every process starts a new pass (epoch %d) rather than "
                       "where it stopped", len(saved), PartialState().num_processes, epoch)
        return DataPosition(epoch)
    return DataPosition(*saved[process_index])


def gather_positions(accelerator: Accelerator, position: DataPosition) -> list[list[int]]:
    """Every process's `[epoch, offset]`, in process order; a collective: call it on every process."""
    local = torch.tensor([[position.epoch, position.offset]], device=accelerator.device)
    return accelerator.gather(local).tolist()


def iterate_batches(accelerator: Accelerator, loader: DataLoader, position: DataPosition) -> Iterator[Any]:
    """Yield batches forever from `position` on, one pass after another, advancing `position` as each is taken.

    A map-style loader skips to its offset (`accelerator.skip_first_batches`); a stream replays its pass up to
    it, reading and decoding those batches again (at most one pass), and goes on to the next pass when that
    one ends there.
    """
    per_epoch = batches_per_epoch(loader)
    no_batches = (f"the training split yields no batches: it is empty or smaller than one batch of {loader.batch_size} "
                  "per process: lower training.batch_size, or add data")
    if per_epoch == 0:
        raise ValueError(no_batches)
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(position.epoch)
        if per_epoch is None:
            iterator = iter(loader)
            collections.deque(itertools.islice(iterator, position.offset), maxlen=0)  # replayed, not yielded
        else:
            iterator = iter(accelerator.skip_first_batches(loader, position.offset) if position.offset else loader)
        for batch in iterator:
            position.offset += 1
            yield batch
        if position.offset == 0:  # a whole pass without a batch
            raise ValueError(no_batches)
        position.epoch, position.offset = position.epoch + 1, 0
