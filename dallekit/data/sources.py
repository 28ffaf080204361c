"""Load any configured source as `train`/`validation` splits with `image` and `text` columns
(and `captions`, several per image, where the source has them)."""

import dataclasses
import hashlib
import logging
import os
import posixpath
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import datasets
import huggingface_hub
import pyarrow
from datasets.fingerprint import Hasher
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, HFValidationError, RepositoryNotFoundError
from huggingface_hub.utils import validate_repo_id

from .cache import local_files, source_fingerprint
from .checks import DataError, DataSourceNotFoundError, check_image_folder
from .config import DataConfig
from .digits import make_digits_dataset
from .replay import mix_in_replay
from .shapes import make_shapes_dataset
from .shards import held_out_shards, hub_shard_files, is_shard_source, shard_features, shard_files, to_pairs

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
    source with a `config.captions_column`.

    With `config.streaming`, an `IterableDatasetDict` whose `train` split is a stream
    (`datasets.IterableDataset`, read shard by shard, never whole in memory) and whose `validation`
    split is a map-style `datasets.Dataset`: held out and small, it is read from the stream once into
    `datasets`' cache (Arrow on disk, memory-mapped; `materialise`), so that every process evaluates
    all of it, each its share, and gathers exactly.
    """
    if config.source in BUILTIN_DATASETS:
        splits = BUILTIN_DATASETS[config.source](config)
        splits = splits.cast_column("image", datasets.Image(decode=False))
        if config.streaming:
            splits = datasets.IterableDatasetDict(
                {"train": splits["train"].to_iterable_dataset(), "validation": splits["validation"]}
            )
    elif is_shard_source(config.source):
        splits = _load_shards(config, shard_files(config.source))
    else:
        splits = _load_external(config)
    if config.streaming:
        splits["validation"] = materialise(splits["validation"], config)
    if config.max_examples is not None:
        splits["train"] = splits["train"].take(config.max_examples)
    if config.replay_source is not None:
        replay = load_text_image_dataset(dataclasses.replace(
            config, source=config.replay_source, replay_source=None, validation_source=None, max_examples=None))
        splits["train"] = mix_in_replay(splits["train"], replay["train"], config.replay_fraction, config.seed,
                                        config.replay_source)
    sizes = {
        name: len(split) if isinstance(split, datasets.Dataset) else "streamed"
        for name, split in splits.items()
    }
    logger.info("Loaded %r: %s examples", config.source, sizes)
    return splits


def _load_external(config: DataConfig) -> Splits:
    """A local folder or Hub dataset through `datasets.load_dataset`, standardised."""
    check_source_exists(config.source, text_column=config.text_column)
    if not os.path.exists(config.source) and (shards := _hub_shards(config.source)) is not None:
        return _load_shards(config, shards)
    if config.validation_source is not None:
        raise DataError(f"validation_source={config.validation_source!r} names held-out WebDataset shards, and "
                        f"{config.source!r} is no shard source: drop it (a folder holds out its validation/ folder)")
    raw = _load_dataset(config)
    if config.train_split not in raw:
        raise DataError(
            f"Source {config.source!r} has no split train_split={config.train_split!r}; "
            f"available splits: {list(raw)}. Set train_split to one of them."
        )
    train = _standardise(raw[config.train_split], config)
    _check_captions(train, "train", config.source)
    if config.validation_split in raw:
        validation = _standardise(raw[config.validation_split], config)
        _check_captions(validation, "validation", config.source)
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


# What `_load_dataset` loaded map-style in this process, by its arguments and the files' sizes and times: every
# consumer of a run (each stage, the judges, the evaluation) loads its data, and `datasets.load_dataset` resolves
# a folder's files again each time, 5 s for 10,000 images on 2 cores, before reading its cached Arrow tables.
_LOADED: dict[str, datasets.DatasetDict] = {}
MAX_LOADED = 8


def _load_dataset(config: DataConfig, path: str | None = None,
                  **options: object) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    """`datasets.load_dataset(path or config.source, **options)`, what it raises about the data or the Hub as
    one-line `DataError`s. A map-style load is kept for this process's next load of the same, unchanged files
    (a stream is not: it holds the state of its iteration)."""
    local = os.path.exists(config.source) or (is_shard_source(config.source) and "://" not in config.source)
    sources = [name for name in (config.source, config.validation_source) if name]
    key = None if config.streaming else Hasher.hash([path, options, [(name, local_files(name)) for name in sources]])
    if key in _LOADED:
        return datasets.DatasetDict(_LOADED[key])
    try:
        loaded = datasets.load_dataset(path or config.source, streaming=config.streaming, **options)
    except (pyarrow.ArrowException, datasets.exceptions.DatasetGenerationError) as error:
        cause = error.__cause__ or error.__context__ or error
        raise DataError(f"datasets cannot read {config.source}: {_first_line(cause)}") from error
    except (ConnectionError, OSError) as error:
        if local:
            raise
        raise DataError(f"cannot load the Hub dataset {config.source!r} ({_first_line(error)}): check the network "
                        "and the id, or give the path of a local image folder") from error
    if key is not None:
        if len(_LOADED) >= MAX_LOADED:
            _LOADED.pop(next(iter(_LOADED)))
        _LOADED[key] = datasets.DatasetDict(loaded)
    return loaded


def _hub_shards(source: str) -> dict[str, list[str]] | None:
    """`hub_shard_files(source)`, what it raises about the Hub as a one-line `DataError`."""
    try:
        return hub_shard_files(source)
    except (ConnectionError, OSError) as error:
        raise DataError(f"cannot load the Hub dataset {source!r} ({_first_line(error)}): check the network "
                        "and the id, or give the path of a local image folder") from error


def _validation_shards(config: DataConfig, shards: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    """(train, validation) shard names: `config.validation_source`'s shards, else the source's validation split,
    else whole shards held out (`held_out_shards`; none when there are too few, to hold out samples instead)."""
    if config.train_split not in shards:
        raise DataError(f"{config.source!r} has no {config.train_split!r} split of shards (splits: {list(shards)}): "
                        "set train_split to one of them")
    train = shards[config.train_split]
    if config.validation_source is not None:
        named = (shard_files(config.validation_source) if is_shard_source(config.validation_source)
                 else _hub_shards(config.validation_source))
        if named is None:
            raise DataError(f"validation_source={config.validation_source!r} holds no WebDataset shards: give a "
                            "pattern such as 'shards/{00090..00099}.tar', a folder of .tar files or one .tar")
        validation = [name for names in named.values() for name in names]
        kept = [name for name in train if name not in validation]
        if len(kept) < len(train):
            logger.info("%d shards of %r are validation_source's: left out of training", len(train) - len(kept),
                        config.source)
        return kept, validation
    if config.validation_split in shards:
        return train, shards[config.validation_split]
    train, validation = held_out_shards(train, config.validation_fraction, config.seed)
    if validation:
        logger.info("%r has no validation shards: holding out %d of its %d shards (%.0f%%, seed %d) for validation",
                    config.source, len(validation), len(train) + len(validation), 100 * config.validation_fraction,
                    config.seed)
    return train, validation


def _load_shards(config: DataConfig, shards: dict[str, list[str]]) -> Splits:
    """WebDataset shards through `datasets`' `webdataset` builder, as `train` and `validation` image/text splits."""
    train_files, validation_files = _validation_shards(config, shards)
    if not train_files:
        raise DataError(f"{config.source!r}: every shard is a validation shard: leave some for training")
    data_files = {"train": train_files} | ({"validation": validation_files} if validation_files else {})
    raw = _load_dataset(config, "webdataset", data_files=data_files,
                        features=shard_features(config.caption_json_field))
    splits = {name: to_pairs(split, config.caption_json_field, config.source) for name, split in raw.items()}
    if "validation" not in splits:
        logger.info("%r has fewer shards than it takes to hold out %.0f%% of them whole: holding out %.0f%% of its "
                    "samples (seed %d) for validation", config.source, 100 * config.validation_fraction,
                    100 * config.validation_fraction, config.seed)
        splits["train"], splits["validation"] = _carve_validation(splits["train"], config.validation_fraction,
                                                                  config.seed)
    splits_type = datasets.IterableDatasetDict if config.streaming else datasets.DatasetDict
    return splits_type(splits)


