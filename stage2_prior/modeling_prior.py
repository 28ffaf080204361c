"""The stage-2 prior: a Llama decoder over `[bos ; text ids ; image codes]` with guided sampling.

Image positions add learned row and column embeddings to the token embedding (2-D position
information on top of the decoder's 1-D rotary positions). Logits are restricted by position:
positions that predict text may only emit text ids, positions that predict image tokens only
image codes, so a sampled image never contains a text id.

Embedding and residual dropout, which Llama lacks, are added around its unchanged modules: on the
summed embeddings, and by forward hooks on each layer's attention and MLP outputs (no new weights,
so checkpoints keep their names).

`generate` samples image codes with a KV cache, temperature / top-k / top-p (transformers'
logits warpers), a seeded `torch.Generator`, and classifier-free guidance with the conditional
and unconditional branches in one batch sharing one cache. transformers' own `generate()` runs
guidance for decoder-only models as a second, unbatched forward per step and samples from the
global RNG, so the loop here is written out over the same decoder layers. Its cache is static
(transformers' `StaticLayer`s, preallocated once per call), and what does not change from step to
step is made once per call: the row/column embeddings, the rotary cos/sin of every position, the
causal mask over the cache, and the image-code rows of `lm_head` (the only logits a step needs).
A step takes its positions as a tensor and draws its code from noise made outside it
(`torch.multinomial`'s own exponential race, so the same seed gives the same codes), so every
one-token step has the same shapes and no Python-level state: `generate(compile=True)` runs it
through `torch.compile` (`compiled_sampling_step`: inductor, C++ wrapper on CPU), traced once per
batch shape. On CPUs with native bf16 it samples under bf16 autocast.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from tqdm.auto import tqdm
from transformers import Cache, DynamicCache, LlamaModel, StaticLayer
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.masking_utils import create_causal_mask
from transformers.utils import ModelOutput

from stage2_prior.configuration_prior import PriorConfig
from training.accelerator import cpu_supports_fast_bf16
from training.pretrained import StrictPreTrainedModel


def classifier_free_guidance(conditional: torch.Tensor, unconditional: torch.Tensor, scale: float) -> torch.Tensor:
    """`uncond + scale * (cond - uncond)`: scale 1 is the conditional model, larger follows the prompt more."""
    return unconditional + scale * (conditional - unconditional)


def exponential_noise(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Exp(1) noise [B, V] for `sample_with_noise`, drawn on `generator`'s device (a seeded CPU generator
    so works whatever device the model is on, as in diffusers) and moved to `device`."""
    noise_device = generator.device if generator is not None else device
    return torch.empty(shape, device=noise_device).exponential_(generator=generator).to(device)


