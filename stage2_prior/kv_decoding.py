"""Cached decoding of a Llama decoder with fused weights: the hot path of the prior's sampling loop.

`FusedDecoder.from_llama(decoder, head, rows, dtype)` prepares, once per sampling call:
- each layer's query/key/value projections as one matrix and its gate/up projections as another
  (four matmuls per layer instead of seven);
- the RMSNorm weights folded into the projections that follow them, the attention scaling into the
  queries, and the final norm into the output head (`head`: the rows of the logits wanted);
- every weight cast once to the compute `dtype` (bf16 on CPUs with native bf16), with no autocast
  dispatch at each op;
- a static key/value cache of `rows` sequences in that dtype, the rotary cos/sin of every position
  and the causal mask.

Calling it runs new positions through the layers as `LlamaDecoderLayer` computes them in eval
mode under autocast (residual stream in the model's dtype, norms in fp32, matmuls and the cache in
`dtype`, rotary in fp32, softmax accumulated in fp32) and returns the head's logits at the last
position. It takes its positions as a tensor and keeps no Python-level state, so a one-token step
has fixed shapes and `torch.compile` traces it once. Training and uncached sampling keep
transformers' own `LlamaModel`; the tests hold this path to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from transformers import LlamaModel


@dataclass
class FusedLayer:
    """One decoder layer's weights in the compute dtype, fused and with its norm weights folded in."""

    qkv: torch.Tensor  # [(heads + 2 kv_heads) * head_dim, hidden]: queries (scaled), keys, values
    out: torch.Tensor  # [hidden, heads * head_dim]
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    down: torch.Tensor  # [hidden, intermediate]


@dataclass
class FusedDecoder:
    """A Llama decoder's layers, fused for cached decoding of `rows` sequences (see the module docstring)."""

    layers: list[FusedLayer]
    head: torch.Tensor  # [vocab, hidden] the output rows wanted, the final norm folded in
    keys: list[torch.Tensor]  # per layer [rows, kv_heads, max_len, head_dim]: the static cache, in the compute dtype
    values: list[torch.Tensor]
    cos: torch.Tensor  # [max_len, head_dim] rotary tables of every position (fp32, as the decoder makes them)
    sin: torch.Tensor
    mask: torch.Tensor  # [max_len, max_len] additive causal mask in the compute dtype
    num_heads: int
    eps: float
    activation: torch.nn.Module

    @classmethod
    @torch.no_grad()
    def from_llama(cls, decoder: LlamaModel, head: torch.Tensor, rows: int, max_len: int,
                   dtype: torch.dtype) -> FusedDecoder:
        """Fuse `decoder`'s weights for sequences of up to `max_len` positions, `rows` at a time."""
        config, layers = decoder.config, []
        for layer in decoder.layers:
            attention, mlp = layer.self_attn, layer.mlp
            if any(module.bias is not None for module in (attention.q_proj, attention.o_proj, mlp.gate_proj)):
                raise NotImplementedError("fused decoding covers Llama layers without biases")
            qkv = torch.cat([attention.q_proj.weight * attention.scaling, attention.k_proj.weight,
                             attention.v_proj.weight]) * layer.input_layernorm.weight
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]) * layer.post_attention_layernorm.weight
            layers.append(FusedLayer(qkv.to(dtype), attention.o_proj.weight.to(dtype), gate_up.to(dtype),
                                     mlp.down_proj.weight.to(dtype)))
        head_dim = decoder.layers[0].self_attn.head_dim
        positions = torch.arange(max_len, device=head.device)
        cos, sin = decoder.rotary_emb(head.new_empty(1, max_len, head_dim), positions[None])
        cache_shape = (rows, config.num_key_value_heads, max_len, head_dim)
        future = positions[None, :] > positions[:, None]
        return cls(
            layers=layers, head=(head * decoder.norm.weight).to(dtype),
            keys=[head.new_zeros(cache_shape, dtype=dtype) for _ in layers],
            values=[head.new_zeros(cache_shape, dtype=dtype) for _ in layers],
            cos=cos[0].float(), sin=sin[0].float(),
            mask=torch.zeros(max_len, max_len, dtype=dtype, device=head.device).masked_fill(future, float("-inf")),
            num_heads=config.num_attention_heads, eps=config.rms_norm_eps, activation=decoder.layers[0].mlp.act_fn,
        )

    def _normalize(self, hidden: torch.Tensor) -> torch.Tensor:
        """RMSNorm without its weight (folded into the next matmul), in fp32, cast to the compute dtype."""
        return F.rms_norm(hidden.float(), hidden.shape[-1:], eps=self.eps).to(self.head.dtype)

    def __call__(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [B, vocab] (fp32) after the last of the embedded positions `hidden` [B, T, hidden] at
        `positions` [T], writing their keys and values into the cache's first B rows (B <= rows)."""
        rows, (cache_rows, kv_heads, _, head_dim) = hidden.shape[0], self.keys[0].shape
        groups = self.num_heads // kv_heads
        cos, sin = self.cos[positions, None], self.sin[positions, None]  # [T, 1, head_dim]
        mask = self.mask[positions]  # [T, max_len]
        if groups > 1:  # grouped-query attention: each kv head serves `groups` query heads, stacked as rows
            mask = mask.repeat(groups, 1)
        for layer, keys, values in zip(self.layers, self.keys, self.values):
            if rows < cache_rows:  # (a view of a graph input is mutated below: slice only where needed)
                keys, values = keys[:rows], values[:rows]
            projected = F.linear(self._normalize(hidden), layer.qkv)
            rotated, value = rearrange(projected, "b t (h d) -> b t h d", d=head_dim).split(
                [self.num_heads + kv_heads, kv_heads], dim=2)
            first, second = rotated.chunk(2, dim=-1)
            rotated = rotated * cos + torch.cat([-second, first], dim=-1) * sin  # Llama's rotate_half, in fp32
            query, key = rotated.split([self.num_heads, kv_heads], dim=2)
            keys.index_copy_(2, positions, key.transpose(1, 2).to(keys.dtype))
            values.index_copy_(2, positions, value.transpose(1, 2))
            query = rearrange(query.to(keys.dtype), "b t (kv g) d -> (b kv) (g t) d", kv=kv_heads)
            scores = torch.baddbmm(mask, query, keys.flatten(0, 1).transpose(1, 2))
            attended = scores.softmax(dim=-1) @ values.flatten(0, 1)
            attended = rearrange(attended, "(b kv) (g t) d -> b t (kv g d)", kv=kv_heads, g=groups)
            hidden = hidden + F.linear(attended, layer.out)
            gate, up = F.linear(self._normalize(hidden), layer.gate_up).chunk(2, dim=-1)
            hidden = hidden + F.linear(self.activation(gate) * up, layer.down)
        return F.linear(self._normalize(hidden[:, -1]), self.head).float()

    def share_rows(self, sources: torch.Tensor, length: int) -> None:
        """Fill the first `length` cached positions of every row `i` with those of row `sources[i]` [rows]:
        sequences that share a prefix compute it once (`__call__` on the distinct ones) and copy it."""
        for cache in (*self.keys, *self.values):
            cache[:, :, :length] = cache[sources, :, :length]  # indexing copies first: no overlap