def materialise(split: Split, config: DataConfig) -> datasets.Dataset:
    """`split` as a map-style dataset: a stream read once into `datasets`' cache (Arrow on disk, memory-mapped),
    keyed by the source's fingerprint (`cache.source_fingerprint`: the config and its local files' sizes and times),
    so that a later run, or another process of this one, reads it from there."""
    if isinstance(split, datasets.Dataset):
        return split
    if next(iter(split), None) is None:
        raise DataError(f"{config.source!r}: the streamed validation split is empty (a stream without validation "
                        "shards holds out about data.validation_fraction of its samples, by a hash of each image): "
                        "raise data.validation_fraction, or give validation shards (a validation/ folder, or "
                        "data.validation_source)")
    return datasets.Dataset.from_generator(
        _examples, features=split.features, gen_kwargs={"split": split}, split=datasets.Split.VALIDATION,
        fingerprint=Hasher.hash(["validation", source_fingerprint(config)]),
    )


def _examples(split: datasets.IterableDataset) -> Iterator[dict]:
    yield from split


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _check_captions(split: Split, name: str, source: str) -> None:
    """Missing captions (None) of a map-style split are an error, empty ones a warning, both with a count (a
    folder's metadata is checked line by line before it loads; a stream is not read ahead)."""
    if not isinstance(split, datasets.Dataset) or os.path.isdir(source):
        return
    texts = list(split["text"])
    missing = [index for index, text in enumerate(texts) if not isinstance(text, str)]
    if missing:
        raise DataError(f"{source}: {len(missing)} of the {len(texts)} rows of the {name} split have no caption "
                        f"string (the first: row {missing[0]}, {texts[missing[0]]!r}): fill or drop them")
    empty = sum(1 for text in texts if not text.strip())
    if empty:
        logger.warning("%d of the %d captions of the %s split of %r are empty: they train as the unconditional "
                       "caption", empty, len(texts), name, source)


