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
global RNG, so the loop here is written out. Its cached steps run the decoder's weights through
`FusedDecoder` (`kv_decoding.py`: projections fused, weights cast once per set of weights, a
static cache made per call, held by the tests to the decoder's own forward); the prompt runs once
per distinct row (candidates of one caption and guidance's empty caption share it). A step takes its
positions as a tensor and draws its code from noise made outside it (`torch.multinomial`'s own
exponential race, so the same seed gives the same codes), so every one-token step has the same
shapes and no Python-level state: `generate(compile=True)` runs it through `torch.compile`
(`compiled_sampling_step`: inductor, C++ wrapper and frozen weights on CPU), traced once per batch
shape; `compile="auto"`, the default, switches to it once a setting has spent 10 s sampling
(`AutoCompile`). On CPUs with native bf16 it samples in bf16. `generate(decoding="jacobi")` draws
several codes per forward pass instead, from the same distribution (speculative Jacobi decoding,
`speculative.py`); `prior.last_decoding_stats` says what the last call did.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import time
import warnings
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from tqdm.auto import tqdm
from transformers import LlamaModel
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.utils import ModelOutput

from dallekit.modeling_utils import StrictPreTrainedModel, inference_dtype
from stage2_prior.configuration_prior import PriorConfig
from stage2_prior.dropout import BitsDropout
from stage2_prior.kv_decoding import FusedDecoder, KVCache
from stage2_prior.speculative import DecodingStats, speculative_jacobi_codes

logger = logging.getLogger(__name__)

# `classifier_free_guidance`'s `plausibility` wherever a user samples: generate, the pipeline, the CLI, the
# server and the page (on the 2-core emoji demo: R-precision at guidance 3 0.46 with plain guidance, 0.74 with it)
DEFAULT_GUIDANCE_PLAUSIBILITY = 0.1


def classifier_free_guidance(conditional: torch.Tensor, unconditional: torch.Tensor, scale: float,
                             plausibility: float = 0.0) -> torch.Tensor:
    """`uncond + scale * (cond - uncond)`: scale 1 is the conditional model, larger follows the prompt more.

    With `plausibility` a > 0 the codes whose conditional probability is below a times the likeliest code's get
    -inf: guidance then reorders the codes the prompted model finds plausible instead of promoting ones it finds
    unlikely, only less so than the unconditional branch does (the adaptive plausibility constraint of
    contrastive decoding, Li et al. 2023). Logits and log-probabilities differ by one constant per row, so the
    test runs on the logits.
    """
    guided = unconditional + scale * (conditional - unconditional)
    if plausibility > 0:
        implausible = conditional < conditional.amax(dim=-1, keepdim=True) + math.log(plausibility)
        guided = guided.masked_fill(implausible, float("-inf"))
    return guided


def exponential_noise(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Exp(1) noise [B, V] for `sample_with_noise`, drawn on `generator`'s device (a seeded CPU generator
    so works whatever device the model is on, as in diffusers) and moved to `device`."""
    noise_device = generator.device if generator is not None else device
    return torch.empty(shape, device=noise_device).exponential_(generator=generator).to(device)


Generators = torch.Generator | Sequence[torch.Generator] | None


def draw_noise(shape: tuple[int, ...], generator: Generators, device: torch.device) -> torch.Tensor:
    """Exp(1) noise [B, V] from one generator, or row `i` from `generator[i]` (a sequence of B): consecutive rows
    that share a generator draw together, so a group of rows gets the same noise whatever rows surround it (what
    lets a server batch requests, each with its own seed, and still draw each request's own images)."""
    if generator is None or isinstance(generator, torch.Generator):
        return exponential_noise(shape, generator, device)
    runs = [(rows_generator, len(list(rows))) for rows_generator, rows in itertools.groupby(generator)]
    return torch.cat([exponential_noise((rows, *shape[1:]), rows_generator, device) for rows_generator, rows in runs])


def sample_with_noise(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """One index [B, 1] per row of `probs` [B, V]: `argmax(probs / noise)` with `noise` ~ Exp(1) draws index i with
    probability probs[i] (the exponential race). It is how `torch.multinomial` draws one sample, so with the noise
    from the same generator state it returns the same index; drawn outside, the noise keeps the step traceable."""
    return (probs / noise).argmax(dim=-1, keepdim=True)


@dataclass
class AutoCompile:
    """When `generate(compile="auto")` compiles: a sampling setting (number of sequences, guidance, warpers,
    dtype: what a compiled step's graph depends on) samples eagerly until it has spent `after_seconds` in eager
    sampling, about what compiling its step costs on a CPU, and runs the compiled step from its next call on.
    This is the ski-rental rule: a workload never spends much more than twice what the better of the two choices
    would have. One short call stays eager; a server, an evaluation or a loop of calls compiles once it pays.
    A compile that fails (no C++ compiler, say) is reported once, and that setting stays eager."""

    after_seconds: float = 10.0
    eager_seconds: Counter = field(default_factory=Counter)
    failed: set = field(default_factory=set)

    def wants_compiled(self, setting: Hashable) -> bool:
        return setting not in self.failed and self.eager_seconds[setting] >= self.after_seconds


@dataclass
class _Decoding:
    """What `generate` makes once per call and reuses at every step."""

    spatial: torch.Tensor  # [max_seq_len, hidden] row + column embeddings (zero before the image)
    decoder: FusedDecoder | None  # the cached decoder; None: every step runs the whole sequence through `forward`
    cache: KVCache | None  # the call's static key/value cache, with `decoder`


class VocabularyHead(nn.Linear):
    """The output layer (`lm_head`, no bias): logits over the joint vocabulary, or over a slice of its rows only.

    Training takes each position's logits over its own vocabulary (`forward(hidden, rows)`). Through this
    module's call, not `lm_head.weight` read in the parent's forward, so that FSDP, which gathers a module's
    sharded weights when the module is called, gathers this one first.
    """

    def forward(self, hidden: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        return F.linear(hidden, self.weight[rows])


@dataclass
class PriorOutput(ModelOutput):
    """Result of `PriorModel.forward`: logits over the joint vocabulary and the weighted loss."""

    loss: torch.Tensor | None = None
    text_loss: torch.Tensor | None = None
    image_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # [B, T, text_vocab_size + image_vocab_size]


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
        self.lm_head = VocabularyHead(config.hidden_size, config.vocab_size, bias=False)
        self.embedding_dropout = BitsDropout(config.embedding_dropout)
        self.residual_dropout = BitsDropout(config.residual_dropout)
        self.auto_compile = AutoCompile()  # when `generate(compile="auto")` switches to the compiled step
        self.last_decoding_stats: DecodingStats | None = None  # set by each `generate` call
        # The sampling loop's FusedDecoder, kept across calls while the weights stay the same; in a plain dict, so
        # that it is not a submodule (nor saved, nor trained).
        self._fused_decoder: dict[torch.dtype, tuple[tuple, FusedDecoder]] = {}  # per dtype: (weights' versions, it)
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

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding (text and image codes): transformers cannot find it under `decoder` by itself."""
        return self.decoder.embed_tokens

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

    def forward(self, input_ids: torch.Tensor, compute_loss: bool = True, return_logits: bool = True) -> PriorOutput:
        """Logits for every position (`return_logits`); with `compute_loss`, the text/image-weighted next-token loss.

        Training passes `return_logits=False`: the loss then takes each position's logits over its own
        vocabulary only (text before the image, image codes after), not the masked joint vocabulary,
        which saves most of the output layer's and the loss's time when the two vocabularies are large.
        """
        if input_ids.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence of {input_ids.shape[1]} tokens exceeds max_seq_len {self.config.max_seq_len}")
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        hidden = self.decoder(
            inputs_embeds=self._embed(input_ids, positions), position_ids=positions.unsqueeze(0), use_cache=False
        )
        output = PriorOutput()
        if return_logits:
            output.logits = self._restrict_logits(self.lm_head(hidden.last_hidden_state).float(), positions)
        if compute_loss and input_ids.shape[1] > 1:
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
        text_logits = self.lm_head(hidden[:, :split], slice(None, text_vocab)).float()
        image_logits = self.lm_head(hidden[:, split:-1], slice(text_vocab, None)).float()
        text_targets = targets[:, :split].masked_fill(targets[:, :split] == self.config.pad_token_id, -100)
        # The mean over the text targets there are, 0 for a batch of empty captions (no data-dependent branch, so
        # that a compiled training step is one graph).
        text_loss = F.cross_entropy(text_logits.flatten(0, 1), text_targets.flatten(), ignore_index=-100,
                                    reduction="sum") / (text_targets != -100).sum().clamp(min=1)
        image_loss = F.cross_entropy(image_logits.flatten(0, 1), (targets[:, split:] - text_vocab).flatten())
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

    def _fused(self, dtype: torch.dtype) -> FusedDecoder:
        """The fused cached decoder of the current weights in `dtype`, made again when a weight has changed (in
        place, moved or replaced) or the LoRA adapters in use have, since compiled steps freeze its weights into
        their graphs."""
        weights = tuple((parameter.data_ptr(), parameter._version) for parameter in self.parameters())
        weights += tuple((tuple(module.active_adapters), module.disable_adapters, tuple(module.merged_adapters),
                          tuple(sorted(module.scaling.items())))  # which adapters apply, and how strongly
                         for module in self.modules() if isinstance(module, BaseTunerLayer))
        if dtype not in self._fused_decoder or self._fused_decoder[dtype][0] != weights:
            # The image-code rows of lm_head; the last code is sampled, never fed: max_seq_len - 1 positions.
            head = self.lm_head.weight[self.config.text_vocab_size :]
            self._fused_decoder[dtype] = weights, FusedDecoder(self.decoder, head, self.config.max_seq_len - 1,
                                                               dtype).eval()
        return self._fused_decoder[dtype][1]

    def _decoding(self, rows: int, decoder: FusedDecoder | None) -> _Decoding:
        """What stays fixed across the steps of one `generate` call over `rows` sequences, made once per call:
        with `decoder` (cached sampling), its static cache."""
        return _Decoding(self._spatial_embeddings(), decoder, decoder.new_cache(rows) if decoder is not None else None)

    def _image_logits(self, input_ids: torch.Tensor, positions: torch.Tensor, decoding: _Decoding) -> torch.Tensor:
        """Logits [B, image_vocab_size] over the image codes that follow `input_ids` [B, T] at `positions` [T]; with
        each row's own `positions` [B, T] (a window of speculative decoding, cached), those that follow each
        position [B, T, image_vocab_size]."""
        if decoding.decoder is None:  # no cache: the whole sequence so far, through transformers' decoder
            return self(input_ids, compute_loss=False).logits[:, -1, self.config.text_vocab_size :]
        if positions.ndim == 2:
            embedded = self._embed(input_ids, positions, decoding.spatial)
            return decoding.decoder(embedded, positions, decoding.cache, last=positions.shape[1])
        if len(positions) == 1:
            return decoding.decoder(self._embed(input_ids, positions, decoding.spatial), positions, decoding.cache)
        # The prompt: rows repeat (the candidates of a caption, guidance's empty caption), so each distinct
        # one runs once and the cache copies it to its repeats.
        distinct, sources = input_ids.unique(dim=0, return_inverse=True)
        logits = decoding.decoder(self._embed(distinct, positions, decoding.spatial), positions, decoding.cache)
        decoding.cache.share_rows(sources, len(positions))
        return logits[sources]

    def _sampling_step(
        self, input_ids: torch.Tensor, positions: torch.Tensor, decoding: _Decoding, noise: torch.Tensor | None,
        guidance_scale: float, guidance_plausibility: float, warpers: LogitsProcessorList,
    ) -> torch.Tensor:
        """The next code [B, 1] after `input_ids` at `positions`: guidance, warpers, then the exponential race
        with `noise` (greedy without). Tensors in, tensors out: this is what `compile=True` traces."""
        logits = self._image_logits(input_ids, positions, decoding)
        if guidance_scale != 1.0:
            logits = classifier_free_guidance(*logits.chunk(2), guidance_scale, guidance_plausibility)
        if noise is None:
            return logits.argmax(dim=-1, keepdim=True)
        # The warpers in use (temperature, top-k, top-p) read only the scores, not the ids generated so far.
        return sample_with_noise(warpers(input_ids, logits).softmax(dim=-1), noise)

    @torch.no_grad()
    def generate(
        self,
        text_ids: torch.Tensor,
        guidance_scale: float = 1.0,
        guidance_plausibility: float = DEFAULT_GUIDANCE_PLAUSIBILITY,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: Generators = None,
        init_codes: torch.Tensor | None = None,
        init_rows: int = 0,
        keep_mask: torch.Tensor | None = None,
        negative_text_ids: torch.Tensor | None = None,
        use_cache: bool = True,
        do_sample: bool = True,
        progress: bool = False,
        mixed_precision: Literal["auto", "no", "bf16"] = "auto",
        compile: bool | Literal["auto"] = "auto",
        decoding: Literal["sequential", "jacobi", "auto"] = "auto",
        jacobi_window: int = 16,
    ) -> torch.Tensor:
        """Sample image codes [B, h, w] for captions `text_ids` [B, text_len].

        `guidance_scale` s mixes `uncond + s * (cond - uncond)` (1 disables guidance); the unconditional
        branch reads the empty caption, or `negative_text_ids` [B, text_len] (a negative prompt).
        `guidance_plausibility` a in [0, 1) keeps guidance to the codes whose conditional probability is at least
        a times the likeliest code's (`classifier_free_guidance`; 0: plain guidance): without it a prior trained
        for long is over-guided at scale 3 (docs/sampling.md); no effect at scale 1.
        With `init_codes` [B, h, w], the codes where `keep_mask` [B, h, w] is True are kept (forced in
        raster order: the codes after them see them) and the others sampled; `init_rows=k` keeps the
        first k rows. Noise is drawn for every position up to the last sampled one, kept or not, so a
        code's randomness does not depend on the mask, and a mask that keeps nothing draws the codes of
        plain sampling with the same generator.
        `generator`: one for the batch, or one per row (the same generator may serve several rows; rows that
        share one draw their noise together, so they get the same codes whatever other rows are in the batch).
        `do_sample=False` picks the most likely code (greedy); `progress` shows a bar over the codes.
        `mixed_precision`: `auto` follows a caller's autocast, else samples in bf16 on CPUs with native
        bf16 (AVX-512 BF16, AMX), where it is faster, else in the weights' dtype; `no` forces the
        weights' dtype (fp32), `bf16` bf16 (`dallekit.modeling_utils.inference_dtype`).
        `compile`: run the one-token step of the KV cache through `torch.compile` (`True`): the first
        call at a batch size compiles (seconds to tens of seconds on a CPU), later ones draw faster; the
        same codes in fp32, under bf16 now and then another where the fused kernels round differently.
        `auto` (default) samples eagerly until the setting has spent `self.auto_compile.after_seconds`
        (10 s) sampling, then compiles (`AutoCompile`); `False` never compiles (codes that never change
        within a session under bf16).
        `decoding`: `sequential` draws one code per forward pass; `jacobi` several, by speculative Jacobi
        decoding (`stage2_prior.speculative`: drafts for `jacobi_window` positions verified per pass, from the
        same distribution but not the same codes for a seed; eager whatever `compile` says; it needs the KV
        cache, sampling and no kept codes). `auto` (default) is `sequential`: on the CPU measured, with the
        demo's prior, jacobi beat only the eager sequential loop, in bf16 at 1-4 images per call (up to 1.4x),
        never the compiled step, and lost in fp32 and at 8 images (docs/sampling.md).
        """
        grid, batch = self.config.image_grid_size, text_ids.shape[0]
        if generator is not None and not isinstance(generator, torch.Generator) and len(generator) != batch:
            raise ValueError(f"generator: give one, or one per row of text_ids ({batch}), got {len(generator)}")
        jacobi = self._uses_jacobi(decoding, jacobi_window, use_cache, do_sample,
                                   init_codes is not None or keep_mask is not None or init_rows > 0)
        if init_rows:
            if init_codes is None or init_codes.shape != (batch, grid, grid) or not 0 < init_rows <= grid:
                raise ValueError(f"priming needs init_codes [{batch}, {grid}, {grid}] and 0 < init_rows <= {grid}")
            if keep_mask is not None:
                raise ValueError("give init_rows or keep_mask, not both")
            rows = torch.arange(grid, device=init_codes.device).view(1, grid, 1)
            keep_mask = (rows < init_rows).expand_as(init_codes)
        forced = keep = None
        if keep_mask is not None:
            if init_codes is None or init_codes.shape != (batch, grid, grid) or keep_mask.shape != (batch, grid, grid):
                raise ValueError(f"keep_mask needs init_codes and keep_mask of shape [{batch}, {grid}, {grid}]")
            keep, forced = keep_mask.flatten(1).to(self.device, torch.bool), init_codes.flatten(1).to(self.device)
            if keep.all():
                return init_codes.clone()
        # Positions before the first code that any row samples are the prompt's; after the last, forced only.
        sampled_anywhere = ~keep.all(dim=0) if keep is not None else None
        num_prefix = int(sampled_anywhere.nonzero()[0]) if keep is not None else 0
        num_sampled_span = int(sampled_anywhere.nonzero()[-1]) + 1 if keep is not None else self.config.image_seq_len
        guided = guidance_scale != 1.0
        if not 0 <= guidance_plausibility < 1:
            raise ValueError(f"guidance_plausibility must be in [0, 1) (0: plain guidance, "
                             f"{DEFAULT_GUIDANCE_PLAUSIBILITY}: the default), got {guidance_plausibility!r}")
        if negative_text_ids is not None and negative_text_ids.shape != text_ids.shape:
            raise ValueError(f"negative_text_ids must have the shape of text_ids {list(text_ids.shape)}, "
                             f"got {list(negative_text_ids.shape)}")
        prefix = forced[:, :num_prefix] + self.config.text_vocab_size if keep is not None else None
        input_ids = self._prompt_ids(text_ids, prefix)
        if guided:
            negative = negative_text_ids if negative_text_ids is not None else self.empty_text_ids(batch, self.device)
            input_ids = torch.cat([input_ids, self._prompt_ids(negative.to(text_ids.device), prefix)])
        warpers = self._sampling_warpers(do_sample, temperature, top_k, top_p)
        if compile not in (True, False, "auto"):
            raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
        if compile is True and not use_cache:
            raise ValueError("compile=True compiles the one-token step of the KV cache: it needs use_cache=True")
        dtype = inference_dtype(self.device, self.dtype, mixed_precision)
        # What a compiled step's graph depends on: the weights (frozen into it) and these.
        fused = self._fused(dtype) if use_cache else None
        if jacobi:
            image_ids, self.last_decoding_stats = self._jacobi_codes(
                input_ids, fused, guidance_scale, guidance_plausibility, warpers, generator, jacobi_window, progress)
            return rearrange(image_ids, "b (h w) -> b h w", h=grid)
        setting = (id(fused), len(input_ids), guidance_scale, guidance_plausibility, temperature, top_k, top_p,
                   do_sample, dtype)
        compiled = compile is True or (compile == "auto" and use_cache and self.auto_compile.wants_compiled(setting))
        one_token_step = self._sampling_step
        if compiled:
            one_token_step = functools.partial(compiled_sampling_step(self.device.type), self)

        text_vocab, length, prefix_length = self.config.text_vocab_size, self.config.max_seq_len, input_ids.shape[1]
        sequence = F.pad(input_ids, (0, length - prefix_length))  # [rows, max_seq_len], filled in as codes are drawn
        all_positions = torch.arange(length, device=self.device)
        noise_shape = (batch, self.config.image_vocab_size)
        start = time.perf_counter()
        # The cached decoder casts its weights itself; autocast serves the uncached path (the decoder's forward).
        autocast = torch.autocast(self.device.type, dtype=dtype, enabled=not use_cache and dtype != self.dtype)
        with autocast, freezing_weights(self.device.type) if compiled else nullcontext():
            decoding = self._decoding(len(input_ids), fused)
            step_input, step = input_ids, self._sampling_step  # the prompt runs eagerly: its length varies
            # The bar is updated, never iterated: the loop must not depend on it (Gradio's progress tracking
            # replaces a tracked bar's iterator with its own, which follows the latest bar opened, e.g. inductor's).
            if do_sample:  # the draws of the kept prefix: a code's noise does not depend on what is kept
                for _ in range(num_prefix):
                    draw_noise(noise_shape, generator, self.device)
            end = self.image_start + num_sampled_span  # after it, only kept codes
            bar = tqdm(total=end - prefix_length, desc="sampling image codes", unit="code", disable=not progress,
                       leave=False)
            for position in range(prefix_length, end):
                first = position - step_input.shape[1]
                noise = draw_noise(noise_shape, generator, self.device) if do_sample else None
                try:
                    codes = step(step_input, all_positions[first:position], decoding, noise, guidance_scale,
                                 guidance_plausibility, warpers)
                except Exception as error:  # compile="auto" falls back to the eager step; compile=True fails
                    if compile != "auto" or step is self._sampling_step:
                        raise
                    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                    warnings.warn(f"compiling the sampling step failed, sampling eagerly instead: {reason}",
                                  RuntimeWarning, stacklevel=2)
                    self.auto_compile.failed.add(setting)
                    one_token_step = step = self._sampling_step
                    codes = step(step_input, all_positions[first:position], decoding, noise, guidance_scale,
                                 guidance_plausibility, warpers)
                if keep is not None:  # a kept code is forced: the codes after it see the image's own
                    index = position - self.image_start
                    codes = torch.where(keep[:, index : index + 1], forced[:, index : index + 1], codes)
                sequence[:, position : position + 1] = (codes + text_vocab).repeat(2 if guided else 1, 1)
                if use_cache:
                    step_input, step = sequence[:, position : position + 1], one_token_step
                else:
                    step_input = sequence[:, : position + 1]
                bar.update()
            bar.close()
        if compile == "auto" and not compiled:
            self.auto_compile.eager_seconds[setting] += time.perf_counter() - start
            if self.auto_compile.wants_compiled(setting):
                logger.info("compile='auto': this sampling setting (%d sequences) has spent %.0f s sampling "
                            "eagerly; its next call compiles the sampling step", len(input_ids),
                            self.auto_compile.eager_seconds[setting])
        self.last_decoding_stats = DecodingStats("sequential", forward_passes=end - prefix_length,
                                                 codes=end - prefix_length, accepted_drafts=0.0)
        image_ids = sequence[:batch, self.image_start :] - text_vocab
        if keep is not None:  # the kept codes after the last sampled one
            image_ids[:, num_sampled_span:] = forced[:, num_sampled_span:]
        return rearrange(image_ids, "b (h w) -> b h w", h=grid)

    def _jacobi_codes(
        self, input_ids: torch.Tensor, decoder: FusedDecoder, guidance_scale: float, guidance_plausibility: float,
        warpers: LogitsProcessorList, generator: Generators, window: int, progress: bool,
    ) -> tuple[torch.Tensor, DecodingStats]:
        """Image codes [B, image_seq_len] after the prompts `input_ids` (guided: conditional rows, then the
        unconditional ones) by speculative Jacobi decoding, drawing from the distributions `_sampling_step` draws
        from, with the same noise source; and what it took."""
        decoding, guided = self._decoding(len(input_ids), decoder), guidance_scale != 1.0

        def probabilities(logits: torch.Tensor) -> torch.Tensor:  # [rows, (T,) V] -> [B, (T,) V]
            if guided:
                logits = classifier_free_guidance(*logits.chunk(2), guidance_scale, guidance_plausibility)
            # The warpers in use (temperature, top-k, top-p) read only the scores, one distribution per row.
            return warpers(None, logits.reshape(-1, logits.shape[-1])).softmax(dim=-1).view_as(logits)

        def window_probabilities(codes: torch.Tensor, code_positions: torch.Tensor) -> torch.Tensor:
            ids, positions = codes + self.config.text_vocab_size, code_positions + self.image_start
            if guided:
                ids, positions = ids.repeat(2, 1), positions.repeat(2, 1)
            return probabilities(self._image_logits(ids, positions, decoding))

        prompt = torch.arange(input_ids.shape[1], device=input_ids.device)
        return speculative_jacobi_codes(
            probabilities(self._image_logits(input_ids, prompt, decoding)), window_probabilities,
            functools.partial(draw_noise, generator=generator, device=self.device), self.config.image_seq_len,
            window, progress)

    @staticmethod
    def _uses_jacobi(
        decoding: str, window: int, use_cache: bool, do_sample: bool, forces_codes: bool
    ) -> bool:
        """Whether `generate(decoding=...)` samples by speculative Jacobi decoding: `jacobi` where it can (else a
        ValueError naming what stands in the way), never under `auto` (see `generate`)."""
        if decoding not in ("sequential", "jacobi", "auto"):
            raise ValueError(f"decoding must be 'sequential', 'jacobi' or 'auto', got {decoding!r}")
        if decoding != "jacobi":
            return False
        if window < 1:
            raise ValueError(f"jacobi_window must be >= 1, got {window}")
        unsupported = [what for what, present in (
            ("use_cache=False (it verifies its drafts with the KV cache)", not use_cache),
            ("do_sample=False (it samples)", not do_sample),
            ("kept codes (init_codes, keep_mask, init_rows)", forces_codes)) if present]
        if unsupported:
            raise ValueError(f"decoding='jacobi' cannot run with {' and '.join(unsupported)}: "
                             "use decoding='sequential' or 'auto'")
        return True

    def _prompt_ids(self, text_ids: torch.Tensor, prefix: torch.Tensor | None) -> torch.Tensor:
        """`[bos, text_ids, prefix]`: the caption and the kept codes (already offset into the joint vocabulary)
        that come before the first sampled one."""
        input_ids = self.build_input_ids(text_ids)
        return input_ids if prefix is None else torch.cat([input_ids, prefix.to(input_ids.device)], dim=1)

    @torch.no_grad()
    def code_log_likelihoods(self, text_ids: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """log p(code | caption, the codes before it) [B, h, w] of `codes` [B, h, w] after `text_ids` [B, text_len],
        in one forward pass: how well a causal prior thinks each code follows what precedes it (an inpainting's
        kept codes after the region measure how well the region fits what lies below and right of it)."""
        input_ids = self.build_input_ids(text_ids, codes)
        logits = self(input_ids[:, :-1], compute_loss=False).logits[:, self.image_start - 1 :,
                                                                    self.config.text_vocab_size :]
        log_probs = logits.float().log_softmax(dim=-1).gather(-1, codes.flatten(1).unsqueeze(-1)).squeeze(-1)
        return log_probs.view_as(codes)


@functools.cache
def compiled_sampling_step(device_type: str) -> Callable[..., torch.Tensor]:
    """`PriorModel._sampling_step` through `torch.compile`, one per device type, shared by every prior.

    The model is an argument of the traced function, not a closure, and dynamo guards on its weights,
    so a copy of a model with other weights never runs its original's graph.
    Shapes are static (`dynamic=False`): each batch size gets its own graph, since inductor's
    dynamic-shape code for this step runs slower than eager at small batches. On CPUs inductor's C++
    wrapper launches the kernels, and the step is called under `freezing_weights`.
    """
    options = {"cpp_wrapper": True} if device_type == "cpu" else None
    return torch.compile(PriorModel._sampling_step, dynamic=False, options=options)


def freezing_weights(device_type: str) -> AbstractContextManager:
    """The context compiled steps run in: on CPUs, inductor's `freezing`, which makes the weights constants of
    the graph (a `FusedDecoder` never changes in place; new weights trace a new graph) and lets inductor
    prepack them for oneDNN, a step 10-25% faster. Dynamo reads the setting when it traces, so it is set
    around the calls rather than in the compile options (torch 2.13 has no public switch for it:
    `options={"freezing": True}` samples no faster than no freezing)."""
    return torch._inductor.config.patch(freezing=True) if device_type == "cpu" else nullcontext()
