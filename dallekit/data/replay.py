"""Replay: mixing another source's training examples into a training split, so that fine-tuning on new data keeps
showing the model some of what it learnt before (`DataConfig.replay_source`, `replay_fraction`)."""

from __future__ import annotations

import logging
import math

import datasets

from .checks import DataError

logger = logging.getLogger(__name__)

# the most rows a map-style split mixed with replay may have (each is encoded once before training)
MAX_REPLAY_ROWS = 20_000


def replay_passes(train_size: int, replay_size: int, fraction: float) -> int:
    """How many times a map-style split of `train_size` examples is repeated so that a `fraction` share of the
    result holds all `replay_size` replay examples, within `MAX_REPLAY_ROWS` rows (at least once)."""
    train_size = max(train_size, 1)
    covering = math.ceil(replay_size * (1 - fraction) / (fraction * train_size))
    within_cap = math.floor(MAX_REPLAY_ROWS * (1 - fraction) / train_size)
    return max(1, min(covering, within_cap))


def mix_in_replay(train: datasets.Dataset | datasets.IterableDataset, replay: datasets.Dataset | datasets.IterableDataset,
                  fraction: float, seed: int, source: str) -> datasets.Dataset | datasets.IterableDataset:
    """`train` with examples of `replay` making up about `fraction` of the result.

    Map-style: `train` repeated as many times as it takes for a `fraction` share to hold every example of `replay`,
    plus that share of `replay` (a seeded sample), concatenated (the loader shuffles). So a run sees the whole replay
    source, not the same few examples again and again, and the new data keeps its share. The result is capped at
    `MAX_REPLAY_ROWS` rows (a sample of `replay` beyond that); `replay` smaller than one pass's share is used whole,
    with a warning. A stream: the two interleaved, each example drawn from `replay` with probability `fraction`
    (`datasets.interleave_datasets`, seeded), ending with the first to run out. Only `image`, `text` and `captions`
    (when both have it) are kept, with `train`'s features.
    """
    shared = [name for name in ("image", "text", "captions")
              if name in train.column_names and name in (replay.column_names or [])]
    if shared[:2] != ["image", "text"]:
        raise DataError(f"replay_source={source!r} has no image and text columns to mix into the training data: "
                        "give a captioned image source")
    train, replay = train.select_columns(shared), replay.select_columns(shared)
    if train.features is not None and replay.features != train.features:
        replay = replay.cast(train.features)
    if isinstance(train, datasets.Dataset) and isinstance(replay, datasets.Dataset):
        passes = replay_passes(len(train), len(replay), fraction)
        wanted = round(fraction / (1 - fraction) * passes * len(train))
        if passes == 1 and wanted > len(replay):
            logger.warning("replay_source %r has %d training examples, fewer than the %d that replay_fraction %.2f "
                           "asks for: replaying all of them", source, len(replay), wanted, fraction)
        sample = replay.shuffle(seed=seed).select(range(min(wanted, len(replay))))
        logger.info("replaying %d of the %d examples of %r beside %d pass(es) over the %d training examples "
                    "(%.0f%% replay)", len(sample), len(replay), source, passes, len(train),
                    100 * len(sample) / (passes * len(train) + len(sample)))
        return datasets.concatenate_datasets([train] * passes + [sample])
    if isinstance(train, datasets.Dataset):
        train = train.to_iterable_dataset()
    if isinstance(replay, datasets.Dataset):
        replay = replay.to_iterable_dataset()
    logger.info("replaying examples of %r: each training example drawn from it with probability %.2f", source, fraction)
    return datasets.interleave_datasets([train, replay], probabilities=[1 - fraction, fraction], seed=seed,
                                        stopping_strategy="first_exhausted")
