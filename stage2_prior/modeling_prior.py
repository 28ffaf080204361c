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
global RNG, so the loop here is written out (about forty lines over the same decoder and cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from transformers import DynamicCache, LlamaModel
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from tqdm.auto import tqdm
from transformers.utils import ModelOutput

from stage2_prior.configuration_prior import PriorConfig
from training.pretrained import StrictPreTrainedModel


def classifier_free_guidance(conditional: torch.Tensor, unconditional: torch.Tensor, scale: float) -> torch.Tensor:
    """`uncond + scale * (cond - uncond)`: scale 1 is the conditional model, larger follows the prompt more."""
    return unconditional + scale * (conditional - unconditional)


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row of `probs` [B, V], drawn on `generator`'s device.

    A seeded CPU generator so works whatever device the model is on, as in diffusers;
    `torch.multinomial` alone refuses a generator on another device than `probs`.
    """
    if generator is None or generator.device == probs.device:
        return torch.multinomial(probs, 1, generator=generator)
    return torch.multinomial(probs.to(generator.device), 1, generator=generator).to(probs.device)


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

    def _embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Token embeddings plus row/column embeddings at image positions (then dropout); positions [T] absolute."""
        embeddings = self.decoder.embed_tokens(input_ids)
        image_index = (positions - self.image_start).clamp(min=0)
        grid = self.config.image_grid_size
        spatial = self.row_embedding(image_index // grid) + self.column_embedding(image_index % grid)
        is_image = (positions >= self.image_start).unsqueeze(-1)
        return self.embedding_dropout(embeddings + torch.where(is_image, spatial, torch.zeros_like(spatial)))

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
    ) -> PriorOutput:
        """Logits for every position; with `compute_loss`, the text/image-weighted next-token loss."""
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
        logits = self._restrict_logits(self.lm_head(hidden.last_hidden_state).float(), positions)
        output = PriorOutput(logits=logits, cache=hidden.cache if use_cache else None)
        if compute_loss and past == 0 and input_ids.shape[1] > 1:
            output.text_loss, output.image_loss = self._losses(logits, input_ids)
            config = self.config
            output.loss = config.text_loss_weight * output.text_loss + config.image_loss_weight * output.image_loss
        return output

    def _losses(self, logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy of the next text token (padding ignored) and of the next image token."""
        targets = input_ids[:, 1:]
        predictions = logits[:, :-1]
        split = self.config.text_len  # predictions [0, text_len) are text, the rest image codes
        text_targets = targets[:, :split].masked_fill(targets[:, :split] == self.config.pad_token_id, -100)
        text_loss = F.cross_entropy(predictions[:, :split].flatten(0, 1), text_targets.flatten(), ignore_index=-100)
        image_loss = F.cross_entropy(predictions[:, split:].flatten(0, 1), targets[:, split:].flatten())
        if not torch.isfinite(text_loss):  # a batch of empty captions has no text target
            text_loss = torch.zeros_like(image_loss)
        return text_loss, image_loss

    # ---- sampling -------------------------------------------------------------------------------

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
    ) -> torch.Tensor:
        """Sample image codes [B, h, w] for captions `text_ids` [B, text_len].

        `guidance_scale` s mixes `uncond + s * (cond - uncond)` (1 disables guidance); with
        `init_codes` [B, h, w] the first `init_rows` rows are kept and the rest completed.
        `do_sample=False` picks the most likely code (greedy); `progress` shows a bar over the codes.
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
        warpers = LogitsProcessorList()
        if do_sample:
            if temperature <= 0:
                raise ValueError(f"temperature must be > 0 (use do_sample=False for greedy), got {temperature}")
            warpers.append(TemperatureLogitsWarper(temperature))
            if top_k:
                warpers.append(TopKLogitsWarper(top_k))
            if top_p is not None and top_p < 1.0:
                warpers.append(TopPLogitsWarper(top_p))

        cache = DynamicCache(config=self.decoder.config) if use_cache else None
        sequence, step_input = input_ids, input_ids
        text_vocab = self.config.text_vocab_size
        steps = range(self.config.image_seq_len - (init_rows * grid))
        for _ in tqdm(steps, desc="sampling image codes", unit="code", disable=not progress, leave=False):
            output = self(step_input, cache=cache, use_cache=use_cache, compute_loss=False)
            logits = output.logits[:, -1, text_vocab:]  # the image-code part of the joint vocabulary
            if guided:
                logits = classifier_free_guidance(*logits.chunk(2), guidance_scale)
            if do_sample:
                probs = warpers(sequence[:batch], logits).softmax(dim=-1)
                codes = sample_categorical(probs, generator)
            else:
                codes = logits.argmax(dim=-1, keepdim=True)
            next_ids = codes + text_vocab
            if guided:
                next_ids = torch.cat([next_ids, next_ids])
            sequence = torch.cat([sequence, next_ids], dim=1)
            step_input = next_ids if use_cache else sequence
        image_ids = sequence[:batch, self.image_start:] - text_vocab
        return rearrange(image_ids, "b (h w) -> b h w", h=grid)
