"""The output type and code statistics every quantizer shares."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class QuantizerOutput:
    """What a quantizer returns for one batch."""

    embeddings: torch.Tensor  # [B, D, h, w] decoder input, differentiable w.r.t. the encoder
    codes: torch.Tensor  # [B, h, w] int64
    loss: torch.Tensor  # KL to uniform (gumbel; the model weights it) or beta * commitment (vq), scalar
    perplexity: torch.Tensor  # exp(entropy) of the batch's code histogram, scalar
    # gumbel, and fsq in training: KL(batch-averaged q || Uniform(K)), the codebook-usage part
    marginal_kl: torch.Tensor | None = None


def code_perplexity(codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """exp(H) of the empirical code distribution: codebook_size when all codes are equally used."""
    counts = torch.bincount(codes.flatten(), minlength=codebook_size).float()
    probs = counts / counts.sum()
    return torch.exp(-(probs * torch.log(probs.clamp_min(1e-12))).sum())


def marginal_kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
    """KL(q̄ || Uniform(K)) of the posterior averaged over the batch and positions: low when all codes are used.

    `logits` [B, K, ...] are the posterior's unnormalised log-probabilities over K codes. The
    per-position KL to the uniform prior decomposes (Hoffman & Johnson 2016) into this term plus
    the mutual information between images and codes; penalising only this part spreads the codes
    without pushing each position's posterior towards uniform.
    """
    return kl_to_uniform_of(F.softmax(logits, dim=1).transpose(0, 1).flatten(1).mean(dim=1))


def kl_to_uniform_of(mean_q: torch.Tensor) -> torch.Tensor:
    """KL(q̄ || Uniform(K)) of a distribution q̄ [K] over the codes."""
    return (mean_q * mean_q.clamp_min(1e-12).log()).sum() + math.log(mean_q.numel())
