"""LoRA adapters of the prior, through peft's own API (what diffusers does for its models).

peft adds low-rank matrices beside the Llama decoder's projections (`peft.inject_adapter_in_model`;
by default all seven: attention q/k/v/o and the MLP's gate/up/down). An adapter is saved in peft's
format, `adapter_config.json` and `adapter_model.safetensors`, plus `dallekit_prior.json`, the sizes
of the prior it was trained on, so that an adapter for another prior is refused in one line. The
cached sampling path adds the active adapters' deltas to the weights it fuses
(`kv_decoding.effective_weight`); `fuse`/`unfuse` merge them into the weights and back.
(transformers' own adapter methods on `PreTrainedModel` need peft >= 0.22; this module works with
the peft releases on PyPI today.)
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from pathlib import Path

from huggingface_hub import snapshot_download
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

from stage2_prior.modeling_prior import PriorModel

LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG, ADAPTER_WEIGHTS, PRIOR_SIZES = "adapter_config.json", "adapter_model.safetensors", "dallekit_prior.json"
COMPATIBLE_SIZES = ("text_vocab_size", "text_len", "image_vocab_size", "image_grid_size", "hidden_size",
                    "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")


class LoraAdapterError(ValueError):
    """An adapter that cannot be used with this prior: missing, unreadable, or made for another one."""


def lora_layers(prior: PriorModel) -> list[BaseTunerLayer]:
    """The decoder's layers that carry adapters."""
    return [module for module in prior.decoder.modules() if isinstance(module, BaseTunerLayer)]


def adapter_names(prior: PriorModel) -> list[str]:
    """Every adapter loaded into the prior, in the order they were added."""
    names: dict[str, None] = {}
    for layer in lora_layers(prior):
        names.update(dict.fromkeys(layer.lora_A))
    return list(names)


def _inject(config: LoraConfig, prior: PriorModel, adapter_name: str) -> None:
    """peft's `inject_adapter_in_model` on the decoder, without its warning that a second adapter makes several
    (that is what a pipeline's adapters are)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter_in_model(config, prior.decoder, adapter_name=adapter_name)


def adapted_modules(prior: PriorModel, adapter_name: str) -> list[str]:
    """The kinds of projection (`q_proj`, ...) that carry the adapter `adapter_name`."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in prior.decoder.named_modules()
                   if isinstance(module, BaseTunerLayer) and adapter_name in module.lora_A})


def add_lora(prior: PriorModel, rank: int = 8, alpha: float = 16.0, target_modules: Iterable[str] = LORA_TARGET_MODULES,
             dropout: float = 0.0, adapter_name: str = "default") -> LoraConfig:
    """Add a new adapter (B initialised to zero: the prior is unchanged until it trains); peft makes only the
    decoder's adapter weights trainable there. Returns its config."""
    if adapter_name in adapter_names(prior):
        raise LoraAdapterError(f"the prior already has an adapter named {adapter_name!r}: choose another name")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=dropout)
    _inject(config, prior, adapter_name)
    return config


def save_lora(prior: PriorModel, directory: str | Path, adapter_name: str = "default") -> Path:
    """Write the adapter `adapter_name` in peft's format, with the prior's sizes."""
    if adapter_name not in adapter_names(prior):
        raise LoraAdapterError(f"the prior has no adapter named {adapter_name!r} (it has: "
                               f"{', '.join(adapter_names(prior)) or 'none'})")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layer = next(layer for layer in lora_layers(prior) if adapter_name in layer.lora_A)
    config = LoraConfig(r=layer.r[adapter_name], lora_alpha=layer.lora_alpha[adapter_name],
                        target_modules=adapted_modules(prior, adapter_name))
    config.save_pretrained(directory)
    state = get_peft_model_state_dict(prior.decoder, adapter_name=adapter_name)
    save_file({name: tensor.detach().contiguous().cpu() for name, tensor in state.items()}, directory / ADAPTER_WEIGHTS)
    sizes = {name: getattr(prior.config, name) for name in COMPATIBLE_SIZES}
    (directory / PRIOR_SIZES).write_text(json.dumps(sizes, indent=2) + "\n")
    return directory


