"""Image grids as PNG files: the reconstructions of stage 1 and the samples of stage 2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageDraw, ImageFont

from dallekit.modeling_utils import to_uint8


def image_grid(
    pixel_values: torch.Tensor, num_rows: int, padding: int = 2, scale: int = 1, row_labels: list[str] | None = None,
) -> Image.Image:
    """Tile [R*C, 3, H, W] images in [-1, 1] into an R x C grid (row-major) with white padding.

    `scale` enlarges each image (nearest neighbour); `row_labels` writes one line of text left of each row.
    """
    if pixel_values.shape[0] % num_rows:
        raise ValueError(f"{pixel_values.shape[0]} images do not fill {num_rows} rows evenly")
    if row_labels is not None and len(row_labels) != num_rows:
        raise ValueError(f"{len(row_labels)} row labels for {num_rows} rows")
    images = to_uint8(pixel_values).repeat(scale, axis=1).repeat(scale, axis=2)
    images = np.pad(images, ((0, 0), (padding, 0), (padding, 0), (0, 0)), constant_values=255)
    grid = rearrange(images, "(r c) h w ch -> (r h) (c w) ch", r=num_rows)
    grid = np.pad(grid, ((0, padding), (0, padding), (0, 0)), constant_values=255)
    image = Image.fromarray(grid)
    return image if row_labels is None else _label_rows(image, row_labels, padding)


def _label_rows(grid: Image.Image, labels: list[str], padding: int) -> Image.Image:
    """`grid` with a white margin on the left holding `labels[r]` beside row r."""
    row_height = (grid.height - padding) / len(labels)
    font = ImageFont.load_default(size=max(10, min(16, int(row_height * 0.4))))
    margin = int(max(font.getlength(label) for label in labels)) + 3 * padding + 4
    labelled = Image.new("RGB", (margin + grid.width, grid.height), "white")
    labelled.paste(grid, (margin, 0))
    draw = ImageDraw.Draw(labelled)
    for row, label in enumerate(labels):
        centre = padding + row * row_height + (row_height - padding) / 2
        draw.text((2 * padding, centre), label, fill="black", font=font, anchor="lm")
    return labelled


def save_image_grid(
    pixel_values: torch.Tensor, path: str | Path, num_rows: int, scale: int = 1, row_labels: list[str] | None = None,
) -> Path:
    """Write `image_grid(...)` to `path` (PNG), creating parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(pixel_values, num_rows, scale=scale, row_labels=row_labels).save(path)
    return path
