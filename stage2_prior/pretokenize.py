"""Encode a captioned-image dataset once with the frozen stage-1 tokenizer into a column of codes.

The prior trains on integers only. Each split is encoded in batches by `DVAEModel.encode` and
written to an Arrow cache file `cache_dir/<split>-<key>.arrow`, the key a fingerprint of the
stage-1 weights, its config, the image size, the precision it runs in (the caller's autocast, if
any) and the source split: the next run with the same inputs loads the file instead of encoding
again, and a new stage-1 checkpoint or image size gives a new file. Unreadable images are dropped,
like in stage 1, and counted (`PretokenizedSplits.num_skipped`).

With augmentation, the `train` split holds each original followed by `copies` randomly shifted and
scaled variants (same caption and other columns); the settings are part of its fingerprint.

When the `train` split has a `captions` column (several captions per image), each of its code
sequences, the original and every copy, gets as `text` one caption drawn from its image's
`captions` by an RNG seeded with (augmentation seed, example index, copy index): independent of
batching, and cached with the codes. Validation keeps its `text`.

Several processes (pass the `accelerator`) share the work: each encodes a contiguous share of the
split's batches, on the accelerator's device, into `cache_dir/<split>-<key>.parts/part-<rank>-of-<n>.arrow`;
once all have written theirs, the main process joins the parts in rank order into a temporary file
and renames it to `<split>-<key>.arrow`, then every process loads that file. The key does not
depend on the number of processes, and neither does the result: the shares are cut at the batch
boundaries of a one-process run, and the augmentation and caption draws are seeded by each image's
index in the whole split, so every process count gives the same codes in the same order, and a cache
written by n processes serves m. The rename is the completion marker: a run killed before it leaves
only parts (or a temporary file), which count as no cache and are encoded again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from datasets.arrow_writer import ArrowWriter
from datasets.fingerprint import Hasher
from datasets.table import MemoryMappedTable

from dallekit.data import AugmentationConfig, ImageTransform, decode_image, random_shift_and_scale
from stage1_dvae import DVAEModel

logger = logging.getLogger(__name__)


class PretokenizedSplits(datasets.DatasetDict):
    """The encoded splits, and `num_skipped`: how many unreadable images each split dropped (all processes)."""

    num_skipped: dict[str, int]


def tokenizer_fingerprint(model: DVAEModel) -> str:
    """A digest of the stage-1 weights and config: changes whenever the checkpoint changes."""
    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def shard_bounds(num_rows: int, batch_size: int, num_shards: int, index: int) -> tuple[int, int]:
    """Rows [start, stop) of shard `index`: a contiguous run of whole `batch_size` batches of the split.

    Cut at the batch boundaries of one process, each batch is the same whatever the number of
    shards, so are its codes (the encoder's arithmetic can depend on the batch it runs in).
    """
    num_batches = -(-num_rows // batch_size)
    first, last = num_batches * index // num_shards, num_batches * (index + 1) // num_shards
    return min(first * batch_size, num_rows), min(last * batch_size, num_rows)


def pretokenize(
    splits: datasets.DatasetDict,
    model: DVAEModel,
    cache_dir: str | Path,
    augmentation: AugmentationConfig | None = None,
    *,
    accelerator: Accelerator | None = None,
    batch_size: int = 256,
) -> PretokenizedSplits:
    """Each split with `image` replaced by `codes` (h*w ints, raster order); cached under `cache_dir`.

    With `augmentation.copies` > 0, the `train` split also holds that many augmented variants
    after each original. A `train` split with `captions` gets one drawn caption per sequence as `text`.

    With an `accelerator`, every one of its processes must call this (it waits for the others);
    each encodes its share on `accelerator.device` (the model is moved there) and all return
    the same, whole splits. `cache_dir` must be one directory that all processes see.
    """
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    model.eval().to(device)
    num_processes = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    is_main = accelerator is None or accelerator.is_main_process
    image_size = model.config.image_size
    transform = ImageTransform(image_size)
    model_digest = tokenizer_fingerprint(model)
    precision = str(torch.get_autocast_dtype(device.type)) if torch.is_autocast_enabled(device.type) else "fp32"
    augmentation = augmentation or AugmentationConfig()

    def variants(image: PIL.Image.Image, index: int, augment: bool) -> list[PIL.Image.Image]:
        """The image, then its augmented copies drawn from (seed, index): independent of batching."""
        if not augment:
            return [image]
        rng = np.random.default_rng([augmentation.seed, index])
        return [image] + [
            random_shift_and_scale(image, rng, augmentation.max_translation, augmentation.max_scale_change)
            for _ in range(augmentation.copies)
        ]

    def draw_caption(captions: list[str], text: str, index: int, copy: int) -> str:
        """One of the image's captions (its `text` when it has none), drawn from (seed, index, copy)."""
        if not captions:
            return text
        return captions[np.random.default_rng([augmentation.seed, index, copy]).integers(len(captions))]

    @torch.no_grad()
    def encode(batch: dict[str, list], start: int, augment: bool, draw: bool) -> dict[str, list]:
        """The code sequences of rows `start`, `start + 1`, ... of the split (indices in the whole split)."""
        pixels, rows, texts = [], [], []
        for row, value in enumerate(batch["image"]):
            image = decode_image(value)
            if image is not None:
                for copy, variant in enumerate(variants(image, start + row, augment)):
                    pixels.append(transform(variant))
                    rows.append(row)
                    if draw:
                        texts.append(draw_caption(batch["captions"][row], batch["text"][row], start + row, copy))
        result = {key: [values[i] for i in rows] for key, values in batch.items() if key != "image"}
        if draw:
            result["text"] = texts
        codes = model.encode(torch.stack(pixels).to(device)).flatten(1) if pixels else torch.empty(0, 0)
        result["codes"] = codes.cpu().tolist()
        return result

    def encode_share(split: datasets.Dataset, name: str, parts_dir: Path, features: datasets.Features,
                     augment: bool, draw: bool) -> None:
        """This process's rows of `split`, encoded into its part file."""
        start, stop = shard_bounds(len(split), batch_size, num_processes, rank)
        parts_dir.mkdir(parents=True, exist_ok=True)
        of_processes = f" (process {rank} of {num_processes})" if num_processes > 1 else ""
        bar = datasets.utils.tqdm(
            total=stop - start, unit=" examples",
            desc=f"encoding {name} images with the stage-1 tokenizer{of_processes}",
            disable=accelerator is not None and not accelerator.is_local_main_process,
        )
        with ArrowWriter(features=features, path=str(parts_dir / f"part-{rank}-of-{num_processes}.arrow")) as writer:
            for begin in range(start, stop, batch_size):
                end = min(begin + batch_size, stop)
                writer.write_batch(encode(split[begin:end], begin, augment, draw))
                bar.update(end - begin)
            writer.finalize()
        bar.close()

    def join_parts(parts_dir: Path, features: datasets.Features, cache_file: Path) -> None:
        """The parts in rank order, as `cache_file`: written aside, then renamed into place (the marker)."""
        temporary = cache_file.with_name(f"{cache_file.name}.incomplete-{os.getpid()}")
        with ArrowWriter(features=features, path=str(temporary)) as writer:
            for part in range(num_processes):
                path = parts_dir / f"part-{part}-of-{num_processes}.arrow"
                writer.write_table(MemoryMappedTable.from_file(str(path)).table)
            writer.finalize()
        os.replace(temporary, cache_file)
        shutil.rmtree(parts_dir, ignore_errors=True)

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    encoded, num_skipped = {}, {}
    for name, split in splits.items():
        augment = name == "train" and augmentation.copies > 0
        draw = name == "train" and "captions" in split.column_names
        inputs = [split._fingerprint, model_digest, image_size, precision]
        if augment:
            inputs.append(dataclasses.asdict(augmentation))
        if draw:
            inputs.append({"caption_seed": augmentation.seed})
        fingerprint = Hasher.hash(inputs)
        reused = (cache_dir / f"{name}-{fingerprint}.arrow").is_file()
        if num_processes > 1:
            # The main process's view decides for all: they must agree on the file and on whether to encode
            # (a split whose fingerprint is random, e.g. after an unhashable transform, differs on each process).
            fingerprint, reused = broadcast_object_list([fingerprint, reused])
        cache_file = cache_dir / f"{name}-{fingerprint}.arrow"
        if not reused:
            features = datasets.Features({key: value for key, value in split.features.items() if key != "image"})
            features["codes"] = datasets.List(datasets.Value("int64"))
            parts_dir = cache_dir / f"{name}-{fingerprint}.parts"
            encode_share(split, name, parts_dir, features, augment, draw)
            if accelerator is not None:
                accelerator.wait_for_everyone()  # every part is written
            if is_main:
                join_parts(parts_dir, features, cache_file)
            if accelerator is not None:
                accelerator.wait_for_everyone()  # the whole split is in the cache
        encoded[name] = datasets.Dataset(MemoryMappedTable.from_file(str(cache_file)), fingerprint=fingerprint)
        per_image = 1 + augmentation.copies if augment else 1
        num_skipped[name] = len(split) - len(encoded[name]) // per_image
        if is_main:
            logger.info(
                "%s split: %d image code sequences%s %s%s", name, len(encoded[name]),
                f" ({augmentation.copies} augmented copies per image)" if augment else "",
                f"loaded from {cache_file}" if reused
                else f"encoded by {num_processes} process(es) into {cache_file}",
                f" ({num_skipped[name]} unreadable images skipped)" if num_skipped[name] else "",
            )
    result = PretokenizedSplits(encoded)
    result.num_skipped = num_skipped
    return result
