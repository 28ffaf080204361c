"""Image grids as PNG files: the reconstructions of stage 1 and the samples of stage 2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image


def to_uint8(pixel_values: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]."""
    pixels = ((pixel_values.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return rearrange(pixels, "b c h w -> b h w c").numpy()


def image_grid(pixel_values: torch.Tensor, num_rows: int, padding: int = 2) -> Image.Image:
    """Tile [R*C, 3, H, W] images in [-1, 1] into an R x C grid (row-major) with white padding."""
    if pixel_values.shape[0] % num_rows:
        raise ValueError(f"{pixel_values.shape[0]} images do not fill {num_rows} rows evenly")
    images = to_uint8(pixel_values)
    images = np.pad(images, ((0, 0), (padding, 0), (padding, 0), (0, 0)), constant_values=255)
    grid = rearrange(images, "(r c) h w ch -> (r h) (c w) ch", r=num_rows)
    grid = np.pad(grid, ((0, padding), (0, padding), (0, 0)), constant_values=255)
    return Image.fromarray(grid)


def save_image_grid(pixel_values: torch.Tensor, path: str | Path, num_rows: int) -> Path:
    """Write `image_grid(...)` to `path` (PNG), creating parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(pixel_values, num_rows).save(path)
    return path
