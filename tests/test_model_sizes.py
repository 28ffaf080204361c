"""The GPU-sized configs: parameter counts as docs/training.md states them, a real training step of the base
prior on CPU, gradient checkpointing that changes memory and nothing else."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from bench.model_sizes import PRIORS, TOKENIZERS, prior_config, read_config
from dallekit.training.config import TrainingConfig, load_config
from dallekit.training.optim import create_optimizer
from stage1_dvae import DVAEConfig, DVAEModel
from stage1_dvae.train import Stage1Config
from stage2_prior import PriorConfig, PriorModel
from stage2_prior.train import Stage2Config

ROOT = Path(__file__).resolve().parents[1]


def readme_parameter_count(config_path: str) -> float:
    """Millions of parameters in docs/training.md's "Sizes for real data" row of `config_path`."""
    readme = (ROOT / "docs" / "training.md").read_text()
    row = re.search(rf"^\| `{re.escape(config_path)}` \|[^|]*\| ([0-9.]+) M \|", readme, flags=re.MULTILINE)
    assert row, f"docs/training.md has no 'Sizes for real data' row for {config_path}"
    return float(row.group(1))


@pytest.mark.parametrize("path", TOKENIZERS + PRIORS)
def test_each_gpu_sized_config_builds_on_the_meta_device_with_the_readme_parameter_count(path: str) -> None:
    with torch.device("meta"):
        if path in PRIORS:
            model = PriorModel(prior_config(path))
        else:
            model = DVAEModel(DVAEConfig(**read_config(path)["model"]))
    parameters = sum(parameter.numel() for parameter in model.parameters())
    assert round(parameters / 1e6, 1) == readme_parameter_count(path)
    # the whole file loads as its stage's config, not only the model section
    loaded = load_config(Stage2Config if path in PRIORS else Stage1Config, ["--config", str(ROOT / path)])
    assert loaded.data.image_size in (128, 256)


def test_the_base_prior_takes_a_training_step_on_cpu_with_gradient_checkpointing() -> None:
    """`configs/prior/base.yaml` (12 x 768, 321 tokens) at batch 1: the loss falls after one AdamW step."""
    torch.manual_seed(0)
    config = prior_config("configs/prior/base.yaml")
    model = PriorModel(config).train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert model.decoder.gradient_checkpointing
    optimizer = create_optimizer(model, TrainingConfig(learning_rate=1e-3, weight_decay=0.05))
    input_ids = torch.cat([torch.tensor([[config.bos_token_id]]),
                           torch.randint(3, config.text_vocab_size, (1, config.text_len)),
                           config.text_vocab_size + torch.randint(0, config.image_vocab_size, (1, config.image_seq_len))],
                          dim=1)
    losses = []
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[1] < losses[0], losses


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    config = PriorConfig(text_vocab_size=40, text_len=6, image_vocab_size=16, image_grid_size=4, hidden_size=64,
                         intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(0)
    plain = PriorModel(config).train()
    checkpointed = PriorModel(config).train()
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    input_ids = torch.cat([torch.ones(3, 1, dtype=torch.long), torch.randint(3, 40, (3, 6)),
                           40 + torch.randint(0, 16, (3, 16))], dim=1)
    for model in (plain, checkpointed):
        model(input_ids).loss.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_gradient_checkpointing_is_refused_outside_the_prior() -> None:
    with pytest.raises(ValueError, match="gradient_checkpointing applies to the prior"):
        Stage1Config(training=TrainingConfig(gradient_checkpointing=True))