def load_lora(prior: PriorModel, path_or_repo_id: str | Path, adapter_name: str = "default",
              token: str | bool | None = None) -> str:
    """Load an adapter saved by `save_lora` (a directory or a Hub id) into the prior, active; returns its name."""
    location = Path(path_or_repo_id)
    if not location.is_dir():
        try:
            location = Path(snapshot_download(str(path_or_repo_id), token=token,
                                              allow_patterns=[ADAPTER_CONFIG, ADAPTER_WEIGHTS, PRIOR_SIZES]))
        except Exception as error:  # huggingface_hub's errors for a bad id, no network, offline mode
            raise LoraAdapterError(f"no LoRA adapter at {str(path_or_repo_id)!r}: not a directory, and not a Hub "
                                   f"repository that can be downloaded ({type(error).__name__})") from error
    missing = [name for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (location / name).is_file()]
    if missing:
        raise LoraAdapterError(f"{location} is not a LoRA adapter: it has no {' and no '.join(missing)}")
    if adapter_name in adapter_names(prior):
        raise LoraAdapterError(f"the prior already has an adapter named {adapter_name!r}: pass another "
                               "adapter_name, or unload it first")
    if (location / PRIOR_SIZES).is_file():
        trained_on = json.loads((location / PRIOR_SIZES).read_text())
        ours = {name: getattr(prior.config, name) for name in COMPATIBLE_SIZES}
        differences = [f"{name} {trained_on[name]} (this prior: {ours[name]})"
                       for name in COMPATIBLE_SIZES if name in trained_on and trained_on[name] != ours[name]]
        if differences:
            raise LoraAdapterError(f"the adapter at {location} was trained on another prior: {', '.join(differences)}; "
                                   "load it into the pipeline it was trained from")
    try:
        config = LoraConfig.from_pretrained(location)
        state = load_file(location / ADAPTER_WEIGHTS)
    except Exception as error:  # JSON, safetensors and peft's config checks each raise their own
        raise LoraAdapterError(f"{location}: not a readable LoRA adapter ({' '.join(str(error).split())})") from error
    _inject(config, prior, adapter_name)
    try:
        result = set_peft_model_state_dict(prior.decoder, state, adapter_name=adapter_name)
    except RuntimeError as error:  # a shape that does not match this prior's layers
        delete_adapters(prior, [adapter_name])
        raise LoraAdapterError(f"the adapter at {location} does not fit this prior's layers: "
                               f"{str(error).splitlines()[-1].strip()}") from error
    unexpected = list(result.unexpected_keys)
    if unexpected:
        delete_adapters(prior, [adapter_name])
        raise LoraAdapterError(f"the adapter at {location} holds weights for layers this prior lacks "
                               f"(e.g. {unexpected[0]}): load it into the pipeline it was trained from")
    return adapter_name


def set_adapters(prior: PriorModel, names: list[str], weights: list[float] | None = None) -> None:
    """Make `names` the active adapters, each with its weight (1: as trained; 0: off)."""
    weights = [1.0] * len(names) if weights is None else list(weights)
    if len(weights) != len(names):
        raise ValueError(f"give one adapter weight per adapter name ({len(names)}), got {len(weights)}")
    unknown = [name for name in names if name not in adapter_names(prior)]
    if unknown:
        raise LoraAdapterError(f"no adapter named {unknown[0]!r} (loaded: {', '.join(adapter_names(prior)) or 'none'})")
    for layer in lora_layers(prior):
        present = [name for name in names if name in layer.lora_A]
        layer.set_adapter(present)
        for name, weight in zip(names, weights):
            if name in layer.lora_A:
                layer.set_scale(name, weight)
        layer.set_requires_grad(present, requires_grad=False)  # `set_adapter` makes them trainable


def enable_adapters(prior: PriorModel, enabled: bool) -> None:
    """Switch every adapter off (the base prior samples) or back on."""
    for layer in lora_layers(prior):
        layer.enable_adapters(enabled)


def fuse(prior: PriorModel) -> None:
    """Merge the active adapters into the weights they adapt (sampling then costs what the base prior's does)."""
    for layer in lora_layers(prior):
        layer.merge(adapter_names=[name for name in layer.active_adapters if name not in layer.merged_adapters])


def unfuse(prior: PriorModel) -> None:
    """Take merged adapters back out of the weights."""
    for layer in lora_layers(prior):
        if layer.merged:
            layer.unmerge()


def delete_adapters(prior: PriorModel, names: list[str] | None = None) -> None:
    """Remove the adapters `names` (default: all), unmerging them first. When none is left, peft's layers give
    way to the linear layers they wrap: the base prior comes back, weights and state dict alike."""
    unfuse(prior)
    for name in names or adapter_names(prior):
        for layer in lora_layers(prior):
            if name in layer.lora_A:
                layer.delete_adapter(name)
    if not adapter_names(prior):
        for path, module in list(prior.decoder.named_modules()):
            if isinstance(module, BaseTunerLayer):
                parent, _, child = path.rpartition(".")
                setattr(prior.decoder.get_submodule(parent), child, module.get_base_layer())
