"""Finite scalar quantization (Mentzer et al. 2023): a fixed grid instead of a learned codebook.

Each of the d = len(levels) latent channels is bounded with tanh to (-(L_i - 1)/2, (L_i - 1)/2)
and rounded to one of L_i integer levels with a straight-through gradient. The code of a position
is the mixed-radix number of its d digits, so there are prod(levels) codes, all reachable by
construction: no codebook to collapse, no commitment loss, no EMA or restarts.

Reachable is not used: an encoder can still crowd a few grid points. For training, each bounded
value also gets a soft posterior over its channel's levels (softmax of minus the squared distance,
in grid steps), their product is a posterior over all codes, and `marginal_kl` is the KL of its
batch average to uniform, the same codebook-usage term as the Gumbel dVAE's (`marginal_kl_weight`;
MAGVIT-v2's entropy penalty on lookup-free quantization is the same idea).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from stage1_dvae.quantizers.base import QuantizerOutput, code_perplexity, kl_to_uniform_of


class FiniteScalarQuantizer(nn.Module):
    """Encoder output [B, D, h, w] -> quantized decoder input [B, D, h, w] with codes [B, h, w]."""

    def __init__(self, levels: list[int], embedding_dim: int) -> None:
        super().__init__()
        if len(levels) < 1 or min(levels) < 2:
            raise ValueError(f"fsq_levels needs at least one entry, each >= 2, got {list(levels)}")
        self.codebook_size = math.prod(levels)
        self.project_in = nn.Linear(embedding_dim, len(levels))
        self.project_out = nn.Linear(len(levels), embedding_dim)
        self.level_counts = tuple(levels)
        # digit i of a code has weight prod(levels[:i]): code = sum(digit_i * basis_i)
        self.digit_weights = tuple(math.prod(levels[:i]) for i in range(len(levels)))

    # Derived from the config, not weights: plain tensors made where needed (never saved or meta-initialised).
    def _long(self, values: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=like.device)

    def _half_width(self, like: torch.Tensor) -> torch.Tensor:
        """L // 2 per channel: grid level n scaled to [-1, 1] is n / (L // 2)."""
        return self._long(self.level_counts, like) // 2

    def bound(self, z: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
        """Squash z [..., d] into (-(L-1)/2, (L-1)/2) (shifted by half a step for even L, so rounding
        yields exactly L integers from -L//2 to L//2 - 1 or to L//2)."""
        levels = self._long(self.level_counts, z)
        half_range = (levels - 1).to(z.dtype) * (1 + eps) / 2
        offset = (levels % 2 == 0).to(z.dtype) * 0.5
        shift = torch.atanh(offset / half_range)
        return torch.tanh(z + shift) * half_range - offset

    def mean_code_posterior(self, bounded: torch.Tensor) -> torch.Tensor:
        """Soft posterior over all codes averaged over positions: bounded values [..., d] -> q̄ [prod(levels)].

        Channel i puts probability softmax(-(value - level)^2) on each of its levels; a position's
        posterior over codes is the product over channels. Split into the low-digit channels (first
        half) and the high-digit ones, the average is q̄[high, low] = mean_n P_high[n, high] · P_low[n, low]:
        one [K_high, N] @ [N, K_low] matmul, never an [N, K] tensor.
        """
        values = bounded.reshape(-1, bounded.shape[-1])
        split = len(self.level_counts) // 2
        low = self._joint_level_probs(values, range(split))
        high = self._joint_level_probs(values, range(split, len(self.level_counts)))
        # [K_high, K_low] flattened row-major: code = high_digits * K_low + low_digits, as in grid_to_codes
        return (high.transpose(0, 1) @ low).flatten() / values.shape[0]

    def _joint_level_probs(self, values: torch.Tensor, channels: range) -> torch.Tensor:
        """Product of the channels' level probabilities, [N, d] -> [N, prod(levels[channels])] (1 column if none)."""
        joint = values.new_ones(values.shape[0], 1)
        for channel in channels:
            count = self.level_counts[channel]
            levels = torch.arange(count, device=values.device, dtype=values.dtype) - count // 2
            probs = F.softmax(-(values[:, channel, None] - levels).square(), dim=-1)
            joint = (probs[:, :, None] * joint[:, None, :]).flatten(1)  # a later channel: a more significant digit
        return joint

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Rounded, bounded z [..., d] scaled to [-1, 1], with a straight-through gradient."""
        bounded = self.bound(z)
        rounded = bounded + (bounded.round() - bounded).detach()
        return rounded / self._half_width(z).to(z.dtype)

    def grid_to_codes(self, grid: torch.Tensor) -> torch.Tensor:
        """Quantized values [..., d] in [-1, 1] -> code indices [...]."""
        half_width = self._half_width(grid)
        digits = (grid * half_width + half_width).round().long()
        return (digits * self._long(self.digit_weights, grid)).sum(dim=-1)

    def codes_to_grid(self, codes: torch.Tensor) -> torch.Tensor:
        """Code indices [...] -> quantized values [..., d] in [-1, 1]."""
        half_width = self._half_width(codes)
        digits = (codes.unsqueeze(-1) // self._long(self.digit_weights, codes)) % self._long(self.level_counts, codes)
        return (digits - half_width).float() / half_width

    def forward(self, latents: torch.Tensor, temperature: float | None = None) -> QuantizerOutput:
        """Quantize; `temperature` is ignored. The loss is zero (FSQ needs no commitment term); in
        training, `marginal_kl` is the codebook-usage term the model weights by `marginal_kl_weight`."""
        vectors = self.project_in(rearrange(latents.float(), "b d h w -> b h w d")).float()  # round in fp32
        grid = self.quantize(vectors)
        codes = self.grid_to_codes(grid.detach())
        embeddings = rearrange(self.project_out(grid), "b h w d -> b d h w").contiguous()
        return QuantizerOutput(
            embeddings=embeddings,
            codes=codes,
            loss=latents.new_zeros((), dtype=torch.float32),
            perplexity=code_perplexity(codes, self.codebook_size),
            marginal_kl=kl_to_uniform_of(self.mean_code_posterior(self.bound(vectors))) if self.training else None,
        )

    def codes(self, latents: torch.Tensor) -> torch.Tensor:
        """The grid point of each position as a code: latents [B, D, h, w] -> [B, h, w]."""
        vectors = self.project_in(rearrange(latents.float(), "b d h w -> b h w d")).float()
        return self.grid_to_codes(self.quantize(vectors))

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, h, w] -> decoder input [B, D, h, w]."""
        return rearrange(self.project_out(self.codes_to_grid(codes)), "b h w d -> b d h w")
