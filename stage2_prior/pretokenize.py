"""Encode a captioned-image dataset once with the frozen stage-1 tokenizer into code shards on disk.

The prior trains on integers only. Each split is cut into shards, encoded batch by batch by
`DVAEModel.encode` and written shard by shard, as Arrow files, under
`cache_dir/<split>-<key>/shard-<i>-of-<n>.arrow`; the prior then reads them memory-mapped, so
neither step holds more than a batch of images, whatever the size of the data. The key is a
fingerprint of the stage-1 weights, its config, the image size, the precision it runs in (the
caller's autocast, if any), the shard size and the source split: the next run with the same inputs
loads the shards instead of encoding again, and a new stage-1 checkpoint or image size gives new
ones. Unreadable images are dropped, like in stage 1, and counted (`PretokenizedSplits.num_skipped`).

Shards: a map-style split (`datasets.Dataset`) is cut into runs of `shard_size` rows; a stream
(`datasets.IterableDataset`, `data.streaming`) keeps its own shards (a WebDataset tar, a parquet
file: `IterableDataset.n_shards`), one code shard each, read one at a time. Several processes
(pass the `accelerator`) share the shards, shard i to process i mod n, each on its accelerator's
device; an encoded shard is written aside and renamed into place with its record of rows read and
skipped, so a run killed half-way leaves whole shards only and the next run, with any number of
processes, encodes only the missing ones. Batches are cut within each shard, and the augmentation
and caption draws are seeded by (shard, row in shard), so every process count, and a resumed run,
gives the same codes in the same order.

With augmentation, the `train` split holds each original followed by `copies` randomly shifted and
scaled variants (same caption and other columns); the settings are part of its fingerprint. A row
repeated in a split (replay's passes over new data) has its unaugmented image encoded once, found by
its bytes (or path), and its copies drawn and encoded anew each time. When
the `train` split has a `captions` column (several captions per image), each of its code sequences,
the original and every copy, gets as `text` one caption drawn from its image's `captions` by an RNG
seeded with (augmentation seed, shard, row, copy index). Validation keeps its `text`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from datasets.arrow_writer import ArrowWriter
from datasets.fingerprint import Hasher
from datasets.table import MemoryMappedTable, concat_tables

from dallekit.data import AugmentationConfig, ImageTransform, decode_image, random_shift_and_scale
from dallekit.data.cache import split_fingerprint
from stage1_dvae import DVAEModel

logger = logging.getLogger(__name__)

CODE_SHARD_SIZE = 10_000  # rows of a map-style split per code shard (a stream keeps its own shards)
MAX_REMEMBERED_ORIGINALS = 20_000  # unaugmented images whose codes a pretokenize call keeps, to encode repeats once


def content_key(value: object) -> bytes | None:
    """A digest of an undecoded image (`{"bytes", "path"}`): its bytes, else its path; None for anything else."""
    if not isinstance(value, Mapping):
        return None
    if value.get("bytes") is not None:
        return hashlib.blake2b(value["bytes"], digest_size=16).digest()
    return os.fsencode(os.path.abspath(value["path"])) if value.get("path") else None


class PretokenizedSplits(datasets.DatasetDict):
    """The encoded splits; `num_skipped`: how many unreadable images each split dropped (all processes);
    `encoded_shards`: the shard indices of each split this process encoded (empty when all were cached)."""

    num_skipped: dict[str, int]
    encoded_shards: dict[str, list[int]]


def tokenizer_fingerprint(model: DVAEModel) -> str:
    """A digest of the stage-1 weights and config: changes whenever the checkpoint changes."""
    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def num_code_shards(split: datasets.Dataset | datasets.IterableDataset, shard_size: int) -> int:
    """How many code shards `split` is written as: its own shards for a stream, runs of `shard_size` rows else."""
    if isinstance(split, datasets.IterableDataset):
        return split.n_shards
    return max(1, -(-len(split) // shard_size))


def shard_batches(split: datasets.Dataset | datasets.IterableDataset, index: int, num_shards: int,
                  shard_size: int, batch_size: int) -> Iterator[dict[str, list]]:
    """The rows of shard `index` of `split`, as batches of `batch_size` cut from the shard's first row."""
    if isinstance(split, datasets.IterableDataset):
        yield from split.shard(num_shards=num_shards, index=index).iter(batch_size=batch_size)
        return
    stop = min((index + 1) * shard_size, len(split))
    for begin in range(index * shard_size, stop, batch_size):
        yield split[begin:min(begin + batch_size, stop)]


