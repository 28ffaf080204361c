"""Parameters and training-memory estimates of the GPU-sized configs (README: "Sizes for real data").

    python bench/model_sizes.py            # one JSON line per config

Memory per process, for a training step under bf16 autocast with AdamW:
- `weights_and_optimizer_gb`: 16 bytes a parameter (fp32 weights, fp32 gradients, two fp32 moments);
- `activations_gb`: what backward keeps, measured as the sum of every leaf module's output in one
  real forward pass of one example (bf16: 2 bytes an element; the prior's fp32 logits: 4 bytes, twice,
  for the logits and their gradient), times the config's per-process batch size. Attention inside
  SDPA (the GPU default) keeps no attention matrix, so none is counted;
- `activations_checkpointed_gb` (priors, `training.gradient_checkpointing: true`): each layer's input,
  plus one layer's activations recomputed at a time, plus the logits.
Estimates, not measurements: allocator overhead, fragmentation and temporary buffers come on top.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from torch import nn

from stage1_dvae import DVAEConfig, DVAEModel
from stage2_prior import PriorConfig, PriorModel

ROOT = Path(__file__).resolve().parents[1]
TOKENIZERS = ["configs/dvae/fsq_128px.yaml", "configs/dvae/vq_256px.yaml"]
PRIORS = ["configs/prior/small.yaml", "configs/prior/base.yaml", "configs/prior/large.yaml"]
PRIOR_TOKENIZER = "configs/dvae/vq_256px.yaml"  # sets the priors' image vocabulary (16,384) and grid (16x16)
GB = 1024**3


def read_config(path: str) -> dict:
    return yaml.safe_load((ROOT / path).read_text())


def prior_config(path: str) -> PriorConfig:
    """The prior a config describes, with the image vocabulary and grid of `PRIOR_TOKENIZER`."""
    tokenizer = DVAEConfig(**read_config(PRIOR_TOKENIZER)["model"])
    return PriorConfig(**read_config(path)["model"], image_vocab_size=tokenizer.codebook_size,
                       image_grid_size=tokenizer.latent_size)


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def leaf_output_elements(model: nn.Module, run_forward) -> dict[str, int]:
    """Elements output by each leaf module (no children) during `run_forward()`, by the module's name."""
    counts: dict[str, int] = {}
    hooks = []
    for name, module in model.named_modules():
        if not list(module.children()):
            def count(module, args, output, name=name):
                if isinstance(output, torch.Tensor):
                    counts[name] = counts.get(name, 0) + output.numel()
            hooks.append(module.register_forward_hook(count))
    with torch.no_grad():
        run_forward()
    for hook in hooks:
        hook.remove()
    return counts


def tokenizer_sizes(path: str) -> dict:
    config = DVAEConfig(**read_config(path)["model"])
    model = DVAEModel(config).train()
    pixels = torch.rand(1, config.num_channels, config.image_size, config.image_size) * 2 - 1
    activations = sum(leaf_output_elements(model, lambda: model(pixels)).values()) * 2
    batch = read_config(path)["training"]["batch_size"]
    parameters = count_parameters(model)
    return {"config": path, "parameters_m": round(parameters / 1e6, 1), "batch_size": batch,
            "weights_and_optimizer_gb": round(16 * parameters / GB, 2),
            "activations_gb": round(batch * activations / GB, 2),
            "total_gb": round((16 * parameters + batch * activations) / GB, 1)}


def prior_sizes(path: str) -> dict:
    config = prior_config(path)
    model = PriorModel(config).train()
    input_ids = torch.zeros(1, config.max_seq_len, dtype=torch.long)
    counts = leaf_output_elements(model, lambda: model(input_ids, compute_loss=False))
    counts.pop("lm_head")
    # training's fp32 logits and their gradient: each position over its own vocabulary (text or image codes)
    logits = 2 * 4 * (config.text_len * config.text_vocab_size + config.image_seq_len * config.image_vocab_size)
    per_layer = {index: sum(n for name, n in counts.items() if name.startswith(f"decoder.layers.{index}."))
                 for index in range(config.num_hidden_layers)}
    activations = sum(counts.values()) * 2 + logits
    layer_inputs = config.num_hidden_layers * config.max_seq_len * config.hidden_size * 2
    checkpointed = layer_inputs + max(per_layer.values()) * 2 + logits
    batch = read_config(path)["training"]["batch_size"]
    parameters = count_parameters(model)
    return {"config": path, "parameters_m": round(parameters / 1e6, 1),
            "layers_x_width": f"{config.num_hidden_layers} x {config.hidden_size}",
            "sequence": config.max_seq_len, "batch_size": batch,
            "weights_and_optimizer_gb": round(16 * parameters / GB, 2),
            "activations_gb": round(batch * activations / GB, 2),
            "activations_checkpointed_gb": round(batch * checkpointed / GB, 2),
            "total_gb": round((16 * parameters + batch * activations) / GB, 1),
            "total_checkpointed_gb": round((16 * parameters + batch * checkpointed) / GB, 1)}


def main() -> None:
    torch.manual_seed(0)
    for path in TOKENIZERS:
        print(json.dumps(tokenizer_sizes(path)), flush=True)
    for path in PRIORS:
        print(json.dumps(prior_sizes(path)), flush=True)


if __name__ == "__main__":
    main()
