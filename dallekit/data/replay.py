"""Replay: mixing another source's training examples into a training split, so that fine-tuning on new data keeps
showing the model some of what it learnt before (`DataConfig.replay_source`, `replay_fraction`)."""

from __future__ import annotations

import logging

import datasets

from .checks import DataError

logger = logging.getLogger(__name__)


def mix_in_replay(train: datasets.Dataset | datasets.IterableDataset, replay: datasets.Dataset | datasets.IterableDataset,
                  fraction: float, seed: int, source: str) -> datasets.Dataset | datasets.IterableDataset:
    """`train` with examples of `replay` making up about `fraction` of the result.

    Map-style: all of `train` and a seeded sample of `replay` sized `fraction / (1 - fraction) * len(train)` (all of
    it when it is smaller, with a warning), concatenated (the loader shuffles). A stream: the two interleaved, each
    example drawn from `replay` with probability `fraction` (`datasets.interleave_datasets`, seeded), ending with
    the first to run out. Only `image`, `text` and `captions` (when both have it) are kept, with `train`'s features.
    """
    shared = [name for name in ("image", "text", "captions")
              if name in train.column_names and name in (replay.column_names or [])]
    if shared[:2] != ["image", "text"]:
        raise DataError(f"replay_source={source!r} has no image and text columns to mix into the training data: "
                        "give a captioned image source")
    train, replay = train.select_columns(shared), replay.select_columns(shared)
    if train.features is not None:
        replay = replay.cast(train.features)
    if isinstance(train, datasets.Dataset) and isinstance(replay, datasets.Dataset):
        wanted = round(fraction / (1 - fraction) * len(train))
        if wanted > len(replay):
            logger.warning("replay_source %r has %d training examples, fewer than the %d that replay_fraction %.2f "
                           "asks for: replaying all of them", source, len(replay), wanted, fraction)
        sample = replay.shuffle(seed=seed).select(range(min(wanted, len(replay))))
        logger.info("replaying %d examples of %r among %d training examples (%.0f%%)", len(sample), source,
                    len(train), 100 * len(sample) / (len(train) + len(sample)))
        return datasets.concatenate_datasets([train, sample])
    if isinstance(train, datasets.Dataset):
        train = train.to_iterable_dataset()
    if isinstance(replay, datasets.Dataset):
        replay = replay.to_iterable_dataset()
    logger.info("replaying examples of %r: each training example drawn from it with probability %.2f", source, fraction)
    return datasets.interleave_datasets([train, replay], probabilities=[1 - fraction, fraction], seed=seed,
                                        stopping_strategy="first_exhausted")
