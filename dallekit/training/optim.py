"""AdamW with decoupled weight decay on matrices only, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import torch
from torch import nn
from transformers import get_constant_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

from dallekit.training.config import TrainingConfig


def create_optimizer(model: nn.Module, config: TrainingConfig) -> torch.optim.AdamW:
    """AdamW where weight decay applies to weight matrices/kernels, not to biases, norms or embeddings' gains."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # The fused kernel (CPU and CUDA, float parameters) is a few percent faster per step than foreach.
    device = next(model.parameters()).device.type
    fused = device in ("cpu", "cuda") and all(p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in decay + no_decay)
    return torch.optim.AdamW(
        groups, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2), fused=fused or None
    )


def create_lr_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainingConfig, last_epoch: int = -1
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then cosine decay to `min_lr_ratio * learning_rate` at `max_steps` (or constant).

    `last_epoch`: the last step taken, for a schedule created mid-run (`dallekit.training.budget`)."""
    if config.lr_schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, config.warmup_steps, last_epoch=last_epoch)
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, config.warmup_steps, config.max_steps, min_lr_rate=config.min_lr_ratio, last_epoch=last_epoch
    )
