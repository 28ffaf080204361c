"""The model card (`README.md`) of a saved pipeline: Hub metadata, components, data, metrics, usage.

The card is regenerated on every save from the components and `training_info` (the dataset and
evaluation figures, kept machine-readable in the card's metadata under `dallekit:` so a loaded
pipeline saves the same card again).
"""

from __future__ import annotations

import os
import re
import textwrap
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from stage2_prior import lora

LIBRARY_NAME = "dallekit"


def dallekit_version() -> str:
    """The installed dallekit's version, written into what it saves and uploads ("unknown" when not installed)."""
    try:
        return version(LIBRARY_NAME)
    except PackageNotFoundError:
        return "unknown"


def _looks_local(text: str) -> bool:
    """Whether `text` names a local path (absolute, or ./ ../ ~, or an existing path with a separator), not a Hub
    id or a built-in dataset name."""
    return (os.path.isabs(text) or text.startswith(("./", "../", "~", ".\\", "..\\")) or text in (".", "..")
            or ((os.sep in text or "/" in text) and os.path.exists(text)))


def _public_name(path: str) -> str:
    """The last component of a local path (the folder's name), which a card may publish."""
    return Path(os.path.abspath(os.path.expanduser(path))).name or path


def public_training_info(info: dict[str, Any]) -> dict[str, Any]:
    """`info` without local paths, as a card publishes it: the dataset, when it is a local folder, becomes the
    folder's name wherever it occurs (the description, the metrics), and any other string that is a whole
    absolute path its last component. Hub ids and built-in names are kept."""
    dataset = info.get("dataset")
    replacements: dict[str, str] = {}
    if isinstance(dataset, str) and _looks_local(dataset):
        name = _public_name(dataset)
        for form in (os.path.abspath(os.path.expanduser(dataset)), os.path.realpath(os.path.expanduser(dataset)),
                     dataset):
            replacements[form] = name

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: clean(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(item) for item in value]
        if not isinstance(value, str):
            return value
        if value in replacements:
            return replacements[value]
        for local, name in sorted(replacements.items(), key=lambda item: -len(item[0])):  # longest first
            value = value.replace(local, name)
        return _public_name(value) if os.path.isabs(value) or value.startswith("~") else value

    return clean(info)


def public_location(location: str) -> str:
    """Where the card's snippets load the model from: a Hub id as it is, a local directory relative to the
    working directory when it lies under it, else by its name (a card names no absolute local path)."""
    if not _looks_local(location) or not os.path.isabs(os.path.expanduser(location)):
        return location
    absolute = os.path.abspath(os.path.expanduser(location))
    relative = os.path.relpath(absolute, os.getcwd()) if absolute.startswith(os.getcwd() + os.sep) else None
    return relative or _public_name(location)


def license_metadata(info: dict[str, Any]) -> dict[str, str]:
    """The card's `license` metadata: the given licence (`info["license"]`, e.g. `--license cc-by-4.0`, or a
    dataset's own) as a Hub licence id (lower case, spaces as hyphens); a name that is no id is `other` with
    `license_name`. Empty without a licence."""
    given = str(info.get("license") or info.get("license_id") or "").strip()
    if not given:
        return {}
    license_id = re.sub(r"\s+", "-", given.lower())
    if re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", license_id):
        return {"license": license_id}
    return {"license": "other", "license_name": re.sub(r"[^a-z0-9.+]+", "-", given.lower()).strip("-") or "other"}


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _metrics_section(metrics: dict[str, Any]) -> str:
    """Scalar metrics as a two-column table; a `guidance` mapping (scale -> metrics) as one row per scale."""
    lines = ["## Evaluation", ""]
    scalars = {key: value for key, value in metrics.items() if not isinstance(value, (dict, list))}
    if scalars:
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| {key} | {_format(value)} |" for key, value in scalars.items()]
        lines.append("")
    by_scale = metrics.get("guidance", {})
    if by_scale:
        columns = list(dict.fromkeys(
            key for row in by_scale.values() for key, value in row.items() if not isinstance(value, (dict, list))
        ))
        lines += ["| guidance scale | " + " | ".join(columns) + " |", "|" + " --- |" * (len(columns) + 1)]
        for scale, row in by_scale.items():
            lines.append(f"| {scale} | " + " | ".join(_format(row.get(column, "")) for column in columns) + " |")
        lines.append("")
    lines.append(
        "Adherence: share of images that an independent classifier, trained on the real training images, "
        "assigns to the prompted class (its accuracy on real validation images is the ceiling). Fréchet "
        "distance: between real validation and generated images in that classifier's feature space. Copy "
        "rates: generated code sequences equal to a training image's (exact), and images closer to a "
        "training image than 95% of real validation images are (near; novel samples score about 5%)."
    )
    return "\n".join(lines) + "\n"


