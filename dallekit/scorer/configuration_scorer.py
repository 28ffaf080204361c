"""Configuration of the contrastive text–image scorer: a small CNN and a small text transformer, one shared space."""

import dataclasses
import math

from huggingface_hub.dataclasses import strict
from transformers import CLIPTextConfig, PreTrainedConfig


@strict
class ScorerConfig(PreTrainedConfig):
    """Sizes of a `ScorerModel` and of the inputs it reads.

    Images are `image_size`² pixels in [-1, 1]. The image encoder has one level per entry of
    `image_channels`: the first keeps the resolution, each later one halves it; its last feature
    map is pooled to an `image_pool_size`² grid (a grid, not one vector: "on the left" is about where).
    Captions are `text_len` ids of the byte-level BPE of `dallekit.text_tokenizer`
    (`[tokens, <eos>, <pad>, ...]`), read by a CLIP text transformer. Both sides are projected to
    `projection_dim` and l2-normalised.
    """

    model_type = "dallekit_scorer"
    main_input_name = "pixel_values"

    image_size: int = 32
    num_channels: int = 3
    image_channels: list[int] = dataclasses.field(default_factory=lambda: [16, 32, 64])
    image_pool_size: int = 4
    text_vocab_size: int = 512
    text_len: int = 16
    text_hidden_size: int = 64
    text_intermediate_size: int = 128
    text_num_hidden_layers: int = 2
    text_num_attention_heads: int = 4
    projection_dim: int = 64
    logit_scale_init_value: float = math.log(1 / 0.07)  # CLIP's initial temperature 0.07
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2

    def validate_architecture(self):
        """Reject inconsistent sizes with a message that says how to fix them."""
        for name in ("image_size", "num_channels", "image_pool_size", "text_vocab_size", "text_num_hidden_layers",
                     "projection_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.text_len < 2:
            raise ValueError(f"text_len must be >= 2 (caption tokens plus <eos>), got {self.text_len}")
        if not self.image_channels or any(c < 8 or c % 8 for c in self.image_channels):
            raise ValueError(
                f"image_channels must list at least one multiple of 8 (each level is normalised in 8 groups), "
                f"got {list(self.image_channels)}"
            )
        smallest = self.image_size // 2 ** (len(self.image_channels) - 1)
        if smallest < self.image_pool_size:
            raise ValueError(
                f"{len(self.image_channels)} levels shrink {self.image_size}px images to {smallest}px, below "
                f"image_pool_size {self.image_pool_size}: drop a level from image_channels or lower image_pool_size"
            )
        if self.text_hidden_size % self.text_num_attention_heads:
            raise ValueError(
                f"text_hidden_size ({self.text_hidden_size}) must be a multiple of text_num_attention_heads "
                f"({self.text_num_attention_heads})"
            )
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is None or not 0 <= value < self.text_vocab_size:
                raise ValueError(f"{name} must be a text token id in [0, {self.text_vocab_size}), got {value}")

    def text_config(self) -> CLIPTextConfig:
        """The CLIP text transformer these sizes describe (causal attention, learned positions)."""
        return CLIPTextConfig(
            vocab_size=self.text_vocab_size,
            hidden_size=self.text_hidden_size,
            intermediate_size=self.text_intermediate_size,
            num_hidden_layers=self.text_num_hidden_layers,
            num_attention_heads=self.text_num_attention_heads,
            max_position_embeddings=self.text_len,
            pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
        )
