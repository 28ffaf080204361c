"""The stage-1 image tokenizer: convolutional encoder, quantizer (Gumbel, VQ or FSQ), decoder."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput

from dallekit.modeling_utils import StrictPreTrainedModel, init_convolutional_weights
from stage1_dvae.configuration_dvae import DVAEConfig
from stage1_dvae.losses import decoder_output_channels, reconstruction_loss, to_pixels
from stage1_dvae.quantizers import FiniteScalarQuantizer, GumbelQuantizer, VectorQuantizer


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class ResidualBlock(nn.Module):
    """(GroupNorm, SiLU, 3x3 conv) x 2 with a residual path (1x1 conv when channels change)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            group_norm(in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1),
            group_norm(out_channels), nn.SiLU(), nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.block(x)


class Encoder(nn.Module):
    """Pixels [B, C, H, W] -> features [B, out_channels, H/f, W/f] (after folding p×p patches into channels)."""

    def __init__(self, config: DVAEConfig, out_channels: int) -> None:
        super().__init__()
        widths = [config.hidden_channels * m for m in config.channel_multipliers]
        patch = config.patch_size
        layers: list[nn.Module] = [nn.PixelUnshuffle(patch)] if patch > 1 else []
        layers.append(nn.Conv2d(config.num_channels * patch**2, widths[0], 3, padding=1))
        previous = widths[0]
        for level, width in enumerate(widths):
            for _ in range(config.num_res_blocks):
                layers.append(ResidualBlock(previous, width))
                previous = width
            if level < len(widths) - 1:
                layers.append(nn.Conv2d(width, width, 4, stride=2, padding=1))
        layers += [group_norm(previous), nn.SiLU(), nn.Conv2d(previous, out_channels, 1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.layers(pixel_values)


class Decoder(nn.Module):
    """Code embeddings [B, D, h, w] -> decoder output [B, C or 2C, h*f, w*f]."""

    def __init__(self, config: DVAEConfig) -> None:
        super().__init__()
        widths = [config.hidden_channels * m for m in reversed(config.channel_multipliers)]
        layers: list[nn.Module] = [nn.Conv2d(config.embedding_dim, widths[0], 3, padding=1)]
        previous = widths[0]
        for level, width in enumerate(widths):
            for _ in range(config.num_res_blocks):
                layers.append(ResidualBlock(previous, width))
                previous = width
            if level == len(widths) - 1:
                continue
            if config.upsample == "nearest":
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, width, 3, padding=1)]
            else:  # the next level's channels computed at this level's resolution, then unfolded 2x2
                previous = widths[level + 1]
                layers += [nn.Conv2d(width, 4 * previous, 3, padding=1), nn.PixelShuffle(2)]
        layers += [group_norm(previous), nn.SiLU()]
        self.layers = nn.Sequential(*layers)
        out_channels = decoder_output_channels(config.reconstruction_loss, config.num_channels)
        self.conv_out = nn.Conv2d(previous, out_channels * config.patch_size**2, 3, padding=1)
        self.unpatch = nn.PixelShuffle(config.patch_size) if config.patch_size > 1 else nn.Identity()

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        # Code embeddings arrive channels-last from einsum/permute; in that layout every GroupNorm on
        # CPU takes a path 8-20x slower (a Gumbel training step ran 1.6x slower, decoding likewise).
        return self.unpatch(self.conv_out(self.layers(embeddings.contiguous())))


@dataclass
class DVAEOutput(ModelOutput):
    """Result of `DVAEModel.forward`."""

    loss: torch.Tensor | None = None  # reconstruction_loss + weighted quantizer_loss
    reconstruction_loss: torch.Tensor | None = None
    quantizer_loss: torch.Tensor | None = None  # KL to uniform (gumbel, unweighted), commitment (vq), 0 (fsq)
    reconstruction: torch.Tensor | None = None  # [B, C, H, W] in [-1, 1]
    codes: torch.Tensor | None = None  # [B, h, w] int64
    perplexity: torch.Tensor | None = None  # of the batch's codes


class DVAEPreTrainedModel(StrictPreTrainedModel):
    config_class = DVAEConfig
    base_model_prefix = "dvae"
    main_input_name = "pixel_values"

    def _init_weights(self, module: nn.Module) -> None:
        if not init_convolutional_weights(module) and isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=1.0)


