"""Image decoding, RGB conversion, shift/scale augmentation (PIL images and tensor batches), and the collator turning captioned images into tensors."""

import logging
import os
from typing import Any, NamedTuple

import datasets
import einops
import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

WHITE = (255, 255, 255, 255)


def decode_image(
    value: PIL.Image.Image | dict[str, Any] | str | os.PathLike,
) -> PIL.Image.Image | None:
    """Fully decode an image given as a PIL image, a `{"bytes", "path"}` dict or a path.

    Returns None, with a warning naming the file, when the image is missing, corrupt or
    truncated.
    """
    if isinstance(value, (str, os.PathLike)):
        value = {"path": os.fspath(value), "bytes": None}
    try:
        image = datasets.Image().decode_example(value)
        image.load()  # a lazily opened PIL image only reveals truncation here
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
        name = value.get("path") if isinstance(value, dict) else getattr(value, "filename", None)
        logger.warning("Skipping unreadable image %s: %s", name or "<in-memory bytes>", error)
        return None
    return image


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparent pixels become white.

    16-bit modes (`I;16*`, and `I`, assumed to hold 16-bit values) are rescaled to 8 bits
    rather than clipped.
    """
    if image.mode.startswith("I;16") or image.mode == "I":
        image = image.convert("I").point(lambda value: value / 257).convert("L")
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        image = PIL.Image.alpha_composite(PIL.Image.new("RGBA", rgba.size, WHITE), rgba)
    return image.convert("RGB")


def background_colour(image: PIL.Image.Image) -> tuple[int, int, int]:
    """The median colour of the RGB image's one-pixel border (black for the built-in datasets)."""
    pixels = np.asarray(image)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return tuple(int(v) for v in np.median(border, axis=0))


def shift_and_scale(image: PIL.Image.Image, translation: tuple[float, float], scale: float) -> PIL.Image.Image:
    """`image` as RGB, zoomed by `scale` about its centre, then moved by `translation` (dx, dy) in
    fractions of its width and height; uncovered pixels take its `background_colour`."""
    image = to_rgb(image)
    width, height = image.size
    centre_x, centre_y = width / 2, height / 2
    shift_x, shift_y = translation[0] * width, translation[1] * height
    # PIL maps each output pixel (x, y) to the input pixel (a x + b y + c, d x + e y + f)
    inverse = (1 / scale, 0, centre_x - (centre_x + shift_x) / scale,
               0, 1 / scale, centre_y - (centre_y + shift_y) / scale)
    return image.transform(image.size, PIL.Image.Transform.AFFINE, inverse,
                           resample=PIL.Image.Resampling.BILINEAR, fillcolor=background_colour(image))


def random_shift_and_scale(
    image: PIL.Image.Image, rng: np.random.Generator, max_translation: float, max_scale_change: float
) -> PIL.Image.Image:
    """`shift_and_scale` with a zoom from [1 - max_scale_change, 1 + max_scale_change] and a shift of
    up to `max_translation` of the side along each axis, drawn uniformly from `rng`."""
    scale = rng.uniform(1 - max_scale_change, 1 + max_scale_change)
    dx, dy = rng.uniform(-max_translation, max_translation, size=2)
    return shift_and_scale(image, (float(dx), float(dy)), float(scale))


def random_shift(pixel_values: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image [B, C, H, W] by a whole number of pixels in [-max_shift, max_shift], edges repeated.

    The shifts are drawn on `generator`'s device, the images moved on theirs.
    """
    batch, _, height, width = pixel_values.shape
    shift = torch.randint(-max_shift, max_shift + 1, (batch, 2), generator=generator, device=generator.device)
    theta = torch.eye(2, 3, device=pixel_values.device).repeat(batch, 1, 1)
    # affine grids span [-1, 1]: a pixel is 2/size
    theta[:, :, 2] = shift.to(pixel_values.device) * 2 / torch.tensor([width, height], device=pixel_values.device)
    grid = F.affine_grid(theta, list(pixel_values.shape), align_corners=False)
    return F.grid_sample(pixel_values, grid, padding_mode="border", align_corners=False)


class ImageTransform:
    """PIL image -> FloatTensor[3, S, S] in [-1, 1]: RGB, shortest side to S, centre crop."""

    def __init__(self, image_size: int) -> None:
        if not isinstance(image_size, int) or image_size <= 0:
            raise ValueError(
                f"image_size={image_size!r} is invalid: set it to a positive integer, e.g. 32."
            )
        self.image_size = image_size

    def __call__(self, image: PIL.Image.Image) -> torch.Tensor:
        size = (self.image_size, self.image_size)
        image = PIL.ImageOps.fit(to_rgb(image), size, method=PIL.Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32))
        return einops.rearrange(pixels / 127.5 - 1.0, "h w c -> c h w")


class TextImageCollator:
    """Batch `{"image", "text"[, "label"]}` examples, dropping and counting unreadable images.

    Returns `{"pixel_values": FloatTensor[B, 3, S, S], "text": list[str], "num_skipped": int}`,
    plus `"label": LongTensor[B]` when the examples carry a label. B is 0 when every image of
    the batch is unreadable.
    """

    def __init__(self, image_size: int) -> None:
        self.transform = ImageTransform(image_size)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        kept, pixel_values = [], []
        for example in examples:
            image = decode_image(example["image"])
            if image is not None:
                kept.append(example)
                pixel_values.append(self.transform(image))
        size = self.transform.image_size
        empty = torch.empty(0, 3, size, size)
        batch = {
            "pixel_values": torch.stack(pixel_values) if pixel_values else empty,
            "text": [example["text"] for example in kept],
            "num_skipped": len(examples) - len(kept),
        }
        if examples and "label" in examples[0]:
            batch["label"] = torch.tensor([example["label"] for example in kept], dtype=torch.long)
        if examples and "captions" in examples[0]:
            batch["captions"] = [list(example["captions"]) for example in kept]
        return batch


class DecodedPairs(NamedTuple):
    """A whole split decoded: pixels [N, 3, S, S] in [-1, 1], each image's caption, and all its captions."""

    pixel_values: torch.Tensor
    texts: list[str]
    captions: list[list[str]]  # the `captions` column where the split has one, else [text]
    num_skipped: int  # unreadable images left out


def decode_pairs(split: datasets.Dataset, image_size: int) -> DecodedPairs:
    """Every readable image of `split` with its captions (unreadable ones skipped, with a warning)."""
    batch = TextImageCollator(image_size)(list(split))
    if batch["num_skipped"]:
        logger.warning("skipped %d unreadable images of %d", batch["num_skipped"], len(split))
    captions = batch.get("captions") or [[text] for text in batch["text"]]
    return DecodedPairs(batch["pixel_values"], batch["text"], captions, batch["num_skipped"])