def shard_path(folder: Path, index: int, num_shards: int) -> Path:
    """Where shard `index` of `num_shards` lives; its record of rows read and skipped is beside it (`.json`)."""
    return folder / f"shard-{index:05d}-of-{num_shards:05d}.arrow"


def pretokenize(
    splits: Mapping[str, datasets.Dataset | datasets.IterableDataset],
    model: DVAEModel,
    cache_dir: str | Path,
    augmentation: AugmentationConfig | None = None,
    *,
    accelerator: Accelerator | None = None,
    batch_size: int = 256,
    shard_size: int = CODE_SHARD_SIZE,
    source_fingerprint: str | None = None,
) -> PretokenizedSplits:
    """Each split with `image` replaced by `codes` (h*w ints, raster order); cached under `cache_dir`.

    With `augmentation.copies` > 0, the `train` split also holds that many augmented variants
    after each original. A `train` split with `captions` gets one drawn caption per sequence as `text`.

    A stream has no fingerprint of its own: for streamed splits give the source's, `source_fingerprint`
    (`dallekit.data.cache.source_fingerprint(data_config)`), so that new data gives a new cache.

    With an `accelerator`, every one of its processes must call this (it waits for the others);
    each encodes its shards on `accelerator.device` (the model is moved there) and all return
    the same, whole splits. `cache_dir` must be one directory that all processes see.
    """
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    model.eval().to(device)
    num_processes = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    image_size = model.config.image_size
    transform = ImageTransform(image_size)
    model_digest = tokenizer_fingerprint(model)
    precision = str(torch.get_autocast_dtype(device.type)) if torch.is_autocast_enabled(device.type) else "fp32"
    augmentation = augmentation or AugmentationConfig()

    def variants(image: PIL.Image.Image, seed: list[int], augment: bool) -> list[PIL.Image.Image]:
        """The image, then its augmented copies drawn from (augmentation seed, shard, row): independent of batching."""
        if not augment:
            return [image]
        rng = np.random.default_rng([augmentation.seed, *seed])
        return [image] + [
            random_shift_and_scale(image, rng, augmentation.max_translation, augmentation.max_scale_change)
            for _ in range(augmentation.copies)
        ]

    def draw_caption(captions: list[str], text: str, seed: list[int], copy: int) -> str:
        """One of the image's captions (its `text` when it has none), drawn from (seed, shard, row, copy)."""
        if not captions:
            return text
        return captions[np.random.default_rng([augmentation.seed, *seed, copy]).integers(len(captions))]

    # The codes of unaugmented images already encoded, by content: a row repeated in a split (the passes of
    # `DataConfig.replay_fraction`) is encoded once; its augmented copies, drawn per row, are encoded each time.
    originals: dict[bytes, np.ndarray] = {}

    @torch.no_grad()
    def encode(batch: dict[str, list], shard: int, first_row: int, augment: bool, draw: bool) -> dict[str, list]:
        """The code sequences of rows `first_row`, `first_row + 1`, ... of shard `shard`."""
        pixels, sequences, texts = [], [], []  # sequences: (row, an original's content key, its remembered codes)
        for row, value in enumerate(batch["image"]):
            content, seed = content_key(value), [shard, first_row + row]
            if not augment and content in originals:  # no copies to draw: not even decoded
                images = [None]
            elif (image := decode_image(value)) is not None:
                images = variants(image, seed, augment)
            else:
                continue
            for copy, variant in enumerate(images):
                original = content if copy == 0 else None
                remembered = originals.get(original)  # never for a copy: None is no key
                if remembered is None:
                    pixels.append(transform(variant))
                sequences.append((row, original, remembered))
                if draw:
                    texts.append(draw_caption(batch["captions"][row], batch["text"][row], seed, copy))
        result = {key: [values[row] for row, _, _ in sequences] for key, values in batch.items() if key != "image"}
        if draw:
            result["text"] = texts
        encoded = iter(model.encode(torch.stack(pixels).to(device)).flatten(1).cpu().numpy() if pixels else [])
        result["codes"] = []
        for _, original, codes in sequences:
            if codes is None:
                codes = next(encoded).astype(np.int32)  # a copy: the batch's array is not kept
                if original is not None and len(originals) < MAX_REMEMBERED_ORIGINALS:
                    originals[original] = codes
            result["codes"].append(codes.tolist())
        return result

    def encode_shard(split: datasets.Dataset | datasets.IterableDataset, index: int, num_shards: int, path: Path,
                     features: datasets.Features | None, augment: bool, draw: bool, bar: datasets.utils.tqdm) -> None:
        """Shard `index`, encoded into a file beside `path`, its record written, then renamed to `path`."""
        temporary = path.with_name(f"{path.name}.incomplete-{os.getpid()}")
        num_rows = num_written = 0
        with ArrowWriter(features=features, path=str(temporary)) as writer:
            for batch in shard_batches(split, index, num_shards, shard_size, batch_size):
                encoded = encode(batch, index, num_rows, augment, draw)
                writer.write_batch(encoded)
                num_rows += len(batch["image"])
                num_written += len(encoded["codes"])
                bar.update(len(batch["image"]))
            writer.finalize()
        per_image = 1 + augmentation.copies if augment else 1
        record = {"rows": num_rows, "skipped": num_rows - num_written // per_image}
        path.with_suffix(".json").write_text(json.dumps(record))
        os.replace(temporary, path)  # the marker: a shard is done when its .arrow exists

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    encoded, num_skipped, encoded_shards = {}, {}, {}
    for name, split in splits.items():
        streamed = isinstance(split, datasets.IterableDataset)
        if streamed and source_fingerprint is None:
            raise ValueError(f"the {name} split is a stream: give the source's fingerprint as source_fingerprint "
                             "(dallekit.data.cache.source_fingerprint of the data config), so that new data is encoded "
                             "anew")
        columns = split.column_names or list(split.features or {})
        augment = name == "train" and augmentation.copies > 0
        draw = name == "train" and "captions" in columns
        num_shards = num_code_shards(split, shard_size)
        inputs = [source_fingerprint if streamed else split_fingerprint(split), model_digest, image_size, precision,
                  {"shard_size": shard_size} if not streamed else {"num_shards": num_shards}]
        if augment:
            inputs.append(dataclasses.asdict(augmentation))
        if draw:
            inputs.append({"caption_seed": augmentation.seed})
        fingerprint = Hasher.hash(inputs)
        if num_processes > 1:
            # The main process's key decides for all (a split whose fingerprint is random, e.g. after an
            # unhashable transform, differs on each process).
            fingerprint = broadcast_object_list([fingerprint])[0]
        folder = cache_dir / f"{name}-{fingerprint}"
        folder.mkdir(exist_ok=True)
        paths = [shard_path(folder, index, num_shards) for index in range(num_shards)]
        mine = [index for index in range(rank, num_shards, num_processes) if not paths[index].is_file()]
        missing_anywhere = sum(not path.is_file() for path in paths)
        if mine:
            features = None  # a stream of unknown features: the writer infers them from the first batch
            if split.features is not None:
                features = datasets.Features({key: value for key, value in split.features.items() if key != "image"})
                features["codes"] = datasets.List(datasets.Value("int64"))
            of_processes = f" (process {rank} of {num_processes})" if num_processes > 1 else ""
            bar = datasets.utils.tqdm(
                total=None if streamed else sum(min(shard_size, len(split) - index * shard_size) for index in mine),
                unit=" examples", desc=f"encoding {len(mine)} {name} shard(s) with the stage-1 tokenizer{of_processes}",
                disable=accelerator is not None and not accelerator.is_local_main_process,
            )
            for index in mine:
                encode_shard(split, index, num_shards, paths[index], features, augment, draw, bar)
            bar.close()
        if accelerator is not None:
            accelerator.wait_for_everyone()  # every shard is written
        records = [json.loads(path.with_suffix(".json").read_text()) for path in paths]
        table = concat_tables([MemoryMappedTable.from_file(str(path)) for path in paths])
        encoded[name] = datasets.Dataset(table, fingerprint=fingerprint)
        num_skipped[name] = sum(record["skipped"] for record in records)
        encoded_shards[name] = mine
        if accelerator is None or accelerator.is_main_process:
            logger.info(
                "%s split: %d image code sequences%s in %d shard(s) under %s: %s%s", name, len(encoded[name]),
                f" ({augmentation.copies} augmented copies per image)" if augment else "", num_shards, folder,
                f"{missing_anywhere} encoded by {num_processes} process(es)" if missing_anywhere else "all loaded",
                f" ({num_skipped[name]} unreadable images skipped)" if num_skipped[name] else "",
            )
    result = PretokenizedSplits(encoded)
    result.num_skipped = num_skipped
    result.encoded_shards = encoded_shards
    return result
