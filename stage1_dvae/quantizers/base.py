"""The output type and code statistics every quantizer shares."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizerOutput:
    """What a quantizer returns for one batch."""

    embeddings: torch.Tensor  # [B, D, h, w] decoder input, differentiable w.r.t. the encoder
    codes: torch.Tensor  # [B, h, w] int64
    loss: torch.Tensor  # KL to uniform (gumbel; the model weights it) or beta * commitment (vq), scalar
    perplexity: torch.Tensor  # exp(entropy) of the batch's code histogram, scalar
    marginal_kl: torch.Tensor | None = None  # gumbel: KL(batch-averaged q || Uniform(K)), the codebook-usage part


def code_perplexity(codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """exp(H) of the empirical code distribution: codebook_size when all codes are equally used."""
    counts = torch.bincount(codes.flatten(), minlength=codebook_size).float()
    probs = counts / counts.sum()
    return torch.exp(-(probs * torch.log(probs.clamp_min(1e-12))).sum())
