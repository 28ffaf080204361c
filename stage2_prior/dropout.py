"""Dropout whose mask costs 16 random bits per element instead of one random number.

torch's CPU dropout (`bernoulli_`, eager or compiled) draws a whole Mersenne Twister number per element: on
2 cores that was a fifth of the emoji prior's training step (nine dropouts of [64, 89, 256], 8 ms each).
`BitsDropout` draws 64-bit integers (`torch.randint`, which `torch.compile` traces), four mask elements out of each, and drops an element when its 16 bits fall
below `round(p * 2**16)`: 6x cheaper on CPU, from the same seeded global generator, with a drop probability
within 2**-17 of `p` (the kept elements are scaled by the exact inverse of the keep probability). On other
devices it is `nn.Dropout` itself (their dropout kernels are already cheap).
"""

from __future__ import annotations

import torch
from torch import nn

LANES = 4  # 16-bit lanes of one 64-bit random integer


class BitsDropout(nn.Dropout):
    """`nn.Dropout(p)` with a cheaper mask on CPU (see the module docstring); identity in eval mode or at p = 0."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or input.device.type != "cpu":
            return super().forward(input)
        dropped_per_65536 = round(self.p * 2**16)
        # Out of place (torch.randint, not Tensor.random_), so that torch.compile traces it without a graph break.
        bits = torch.randint(-(2**63), 2**63 - 1, (-(-input.numel() // LANES),), dtype=torch.int64, device=input.device)
        lanes = bits.view(torch.int16)[: input.numel()].view(input.shape)
        keep = lanes >= dropped_per_65536 - 2**15  # int16 is uniform on [-2**15, 2**15)
        return input * keep * (2**16 / (2**16 - dropped_per_65536))
