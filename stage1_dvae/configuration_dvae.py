"""Configuration of the stage-1 image tokenizer (Gumbel-softmax dVAE, VQ-VAE or FSQ)."""

import dataclasses
import math
from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig


@strict
class DVAEConfig(PreTrainedConfig):
    """Architecture and loss constants of a `DVAEModel`.

    Images of `image_size`² pixels become a grid of (image_size / downsample_factor)² codes out of
    `codebook_size` (for `quantizer: fsq`, prod(fsq_levels), set from the levels). With `patch_size` p > 1 the
    encoder first folds each p×p pixel patch into channels (pixel unshuffle) and the decoder unfolds its output
    (pixel shuffle), so no convolution runs at full resolution. The encoder has one level per entry of
    `channel_multipliers`, each level halving the resolution except the last, so
    `len(channel_multipliers) == log2(downsample_factor / patch_size) + 1`.
    """

    model_type = "dallekit_dvae"
    main_input_name = "pixel_values"

    image_size: int = 32
    num_channels: int = 3
    downsample_factor: int = 4
    patch_size: int = 1  # pixels folded into channels before the first convolution (1: none)
    hidden_channels: int = 64
    channel_multipliers: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 2])
    num_res_blocks: int = 1
    # decoder upsampling: nearest-neighbour then a 3x3 conv at the new resolution, or a 3x3 conv at the old
    # resolution to 4x the next level's channels, then pixel shuffle (sub-pixel conv: fewer operations)
    upsample: Literal["nearest", "pixel_shuffle"] = "nearest"
    codebook_size: int = 512
    embedding_dim: int = 64
    quantizer: Literal["gumbel", "vq", "fsq"] = "gumbel"
    reconstruction_loss: Literal["mse", "l1", "logit_laplace"] = "mse"
    logit_laplace_eps: float = 0.1
    # Gumbel-softmax dVAE
    straight_through: bool = False
    kl_weight: float = 0.05
    # Gumbel and FSQ: KL of the batch-averaged posterior to uniform, a codebook-usage term
    marginal_kl_weight: float = 0.0
    # VQ-VAE
    codebook_dim: int | None = None
    use_l2_norm: bool = False
    commitment_cost: float = 0.25
    ema_decay: float = 0.99
    ema_epsilon: float = 1e-5
    dead_code_threshold: float = 1.0
    kmeans_init: bool = True
    kmeans_iters: int = 10
    # FSQ: levels per latent channel; prod(fsq_levels) codes
    fsq_levels: list[int] = dataclasses.field(default_factory=lambda: [8, 5, 5, 5])

    def __post_init__(self, **kwargs):
        if self.quantizer == "fsq":  # the grid defines the code count: codebook_size follows the levels
            self.codebook_size = math.prod(self.fsq_levels)
        super().__post_init__(**kwargs)

    @property
    def latent_size(self) -> int:
        """Side of the code grid: `image_size // downsample_factor`."""
        return self.image_size // self.downsample_factor

    def validate_architecture(self):
        """Reject inconsistent values with a message that says how to fix them."""
        f = self.downsample_factor
        if f < 1 or f & (f - 1):
            raise ValueError(f"downsample_factor must be a power of two (1, 2, 4, 8, ...), got {f}")
        p = self.patch_size
        if p < 1 or p & (p - 1) or p > f:
            raise ValueError(f"patch_size must be a power of two no larger than downsample_factor {f}, got {p}")
        levels = int(math.log2(f // p)) + 1
        if len(self.channel_multipliers) != levels:
            raise ValueError(
                f"channel_multipliers needs log2(downsample_factor / patch_size) + 1 = {levels} entries for "
                f"downsample_factor {f} and patch_size {p}, got {list(self.channel_multipliers)}"
            )
        if self.image_size <= 0 or self.image_size % f:
            raise ValueError(f"image_size must be a positive multiple of downsample_factor {f}, got {self.image_size}")
        for name in ("num_channels", "hidden_channels", "codebook_size", "embedding_dim", "num_res_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {self.codebook_size}")
        if not 0 < self.logit_laplace_eps < 0.5:
            raise ValueError(f"logit_laplace_eps must be in (0, 0.5), got {self.logit_laplace_eps}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.codebook_dim is not None and self.codebook_dim < 1:
            raise ValueError(f"codebook_dim must be >= 1 or null (use embedding_dim), got {self.codebook_dim}")
        if len(self.fsq_levels) < 1 or min(self.fsq_levels) < 2:
            raise ValueError(f"fsq_levels needs at least one entry, each >= 2 (e.g. [8, 5, 5, 5]), got {self.fsq_levels}")
        if min(self.kl_weight, self.marginal_kl_weight, self.commitment_cost) < 0:
            raise ValueError("kl_weight, marginal_kl_weight and commitment_cost must be >= 0")
