"""Reconstruction metrics of an image tokenizer: MSE, PSNR, codebook usage and perplexity.

Used by its training (validation, on every process, gathered) and by `dallekit evaluate-tokenizer`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from stage1_dvae.modeling_dvae import DVAEModel


def psnr_from_mse(mean_squared_error: float) -> float:
    """Peak signal-to-noise ratio in dB for pixels in [0, 1]."""
    return 10 * math.log10(1.0 / max(mean_squared_error, 1e-12))


def codebook_statistics(code_counts: torch.Tensor) -> dict[str, float]:
    """Usage (share of the K codes seen at least once) and perplexity (exp entropy) of a code histogram."""
    counts = code_counts.double()
    probs = counts / counts.sum().clamp_min(1)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum().item()
    return {"codebook_usage": (counts > 0).double().mean().item(), "perplexity": math.exp(entropy)}


@torch.no_grad()
def reconstruction_metrics(
    model: DVAEModel,
    batches: Iterable[torch.Tensor],
    gather: Callable[[torch.Tensor], torch.Tensor] = lambda values: values,
) -> dict[str, float]:
    """MSE, PSNR, codebook usage and perplexity of `model` over batches of pixels [B, C, H, W] in [-1, 1].

    The tokenizer is evaluated as stage 2 uses it: deterministic codes, then `decode(codes)`. `gather`
    collects per-image values from every process (`accelerator.gather_for_metrics`) when each
    process holds a share of the images.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    errors, codes = [], []
    for pixel_values in batches:
        pixel_values = pixel_values.to(device)
        image_codes = model.encode(pixel_values)  # [B, h, w]
        reconstruction = model.decode(image_codes)
        per_image = ((reconstruction.float() - pixel_values.float()) / 2).pow(2).flatten(1).mean(1)  # [B]
        errors.append(gather(per_image).cpu())
        codes.append(gather(image_codes.flatten(1)).cpu())  # [B, h*w]
    model.train(was_training)
    errors_all = torch.cat(errors) if errors else torch.empty(0)
    if errors_all.numel() == 0:
        raise ValueError("no images to evaluate: the evaluation split is empty or every image was unreadable")
    mean_squared_error = errors_all.double().mean().item()
    counts = torch.bincount(torch.cat(codes).flatten(), minlength=model.config.codebook_size)
    return {
        "mse": mean_squared_error,
        "psnr": psnr_from_mse(mean_squared_error),
        **codebook_statistics(counts),
        "num_images": errors_all.numel(),
    }
