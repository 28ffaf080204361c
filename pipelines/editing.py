"""What an edit of an image starts from: its pixels at the model's size, and which code cells to resample.

`TextToImagePipeline.__call__(image=..., mask_image=... | strength=...)` encodes the image to a code
grid and resamples some of its cells, forcing the others in raster order (`PriorModel.generate`'s
`keep_mask`). A mask's white pixels are repainted (the diffusers convention); a cell is resampled
when any masked pixel falls in it. `strength` resamples a share of the grid instead: its last codes
in raster order (`variation="rows"`, the completion of an image's first rows) or cells drawn at
random (`"random"`). Bad input is a ValueError that says what to give; what can be repaired (a grey
or RGBA image, an image of another size, a mask that is not black and white) is, with a warning.
"""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
import PIL.Image
import PIL.ImageFilter
import PIL.ImageOps
import torch
import torch.nn.functional as F

from dallekit.data import ImageTransform
from stage2_prior import PriorModel

ImageInput = PIL.Image.Image | torch.Tensor
Variation = Literal["rows", "random"]


def image_pixels(image: ImageInput, image_size: int) -> torch.Tensor:
    """Pixels [1, 3, S, S] in [-1, 1] of a PIL image (any mode, any size: converted to RGB, resized and
    centre-cropped, with a warning when its size is not S x S) or of a tensor [3, S, S] / [1, 3, S, S]."""
    if isinstance(image, torch.Tensor):
        pixels = image.unsqueeze(0) if image.ndim == 3 else image
        if pixels.shape[1:] != (3, image_size, image_size) or pixels.shape[0] != 1:
            raise ValueError(f"image as a tensor must be [3, {image_size}, {image_size}] in [-1, 1], got "
                             f"{list(image.shape)}: pass a PIL image to have it resized")
        return pixels.float()
    if not isinstance(image, PIL.Image.Image):
        raise ValueError(f"image must be a PIL image or a tensor, got a {type(image).__name__}")
    if image.size != (image_size, image_size):
        warnings.warn(f"image is {image.width}x{image.height} and the model draws {image_size}x{image_size}: resized"
                      f"{' and centre-cropped' if image.width != image.height else ''} to {image_size}x{image_size}",
                      UserWarning, stacklevel=3)
    return ImageTransform(image_size)(image).unsqueeze(0)


def mask_pixels(mask_image: ImageInput, image: ImageInput, image_size: int) -> torch.Tensor:
    """The repaint mask [S, S] (1: repaint, 0: keep) of `mask_image`, a PIL image or a tensor [H, W] in [0, 1]
    of the image's own size, taken through the image's resize and crop. Grey values are thresholded at 50%,
    with a warning."""
    if isinstance(mask_image, torch.Tensor):
        values = mask_image.squeeze(0).float().cpu().numpy() if mask_image.ndim == 3 else mask_image.float().numpy()
        if values.ndim != 2:
            raise ValueError(f"mask_image as a tensor must be [H, W] in [0, 1], got {list(mask_image.shape)}")
        values = values * 255
    elif isinstance(mask_image, PIL.Image.Image):
        values = np.asarray(mask_image.convert("L"), dtype=np.float32)
    else:
        raise ValueError(f"mask_image must be a PIL image or a tensor, got a {type(mask_image).__name__}")
    size = image.size if isinstance(image, PIL.Image.Image) else tuple(image.shape[-1:-3:-1])
    if (values.shape[1], values.shape[0]) != size:
        raise ValueError(f"mask_image is {values.shape[1]}x{values.shape[0]} but the image is {size[0]}x{size[1]}: "
                         "give a mask of the image's size (white: repaint, black: keep)")
    if not np.isin(values, (0, 255)).all():
        warnings.warn("mask_image is not black and white: thresholded at 50% (white: repaint, black: keep)",
                      UserWarning, stacklevel=3)
    binary = PIL.Image.fromarray(np.where(values >= 127.5, 255, 0).astype(np.uint8))
    fitted = PIL.ImageOps.fit(binary, (image_size, image_size), method=PIL.Image.Resampling.NEAREST)
    return torch.from_numpy(np.asarray(fitted) > 127).float()


