"""The contrastive text–image scorer: a CNN image encoder and a CLIP text transformer, trained with InfoNCE.

Both encoders end in a linear projection to `projection_dim` and are l2-normalised, so their dot
product is a cosine similarity; the logits are that similarity times a learned scale
(`exp(logit_scale)`, clamped at 100 as in CLIP). The loss is CLIP's symmetric InfoNCE
(transformers' `image_text_contrastive_loss`), the diagonal of the batch being the positives.

Captions repeated within a batch (digits: 50 captions over 1,400 images; shapes: 60 over 1,800)
are not false negatives of this loss: identical ids give identical text embeddings, so their
logit columns are equal, and the loss equals, in value and gradient, the one that counts every
pair with identical captions as positive (multi-positive targets; `tests/test_scorer.py` checks it).
The false negatives that remain are paraphrases ("the number 7", "a hand-drawn seven"), which no
comparison of caption text can find.

Why a CNN and not a ViT (`CLIPVisionModel`): with the same text side, batch 128, on one CPU thread
for about 18 s, this CNN (`image_channels` 16/32/64, 0.14 M parameters, 150 steps in bf16) ranked
the true caption of 99.5% of the held-out digits within the top 5 of their 50 captions (and the
right digit first for all of them) and the true caption first for 100% of the held-out shapes;
a 3-layer ViT of width 64 on 4-pixel patches (0.11 M parameters, ~100 steps in fp32, the better of
learning rates 1e-3 and 2e-3) reached 43% and 37%. Convolutions bring the locality prior that a
ViT must learn from far more data than 1,400 digits; the CNN is also the cheaper per step.
The text side is transformers' `CLIPTextModel` (what CLIP uses), pooled at the first `<eos>`
here: its own `pooler_output` takes the position of the largest id when `eos_token_id == 2`
(a compatibility rule for old CLIP checkpoints), which is not the `<eos>` of this tokenizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPTextModel
from transformers.models.clip.modeling_clip import image_text_contrastive_loss
from transformers.utils import ModelOutput

from dallekit.modeling_utils import StrictPreTrainedModel, init_convolutional_weights
from dallekit.scorer.configuration_scorer import ScorerConfig

MAX_LOGIT_SCALE = 100.0  # CLIP's clamp of exp(logit_scale): a temperature no lower than 0.01


@dataclass
class ScorerOutput(ModelOutput):
    """Result of `ScorerModel.forward` on a batch of N pairs."""

    loss: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None  # [N, N]: scaled cosine of image i and caption j
    image_embeds: torch.Tensor | None = None  # [N, projection_dim], unit length
    text_embeds: torch.Tensor | None = None  # [N, projection_dim], unit length


def _conv_block(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride, padding=1), nn.GroupNorm(8, out_channels), nn.GELU()
    )


class ImageEncoder(nn.Module):
    """Pixels [B, C, H, W] in [-1, 1] -> features [B, projection_dim] (not normalised)."""

    def __init__(self, config: ScorerConfig) -> None:
        super().__init__()
        channels = list(config.image_channels)
        layers = [_conv_block(config.num_channels, channels[0], stride=1)]
        for in_channels, out_channels in zip(channels, channels[1:]):
            layers += [_conv_block(in_channels, out_channels, stride=2), _conv_block(out_channels, out_channels, 1)]
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(config.image_pool_size), nn.Flatten())
        self.projection = nn.Linear(channels[-1] * config.image_pool_size**2, config.projection_dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projection(self.body(pixel_values))


class ScorerPreTrainedModel(StrictPreTrainedModel):
    config_class = ScorerConfig
    base_model_prefix = "scorer"
    main_input_name = "pixel_values"

    def _init_weights(self, module: nn.Module) -> None:
        # The CLIP text model is a sub-model: transformers initialises it with CLIP's own scheme.
        if not init_convolutional_weights(module) and isinstance(module, ScorerModel):
            nn.init.constant_(module.logit_scale, self.config.logit_scale_init_value)


class ScorerModel(ScorerPreTrainedModel):
    """Dual encoder: `get_image_features(pixels)` and `get_text_features(ids)` are unit vectors of one space."""

    def __init__(self, config: ScorerConfig) -> None:
        super().__init__(config)
        self.image_encoder = ImageEncoder(config)
        self.text_encoder = CLIPTextModel(config.text_config())
        self.text_projection = nn.Linear(config.text_hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.post_init()

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Unit-length embeddings [B, projection_dim] of pixels [B, C, image_size, image_size] in [-1, 1]."""
        size = self.config.image_size
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (self.config.num_channels, size, size):
            raise ValueError(
                f"pixel_values must have shape [batch, {self.config.num_channels}, {size}, {size}] (this scorer's "
                f"image_size), got {list(pixel_values.shape)}: resize the images to {size}x{size}"
            )
        return F.normalize(self.image_encoder(pixel_values), dim=-1)

    def get_text_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Unit-length embeddings [B, projection_dim] of caption ids [B, text_len] (`encode_captions`)."""
        if input_ids.ndim != 2 or input_ids.shape[1] != self.config.text_len:
            raise ValueError(
                f"input_ids must have shape [batch, {self.config.text_len}] (encode_captions(tokenizer, captions, "
                f"{self.config.text_len})), got {list(input_ids.shape)}"
            )
        hidden = self.text_encoder(input_ids=input_ids).last_hidden_state  # [B, L, text_hidden_size]
        eos = (input_ids == self.config.eos_token_id).int().argmax(dim=-1)  # the first <eos> of each caption
        pooled = hidden[torch.arange(len(input_ids), device=input_ids.device), eos]
        return F.normalize(self.text_projection(pooled), dim=-1)

    @property
    def temperature_scale(self) -> torch.Tensor:
        """`exp(logit_scale)` clamped at `MAX_LOGIT_SCALE`: the factor turning cosines into logits."""
        return self.logit_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()

    def contrastive_loss(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The symmetric InfoNCE loss and the logits [N, N] of N pairs' embeddings (pair i is image i, caption i)."""
        logits = self.temperature_scale * image_embeds.float() @ text_embeds.float().T
        return image_text_contrastive_loss(logits), logits

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> ScorerOutput:
        """Embeddings of N (image, caption) pairs, their logits and the contrastive loss."""
        image_embeds = self.get_image_features(pixel_values)
        text_embeds = self.get_text_features(input_ids)
        loss, logits = self.contrastive_loss(image_embeds, text_embeds)
        return ScorerOutput(loss=loss, logits_per_image=logits, image_embeds=image_embeds, text_embeds=text_embeds)
