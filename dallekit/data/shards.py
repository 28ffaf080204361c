"""WebDataset tar shards (img2dataset's layout): writing them from an image folder, finding and reading them.

A shard is a tar of samples, each the members that share a key: `000000042.jpg` (the image, any
of `SHARD_IMAGE_EXTENSIONS`), `000000042.txt` (the caption) and/or `000000042.json` (metadata
whose `caption` field, or another one, holds it). They are read with `datasets`' own `webdataset`
builder (`datasets.load_dataset("webdataset", data_files=...)`), which also reads them from the
Hub and streams them; its features are given here rather than inferred from the first five samples,
so that samples with different image extensions share one dataset and a corrupt image stays
undecoded bytes, skipped and counted by the collator like an unreadable file of a folder.
"""

from __future__ import annotations

import functools
import glob
import io
import json
import logging
import os
import random
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow.compute

from .checks import DataError, check_image_folder

logger = logging.getLogger(__name__)

SHARD_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # the image members read, in this order of preference
SHARD_SIZE = 10_000  # samples per shard, img2dataset's default
_BRACES = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
PAIR_FEATURES = datasets.Features({
    "image": datasets.Image(decode=False), "text": datasets.Value("string"),
    "__key__": datasets.Value("string"), "__url__": datasets.Value("string"),
})


def expand_braces(pattern: str) -> list[str]:
    """Every name a shell-style brace pattern stands for, in order: `{00000..00002}` ranges (zero-padded like
    their first bound) and `{a,b}` alternatives, several groups multiplied out (the `braceexpand` package's
    syntax, without nesting)."""
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    if (bounds := _RANGE.match(body)) is not None:
        first, last = int(bounds.group(1)), int(bounds.group(2))
        width = len(bounds.group(1))
        step = 1 if last >= first else -1
        choices = [f"{number:0{width}d}" for number in range(first, last + step, step)]
    else:
        choices = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end():]
    return [head + choice + rest for choice in choices for rest in expand_braces(tail)]


def _is_remote(path: str) -> bool:
    return "://" in path


def is_shard_source(source: str) -> bool:
    """Whether `source` names WebDataset shards by itself: a brace pattern or a path ending in `.tar` (a file, a
    glob or a URL such as `hf://datasets/user/name/{00000..00009}.tar`), or a local folder holding `.tar` files
    and no image-folder metadata. A Hub dataset id of tar shards is found when it loads (`hub_shard_files`)."""
    if _BRACES.search(source) or source.lower().endswith(".tar"):
        return True
    return os.path.isdir(source) and bool(glob.glob(os.path.join(glob.escape(source), "*.tar"))) and not any(
        os.path.isfile(os.path.join(source, name)) for name in ("metadata.jsonl", "metadata.csv"))


def shard_files(source: str) -> dict[str, list[str]]:
    """The shards of `source` (see `is_shard_source`) by split: `train`, and `validation` for a folder with a
    `validation/` folder of shards. Local names must exist: a DataError (one line) when none does."""
    if os.path.isdir(source):
        found = {"train": sorted(glob.glob(os.path.join(glob.escape(source), "*.tar")))}
        validation = sorted(glob.glob(os.path.join(glob.escape(source), "validation", "*.tar")))
        return found | ({"validation": validation} if validation else {})
    names = expand_braces(source)
    if any(_is_remote(name) for name in names):
        return {"train": names}  # `datasets` resolves remote names and globs, and reports what is missing
    files = [path for name in names for path in sorted(glob.glob(os.path.expanduser(name)))]
    if not files:
        shown = f"{names[0]} ... {names[-1]}" if len(names) > 1 else names[0]
        raise DataError(f"no shard matches {source!r} ({len(names)} name(s): {shown}, none of which exists): give "
                        "existing .tar files, e.g. 'shards/{00000..00009}.tar', a folder of them, or one .tar")
    missing = [name for name in names if not _BRACES.search(name) and not glob.has_magic(name)
               and not os.path.exists(os.path.expanduser(name))]
    if missing:
        logger.warning("%d of the %d shards that %r names do not exist (the first: %s): reading the %d that do",
                       len(missing), len(names), source, missing[0], len(files))
    return {"train": files}