def cells_touched(mask: torch.Tensor, grid_size: int) -> torch.Tensor:
    """[g, g] bool: the code cells that hold any repainted pixel of `mask` [S, S]."""
    cell = mask.shape[-1] // grid_size
    return F.max_pool2d(mask.view(1, 1, *mask.shape), cell).view(grid_size, grid_size) > 0


def strength_cells(strength: float, grid_size: int, variation: Variation,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """[g, g] bool: the round(strength * g * g) cells a variation resamples: the last in raster order ("rows"),
    or drawn with `generator` ("random")."""
    if not 0 <= strength <= 1:
        raise ValueError(f"strength must be in [0, 1] (the share of the code grid resampled), got {strength!r}")
    count, total = round(strength * grid_size**2), grid_size**2
    cells = torch.zeros(total, dtype=torch.bool)
    if variation == "rows":
        cells[total - count :] = True
    elif variation == "random":
        cells[torch.randperm(total, generator=generator, device=generator.device if generator else "cpu")[:count]
              .cpu()] = True
    else:
        raise ValueError(f"variation must be 'rows' or 'random', got {variation!r}")
    return cells.view(grid_size, grid_size)


def cells_to_pixels(cells: torch.Tensor, image_size: int) -> torch.Tensor:
    """[S, S] float: each cell of `cells` [g, g] spread over its pixels."""
    return F.interpolate(cells.float().view(1, 1, *cells.shape), size=(image_size, image_size)).view(
        image_size, image_size)


def soft_edge(mask: torch.Tensor) -> torch.Tensor:
    """[1, 1, S, S] weights of the generated pixels for `paste_back`: 1 on the repainted `mask` [S, S], falling to 0
    outside it across a soft edge (the mask blurred over about a sixteenth of the image's side)."""
    size = mask.shape[-1]
    image = PIL.Image.fromarray((mask.cpu().numpy() * 255).astype(np.uint8))
    soft = image.filter(PIL.ImageFilter.GaussianBlur(radius=max(size / 32, 0.5)))
    weight = torch.from_numpy(np.asarray(soft, dtype=np.float32) / 255).view(1, 1, size, size)
    return torch.maximum(weight, mask.cpu().view(1, 1, size, size))  # the masked pixels stay wholly generated


def paste_back(generated: torch.Tensor, original: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`generated` [B, 3, S, S] where `weight` (`soft_edge`) is 1, `original` [1, 3, S, S] where it is 0."""
    return weight * generated + (1 - weight) * original.to(generated.dtype)


def kept_after_region(resampled: torch.Tensor) -> torch.Tensor:
    """[g, g] bool: the kept cells that come after the first resampled one in raster order (what a causal prior
    drew the region without seeing), for `region_fit`."""
    flat = resampled.flatten()
    first = int(flat.nonzero()[0]) if flat.any() else flat.numel()
    return ~resampled & (torch.arange(flat.numel(), device=resampled.device).view_as(resampled) > first)


def region_fit(prior: PriorModel, text_ids: torch.Tensor, codes: torch.Tensor,
               kept_after: torch.Tensor) -> torch.Tensor:
    """[B] the mean log-likelihood the prior gives the kept codes after the region (`kept_after` [g, g]), given the
    caption and every code before them: how well each candidate region agrees with what follows it."""
    log_likelihoods = prior.code_log_likelihoods(text_ids, codes)
    kept_after = kept_after.to(log_likelihoods.device)
    return (log_likelihoods * kept_after).sum(dim=(1, 2)) / kept_after.sum().clamp(min=1)


def standardised(values: torch.Tensor) -> torch.Tensor:
    """`values` [P, N] standardised over each row (a prompt's candidates), so that rankings of other units add."""
    values = values.float()
    return (values - values.mean(dim=1, keepdim=True)) / (values.std(dim=1, keepdim=True) + 1e-6)
