"""The pipeline both sampling benchmarks time: the demo's shapes with random weights (bench/stage2.py, bench/reference.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from dallekit.data import load_text_image_dataset
from dallekit.text_tokenizer import train_text_tokenizer
from dallekit.training.config import load_config
from pipelines import TextToImagePipeline
from stage1_dvae import DVAEModel
from stage1_dvae.train import Stage1Config
from stage2_prior import PriorModel
from stage2_prior.train import Stage2Config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def demo_pipeline(device: torch.device) -> TextToImagePipeline:
    """The demo's VQ-VAE, caption BPE and prior at their trained shapes, with random weights (the same cost)."""
    torch.manual_seed(0)
    vqvae = DVAEModel(load_config(Stage1Config, ["--config", str(CONFIGS / "dvae" / "demo.yaml")]).model)
    run = load_config(Stage2Config, ["--config", str(CONFIGS / "prior" / "demo.yaml")])
    captions = load_text_image_dataset(run.data)["train"]["text"]
    tokenizer = train_text_tokenizer(captions, run.model.text_vocab_size, run.model.text_len)
    config = run.model
    config.image_vocab_size, config.image_grid_size = vqvae.config.codebook_size, vqvae.config.latent_size
    return TextToImagePipeline(vqvae=vqvae, prior=PriorModel(config), tokenizer=tokenizer).to(device)


def reference_sizes(pipe: TextToImagePipeline) -> dict:
    """The demo pipeline's shapes, as `bench/reference.py`'s sampler takes them."""
    config = pipe.prior.config
    return dict(text_vocab_size=config.text_vocab_size, text_len=config.text_len,
                image_vocab_size=config.image_vocab_size, grid=config.image_grid_size,
                image_size=pipe.vqvae.config.image_size, depth=config.num_hidden_layers, dim=config.hidden_size,
                heads=config.num_attention_heads, dim_head=config.hidden_size // config.num_attention_heads)