class DVAEModel(DVAEPreTrainedModel):
    """Image tokenizer: `encode(pixels) -> codes [B, h, w]`, `decode(codes) -> pixels in [-1, 1]`."""

    def __init__(self, config: DVAEConfig) -> None:
        super().__init__(config)
        if config.quantizer == "gumbel":
            self.encoder = Encoder(config, out_channels=config.codebook_size)
            self.quantizer: GumbelQuantizer | VectorQuantizer | FiniteScalarQuantizer = GumbelQuantizer(
                config.codebook_size, config.embedding_dim, straight_through=config.straight_through
            )
        elif config.quantizer == "fsq":
            self.encoder = Encoder(config, out_channels=config.embedding_dim)
            self.quantizer = FiniteScalarQuantizer(config.fsq_levels, config.embedding_dim)
        else:
            self.encoder = Encoder(config, out_channels=config.embedding_dim)
            self.quantizer = VectorQuantizer(
                config.codebook_size,
                config.embedding_dim,
                codebook_dim=config.codebook_dim,
                use_l2_norm=config.use_l2_norm,
                commitment_cost=config.commitment_cost,
                ema_decay=config.ema_decay,
                ema_epsilon=config.ema_epsilon,
                dead_code_threshold=config.dead_code_threshold,
                kmeans_init=config.kmeans_init,
                kmeans_iters=config.kmeans_iters,
            )
        self.decoder = Decoder(config)
        self.post_init()

    def _check_pixels(self, pixel_values: torch.Tensor) -> None:
        expected = (self.config.num_channels, self.config.image_size, self.config.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must have shape [batch, {expected[0]}, {expected[1]}, {expected[2]}] "
                f"(values in [-1, 1]), got {list(pixel_values.shape)}"
            )

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixels [B, C, H, W] in [-1, 1] -> codes LongTensor [B, H/f, W/f] (deterministic)."""
        self._check_pixels(pixel_values)
        return self.quantizer.codes(self.encoder(pixel_values))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes LongTensor [B, h, w] -> pixels [B, C, H, W] in [-1, 1]."""
        if codes.dtype not in (torch.int64, torch.int32) or codes.ndim != 3:
            raise ValueError(f"codes must be an integer tensor [batch, h, w], got {codes.dtype} {list(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.config.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.config.codebook_size}), got [{codes.min()}, {codes.max()}]")
        output = self.decoder(self.quantizer.embed_codes(codes.long()))
        return to_pixels(output, self.config.reconstruction_loss, self.config.logit_laplace_eps).clamp(-1, 1)

    def get_input_embeddings(self) -> None:
        """None: the tokenizer reads pixels, it has no token embedding (transformers' default raises, and
        accelerate's FSDP2 preparation asks every model for its embeddings)."""

    def get_last_layer(self) -> torch.Tensor:
        """The decoder's final weight (VQGAN's adaptive adversarial weight balances gradients here)."""
        return self.decoder.conv_out.weight

    def forward(
        self, pixel_values: torch.Tensor, temperature: float = 1.0, kl_weight: float | None = None
    ) -> DVAEOutput:
        """Encode, quantize (τ = `temperature` for Gumbel), decode, and compute the loss terms."""
        self._check_pixels(pixel_values)
        quantized = self.quantizer(self.encoder(pixel_values), temperature=temperature)
        output = self.decoder(quantized.embeddings.to(pixel_values.dtype))
        kind, eps = self.config.reconstruction_loss, self.config.logit_laplace_eps
        recon_loss = reconstruction_loss(output, pixel_values, kind, eps)
        if isinstance(self.quantizer, GumbelQuantizer):
            weight = self.config.kl_weight if kl_weight is None else kl_weight
            loss = recon_loss + weight * quantized.loss
        else:
            loss = recon_loss + quantized.loss
        if quantized.marginal_kl is not None and self.config.marginal_kl_weight:
            loss = loss + self.config.marginal_kl_weight * quantized.marginal_kl
        return DVAEOutput(
            loss=loss,
            reconstruction_loss=recon_loss,
            quantizer_loss=quantized.loss,
            reconstruction=to_pixels(output, kind, eps),
            codes=quantized.codes,
            perplexity=quantized.perplexity,
        )