def hub_shard_files(source: str) -> dict[str, list[str]] | None:
    """The tar shards of the Hub dataset `source` by split, as `datasets` resolves its files, or None when
    `datasets` reads it with another builder than `webdataset` (parquet, an image folder, ...)."""
    builder = datasets.load_dataset_builder(source)
    if builder.name != "webdataset":
        return None
    return {str(split): list(files) for split, files in builder.config.data_files.items()}


def held_out_shards(files: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, validation) shards: `floor(fraction * len(files))` whole shards held out, drawn with `seed`
    (no validation shard when that is 0: hold out samples instead)."""
    count = int(fraction * len(files))
    held_out = set(random.Random(seed).sample(range(len(files)), count))
    return ([name for index, name in enumerate(files) if index not in held_out],
            [name for index, name in enumerate(files) if index in held_out])


def shard_features(caption_json_field: str) -> datasets.Features:
    """The columns read from each sample: every image extension (undecoded), `txt`, and `json`'s caption field."""
    images = {extension: datasets.Image(decode=False) for extension in SHARD_IMAGE_EXTENSIONS}
    return datasets.Features({
        **images, "txt": datasets.Value("string"), "json": {caption_json_field: datasets.Value("string")},
        "__key__": datasets.Value("string"), "__url__": datasets.Value("string"),
    })


def _pair(example: dict, caption_json_field: str) -> dict:
    """A sample as `image` (its first image member) and `text` (`txt`, else the JSON field), key and shard kept."""
    image = next((example[extension] for extension in SHARD_IMAGE_EXTENSIONS if example[extension]), None)
    text = example["txt"]
    if text is None and example["json"] is not None:
        text = example["json"][caption_json_field]
    return {"image": image, "text": text, "__key__": example["__key__"], "__url__": example["__url__"]}


def to_pairs(split: datasets.Dataset | datasets.IterableDataset, caption_json_field: str,
             source: str) -> datasets.Dataset | datasets.IterableDataset:
    """`split` (read with `shard_features`) as `image` and `text` columns.

    A map-style split is checked: samples without an image member are dropped with a warning (a DataError
    when no sample has one), and a sample without a caption is a DataError naming it. A stream is not
    read ahead: its samples without an image or caption are dropped as they come.
    """
    pairs = split.map(functools.partial(_pair, caption_json_field=caption_json_field),
                      remove_columns=split.column_names, features=PAIR_FEATURES)
    if not isinstance(pairs, datasets.Dataset):
        pairs = pairs.filter(lambda image, text: image is not None and text is not None,
                             input_columns=["image", "text"])
        return pairs.select_columns(["image", "text"])
    images = pairs.data.column("image")
    extensions = ", ".join(f".{extension}" for extension in SHARD_IMAGE_EXTENSIONS)
    if len(pairs) == 0 or images.null_count == len(pairs):
        raise DataError(f"{source}: none of the {len(pairs)} samples of its shards has an image member ({extensions}):"
                        " a sample is the members that share a key, e.g. 000000042.jpg with 000000042.txt")
    if images.null_count:
        logger.warning("%s: %d of the %d samples have no image member (%s): they are skipped", source,
                       images.null_count, len(pairs), extensions)
        pairs = pairs.filter(lambda image: image is not None, input_columns="image").flatten_indices()
    texts = pairs.data.column("text")
    if texts.null_count:
        first = pairs[pyarrow.compute.index(pyarrow.compute.is_null(texts), True).as_py()]
        raise DataError(
            f"{source}: {texts.null_count} of the {len(pairs)} samples have no caption, neither a .txt member nor a "
            f"{caption_json_field!r} field in a .json one (the first: {first['__key__']} in {first['__url__']}): set "
            "data.caption_json_field to the JSON field that holds the caption"
        )
    empty = pyarrow.compute.sum(pyarrow.compute.equal(pyarrow.compute.utf8_trim_whitespace(texts), "")).as_py()
    if empty:
        logger.warning("%s: %d of the %d captions are empty: they train as the unconditional caption", source, empty,
                       len(pairs))
    return pairs.select_columns(["image", "text"])


