"""AdamW with decoupled weight decay on matrices only, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import torch
from torch import nn
from transformers import get_constant_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

from dallekit.training.config import TrainingConfig
from dallekit.training.schedules import cosine_anneal


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


def decay_progress(step: int, config: TrainingConfig, anchor: tuple[int, float] | None = None) -> float:
    """How far the cosine has decayed at `step`, from 0 (end of warmup) to 1 (`max_steps`). With `anchor`
    (step₀, progress₀), a schedule re-planned mid-run: it goes on from progress₀ at step₀ and ends at `max_steps`."""
    start, done = (config.warmup_steps, 0.0) if anchor is None else anchor
    if step <= start:
        return done
    return min(1.0, done + (1.0 - done) * (step - start) / max(1, config.max_steps - start))


def create_lr_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainingConfig, last_epoch: int = -1,
    anchor: tuple[int, float] | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then cosine decay to `min_lr_ratio * learning_rate` at `max_steps` (or constant).

    `last_epoch`: the last step taken, and `anchor`: where a re-planned cosine goes on from (`decay_progress`),
    for a schedule created mid-run (`dallekit.training.budget`)."""
    if config.lr_schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, config.warmup_steps, last_epoch=last_epoch)
    if anchor is None:
        return get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, config.warmup_steps, config.max_steps, min_lr_rate=config.min_lr_ratio, last_epoch=last_epoch
        )

    def factor(step: int) -> float:  # the anchor lies after the warmup; progress 0 -> 1 over one "step" of the cosine
        return cosine_anneal(decay_progress(step, config, anchor), 1.0, config.min_lr_ratio, 1)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=last_epoch)
