"""DALL·E's relaxed categorical posterior: Gumbel-softmax over K code logits, KL to a uniform prior."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from stage1_dvae.quantizers.base import QuantizerOutput, code_perplexity, marginal_kl_to_uniform


class GumbelQuantizer(nn.Module):
    """Logits [B, K, h, w] -> code embeddings [B, D, h, w].

    Training draws a Gumbel-softmax sample at temperature τ (a hard one-hot with a straight-through
    gradient when `straight_through`), evaluation uses the argmax code. The loss is
    KL(q(c|x) || Uniform(K)) = log K − H(q), averaged over positions.
    """

    def __init__(self, codebook_size: int, embedding_dim: int, straight_through: bool = False) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.straight_through = straight_through
        self.embedding = nn.Embedding(codebook_size, embedding_dim)

    def forward(self, logits: torch.Tensor, temperature: float = 1.0) -> QuantizerOutput:
        logits = logits.float()
        codes = self.codes(logits)
        if self.training:
            one_hot = F.gumbel_softmax(logits, tau=temperature, hard=self.straight_through, dim=1)
        else:
            one_hot = F.one_hot(codes, self.codebook_size).permute(0, 3, 1, 2).to(logits.dtype)
        embeddings = torch.einsum("bkhw,kd->bdhw", one_hot, self.embedding.weight.float())
        return QuantizerOutput(
            embeddings=embeddings,
            codes=codes,
            loss=kl_to_uniform(logits),
            perplexity=code_perplexity(codes, self.codebook_size),
            marginal_kl=marginal_kl_to_uniform(logits),
        )

    def codes(self, logits: torch.Tensor) -> torch.Tensor:
        """The most likely code at each position: logits [B, K, h, w] -> [B, h, w]."""
        return logits.argmax(dim=1)

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, h, w] -> decoder input [B, D, h, w]."""
        return self.embedding(codes).permute(0, 3, 1, 2)


def kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(softmax(logits) || Uniform(K)) = log K − H(q); logits [B, K, ...]."""
    log_q = F.log_softmax(logits, dim=1)
    negative_entropy = (log_q.exp() * log_q).sum(dim=1)
    return negative_entropy.mean() + math.log(logits.shape[1])
