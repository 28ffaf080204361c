"""Load any configured source as `train`/`validation` splits with `image` and `text` columns
(and `captions`, several per image, where the source has them)."""

import hashlib
import logging
import os
from collections.abc import Callable

import datasets
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .config import DataConfig
from .digits import make_digits_dataset
from .shapes import make_shapes_dataset

logger = logging.getLogger(__name__)

Splits = datasets.DatasetDict | datasets.IterableDatasetDict
Split = datasets.Dataset | datasets.IterableDataset

BUILTIN_DATASETS: dict[str, Callable[[DataConfig], datasets.DatasetDict]] = {
    "digits": lambda config: make_digits_dataset(config.image_size),
    "shapes": lambda config: make_shapes_dataset(config.num_shapes, config.image_size),
    "emoji": lambda config: _make_emoji_dataset(config.image_size, config.caption_languages),
}


def _make_emoji_dataset(image_size: int, languages: list[str]) -> datasets.DatasetDict:
    from .emoji import make_emoji_dataset  # imported on use: `python -m dallekit.data.emoji` runs it as __main__

    return make_emoji_dataset(image_size, languages)


def load_text_image_dataset(config: DataConfig) -> Splits:
    """`train` and `validation` splits of `config.source` with columns `image` and `text`.

    `image` holds undecoded `{"bytes", "path"}` values (`datasets.Image(decode=False)`):
    decoding, and skipping unreadable files, is the collator's job. `digits` and `shapes` also
    carry a `label` column; `emoji` carries `captions` and structured columns, and so does a
    source with a `config.captions_column`. Streaming returns an `IterableDatasetDict`.
    """
    if config.source in BUILTIN_DATASETS:
        splits = BUILTIN_DATASETS[config.source](config)
        splits = splits.cast_column("image", datasets.Image(decode=False))
        if config.streaming:
            splits = datasets.IterableDatasetDict(
                {name: split.to_iterable_dataset() for name, split in splits.items()}
            )
    else:
        splits = _load_external(config)
    if config.max_examples is not None:
        splits["train"] = splits["train"].take(config.max_examples)
    sizes = {
        name: len(split) if isinstance(split, datasets.Dataset) else "streamed"
        for name, split in splits.items()
    }
    logger.info("Loaded %r: %s examples", config.source, sizes)
    return splits


def _load_external(config: DataConfig) -> Splits:
    """A local folder or Hub dataset through `datasets.load_dataset`, standardised."""
    check_source_exists(config.source)
    raw = datasets.load_dataset(config.source, streaming=config.streaming)
    if config.train_split not in raw:
        raise ValueError(
            f"Source {config.source!r} has no split train_split={config.train_split!r}; "
            f"available splits: {list(raw)}. Set train_split to one of them."
        )
    train = _standardise(raw[config.train_split], config)
    if config.validation_split in raw:
        validation = _standardise(raw[config.validation_split], config)
    else:
        logger.info(
            "Source %r has no %r split: holding out %.0f%% of %r (seed %d) for validation.",
            config.source,
            config.validation_split,
            100 * config.validation_fraction,
            config.train_split,
            config.seed,
        )
        train, validation = _carve_validation(train, config.validation_fraction, config.seed)
    splits_type = datasets.IterableDatasetDict if config.streaming else datasets.DatasetDict
    return splits_type({"train": train, "validation": validation})


def check_source_exists(source: str) -> None:
    """Raise when `source` is neither an existing path nor shaped like a Hub dataset id."""
    if os.path.exists(source):
        return
    try:
        validate_repo_id(source)
    except HFValidationError:
        raise FileNotFoundError(
            f"source={source!r} is not a built-in dataset ({', '.join(BUILTIN_DATASETS)}), "
            "an existing local folder, or a Hub dataset id such as 'namespace/name'."
        ) from None


def _standardise(split: Split, config: DataConfig) -> Split:
    """Keep only the image and text columns, named `image` and `text`, images left undecoded, and
    the captions column, named `captions`, when the source has one."""
    columns = split.column_names
    missing = [name for name in (config.image_column, config.text_column) if name not in columns]
    if missing:
        raise ValueError(
            f"Column(s) {missing} not found in {config.source!r}; available columns: {columns}. "
            "Set image_column and text_column to the names of the image and caption columns."
        )
    renames = {config.image_column: "image", config.text_column: "text"}
    if config.captions_column in columns:
        _check_caption_lists(split, config)
        renames[config.captions_column] = "captions"
    # cast before anything else: a stream decodes with the features it had at each step
    split = split.cast_column(config.image_column, datasets.Image(decode=False))
    split = split.select_columns(list(renames))
    return split.rename_columns({old: new for old, new in renames.items() if old != new})


def _check_caption_lists(split: Split, config: DataConfig) -> None:
    """Raise unless the captions column holds lists of strings (unknown types of a stream pass)."""
    feature = split.features[config.captions_column] if split.features else None
    if feature is None or (
        isinstance(feature, (datasets.List, datasets.LargeList)) and feature.feature == datasets.Value("string")
    ):
        return
    raise ValueError(
        f"Column captions_column={config.captions_column!r} of {config.source!r} holds {feature}, not lists of "
        "strings: give each image a list of captions there, or set captions_column to None to ignore it."
    )


def training_captions(split: datasets.Dataset) -> list[str]:
    """Every caption a model trained on `split` sees: each entry of `captions` when it has them, else `text`."""
    if "captions" in split.column_names:
        return [caption for captions in split["captions"] for caption in captions]
    return list(split["text"])


def _carve_validation(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Split `train` into (train, validation) holding out `fraction` of it, reproducibly.

    A map-style dataset is shuffled with `seed` and split exactly; a stream, whose length is
    unknown, is split by a seeded hash of each image, so the held-out share is approximate and
    identical images always land on the same side.
    """
    if isinstance(train, datasets.Dataset):
        parts = train.train_test_split(test_size=fraction, seed=seed)
        return parts["train"], parts["test"]

    def held_out(image: dict) -> bool:
        data = image["bytes"] or image["path"].encode()
        digest = hashlib.blake2b(f"{seed}:".encode() + data, digest_size=8).digest()
        return int.from_bytes(digest, "little") / 2**64 < fraction

    validation = train.filter(held_out, input_columns="image")
    return train.filter(lambda image: not held_out(image), input_columns="image"), validation