_CHECKED: dict[tuple[str, str | None], tuple] = {}  # folder -> the state it was checked in, to check it once


def _folder_state(folder: str) -> tuple:
    """The modification times of `folder` and its metadata files: a folder whose state is unchanged is not re-read."""
    state = [os.stat(folder).st_mtime_ns]
    for root, directories, files in os.walk(folder):
        directories[:] = [name for name in directories if not name.startswith((".", "__"))]
        state += [(os.path.join(root, name), os.stat(os.path.join(root, name)).st_mtime_ns) for name in files
                  if name.startswith("metadata.")]
    return tuple(state)


def _looks_like_a_path(source: str) -> bool:
    """A name that can only mean a local path: no Hub id is absolute, starts with . or ~, or lacks a '/'."""
    return (os.path.isabs(source) or source.startswith((".", "~")) or "/" not in source or "\\" in source
            or source.count("/") > 1)


def _offline() -> bool:
    return huggingface_hub.constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in (
        "1", "ON", "YES", "TRUE")


def _in_hub_cache(repo_id: str) -> bool:
    namespace, name = repo_id.split("/")
    return (Path(datasets.config.HF_DATASETS_CACHE) / f"{namespace}___{name}").is_dir() or (
        Path(huggingface_hub.constants.HF_HUB_CACHE) / f"datasets--{namespace}--{name}").is_dir()


_REACHED: set[str] = set()  # Hub ids whose dataset the Hub confirmed in this process


