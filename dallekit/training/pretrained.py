"""Strict loading for exported models: safetensors only, and every weight present with its shape.

transformers' default `from_pretrained` re-initialises missing or mismatched weights with a
warning; for a tokenizer or prior that silently yields a broken model, so here it is an error.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedModel


class StrictPreTrainedModel(PreTrainedModel):
    """A `PreTrainedModel` whose `from_pretrained` fails loudly on incomplete or mismatched checkpoints."""

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
