"""Encode a captioned-image dataset once with the frozen stage-1 tokenizer into a column of codes.

The prior trains on integers only. Each split is mapped in batches through `DVAEModel.encode`
and written to an Arrow cache file named by a fingerprint of the stage-1 weights, its config, the
image size, the precision it runs in (the caller's autocast, if any) and the source split: the next
run with the same inputs loads the file instead of encoding again, and a new stage-1 checkpoint or
image size gives a new file. Unreadable images are dropped (and counted in the log) like in stage 1.

With augmentation, the `train` split holds each original followed by `copies` randomly shifted and
scaled variants (same caption and other columns); the settings are part of its fingerprint.

When the `train` split has a `captions` column (several captions per image), each of its code
sequences, the original and every copy, gets as `text` one caption drawn from its image's
`captions` by an RNG seeded with (augmentation seed, example index, copy index): independent of
batching, and cached with the codes. Validation keeps its `text`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import torch
from datasets.fingerprint import Hasher

from stage1_dvae import DVAEModel
from dallekit.data import AugmentationConfig, ImageTransform, decode_image, random_shift_and_scale

logger = logging.getLogger(__name__)


def tokenizer_fingerprint(model: DVAEModel) -> str:
    """A digest of the stage-1 weights and config: changes whenever the checkpoint changes."""
    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def pretokenize(
    splits: datasets.DatasetDict,
    model: DVAEModel,
    cache_dir: str | Path,
    augmentation: AugmentationConfig | None = None,
    batch_size: int = 256,
) -> datasets.DatasetDict:
    """Each split with `image` replaced by `codes` (h*w ints, raster order); cached under `cache_dir`.

    With `augmentation.copies` > 0, the `train` split also holds that many augmented variants
    after each original. A `train` split with `captions` gets one drawn caption per sequence as `text`.
    """
    image_size = model.config.image_size
    transform = ImageTransform(image_size)
    model_digest = tokenizer_fingerprint(model)
    device = next(model.parameters()).device
    precision = str(torch.get_autocast_dtype(device.type)) if torch.is_autocast_enabled(device.type) else "fp32"
    model.eval()
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
    def encode(batch: dict[str, list], indices: list[int], augment: bool, draw: bool) -> dict[str, list]:
        pixels, rows, texts = [], [], []
        for row, (index, value) in enumerate(zip(indices, batch["image"])):
            image = decode_image(value)
            if image is not None:
                for copy, variant in enumerate(variants(image, index, augment)):
                    pixels.append(transform(variant))
                    rows.append(row)
                    if draw:
                        texts.append(draw_caption(batch["captions"][row], batch["text"][row], index, copy))
        result = {key: [values[i] for i in rows] for key, values in batch.items() if key != "image"}
        if draw:
            result["text"] = texts
        codes = model.encode(torch.stack(pixels).to(device)).flatten(1) if pixels else torch.empty(0, 0)
        result["codes"] = codes.cpu().tolist()
        return result

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    encoded = {}
    for name, split in splits.items():
        augment = name == "train" and augmentation.copies > 0
        draw = name == "train" and "captions" in split.column_names
        inputs = [split._fingerprint, model_digest, image_size, precision]
        if augment:
            inputs.append(dataclasses.asdict(augmentation))
        if draw:
            inputs.append({"caption_seed": augmentation.seed})
        fingerprint = Hasher.hash(inputs)
        cache_file = cache_dir / f"{name}-{fingerprint}.arrow"
        reused = cache_file.is_file()
        encoded[name] = split.map(
            encode,
            batched=True,
            batch_size=batch_size,
            with_indices=True,
            fn_kwargs={"augment": augment, "draw": draw},
            remove_columns=split.column_names,
            cache_file_name=str(cache_file),
            new_fingerprint=fingerprint,
            load_from_cache_file=True,
            desc=f"encoding {name} images with the stage-1 tokenizer",
        )
        per_image = 1 + augmentation.copies if augment else 1
        dropped = len(split) - len(encoded[name]) // per_image
        logger.info(
            "%s split: %d image code sequences%s %s%s", name, len(encoded[name]),
            f" ({augmentation.copies} augmented copies per image)" if augment else "",
            f"loaded from {cache_file}" if reused else f"encoded into {cache_file}",
            f" ({dropped} unreadable images skipped)" if dropped else "",
        )
    return datasets.DatasetDict(encoded)