def check_source_exists(source: str, text_column: str | None = "text") -> None:
    """Raise a one-line `DataError` (`DataSourceNotFoundError`, also a FileNotFoundError, when there is no such
    source) unless `source` can load: a built-in name; a local folder whose metadata checks out
    (`checks.check_image_folder`; pass the run's `DataConfig.text_column` as `text_column`, or None not to
    check the caption column); or a Hub id `namespace/name` that is in the cache when `HF_HUB_OFFLINE=1`,
    else that the Hub confirms.

    A name that is no existing path and looks like a path (no '/', or starting with / . ~) is never
    sent to the Hub. A checked folder is not re-read while it and its metadata files are unchanged.
    """
    if source in BUILTIN_DATASETS:
        return
    if is_shard_source(source):
        shard_files(source)  # a pattern that matches nothing is a DataError
        return
    if os.path.isdir(source):
        key, state = (os.path.realpath(source), text_column), _folder_state(source)
        if _CHECKED.get(key) != state:
            check_image_folder(source, text_column)
            _CHECKED[key] = state
        return
    if os.path.exists(source):
        return  # a data file: `datasets` reads it
    where = os.path.abspath(os.path.expanduser(source))
    builtins = ", ".join(BUILTIN_DATASETS)
    if source.startswith("~") and os.path.exists(where):
        raise DataSourceNotFoundError(f"{source!r} starts with a ~ that no shell expanded: give the folder as {where}")
    if _looks_like_a_path(source) or not _is_repo_id(source):
        raise DataSourceNotFoundError(
            f"no folder {where}: {source!r} is not a built-in dataset ({builtins}), an existing local folder, or a "
            "Hub dataset id such as 'namespace/name'; give the path of your image folder (with metadata.jsonl)"
        )
    if source in _REACHED or (_offline() and _in_hub_cache(source)):
        return
    if _offline():
        raise DataSourceNotFoundError(
            f"no folder {where}, and the Hub dataset {source!r} is not in the local cache while HF_HUB_OFFLINE=1 "
            "forbids downloading it: unset HF_HUB_OFFLINE, or give the path of an existing image folder"
        )
    try:
        huggingface_hub.HfApi().dataset_info(source, timeout=15)
    except GatedRepoError:
        _REACHED.add(source)  # its files need an accepted licence and a login, which `datasets` reports
    except RepositoryNotFoundError:
        raise DataSourceNotFoundError(
            f"no folder {where}, and no dataset {source!r} on the Hub (a private one needs `hf auth login`): give "
            "the path of your image folder, or an existing Hub dataset id"
        ) from None
    except HfHubHTTPError as error:
        raise DataError(f"the Hub answered {_first_line(error)} for dataset {source!r}: try again later, or give "
                        "the path of a local image folder") from None
    except Exception as error:  # noqa: BLE001 (httpx's connection errors and timeouts, whatever the transport)
        if _in_hub_cache(source):
            logger.warning("cannot reach the Hub (%s): loading %r from the local cache", _first_line(error), source)
            return
        raise DataError(
            f"cannot reach the Hub to download the dataset {source!r} ({type(error).__name__}: {_first_line(error)}): "
            f"check the network, or give the path of a local image folder (there is no folder {where})"
        ) from None
    else:
        _REACHED.add(source)


def _is_repo_id(source: str) -> bool:
    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


def _standardise(split: Split, config: DataConfig) -> Split:
    """Keep only the image and text columns, named `image` and `text`, images left undecoded, and
    the captions column, named `captions`, when the source has one."""
    columns = split.column_names
    missing = [name for name in (config.image_column, config.text_column) if name not in columns]
    if missing:
        raise DataError(
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
    raise DataError(
        f"Column captions_column={config.captions_column!r} of {config.source!r} holds {feature}, not lists of "
        "strings: give each image a list of captions there, or set captions_column to None to ignore it."
    )


def training_captions(split: Split) -> Iterable[str]:
    """Every caption a model trained on `split` sees: each entry of `captions` when it has them, else `text`.

    A list for a map-style split; for a stream, an iterator that reads them in one pass as it is consumed (the
    images are read past, not decoded), so that they are never all in memory.
    """
    if isinstance(split, datasets.Dataset):
        if "captions" in split.column_names:
            return [caption for captions in split["captions"] for caption in captions]
        return list(split["text"])
    if "captions" in split.column_names:
        return (caption for captions in split.select_columns(["captions"])["captions"] for caption in captions)
    return iter(split.select_columns(["text"])["text"])


def _carve_validation(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Split `train` into (train, validation) holding out `fraction` of it, reproducibly.

    A map-style dataset is shuffled with `seed` and split exactly; a stream, whose length is
    unknown, is split by a seeded hash of each image (its bytes, or the name of the file it is
    read from, never the folder it sits in), so the held-out share is approximate and the same
    data gives the same split wherever it is stored.
    """
    if isinstance(train, datasets.Dataset):
        parts = train.train_test_split(test_size=fraction, seed=seed)
        return parts["train"], parts["test"]

    def held_out(image: dict) -> bool:
        data = image["bytes"] or posixpath.basename(image["path"].replace("\\", "/")).encode()
        digest = hashlib.blake2b(f"{seed}:".encode() + data, digest_size=8).digest()
        return int.from_bytes(digest, "little") / 2**64 < fraction

    validation = train.filter(held_out, input_columns="image")
    return train.filter(lambda image: not held_out(image), input_columns="image"), validation
