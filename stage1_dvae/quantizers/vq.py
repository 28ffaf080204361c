"""VQ-VAE quantizer: nearest code, straight-through gradient, commitment loss, EMA codebook.

Codebook maintenance follows van den Oord et al. (2017) and later practice: exponential moving
averages of code counts and sums with Laplace smoothing, dead codes (EMA count below a threshold)
restarted from random encoder outputs of the current batch, and k-means initialisation on the
first training batch. With `codebook_dim` the lookup runs in a low-dimensional projection and,
with `use_l2_norm`, on the unit sphere (factorised, l2-normalised codes as in ViT-VQGAN).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from stage1_dvae.quantizers.base import QuantizerOutput, code_perplexity


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def kmeans(vectors: torch.Tensor, num_clusters: int, iters: int, l2_norm: bool) -> torch.Tensor:
    """Lloyd's k-means on `vectors` [N, d], centroids seeded from random rows; returns [num_clusters, d]."""
    index = torch.randperm(vectors.shape[0], device=vectors.device)
    if vectors.shape[0] < num_clusters:
        index = torch.randint(0, vectors.shape[0], (num_clusters,), device=vectors.device)
    centroids = vectors[index[:num_clusters]].clone()
    for _ in range(iters):
        assignment = torch.cdist(vectors, centroids).argmin(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, vectors)
        counts = torch.bincount(assignment, minlength=num_clusters).unsqueeze(1)
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
        if l2_norm:
            centroids = F.normalize(centroids, dim=1)
    return centroids


class VectorQuantizer(nn.Module):
    """Encoder output [B, D, h, w] -> quantized [B, D, h, w] with codes [B, h, w]."""

    def __init__(
        self,
        codebook_size: int,
        embedding_dim: int,
        codebook_dim: int | None = None,
        use_l2_norm: bool = False,
        commitment_cost: float = 0.25,
        ema_decay: float = 0.99,
        ema_epsilon: float = 1e-5,
        dead_code_threshold: float = 1.0,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
    ) -> None:
        super().__init__()
        lookup_dim = codebook_dim or embedding_dim
        self.codebook_size = codebook_size
        self.use_l2_norm = use_l2_norm
        self.commitment_cost = commitment_cost
        self.ema_decay = ema_decay
        self.ema_epsilon = ema_epsilon
        self.dead_code_threshold = dead_code_threshold
        self.kmeans_iters = kmeans_iters
        factorised = lookup_dim != embedding_dim
        self.project_in = nn.Linear(embedding_dim, lookup_dim) if factorised else nn.Identity()
        self.project_out = nn.Linear(lookup_dim, embedding_dim) if factorised else nn.Identity()
        codebook = torch.randn(codebook_size, lookup_dim)
        if use_l2_norm:
            codebook = F.normalize(codebook, dim=1)
        self.register_buffer("codebook", codebook)
        self.register_buffer("ema_cluster_size", torch.ones(codebook_size))
        self.register_buffer("ema_embedding_sum", codebook.clone())
        self.register_buffer("initialized", torch.tensor(not kmeans_init))

    def _lookup_space(self, latents: torch.Tensor) -> torch.Tensor:
        vectors = self.project_in(latents).float()  # float32 under autocast too, like the codebook and EMA sums
        return F.normalize(vectors, dim=-1) if self.use_l2_norm else vectors

    def nearest_codes(self, vectors: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook entry for each row of `vectors` [N, d] (float32 distances)."""
        with torch.no_grad(), torch.autocast(vectors.device.type, enabled=False):
            vectors, codebook = vectors.float(), self.codebook.float()
            distances = (
                vectors.pow(2).sum(1, keepdim=True) - 2 * vectors @ codebook.t() + codebook.pow(2).sum(1)
            )
            return distances.argmin(dim=1)

    def forward(self, latents: torch.Tensor, temperature: float | None = None) -> QuantizerOutput:
        """Quantize; in training mode also update the EMA codebook. `temperature` is ignored."""
        batch, _, height, width = latents.shape
        vectors = self._lookup_space(rearrange(latents.float(), "b d h w -> (b h w) d"))
        if self.training and not bool(self.initialized):
            self._initialise(vectors.detach())
        codes = self.nearest_codes(vectors)
        quantized = self.codebook[codes]
        commitment = F.mse_loss(vectors, quantized.detach())
        if self.training:
            self._update_codebook(vectors.detach(), codes)
        quantized = vectors + (quantized - vectors).detach()  # straight-through estimator
        embeddings = rearrange(self.project_out(quantized), "(b h w) d -> b d h w", b=batch, h=height, w=width)
        embeddings = embeddings.contiguous()  # contiguous gradients for the encoder's last conv (DDP buckets)
        codes = rearrange(codes, "(b h w) -> b h w", b=batch, h=height, w=width)
        return QuantizerOutput(
            embeddings=embeddings,
            codes=codes,
            loss=self.commitment_cost * commitment,
            perplexity=code_perplexity(codes, self.codebook_size),
        )

    def codes(self, latents: torch.Tensor) -> torch.Tensor:
        """The nearest code at each position: latents [B, D, h, w] -> [B, h, w]."""
        batch, _, height, width = latents.shape
        vectors = self._lookup_space(rearrange(latents.float(), "b d h w -> (b h w) d"))
        return rearrange(self.nearest_codes(vectors), "(b h w) -> b h w", b=batch, h=height, w=width)

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, h, w] -> decoder input [B, D, h, w]."""
        return rearrange(self.project_out(self.codebook[codes]), "b h w d -> b d h w")

    @torch.no_grad()
    def _initialise(self, vectors: torch.Tensor) -> None:
        centroids = kmeans(vectors, self.codebook_size, self.kmeans_iters, self.use_l2_norm)
        if _distributed():
            dist.broadcast(centroids, src=0)
        self.codebook.copy_(centroids)
        self.ema_embedding_sum.copy_(centroids)
        self.ema_cluster_size.fill_(1.0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _update_codebook(self, vectors: torch.Tensor, codes: torch.Tensor) -> None:
        counts = torch.bincount(codes, minlength=self.codebook_size).to(vectors.dtype)
        sums = torch.zeros_like(self.codebook).index_add_(0, codes, vectors)
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.ema_cluster_size.lerp_(counts, 1 - self.ema_decay)
        self.ema_embedding_sum.lerp_(sums, 1 - self.ema_decay)
        total = self.ema_cluster_size.sum()
        smoothed = (self.ema_cluster_size + self.ema_epsilon) / (total + self.codebook_size * self.ema_epsilon) * total
        codebook = self.ema_embedding_sum / smoothed.unsqueeze(1)
        self.codebook.copy_(F.normalize(codebook, dim=1) if self.use_l2_norm else codebook)
        self._restart_dead_codes(vectors)

    @torch.no_grad()
    def _restart_dead_codes(self, vectors: torch.Tensor) -> None:
        dead = self.ema_cluster_size < self.dead_code_threshold
        num_dead = int(dead.sum())
        if num_dead == 0:
            return
        replacements = vectors[torch.randint(0, vectors.shape[0], (num_dead,), device=vectors.device)]
        if _distributed():
            dist.broadcast(replacements, src=0)
        self.codebook[dead] = replacements
        self.ema_embedding_sum[dead] = replacements
        self.ema_cluster_size[dead] = 1.0