def sample_with_noise(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """One index [B, 1] per row of `probs` [B, V]: `argmax(probs / noise)` with `noise` ~ Exp(1) draws index i with
    probability probs[i] (the exponential race). It is how `torch.multinomial` draws one sample, so with the noise
    from the same generator state it returns the same index; drawn outside, the noise keeps the step traceable."""
    return (probs / noise).argmax(dim=-1, keepdim=True)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs matmuls in on `device_type` ("cpu", "cuda"), or None where autocast is off."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


class _AutocastStaticLayer(StaticLayer):
    """transformers' `StaticLayer` (keys and values preallocated, written in place), stored in the autocast dtype.

    Under bf16 autocast, Llama's rotary embedding hands the cache fp32 keys, which attention then
    casts to bf16 at every step, the whole preallocated cache at once. Stored in bf16, each key is
    cast once when written; attention reads the same values.
    """

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        dtype = _autocast_dtype(key_states.device.type) or key_states.dtype
        super().lazy_initialization(key_states.to(dtype), value_states.to(dtype))

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return super().update(key_states.to(self.keys.dtype), value_states.to(self.values.dtype), *args, **kwargs)


@dataclass
class _Decoding:
    """What `generate` makes once per call and reuses at every step."""

    spatial: torch.Tensor  # [max_seq_len, hidden] row + column embeddings (zero before the image)
    rotary: tuple[torch.Tensor, torch.Tensor]  # cos, sin [1, max_seq_len, head_dim] of every position
    cache: Cache | None  # static, one `_AutocastStaticLayer` per decoder layer; None: every step recomputes all
    causal_mask: torch.Tensor  # [1, 1, L, L] over the L = max_seq_len - 1 positions a step can attend to
    image_head: torch.Tensor  # [image_vocab_size, hidden] the lm_head rows of image codes, in the autocast dtype


@dataclass
class PriorOutput(ModelOutput):
    """Result of `PriorModel.forward`: logits over the joint vocabulary and the weighted loss."""

    loss: torch.Tensor | None = None
    text_loss: torch.Tensor | None = None
    image_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # [B, T, text_vocab_size + image_vocab_size]
    cache: DynamicCache | None = None


class PriorPreTrainedModel(StrictPreTrainedModel):
    config_class = PriorConfig
    base_model_prefix = "prior"
    main_input_name = "input_ids"
    _supports_sdpa = True
    supports_gradient_checkpointing = True  # the decoder's layers

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        elif hasattr(module, "weight") and type(module).__name__.endswith("RMSNorm"):
            nn.init.ones_(module.weight)


class PriorModel(PriorPreTrainedModel):
    """Autoregressive prior p(text, image codes); `generate(text_ids, ...) -> codes [B, h, w]`."""

    def __init__(self, config: PriorConfig) -> None:
        super().__init__(config)
        self.decoder = LlamaModel(config.decoder_config())
        self.row_embedding = nn.Embedding(config.image_grid_size, config.hidden_size)
        self.column_embedding = nn.Embedding(config.image_grid_size, config.hidden_size)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.embedding_dropout = nn.Dropout(config.embedding_dropout)
        self.residual_dropout = nn.Dropout(config.residual_dropout)
        if config.residual_dropout > 0:
            for layer in self.decoder.layers:
                layer.self_attn.register_forward_hook(self._drop_sublayer_output)
                layer.mlp.register_forward_hook(self._drop_sublayer_output)
        self.post_init()

    def _drop_sublayer_output(
        self, module: nn.Module, args: tuple, output: torch.Tensor | tuple
    ) -> torch.Tensor | tuple:
        """Residual dropout on an attention (`(hidden, weights)`) or MLP output, before the residual add."""
        if isinstance(output, tuple):
            return (self.residual_dropout(output[0]), *output[1:])
        return self.residual_dropout(output)

    # ---- sequence layout ------------------------------------------------------------------------

    @property
    def image_start(self) -> int:
        """Sequence index of the first image token (after bos and the text)."""
        return 1 + self.config.text_len

    def build_input_ids(self, text_ids: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
        """`[bos, text_ids, text_vocab_size + codes]`: text [B, text_len], codes [B, h, w] -> [B, T]."""
        if text_ids.ndim != 2 or text_ids.shape[1] != self.config.text_len:
            raise ValueError(f"text_ids must have shape [batch, {self.config.text_len}], got {list(text_ids.shape)}")
        bos = torch.full_like(text_ids[:, :1], self.config.bos_token_id)
        parts = [bos, text_ids]
        if codes is not None:
            parts.append(rearrange(codes, "b h w -> b (h w)") + self.config.text_vocab_size)
        return torch.cat(parts, dim=1)

    def empty_text_ids(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """The empty caption `[eos, pad, ...]`: the unconditional input of classifier-free guidance."""
        ids = torch.full((batch_size, self.config.text_len), self.config.pad_token_id, device=device)
        ids[:, 0] = self.config.eos_token_id
        return ids

    def _spatial_embeddings(self) -> torch.Tensor:
        """Row plus column embedding of every sequence position [max_seq_len, hidden]; zero before the image."""
        grid = self.config.image_grid_size
        index = torch.arange(self.config.image_seq_len, device=self.row_embedding.weight.device)
        spatial = self.row_embedding(index // grid) + self.column_embedding(index % grid)
        return F.pad(spatial, (0, 0, self.image_start, 0))

    def _embed(
        self, input_ids: torch.Tensor, positions: torch.Tensor, spatial: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token plus spatial embeddings (then dropout) of `input_ids` [B, T] at sequence `positions` [T].

        `spatial` is `_spatial_embeddings()`, passed in by callers that embed many times with the same weights.
        """
        spatial = self._spatial_embeddings() if spatial is None else spatial
        return self.embedding_dropout(self.decoder.embed_tokens(input_ids) + spatial[positions])

    def _restrict_logits(self, logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Mask the vocabulary a position cannot predict: text before the image, image codes after."""
        predicts_image = (positions >= self.image_start - 1).view(1, -1, 1)
        is_image_id = (torch.arange(self.config.vocab_size, device=logits.device) >= self.config.text_vocab_size)
        allowed = predicts_image == is_image_id.view(1, 1, -1)
        return logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)

    # ---- training -------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: DynamicCache | None = None,
        use_cache: bool = False,
        compute_loss: bool = True,
        return_logits: bool = True,
    ) -> PriorOutput:
        """Logits for every position (`return_logits`); with `compute_loss`, the text/image-weighted next-token loss.

        Training passes `return_logits=False`: the loss then takes each position's logits over its own
        vocabulary only (text before the image, image codes after), not the masked joint vocabulary,
        which saves most of the output layer's and the loss's time when the two vocabularies are large.
        """
        past = cache.get_seq_length() if cache is not None else 0
        positions = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)
        if positions[-1] >= self.config.max_seq_len:
            raise ValueError(f"sequence of {positions[-1] + 1} tokens exceeds max_seq_len {self.config.max_seq_len}")
        hidden = self.decoder(
            inputs_embeds=self._embed(input_ids, positions),
            position_ids=positions.unsqueeze(0),
            cache=cache,
            use_cache=use_cache,
        )
        output = PriorOutput(cache=hidden.cache if use_cache else None)
        if return_logits:
            output.logits = self._restrict_logits(self.lm_head(hidden.last_hidden_state).float(), positions)
        if compute_loss and past == 0 and input_ids.shape[1] > 1:
            output.text_loss, output.image_loss = self._losses(hidden.last_hidden_state, input_ids)
            config = self.config
            output.loss = config.text_loss_weight * output.text_loss + config.image_loss_weight * output.image_loss
        return output

    def _losses(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy of the next text token (padding ignored) and of the next image token.

        Positions [0, text_len) predict text, the rest image codes: each against its own vocabulary,
        which equals the cross-entropy of the restricted joint logits.
        """
        split, text_vocab = self.config.text_len, self.config.text_vocab_size
        targets = input_ids[:, 1:]
        text_logits = F.linear(hidden[:, :split], self.lm_head.weight[:text_vocab]).float()
        image_logits = F.linear(hidden[:, split:-1], self.lm_head.weight[text_vocab:]).float()
        text_targets = targets[:, :split].masked_fill(targets[:, :split] == self.config.pad_token_id, -100)
        text_loss = F.cross_entropy(text_logits.flatten(0, 1), text_targets.flatten(), ignore_index=-100)
        image_loss = F.cross_entropy(image_logits.flatten(0, 1), (targets[:, split:] - text_vocab).flatten())
        if not torch.isfinite(text_loss):  # a batch of empty captions has no text target
            text_loss = torch.zeros_like(image_loss)
        return text_loss, image_loss

    # ---- sampling -------------------------------------------------------------------------------

    def _sampling_warpers(
        self, do_sample: bool, temperature: float, top_k: int | None, top_p: float | None
    ) -> LogitsProcessorList:
        """transformers' warpers for these settings, leaving out those that would change nothing."""
        warpers = LogitsProcessorList()
        if not do_sample:
            return warpers
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 (use do_sample=False for greedy), got {temperature}")
        if temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_k and top_k < self.config.image_vocab_size:
            warpers.append(TopKLogitsWarper(top_k))
        if top_p is not None and top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
        return warpers

    def _sampling_precision(self, mixed_precision: str) -> AbstractContextManager:
        """The autocast context `generate` runs in: `auto` is bf16 on a CPU with native bf16, else the caller's."""
        device = self.device.type
        if mixed_precision == "auto":
            if device != "cpu" or not cpu_supports_fast_bf16():
                return nullcontext()
            mixed_precision = "bf16"
        if mixed_precision not in ("no", "bf16"):
            raise ValueError(f"mixed_precision must be 'auto', 'no' or 'bf16', got {mixed_precision!r}")
        return torch.autocast(device, dtype=torch.bfloat16, enabled=mixed_precision == "bf16")

    def _decoding(self, use_cache: bool) -> _Decoding:
        """What stays fixed across the steps of one `generate` call, made once per call."""
        length, device = self.config.max_seq_len, self.device
        spatial = self._spatial_embeddings()
        positions = torch.arange(length, device=device).unsqueeze(0)
        rotary = self.decoder.rotary_emb(spatial[None], positions)  # in the embeddings' dtype, as the decoder makes it
        image_head = self.lm_head.weight[self.config.text_vocab_size :]
        image_head = image_head.to(_autocast_dtype(device.type) or image_head.dtype)  # cast once, not at every step
        # The last code is sampled, never fed: a step attends to at most max_seq_len - 1 positions.
        causal_mask = create_causal_mask(
            config=self.decoder.config, inputs_embeds=spatial[None, :-1], attention_mask=None, cache=None,
            position_ids=positions[:, :-1], allow_is_causal_skip=False,
        )  # [1, 1, length - 1, length - 1] in the format of the decoder's attention implementation
        cache = None
        if use_cache:
            cache = Cache(layers=[_AutocastStaticLayer(max_cache_len=length - 1) for _ in self.decoder.layers])
        return _Decoding(spatial, rotary, cache, causal_mask, image_head)

    def _image_logits(self, input_ids: torch.Tensor, positions: torch.Tensor, decoding: _Decoding) -> torch.Tensor:
        """Logits [B, image_vocab_size] over the image codes that follow `input_ids` [B, T] at `positions` [T].

        The decoder's layers run as `LlamaModel.forward` runs them, with the call's precomputed rotary
        tables and mask rows instead of recomputing them at every step.
        """
        cos, sin = decoding.rotary
        mask = decoding.causal_mask[:, :, positions]
        if decoding.cache is None:  # the whole sequence so far, no cached keys
            mask = mask[..., : input_ids.shape[1]]
        hidden = self._embed(input_ids, positions, decoding.spatial)
        for layer in self.decoder.layers:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=(cos[:, positions], sin[:, positions]),
                           cache=decoding.cache, use_cache=decoding.cache is not None)
        hidden = self.decoder.norm(hidden[:, -1])
        return F.linear(hidden, decoding.image_head).float()

    def _sampling_step(
        self, input_ids: torch.Tensor, positions: torch.Tensor, decoding: _Decoding, noise: torch.Tensor | None,
        guidance_scale: float, warpers: LogitsProcessorList,
    ) -> torch.Tensor:
        """The next code [B, 1] after `input_ids` at `positions`: guidance, warpers, then the exponential race
        with `noise` (greedy without). Tensors in, tensors out: this is what `compile=True` traces."""
        logits = self._image_logits(input_ids, positions, decoding)
        if guidance_scale != 1.0:
            logits = classifier_free_guidance(*logits.chunk(2), guidance_scale)
        if noise is None:
            return logits.argmax(dim=-1, keepdim=True)
        # The warpers in use (temperature, top-k, top-p) read only the scores, not the ids generated so far.
        return sample_with_noise(warpers(input_ids, logits).softmax(dim=-1), noise)

    @torch.no_grad()
    def generate(
        self,
        text_ids: torch.Tensor,
        guidance_scale: float = 1.0,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        init_codes: torch.Tensor | None = None,
        init_rows: int = 0,
        use_cache: bool = True,
        do_sample: bool = True,
        progress: bool = False,
        mixed_precision: Literal["auto", "no", "bf16"] = "auto",
        compile: bool = False,
    ) -> torch.Tensor:
        """Sample image codes [B, h, w] for captions `text_ids` [B, text_len].

        `guidance_scale` s mixes `uncond + s * (cond - uncond)` (1 disables guidance); with
        `init_codes` [B, h, w] the first `init_rows` rows are kept and the rest completed.
        `do_sample=False` picks the most likely code (greedy); `progress` shows a bar over the codes.
        `mixed_precision`: `auto` samples under bf16 autocast on CPUs with native bf16 (AVX-512 BF16,
        AMX), where it is faster, and otherwise in the caller's precision; `no` forces fp32.
        `compile`: run the one-token step of the KV cache through `torch.compile`: the first call at
        a batch size compiles (tens of seconds on CPU), later ones draw faster; the same codes in fp32,
        under bf16 now and then another where the fused kernels round differently.
        """
        grid, batch = self.config.image_grid_size, text_ids.shape[0]
        prefix_codes = None
        if init_rows:
            if init_codes is None or init_codes.shape != (batch, grid, grid) or not 0 < init_rows <= grid:
                raise ValueError(f"priming needs init_codes [{batch}, {grid}, {grid}] and 0 < init_rows <= {grid}")
            prefix_codes = init_codes[:, :init_rows]
        guided = guidance_scale != 1.0
        input_ids = self.build_input_ids(text_ids, prefix_codes)
        if guided:
            unconditional = self.build_input_ids(self.empty_text_ids(batch, text_ids.device), prefix_codes)
            input_ids = torch.cat([input_ids, unconditional])
        warpers = self._sampling_warpers(do_sample, temperature, top_k, top_p)
        if compile and not use_cache:
            raise ValueError("compile=True compiles the one-token step of the KV cache: it needs use_cache=True")
        one_token_step = self._sampling_step
        if compile:
            one_token_step = functools.partial(compiled_sampling_step(self.device.type), self)

        text_vocab, length, prefix_length = self.config.text_vocab_size, self.config.max_seq_len, input_ids.shape[1]
        sequence = F.pad(input_ids, (0, length - prefix_length))  # [rows, max_seq_len], filled in as codes are drawn
        all_positions = torch.arange(length, device=self.device)
        noise_shape = (batch, self.config.image_vocab_size)
        with self._sampling_precision(mixed_precision):
            decoding = self._decoding(use_cache)
            step_input, step = input_ids, self._sampling_step  # the prompt runs eagerly: its length varies
            # The bar is updated, never iterated: the loop must not depend on it (Gradio's progress tracking
            # replaces a tracked bar's iterator with its own, which follows the latest bar opened, e.g. inductor's).
            bar = tqdm(total=length - prefix_length, desc="sampling image codes", unit="code", disable=not progress,
                       leave=False)
            for position in range(prefix_length, length):
                first = position - step_input.shape[1]
                noise = exponential_noise(noise_shape, generator, self.device) if do_sample else None
                codes = step(step_input, all_positions[first:position], decoding, noise, guidance_scale, warpers)
                sequence[:, position : position + 1] = (codes + text_vocab).repeat(2 if guided else 1, 1)
                if use_cache:
                    step_input, step = sequence[:, position : position + 1], one_token_step
                else:
                    step_input = sequence[:, : position + 1]
                bar.update()
            bar.close()
        image_ids = sequence[:batch, self.image_start :] - text_vocab
        return rearrange(image_ids, "b (h w) -> b h w", h=grid)


@functools.cache
def compiled_sampling_step(device_type: str) -> Callable[..., torch.Tensor]:
    """`PriorModel._sampling_step` through `torch.compile`, one per device type, shared by every prior.

    The model is an argument of the traced function, not a closure, so a copy of a model never runs
    its original's weights; dynamo treats the weights as inputs, and priors of one shape share a graph.
    """
    options = {"cpp_wrapper": True} if device_type == "cpu" else None  # C++ launches the CPU kernels
    return torch.compile(PriorModel._sampling_step, options=options)