_RERANKING_USAGE = """
# Reranking: draw 16 candidates per prompt, keep the 4 that the scorer ranks closest to the prompt
output = pipe("{prompt}", num_images_per_prompt=4, num_candidates=16, guidance_scale=1.0,
              generator=torch.Generator().manual_seed(0))
output.images, output.scores  # best first; scores: the scorer's cosine of each image with the prompt"""


def _scorer_row(scorer, metrics: dict[str, float]) -> str:
    """The components table's row of a reranking scorer (`TextImageScorer`), with its held-out retrieval."""
    config = scorer.model.config
    retrieval = (f"; among the distinct held-out captions it ranks a held-out image's own caption first for "
                 f"{metrics['image_to_text_top1']:.0%} of them (within 5: {metrics['image_to_text_top5']:.0%})"
                 ) if "image_to_text_top1" in metrics else ""
    return (
        f"| `scorer` | contrastive text–image scorer (CNN of {len(config.image_channels)} levels + "
        f"{config.text_num_hidden_layers}-layer text transformer, {scorer.model.num_parameters():,} parameters, "
        f"own caption tokenizer) that reranks candidates (`num_candidates`){retrieval} |"
    )


def make_model_card(
    pipe, location: str, training_info: dict[str, Any] | None = None, space_id: str | None = None,
) -> ModelCard:
    """A card for `pipe` (a `TextToImagePipeline`), loadable as `location` (a Hub id or a directory).

    With `space_id` the card links to the Gradio Space that serves the model's page. The card names no
    absolute local path (`public_training_info`, `public_location`): it is published with the model.
    """
    info = public_training_info(training_info or {})  # a card is published: no local paths
    location = public_location(location)
    vqvae, prior = pipe.vqvae.config, pipe.prior.config
    quantizer = {"gumbel": "gumbel-dvae", "vq": "vq-vae", "fsq": "fsq"}[vqvae.quantizer]
    data = ModelCardData(
        # the training data's (OpenMoji's CC BY-SA 4.0 travels with the emoji), or the one given (`--license`)
        **license_metadata(info),
        library_name=LIBRARY_NAME,
        pipeline_tag="text-to-image",
        tags=["dallekit", "text-to-image", "dall-e", "autoregressive", quantizer],
        # the pipeline a fine-tuning run started from (`dallekit train --init-from`), a Hub id where it was one
        **({"base_model": public_location(info["base_model"])} if info.get("base_model") else {}),
        dallekit=info,
    )
    dataset = info.get("dataset")
    # a caption of any length may be the example: the card's snippets show its start
    prompt = textwrap.shorten(info.get("example_prompt", "a handwritten digit seven"), width=100, placeholder=" ...")
    sections = [
        f"# dallekit text-to-image{f' ({dataset})' if dataset else ''}",
        "",
        "A DALL·E-style two-stage model trained with dallekit: "
        "an image tokenizer turns images into a grid of discrete codes, and an autoregressive transformer "
        "samples those codes from a caption.",
        "",
        *([f"Try it in the browser: [{space_id}](https://huggingface.co/spaces/{space_id}).", ""] if space_id else []),
        "| component | what it is |",
        "| --- | --- |",
        f"| `vqvae` | {quantizer}: {vqvae.image_size}x{vqvae.image_size} RGB images <-> {vqvae.latent_size}x"
        f"{vqvae.latent_size} codes out of {vqvae.codebook_size}, {pipe.vqvae.num_parameters():,} parameters |",
        f"| `prior` | Llama-style decoder, {prior.num_hidden_layers} layers x {prior.hidden_size} wide, over "
        f"{prior.text_len} caption tokens + {prior.image_seq_len} image codes, {pipe.prior.num_parameters():,} "
        f"parameters, classifier-free guidance |",
        f"| `tokenizer` | byte-level BPE over the captions, {len(pipe.tokenizer)} tokens |",
        *([_scorer_row(pipe.scorer, info.get("scorer_metrics", {}))] if pipe.scorer is not None else []),
        "",
        "## Training data",
        "",
        info.get("data_description") or (f"`{dataset}`" if dataset else "Not recorded."),
        "",
        *([f"Fine-tuned from `{public_location(info['base_model'])}`"
           + (f", with the LoRA adapter(s) {', '.join(f'`{name}`' for name in adapters)} of the prior in `lora/`"
              if (adapters := pipe.get_list_adapters()) else "") + ".", ""] if info.get("base_model") else []),
        *([f"Licence of the training data, which this model carries: {info['license']}. "
           f"{info.get('attribution') or ''}".rstrip(), ""] if info.get("license") else []),
    ]
    if info.get("metrics"):
        sections.append(_metrics_section(info["metrics"]))
    sections += [
        "## Usage",
        "",
        "```python",
        "import torch",
        "from pipelines import TextToImagePipeline",
        "",
        f'pipe = TextToImagePipeline.from_pretrained("{location}")',
        f'images = pipe("{prompt}", num_images_per_prompt=4, guidance_scale=3.0,',
        "              generator=torch.Generator().manual_seed(0)).images  # PIL images",
        *(_RERANKING_USAGE.format(prompt=prompt).splitlines() if pipe.scorer is not None else []),
        "```",
        "",
        "or from the command line:",
        "",
        "```bash",
        f'dallekit generate --model {location} --prompt "{prompt}" --num-images 8 --out samples.png',
        *([f'dallekit generate --model {location} --prompt "{prompt}" --num-images 8 --candidates 32 '
           "--out best.png   # the best 8 of 32"] if pipe.scorer is not None else []),
        f"dallekit serve --model {location}   # a web page to try it (needs the web extra: Gradio)",
        "```",
        "",
    ]
    return ModelCard("---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(sections))


def read_training_info(card: ModelCard) -> dict[str, Any]:
    """The `training_info` a card was written with (empty for a card that dallekit did not write)."""
    return dict(card.data.to_dict().get(LIBRARY_NAME) or {})


def make_adapter_card(pipe, adapter_name: str, base_model: str | None, training_info: dict[str, Any] | None = None,
                      ) -> ModelCard:
    """The card of a LoRA adapter of `pipe`'s prior, published alone: what it adapts (`base_model`, a pipeline's
    Hub id or name), its settings, and the data and metrics of its training."""
    info = public_training_info(training_info or {})
    base = public_location(base_model) if base_model else None
    layer = next(layer for layer in lora.lora_layers(pipe.prior) if adapter_name in layer.lora_A)
    targets = lora.adapted_modules(pipe.prior, adapter_name)
    data = ModelCardData(library_name=LIBRARY_NAME, tags=["dallekit", "text-to-image", "lora", "peft"],
                         **({"base_model": base} if base else {}), **license_metadata(info), dallekit=info)
    usage = [
        "```python",
        "from pipelines import TextToImagePipeline",
        "",
        f'pipe = TextToImagePipeline.from_pretrained("{base or "BASE_PIPELINE"}")',
        'pipe.load_lora_weights("THIS_REPOSITORY", adapter_name="' + adapter_name + '")',
        f'images = pipe("{info.get("example_prompt", "a caption")}", num_images_per_prompt=4).images',
        "```",
    ]
    sections = [
        f"# LoRA adapter `{adapter_name}` for a dallekit prior",
        "",
        f"A LoRA adapter (peft's format) of the prior of {f'`{base}`' if base else 'a dallekit pipeline'}: rank "
        f"{layer.r[adapter_name]}, alpha {layer.lora_alpha[adapter_name]}, on the decoder's "
        f"{', '.join(targets)} projections.",
        "",
        "## Training data",
        "",
        info.get("data_description") or "Not recorded.",
        "",
        *([_metrics_section(info["metrics"])] if info.get("metrics") else []),
        "## Usage",
        "",
        *usage,
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(sections) + "\n")