@dataclass(frozen=True)
class WrittenShards:
    """What `write_shards` wrote for one split: the shard files, and the samples in them."""

    paths: list[Path]
    samples: int


def add_tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add `data` as `name`, with fixed metadata so that the same input writes the same bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
    tar.addfile(info, io.BytesIO(data))


def _write_split(split: datasets.Dataset, folder: str, output: Path, shard_size: int, caption_column: str,
                 first_key: int) -> WrittenShards:
    """Write `split` (an image folder's, images undecoded) as `output/00000.tar`, ... with keys from `first_key`."""
    for image in split["image"]:
        extension = os.path.splitext(image["path"])[1].lower().lstrip(".")
        if extension not in SHARD_IMAGE_EXTENSIONS:
            raise DataError(f"{image['path']}: a .{extension} image, which shards do not carry (they carry "
                            f"{', '.join(SHARD_IMAGE_EXTENSIONS)}): convert it, e.g. to PNG")
    output.mkdir(parents=True, exist_ok=True)
    paths = [output / f"{number:05d}.tar" for number in range(-(-len(split) // shard_size))]
    for number, path in enumerate(paths):
        start = number * shard_size
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for index, row in enumerate(split.select(range(start, min(start + shard_size, len(split)))), start):
                image, caption, key = row["image"], row[caption_column], f"{first_key + index:09d}"
                extension = os.path.splitext(image["path"])[1].lower().lstrip(".")
                data = image["bytes"] if image["bytes"] is not None else Path(image["path"]).read_bytes()
                add_tar_member(tar, f"{key}.{extension}", data)
                add_tar_member(tar, f"{key}.txt", caption.encode())
                metadata = {"caption": caption, "file_name": os.path.relpath(image["path"], folder)}
                add_tar_member(tar, f"{key}.json", json.dumps(metadata, ensure_ascii=False).encode())
    return WrittenShards(paths, len(split))


def write_shards(folder: str | os.PathLike, output: str | os.PathLike, shard_size: int = SHARD_SIZE,
                 caption_column: str = "text") -> dict[str, WrittenShards]:
    """Write the image folder `folder` (the imagefolder convention: images and `metadata.jsonl`/`.csv`) as
    WebDataset shards in img2dataset's layout: its train split as `output/00000.tar`, ..., any other split
    (`validation`) as `output/<split>/00000.tar`, ..., `shard_size` samples a shard.

    Each sample is `<key>.<ext>` (the image file's bytes, unchanged), `<key>.txt` (its caption, from
    `caption_column`) and `<key>.json` (`caption` and `file_name`, relative to `folder`); keys are
    nine-digit numbers, unique over the splits. Members are written in the folder's order with fixed
    times and owners, so the same folder writes the same bytes. Returns what was written, by split.
    """
    folder, output = os.fspath(folder), Path(output)
    if not isinstance(shard_size, int) or shard_size <= 0:
        raise DataError(f"shard_size={shard_size!r}: give a positive number of samples per shard, e.g. {SHARD_SIZE}")
    if not os.path.isdir(folder):
        raise DataError(f"no folder {os.path.abspath(folder)}: give an image folder with metadata.jsonl")
    if check_image_folder(folder, caption_column) is None:
        raise DataError(f"{folder} is not an image folder with metadata.jsonl or metadata.csv: give one")
    if output.is_dir() and any(output.rglob("*.tar")):
        raise DataError(f"{output} already holds .tar files: give an empty or new folder for the shards")
    splits = datasets.load_dataset(folder)
    written, first_key = {}, 0
    for name in sorted(splits, key=lambda split: split != "train"):
        split = splits[name].cast_column("image", datasets.Image(decode=False))
        written[name] = _write_split(split, folder, output if name == "train" else output / name, shard_size,
                                     caption_column, first_key)
        first_key += written[name].samples
        logger.info("wrote %d samples of %s's %s split in %d shard(s) to %s", written[name].samples, folder, name,
                    len(written[name].paths), output)
    return written
