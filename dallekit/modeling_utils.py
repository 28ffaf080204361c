"""What the models share: strict loading, the convolutional initialisation, the inference dtype, pixels as uint8.

Layer 0: libraries only. The models (`modeling_*.py`) take these from here, not from `dallekit.training`,
so that loading a model for inference imports neither accelerate nor the training configs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from torch import nn
from transformers import PreTrainedModel


class StrictPreTrainedModel(PreTrainedModel):
    """A `PreTrainedModel` whose `from_pretrained` fails loudly on incomplete or mismatched checkpoints.

    transformers' default `from_pretrained` re-initialises missing or mismatched weights with a
    warning; for a tokenizer or prior that silently yields a broken model, so here it is an error.
    Only safetensors are read.
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        location = Path(pretrained_model_name_or_path) / kwargs.get("subfolder", "")
        if location.exists():
            for required in ("config.json", "model.safetensors"):
                if not (location / required).is_file():
                    raise FileNotFoundError(
                        f"{location} has no {required}: it is not a complete {cls.__name__} directory "
                        f"(save one with `model.save_pretrained(dir)`)"
                    )
        kwargs.setdefault("use_safetensors", True)  # never fall back to unpickling a .bin file
        wants_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
            )
        except RuntimeError as error:
            if "mismatched" in str(error) or "size mismatch" in str(error):
                raise ValueError(
                    f"the weights in {pretrained_model_name_or_path} do not match the shapes its config.json "
                    f"describes (was config.json edited, or are files of two models mixed?)"
                ) from error
            raise
        problems = {name: keys for name, keys in info.items() if name != "error_msgs" and keys}
        if problems:
            details = "; ".join(f"{name}: {sorted(keys)[:5]}" for name, keys in problems.items())
            raise ValueError(f"{pretrained_model_name_or_path} does not match {cls.__name__}: {details}")
        return (model, info) if wants_info else model


def init_convolutional_weights(module: nn.Module) -> bool:
    """He-normal weights and zero biases for convolutions and linear layers (ReLU-family networks), ones and zeros for
    group norms: the image tokenizer's and the scorer's initialisation. Returns whether `module` was one of these."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.GroupNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    else:
        return False
    return True


def cpu_supports_fast_bf16() -> bool:
    """True when the CPU advertises native bf16 matmul (AMX or AVX-512 BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def inference_dtype(device: torch.device, weights_dtype: torch.dtype, mixed_precision: str = "auto") -> torch.dtype:
    """The dtype inference computes in: `bf16`; `no`: the weights' dtype; `auto`: the caller's autocast dtype if
    one is on, else bf16 on a CPU with native bf16 (where it is faster), else the weights' dtype."""
    if mixed_precision not in ("auto", "no", "bf16"):
        raise ValueError(f"mixed_precision must be 'auto', 'no' or 'bf16', got {mixed_precision!r}")
    if mixed_precision == "auto":
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        mixed_precision = "bf16" if device.type == "cpu" and cpu_supports_fast_bf16() else "no"
    return torch.bfloat16 if mixed_precision == "bf16" else weights_dtype


def to_uint8(pixel_values: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]."""
    pixels = ((pixel_values.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return rearrange(pixels, "b c h w -> b h w c").numpy()
