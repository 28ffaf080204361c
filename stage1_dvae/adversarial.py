"""Optional adversarial loss for sharper reconstructions (VQGAN, Esser et al. 2021).

A PatchGAN discriminator scores overlapping patches as real or reconstructed. The generator's
adversarial term is scaled by VQGAN's adaptive weight, ||∇ rec|| / ||∇ adv|| at the decoder's last
layer, and switched on only after `disc_start` steps so the autoencoder first learns to reconstruct.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from stage1_dvae.modeling_dvae import group_norm


class PatchDiscriminator(nn.Module):
    """Pixels [B, C, H, W] -> patch logits [B, 1, H', W'] (pix2pix's PatchGAN, GroupNorm instead of BatchNorm)."""

    def __init__(self, num_channels: int = 3, hidden_channels: int = 64, num_layers: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(num_channels, hidden_channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = hidden_channels
        for layer in range(1, num_layers + 1):
            next_width = hidden_channels * min(2**layer, 8)
            stride = 2 if layer < num_layers else 1
            layers += [
                nn.Conv2d(width, next_width, 4, stride=stride, padding=1, bias=False),
                group_norm(next_width),
                nn.LeakyReLU(0.2),
            ]
            width = next_width
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.layers(pixel_values)


class AdversarialLoss(nn.Module):
    """Hinge or non-saturating GAN losses plus VQGAN's adaptive generator weight."""

    def __init__(self, kind: Literal["hinge", "non_saturating"] = "hinge", weight: float = 0.5) -> None:
        super().__init__()
        self.kind = kind
        self.weight = weight

    def discriminator_loss(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        if self.kind == "hinge":
            return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())
        return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())

    def generator_loss(self, logits_fake: torch.Tensor) -> torch.Tensor:
        if self.kind == "hinge":
            return -logits_fake.mean()
        return F.softplus(-logits_fake).mean()

    def adaptive_weight(
        self, reconstruction_loss: torch.Tensor, generator_loss: torch.Tensor, last_layer: torch.Tensor
    ) -> torch.Tensor:
        """weight · ||∂rec/∂W|| / ||∂adv/∂W|| at the decoder's last layer W, clamped to [0, 1e4]."""
        rec_grad = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)[0]
        adv_grad = torch.autograd.grad(generator_loss, last_layer, retain_graph=True)[0]
        ratio = rec_grad.norm() / (adv_grad.norm() + 1e-4)
        return self.weight * ratio.clamp(0.0, 1e4).detach()
