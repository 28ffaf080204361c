"""Cached decoding of a Llama decoder with fused weights: the hot path of the prior's sampling loop.

`FusedDecoder(decoder, head, max_len, dtype)` holds, made once per set of weights:
- each layer's query/key/value projections as one matrix and its gate/up projections as another
  (four matmuls per layer instead of seven);
- the RMSNorm weights folded into the projections that follow them, the attention scaling into the
  queries, and the final norm into the output head (`head`: the rows of the logits wanted);
- LoRA adapters (peft) that are active and not merged added to the weights they adapt;
- every weight cast once to the compute `dtype` (bf16 on CPUs with native bf16), with no autocast
  dispatch at each op;
- the rotary cos/sin of every position and the causal mask.

Its weights are parameters that never change in place (new weights make a new `FusedDecoder`), so
a compiled step may freeze them into its graph as constants, which lets inductor prepack them for
oneDNN. `decoder.new_cache(rows)` makes the static key/value cache of one sampling call, and
`decoder(hidden, positions, cache)` runs new positions through the layers as `LlamaDecoderLayer`
computes them in eval mode under autocast (residual stream in the model's dtype, norms in fp32,
matmuls and the cache in `dtype`, rotary in fp32, softmax accumulated in fp32), returning the head's
logits at the last position (or, with `last=n`, at each of the last n: speculative decoding verifies a
window of drafts in one call). It takes its positions as a tensor, shared by the rows or one row of positions
per row (rows at different points of their images), and keeps no Python-level state, so a one-token
step has fixed shapes and `torch.compile` traces it once. A position's cache entries beyond it are
masked, so rolling back is feeding again from an earlier position. Training and uncached sampling
keep transformers' own `LlamaModel`; the tests hold this path to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import LlamaModel


def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


def effective_weight(linear: nn.Module) -> torch.Tensor:
    """The weight a linear layer's forward applies: its own, plus the deltas of the LoRA adapters (peft) that are
    active on it and not merged into it already."""
    weight = linear.weight
    if isinstance(linear, BaseTunerLayer) and not linear.disable_adapters:
        for name in linear.active_adapters:
            if name in linear.lora_A and name not in linear.merged_adapters:
                weight = weight + linear.get_delta_weight(name)
    return weight


class FusedLayer(nn.Module):
    """One decoder layer's weights in the compute dtype, fused and with its norm weights folded in."""

    def __init__(self, qkv: torch.Tensor, out: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        super().__init__()
        self.qkv = _frozen(qkv)  # [(heads + 2 kv_heads) * head_dim, hidden]: queries (scaled), keys, values
        self.out = _frozen(out)  # [hidden, heads * head_dim]
        self.gate_up = _frozen(gate_up)  # [2 * intermediate, hidden]
        self.down = _frozen(down)  # [hidden, intermediate]


@dataclass
class KVCache:
    """The static key/value cache of one sampling call: per layer [rows, kv_heads, max_len, head_dim]."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    def share_rows(self, sources: torch.Tensor, length: int) -> None:
        """Fill the first `length` cached positions of every row `i` with those of row `sources[i]` [rows]:
        sequences that share a prefix compute it once (on the distinct ones, in the first rows) and copy it."""
        for cache in (*self.keys, *self.values):
            cache[:, :, :length] = cache[sources, :, :length]  # indexing copies first: no overlap


class FusedDecoder(nn.Module):
    """A Llama decoder's layers, fused for cached decoding (see the module docstring)."""

    @torch.no_grad()
    def __init__(self, decoder: LlamaModel, head: torch.Tensor, max_len: int, dtype: torch.dtype) -> None:
        super().__init__()
        config, layers = decoder.config, []
        for layer in decoder.layers:
            attention, mlp = layer.self_attn, layer.mlp
            if any(module.bias is not None for module in (attention.q_proj, attention.o_proj, mlp.gate_proj)):
                raise NotImplementedError("fused decoding covers Llama layers without biases")
            q, k, v, o, gate, up, down = (effective_weight(module) for module in (
                attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj, mlp.gate_proj, mlp.up_proj,
                mlp.down_proj))
            qkv = torch.cat([q * attention.scaling, k, v]) * layer.input_layernorm.weight
            gate_up = torch.cat([gate, up]) * layer.post_attention_layernorm.weight
            layers.append(FusedLayer(qkv.to(dtype), o.to(dtype), gate_up.to(dtype), down.to(dtype)))
        self.layers = nn.ModuleList(layers)
        self.head = _frozen((head * decoder.norm.weight).to(dtype))  # [vocab, hidden]
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.eps = decoder.layers[0].self_attn.head_dim, config.rms_norm_eps
        self.activation = decoder.layers[0].mlp.act_fn
        positions = torch.arange(max_len, device=head.device)
        cos, sin = decoder.rotary_emb(head.new_empty(1, max_len, self.head_dim), positions[None])
        # [max_len, head_dim] rotary tables (fp32, as the decoder makes them); [max_len, max_len] additive causal mask
        self.register_buffer("cos", cos[0].float(), persistent=False)
        self.register_buffer("sin", sin[0].float(), persistent=False)
        mask = torch.zeros(max_len, max_len, dtype=dtype, device=head.device)
        self.register_buffer("mask", mask.masked_fill(positions[None, :] > positions[:, None], float("-inf")),
                             persistent=False)

    def new_cache(self, rows: int) -> KVCache:
        """A zeroed static cache for `rows` sequences of up to `max_len` positions, in the compute dtype."""
        shape = (rows, self.num_kv_heads, self.mask.shape[0], self.head_dim)
        return KVCache(keys=[self.head.new_zeros(shape) for _ in self.layers],
                       values=[self.head.new_zeros(shape) for _ in self.layers])

    def _normalize(self, hidden: torch.Tensor) -> torch.Tensor:
        """RMSNorm without its weight (folded into the next matmul), in fp32, cast to the compute dtype."""
        return F.rms_norm(hidden.float(), hidden.shape[-1:], eps=self.eps).to(self.head.dtype)

    def forward(
        self, hidden: torch.Tensor, positions: torch.Tensor, cache: KVCache, last: int | None = None
    ) -> torch.Tensor:
        """Logits (fp32) after the last of the embedded positions `hidden` [B, T, hidden]: [B, vocab]; with
        `last=n`, after each of the last n [B, n, vocab]. `positions`: [T] for every row, or [B, T] each row's
        own. Writes their keys and values into the cache's first B rows."""
        rows, kv_heads = hidden.shape[0], self.num_kv_heads
        groups = self.num_heads // kv_heads
        cos, sin = self.cos[positions].unsqueeze(-2), self.sin[positions].unsqueeze(-2)  # [(B,) T, 1, head_dim]
        mask = self.mask[positions]  # [(B,) T, max_len]
        if groups > 1:  # grouped-query attention: each kv head serves `groups` query heads, stacked as rows
            mask = mask.repeat(groups, 1) if positions.ndim == 1 else mask.repeat(1, groups, 1)
        if positions.ndim == 2:  # one mask per row, for each of its kv heads: [(B kv), (g T), max_len]
            mask = mask.repeat_interleave(kv_heads, dim=0)
            row_index = torch.arange(rows, device=positions.device)[:, None]
        for layer, keys, values in zip(self.layers, cache.keys, cache.values):
            if rows < len(keys):  # (a view of a graph input is mutated below: slice only where needed)
                keys, values = keys[:rows], values[:rows]
            projected = F.linear(self._normalize(hidden), layer.qkv)
            rotated, value = rearrange(projected, "b t (h d) -> b t h d", d=self.head_dim).split(
                [self.num_heads + kv_heads, kv_heads], dim=2)
            first, second = rotated.chunk(2, dim=-1)
            rotated = rotated * cos + torch.cat([-second, first], dim=-1) * sin  # Llama's rotate_half, in fp32
            query, key = rotated.split([self.num_heads, kv_heads], dim=2)
            if positions.ndim == 1:
                keys.index_copy_(2, positions, key.transpose(1, 2).to(keys.dtype))
                values.index_copy_(2, positions, value.transpose(1, 2))
            else:  # (indexing rows and positions around a slice puts them first: [B, T, kv_heads, head_dim])
                keys[row_index, :, positions] = key.to(keys.dtype)
                values[row_index, :, positions] = value
            query = rearrange(query.to(keys.dtype), "b t (kv g) d -> (b kv) (g t) d", kv=kv_heads)
            scores = torch.baddbmm(mask, query, keys.flatten(0, 1).transpose(1, 2))
            attended = scores.softmax(dim=-1) @ values.flatten(0, 1)
            attended = rearrange(attended, "(b kv) (g t) d -> b t (kv g d)", kv=kv_heads, g=groups)
            hidden = hidden + F.linear(attended, layer.out)
            gate, up = F.linear(self._normalize(hidden), layer.gate_up).chunk(2, dim=-1)
            hidden = hidden + F.linear(self.activation(gate) * up, layer.down)
        return F.linear(self._normalize(hidden[:, -1] if last is None else hidden[:, -last:]), self.head).float()
