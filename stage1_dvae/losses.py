"""Reconstruction likelihoods of stage 1: MSE, L1, and DALL·E's logit-Laplace with `map_pixels`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def map_pixels(x: torch.Tensor, eps: float) -> torch.Tensor:
    """DALL·E: squeeze pixels in [0, 1] into [eps, 1 - eps] so their logit is finite."""
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Inverse of `map_pixels`, clamped to [0, 1]."""
    return ((x - eps) / (1 - 2 * eps)).clamp(0, 1)


def decoder_output_channels(kind: str, num_channels: int) -> int:
    """Channels the decoder emits: the pixels, or (location, log-scale) pairs for logit-Laplace."""
    return 2 * num_channels if kind == "logit_laplace" else num_channels


def to_pixels(decoder_output: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    """The decoder's image in [-1, 1] (the mode of the logit-Laplace, or the regressed pixels)."""
    if kind == "logit_laplace":
        location, _ = decoder_output.chunk(2, dim=1)
        return unmap_pixels(torch.sigmoid(location), eps) * 2 - 1
    return decoder_output


def reconstruction_loss(decoder_output: torch.Tensor, target: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    """Mean per-pixel loss of `decoder_output` against `target` in [-1, 1]."""
    if kind == "mse":
        return F.mse_loss(decoder_output.float(), target.float())
    if kind == "l1":
        return F.l1_loss(decoder_output.float(), target.float())
    # Negative log density of the logit-Laplace distribution (DALL·E, eq. 2) at the mapped pixels.
    location, log_scale = decoder_output.float().chunk(2, dim=1)
    x = map_pixels((target.float() + 1) / 2, eps)
    logit_x = torch.log(x) - torch.log1p(-x)
    nll = math.log(2.0) + log_scale + torch.log(x * (1 - x)) + (logit_x - location).abs() * torch.exp(-log_scale)
    return nll.mean()
