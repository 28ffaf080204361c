"""Shared fixtures: tiny real models and real data, small enough for a 2-core CPU."""

from __future__ import annotations

import os

# Tests never reach a hub: fail fast instead of retrying a network that is not there.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from stage1_dvae import DVAEConfig  # noqa: E402
from textimage_data import DataConfig, TextImageCollator, load_text_image_dataset  # noqa: E402


def tiny_dvae_config(quantizer: str = "gumbel", **overrides) -> DVAEConfig:
    """A ~20k-parameter tokenizer for 16x16 images: 8x8 codes out of 64."""
    values = dict(
        image_size=16, quantizer=quantizer, downsample_factor=2, hidden_channels=16,
        channel_multipliers=[1, 2], num_res_blocks=1, codebook_size=64, embedding_dim=16,
    )
    values.update(overrides)
    return DVAEConfig(**values)


@pytest.fixture(scope="session")
def digit_pixels() -> torch.Tensor:
    """16 real digits at 16x16 in [-1, 1], shape [16, 3, 16, 16]."""
    splits = load_text_image_dataset(DataConfig(source="digits", image_size=16))
    examples = [splits["train"][i] for i in range(16)]
    return TextImageCollator(16)(examples)["pixel_values"]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
