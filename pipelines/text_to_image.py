"""`TextToImagePipeline`: prompt -> caption ids -> prior samples image codes -> stage-1 decoder -> images.

With a text–image scorer (`scorer.TextImageScorer`), a call can draw N candidates per prompt and
keep the best k by the scorer's similarity to the prompt (DALL·E's reranking).

A pipeline directory holds `model_index.json` (pipeline class, dallekit version, components),
one subfolder per component: `vqvae/` (stage 1), `prior/` (stage 2), `tokenizer/` (captions),
`scorer/` (optional: the reranking scorer's model and caption tokenizer), and the model card
`README.md`. Loading reads safetensors only; a Hub id goes through
`huggingface_hub.snapshot_download`, so the Hub cache and `HF_HUB_OFFLINE=1` work as usual. A file
that is there but cannot be read raises `PipelineLoadError` naming the file and what is wrong.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
import torch
from huggingface_hub import CommitInfo, HfApi, ModelCard, snapshot_download
from PIL import Image
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from dallekit.modeling_utils import inference_dtype, to_uint8
from dallekit.scorer import ScorerModel, TextImageScorer
from dallekit.text_tokenizer import encode_captions
from pipelines.editing import (
    Variation,
    cells_to_pixels,
    cells_touched,
    image_pixels,
    kept_after_region,
    mask_pixels,
    region_fit,
    soft_edge,
    standardised,
    strength_cells,
)
from pipelines.editing import paste_back as paste_back_pixels
from pipelines.model_card import dallekit_version, make_adapter_card, make_model_card, read_training_info
from pipelines.space import require_gradio, write_space
from stage1_dvae import DVAEModel
from stage2_prior import PriorModel, lora
from stage2_prior.modeling_prior import DEFAULT_GUIDANCE_PLAUSIBILITY

ModelT = TypeVar("ModelT", DVAEModel, PriorModel, ScorerModel)
MODEL_INDEX = "model_index.json"
MAX_IMAGES_PER_CALL = 1024
"""The most images one call returns (prompts x `num_images_per_prompt`): a call holds them all in memory until it
returns (`dallekit generate` draws them into one grid too), and 1,024 take minutes on a CPU; draw more in
several calls, another seed each."""
MAX_CANDIDATES_PER_CALL = 8192
"""The most candidates one call draws (prompts x `num_candidates`): their pixels stay in memory until the scorer has
ranked them all."""
COMPONENTS = {
    "vqvae": ("stage1_dvae", "DVAEModel"),
    "prior": ("stage2_prior", "PriorModel"),
    "tokenizer": ("transformers", "PreTrainedTokenizerFast"),
}
OPTIONAL_COMPONENTS = {"scorer": ("scorer", "TextImageScorer")}  # saved and listed only when present
LORA_DIR = "lora"  # the prior's LoRA adapters saved with a pipeline: lora/<name>/, peft's format
REQUIRED_FILES = {
    "vqvae": ("config.json", "model.safetensors"),
    "prior": ("config.json", "model.safetensors"),
    "tokenizer": ("tokenizer.json",),
    "scorer": ("config.json", "model.safetensors", "tokenizer.json"),
}


def pipeline_directory(pretrained_path_or_repo_id: str | Path, revision: str | None = None,
                       token: str | bool | None = None, cache_dir: str | Path | None = None) -> Path:
    """The local directory of a saved pipeline: the path itself, or a Hub repository's snapshot in the Hub cache."""
    location = Path(pretrained_path_or_repo_id)
    if location.is_dir():
        return location
    return Path(snapshot_download(
        str(pretrained_path_or_repo_id), revision=revision, token=token, cache_dir=cache_dir,
        allow_patterns=["*.json", "*.safetensors", "*.txt", "README.md"],  # lora/<name>/ included
    ))


def check_call_limits(num_prompts: int, num_images_per_prompt: int, num_candidates: int | None = None,
                      guidance_scale: float = 3.0, temperature: float = 1.0) -> None:
    """Raise a ValueError, with the limit's reason, for a call that asks for more than `MAX_IMAGES_PER_CALL` images
    or `MAX_CANDIDATES_PER_CALL` candidates, or for a guidance scale or temperature that is not a finite number
    (the prior checks the rest)."""
    images = num_prompts * num_images_per_prompt
    if images > MAX_IMAGES_PER_CALL:
        raise ValueError(
            f"{num_prompts} prompt(s) x {num_images_per_prompt:,} images per prompt is {images:,} images, more than "
            f"the {MAX_IMAGES_PER_CALL:,} one call returns: a call holds all its images in memory until it returns, "
            f"and {MAX_IMAGES_PER_CALL:,} take minutes on a CPU; draw more in several calls, another seed each"
        )
    per_prompt = num_candidates or num_images_per_prompt
    candidates = num_prompts * per_prompt
    if candidates > MAX_CANDIDATES_PER_CALL:
        raise ValueError(
            f"{num_prompts} prompt(s) x {per_prompt:,} candidates per prompt is {candidates:,} candidates, more "
            f"than the {MAX_CANDIDATES_PER_CALL:,} one call draws: their pixels stay in memory until all are ranked; "
            "draw fewer candidates per prompt, or split the prompts over several calls"
        )
    if not math.isfinite(guidance_scale):
        raise ValueError(
            f"guidance_scale must be a finite number, got {guidance_scale!r}: an infinite or NaN scale turns every "
            "logit infinite or NaN, and every image comes out the same; use e.g. 3.0 (1.0 turns guidance off)"
        )
    if not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}: use e.g. 1.0")


def prior_batches(num_prompts: int, per_prompt: int, batch_size: int, whole_prompts: bool = False) -> list[slice]:
    """The rows (prompt-major, `per_prompt` each) of each prior call of at most `batch_size` sequences. With
    `whole_prompts`, a call holds whole prompts, and a prompt with more rows than `batch_size` is split alone,
    so a prompt's rows fall into the same calls whatever prompts surround it."""
    total = num_prompts * per_prompt
    if not whole_prompts:
        return [slice(start, start + batch_size) for start in range(0, total, batch_size)]
    if per_prompt <= batch_size:
        step = batch_size // per_prompt * per_prompt
        return [slice(start, start + step) for start in range(0, total, step)]
    return [slice(start, min(start + batch_size, first + per_prompt))
            for first in range(0, total, per_prompt) for start in range(first, first + per_prompt, batch_size)]


class PipelineLoadError(ValueError):
    """A file of a saved pipeline that is there but cannot be read; `path` names it."""

    def __init__(self, path: Path, problem: str) -> None:
        self.path = path
        super().__init__(f"{path}: {problem} (save the pipeline again, or download a fresh copy)")


@contextmanager
def _reading(path: Path, what: str) -> Iterator[None]:
    """Re-raise a failure inside as a `PipelineLoadError`: `path` is not a valid `what`, and why."""
    try:
        yield
    except PipelineLoadError:
        raise
    except Exception as error:  # JSON, YAML, safetensors, tokenizers and config validation all raise their own
        reason = f"no {error} entry" if isinstance(error, KeyError) else " ".join(str(error).split())
        raise PipelineLoadError(path, f"not a valid {what}: {reason}") from error


def _read_json(path: Path) -> dict:
    """The JSON object in `path`; anything else is a `PipelineLoadError`."""
    with _reading(path, "JSON file"):
        content = json.loads(path.read_text())
    if not isinstance(content, dict):
        raise PipelineLoadError(path, f"expected a JSON object, found a {type(content).__name__}")
    return content


def _load_model(model_class: type[ModelT], folder: Path, **kwargs) -> ModelT:
    """A model component from `folder`: its config.json, then its weights, a failure naming the file at fault."""
    with _reading(folder / "config.json", model_class.config_class.__name__):
        config = model_class.config_class.from_pretrained(folder)
    with _reading(folder / "model.safetensors", f"{model_class.__name__} weights file for that config"):
        return model_class.from_pretrained(folder, config=config, **kwargs)


def _load_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """The caption tokenizer saved in `folder`, a failure naming the folder."""
    with _reading(folder, "tokenizer directory"):
        return PreTrainedTokenizerFast.from_pretrained(folder)


@dataclass
class TextToImageOutput:
    """Images in the requested format (list of PIL, np.ndarray [N, H, W, 3] uint8, or tensor [N, 3, H, W] in [-1, 1])."""

    images: list[Image.Image] | np.ndarray | torch.Tensor
    codes: torch.Tensor  # [N, h, w] image codes, N = len(prompts) * num_images_per_prompt
    scores: torch.Tensor | None = None  # [N] float32 scorer similarity of each image to its prompt; None: no scorer


class TextToImagePipeline:
    """The two stages behind one call: `pipe("a handwritten digit seven", num_images_per_prompt=4).images`.

    `scorer` (optional) scores every image against its prompt and reranks candidates
    (`num_candidates`). `training_info` (dataset, evaluation metrics, an example prompt) goes into
    the model card.
    """

    def __init__(
        self, vqvae: DVAEModel, prior: PriorModel, tokenizer: PreTrainedTokenizerFast,
        training_info: dict | None = None, scorer: TextImageScorer | None = None,
    ) -> None:
        if prior.config.image_vocab_size != vqvae.config.codebook_size:
            raise ValueError(
                f"prior samples {prior.config.image_vocab_size} image codes but the vqvae has "
                f"{vqvae.config.codebook_size}: they were not trained together"
            )
        if prior.config.image_grid_size != vqvae.config.latent_size:
            raise ValueError(
                f"prior samples {prior.config.image_grid_size}x{prior.config.image_grid_size} code grids but the "
                f"vqvae decodes {vqvae.config.latent_size}x{vqvae.config.latent_size}"
            )
        self.vqvae = vqvae.eval()
        self.prior = prior.eval()
        self.tokenizer = tokenizer
        self.scorer = self._checked_scorer(scorer) if scorer is not None else None
        self.training_info = dict(training_info or {})

    def _checked_scorer(self, scorer: TextImageScorer) -> TextImageScorer:
        """`scorer` if it can judge this pipeline's images, else a ValueError saying what to pass."""
        if not isinstance(scorer, TextImageScorer):
            raise ValueError(
                f"scorer must be a scorer.TextImageScorer (model and caption tokenizer), got a "
                f"{type(scorer).__name__}: load one with TextImageScorer.from_pretrained(dir)"
            )
        reads, makes = scorer.model.config, self.vqvae.config
        if (reads.image_size, reads.num_channels) != (makes.image_size, makes.num_channels):
            raise ValueError(
                f"the scorer reads {reads.image_size}px {reads.num_channels}-channel images but the pipeline makes "
                f"{makes.image_size}px {makes.num_channels}-channel ones: train a scorer on these images "
                f"(python -m dallekit.scorer.train --config configs/scorer/<dataset>.yaml --data.image_size {makes.image_size})"
            )
        return scorer

    @property
    def device(self) -> torch.device:
        return next(self.prior.parameters()).device

    def to(self, device: str | torch.device) -> TextToImagePipeline:
        self.vqvae.to(device)
        self.prior.to(device)
        if self.scorer is not None:
            self.scorer.to(device)
        return self

    # ---- files --------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        pretrained_path_or_repo_id: str | Path,
        revision: str | None = None,
        device: str | torch.device | None = None,
        torch_dtype: torch.dtype | None = None,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
    ) -> TextToImagePipeline:
        """Load a pipeline from a local directory or a Hub repository (through the Hub cache)."""
        location = pipeline_directory(pretrained_path_or_repo_id, revision, token, cache_dir)
        index_path = location / MODEL_INDEX
        if not index_path.is_file():
            raise FileNotFoundError(f"{location} has no {MODEL_INDEX}: it is not a saved TextToImagePipeline")
        index = _read_json(index_path)
        if index.get("_class_name") != cls.__name__:
            raise ValueError(f"{index_path} describes a {index.get('_class_name')!r}, not a {cls.__name__}")
        components = [*COMPONENTS, *(name for name in OPTIONAL_COMPONENTS if name in index)]
        missing = [name for name in components if name not in index or not (location / name).is_dir()]
        if missing:
            raise FileNotFoundError(f"{location} lacks the component(s) {', '.join(missing)} named in {MODEL_INDEX}")
        for name in components:
            for filename in REQUIRED_FILES[name]:
                if not (location / name / filename).is_file():
                    raise FileNotFoundError(f"{location / name} has no {filename}: the saved pipeline is incomplete")
            for path in sorted((location / name).glob("*.json")):
                _read_json(path)
        dtype = {"dtype": torch_dtype} if torch_dtype is not None else {}
        card_path = location / "README.md"
        training_info = None
        if card_path.is_file():
            with _reading(card_path, "model card (its YAML metadata)"):
                training_info = read_training_info(ModelCard.load(card_path))
        scorer = None
        if "scorer" in components:
            scorer = TextImageScorer(_load_model(ScorerModel, location / "scorer", **dtype),
                                     _load_tokenizer(location / "scorer"))
        pipe = cls(
            vqvae=_load_model(DVAEModel, location / "vqvae", **dtype),
            prior=_load_model(PriorModel, location / "prior", **dtype),
            tokenizer=_load_tokenizer(location / "tokenizer"),
            scorer=scorer,
            training_info=training_info,
        )
        if LORA_DIR in index:  # adapters saved with the pipeline
            for name in index[LORA_DIR]["adapters"]:
                lora.load_lora(pipe.prior, location / LORA_DIR / name, adapter_name=name)
            pipe.set_adapters(index[LORA_DIR]["active"])
        return pipe.to(device) if device is not None else pipe

    def save_pretrained(
        self, save_directory: str | Path, repo_id: str | None = None, space_id: str | None = None,
    ) -> Path:
        """Write `model_index.json`, the components (safetensors; `scorer/` when there is one) and the model card.

        The card's usage snippet loads from `repo_id` when given, else from `save_directory`; with
        `space_id` the card links to that Space.
        """
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.vqvae.save_pretrained(directory / "vqvae")
        adapters = lora.adapter_names(self.prior)
        base_prior = self.prior
        if adapters:  # the base prior's weights, and each adapter apart in lora/<name>/ (loaded active again)
            base_prior = copy.deepcopy(self.prior)
            lora.delete_adapters(base_prior)
            shutil.rmtree(directory / LORA_DIR, ignore_errors=True)
            for name in adapters:
                lora.save_lora(self.prior, directory / LORA_DIR / name, name)
        base_prior.save_pretrained(directory / "prior")
        self.tokenizer.save_pretrained(directory / "tokenizer")
        components = dict(COMPONENTS)
        if self.scorer is not None:
            self.scorer.save_pretrained(directory / "scorer")
            components |= OPTIONAL_COMPONENTS
        index = {"_class_name": type(self).__name__, "_dallekit_version": dallekit_version()}
        index |= {name: list(library_and_class) for name, library_and_class in components.items()}
        if adapters:
            index[LORA_DIR] = {"adapters": adapters, "active": self.get_active_adapters()}
        (directory / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        make_model_card(self, repo_id or str(directory), self.training_info, space_id).save(directory / "README.md")
        return directory

    def push_to_hub(
        self,
        repo_id: str,
        private: bool | None = None,
        token: str | bool | None = None,
        commit_message: str | None = None,
        revision: str | None = None,
        space_id: str | None = None,
    ) -> CommitInfo:
        """Save the pipeline to a temporary folder and upload it as one commit to the Hub model `repo_id`.

        With `space_id`, also create or update that Gradio Space, whose `app.py` serves the model's
        page (`pipelines.space.write_space`; needs the `web` extra), with the same `private`; the model
        card links to it. The page lives in a Space of its own because a model repository runs no app.
        Returns the model's commit.
        """
        if space_id is not None:
            require_gradio()  # before anything is uploaded
        api = HfApi(token=token)
        message = commit_message or f"Upload {type(self).__name__} (dallekit {dallekit_version()})"
        with tempfile.TemporaryDirectory(prefix="dallekit-upload-") as folder:
            model_folder = self.save_pretrained(Path(folder) / "model", repo_id=repo_id, space_id=space_id)
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            commit = api.upload_folder(repo_id=repo_id, folder_path=model_folder, repo_type="model",
                                       revision=revision, commit_message=message)
            if space_id is not None:
                space_folder = write_space(Path(folder) / "space", repo_id, revision=revision)
                api.create_repo(space_id, private=private, exist_ok=True, repo_type="space", space_sdk="gradio")
                api.upload_folder(repo_id=space_id, folder_path=space_folder, repo_type="space", commit_message=message)
        return commit

    # ---- LoRA adapters of the prior (diffusers' names) ------------------------------------------

    def load_lora_weights(self, pretrained_path_or_repo_id: str | Path, adapter_name: str | None = None,
                          token: str | bool | None = None) -> str:
        """Load a LoRA adapter of the prior (a directory or Hub id in peft's format, saved by `save_lora_weights`
        or `dallekit train --lora-rank`), active alongside those already active; returns its name (default: the
        directory's name)."""
        name = adapter_name or Path(str(pretrained_path_or_repo_id)).name or "default"
        active = self.get_active_adapters()
        lora.load_lora(self.prior, pretrained_path_or_repo_id, adapter_name=name, token=token)
        lora.set_adapters(self.prior, [*active, name])
        return name

    def save_lora_weights(self, save_directory: str | Path, adapter_name: str = "default",
                          base_model: str | None = None) -> Path:
        """Write the prior's adapter `adapter_name` alone, in peft's format, with its model card (`README.md`:
        `base_model`, the pipeline it adapts, and this pipeline's `training_info`)."""
        directory = lora.save_lora(self.prior, save_directory, adapter_name)
        make_adapter_card(self, adapter_name, base_model, self.training_info).save(directory / "README.md")
        return directory

    def push_lora_to_hub(self, repo_id: str, adapter_name: str = "default", base_model: str | None = None,
                         private: bool | None = None, token: str | bool | None = None) -> CommitInfo:
        """Upload the adapter `adapter_name` alone, with its model card, to the Hub model repository `repo_id`."""
        api = HfApi(token=token)
        with tempfile.TemporaryDirectory(prefix="dallekit-lora-") as folder:
            directory = self.save_lora_weights(folder, adapter_name, base_model)
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            message = f"Upload LoRA adapter {adapter_name} (dallekit {dallekit_version()})"
            return api.upload_folder(repo_id=repo_id, folder_path=directory, repo_type="model", commit_message=message)

    def get_list_adapters(self) -> list[str]:
        return lora.adapter_names(self.prior)

    def get_active_adapters(self) -> list[str]:
        layers = lora.lora_layers(self.prior)
        return list(layers[0].active_adapters) if layers else []

    def set_adapters(self, adapter_names: str | list[str], adapter_weights: float | list[float] | None = None) -> None:
        """Sample with the adapters `adapter_names`, each scaled by its weight (1: as trained)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weights = [adapter_weights] if isinstance(adapter_weights, (int, float)) else adapter_weights
        lora.set_adapters(self.prior, names, weights)

    def disable_lora(self) -> None:
        """Sample with the base prior, adapters kept loaded (`enable_lora` switches them back on)."""
        lora.enable_adapters(self.prior, False)

    def enable_lora(self) -> None:
        lora.enable_adapters(self.prior, True)

    def fuse_lora(self) -> None:
        """Merge the active adapters into the prior's weights (`unfuse_lora` takes them out again)."""
        lora.fuse(self.prior)

    def unfuse_lora(self) -> None:
        lora.unfuse(self.prior)

    def unload_lora_weights(self) -> None:
        """Remove every adapter: the base prior's weights and samples come back exactly."""
        lora.delete_adapters(self.prior)

    def delete_adapters(self, adapter_names: str | list[str]) -> None:
        lora.delete_adapters(self.prior, [adapter_names] if isinstance(adapter_names, str) else list(adapter_names))

    # ---- generation ---------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        guidance_scale: float = 3.0,
        negative_prompt: str | list[str] | None = None,
        guidance_plausibility: float = DEFAULT_GUIDANCE_PLAUSIBILITY,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        image: Image.Image | torch.Tensor | None = None,
        mask_image: Image.Image | torch.Tensor | None = None,
        strength: float | None = None,
        variation: Variation = "rows",
        paste_back: bool = False,
        num_candidates: int | None = None,
        scorer: TextImageScorer | None = None,
        batch_size: int = 64,
        output_type: Literal["pil", "np", "pt"] = "pil",
        return_dict: bool = True,
        progress: bool = True,
        compile: bool | Literal["auto"] = "auto",
        decoding: Literal["sequential", "jacobi", "auto"] = "auto",
    ) -> TextToImageOutput | tuple:
        """Images for `prompt` (one or a list), `num_images_per_prompt` each.

        `negative_prompt` (one, or one per prompt) is what classifier-free guidance steers away from: the
        unconditional branch reads it instead of the empty caption (`guidance_scale` > 1 needed).
        `guidance_plausibility` a: guidance only reorders the codes the prompted prior gives at least a times the
        likeliest code's probability (0: plain guidance); it keeps a long-trained prior from being over-guided
        (docs/sampling.md).
        Editing `image` (a PIL image of any size and mode, or a tensor [3, S, S] in [-1, 1]; edited for
        every prompt, which is then optional): `mask_image` (white: repaint) resamples the code cells the
        mask touches and forces the others in raster order (inpainting); `strength` s in [0, 1] resamples
        a share s of the code grid instead (a variation): its last codes (`variation="rows"`, completing
        the image's top) or cells drawn at random (`"random"`). `paste_back` puts the original pixels
        back outside the repainted region, across a soft edge. Inpainting candidates (`num_candidates`)
        are ranked by how likely the prior finds the kept codes that follow the region (a causal prior
        draws the region seeing only what lies above and left of it), plus the scorer's similarity where
        there is a scorer (the two standardised over a prompt's candidates and added).

        The prior samples `num_candidates` (default `num_images_per_prompt`) per prompt, in prior
        calls of at most `batch_size` sequences; the scorer (`scorer`, else `self.scorer`) scores each
        against its prompt and the best `num_images_per_prompt` are kept, highest score first. With
        as many candidates as images nothing is dropped or reordered, and the scores come along when
        there is a scorer. `generator`: one for the call, or a list with one per prompt: each prompt's candidates
        then draw from their own generator, in prior calls that never split a prompt with fewer candidates than
        `batch_size`, so a prompt gets the same images whatever other prompts share the call (what lets
        `dallekit serve` batch its users' requests; diffusers' list has one per image instead).
        `return_dict=False` gives `(images, codes)`, plus `scores` when scored.
        `compile` is the prior's (`PriorModel.generate`): `auto` (default) samples eagerly until a
        setting has spent 10 s sampling, then with the compiled one-token step, so a loop of calls, a
        server or a large batch of candidates compiles and one short call does not; `True` compiles at
        once (seconds to tens of seconds per batch size on a CPU), `False` never. `decoding` is the prior's too:
        `jacobi` drafts and verifies several codes per forward pass (speculative Jacobi decoding: the same
        distribution, other codes for a seed; not with an image to edit), `sequential` one code per pass, `auto`
        the one measured faster (see docs/sampling.md).
        """
        if prompt is None and image is None:
            raise ValueError("give a prompt (a prompt is optional only when editing an image: image=...)")
        prompts = [""] if prompt is None else [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or num_images_per_prompt < 1:
            raise ValueError("give at least one prompt and num_images_per_prompt >= 1")
        negatives = self._negative_prompts(negative_prompt, len(prompts), guidance_scale)
        check_call_limits(len(prompts), num_images_per_prompt, num_candidates, guidance_scale, temperature)
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size (sequences per prior call) must be >= 1, got {batch_size}")
        num_candidates = num_images_per_prompt if num_candidates is None else num_candidates
        if num_candidates < num_images_per_prompt:
            raise ValueError(
                f"num_candidates ({num_candidates}) must be at least num_images_per_prompt ({num_images_per_prompt}): "
                "the best num_images_per_prompt of num_candidates drawn are kept"
            )
        scorer = self._checked_scorer(scorer) if scorer is not None else self.scorer
        per_prompt_generators = isinstance(generator, (list, tuple))
        if per_prompt_generators and len(generator) != len(prompts):
            raise ValueError(f"generator: give one, or a list of one per prompt ({len(prompts)}), got {len(generator)}")
        if per_prompt_generators and image is not None:
            raise ValueError("editing an image takes one generator, not a list of them")
        edit = self._edit(image, mask_image, strength, variation, generator)
        ranks_by_fit = edit is not None and bool(edit.kept_after.any())
        if num_candidates > num_images_per_prompt and scorer is None and not ranks_by_fit:
            raise ValueError(
                f"num_candidates={num_candidates} > num_images_per_prompt={num_images_per_prompt} needs a scorer to "
                "choose the images: pass scorer=TextImageScorer.from_pretrained(dir), or load a pipeline saved with "
                "one (pipe.scorer)"
            )
        text_len = self.prior.config.text_len
        text_ids = encode_captions(self.tokenizer, prompts, text_len).to(self.device)
        text_ids = text_ids.repeat_interleave(num_candidates, dim=0)  # [P * N, text_len], prompt-major
        negative_ids = None
        if negatives is not None:
            negative_ids = encode_captions(self.tokenizer, negatives, text_len).to(self.device)
            negative_ids = negative_ids.repeat_interleave(num_candidates, dim=0)
        captions = [caption for caption in prompts for _ in range(num_candidates)]
        codes, pixels, scores, fits = [], [], [], []
        pasted_weight = soft_edge(edit.repaint) if edit is not None and paste_back else None  # once per call
        batches = prior_batches(len(prompts), num_candidates, batch_size, whole_prompts=per_prompt_generators)
        row_generators = [g for g in generator for _ in range(num_candidates)] if per_prompt_generators else None
        bar = tqdm(total=len(batches), desc="candidate batches", unit="batch", disable=not progress or len(batches) == 1)
        for batch in batches:  # the bar is updated, not iterated (see `PriorModel.generate`)
            rows = len(text_ids[batch])
            batch_generator = row_generators[batch] if per_prompt_generators else generator
            batch_codes = self.prior.generate(
                text_ids[batch], guidance_scale=guidance_scale, guidance_plausibility=guidance_plausibility,
                temperature=temperature, top_k=top_k, top_p=top_p,
                generator=batch_generator, negative_text_ids=None if negative_ids is None else negative_ids[batch],
                init_codes=None if edit is None else edit.codes.expand(rows, -1, -1),
                keep_mask=None if edit is None else edit.kept.expand(rows, -1, -1),
                progress=progress, compile=compile, decoding=decoding,
            )
            codes.append(batch_codes)
            batch_pixels = self._decode(batch_codes)
            if edit is not None and paste_back:
                batch_pixels = paste_back_pixels(batch_pixels, edit.pixels.cpu(), pasted_weight)
            pixels.append(batch_pixels)
            if scorer is not None:
                scores.append(scorer.score(pixels[-1], captions[batch]))
            if ranks_by_fit and num_candidates > num_images_per_prompt:
                fits.append(region_fit(self.prior, text_ids[batch], batch_codes, edit.kept_after))
            bar.update()
        bar.close()
        codes, pixels = torch.cat(codes), torch.cat(pixels)
        scores = torch.cat(scores) if scorer is not None else None
        if num_candidates > num_images_per_prompt:  # keep the best k of each prompt's N, best first
            ranking = scores.view(len(prompts), num_candidates) if scores is not None else None
            if fits:
                fit = torch.cat(fits).cpu().view(len(prompts), num_candidates)
                ranking = standardised(fit) + (standardised(ranking) if ranking is not None else 0)
            ranked = ranking.sort(dim=1, descending=True, stable=True).indices
            first = num_candidates * torch.arange(len(prompts)).unsqueeze(1)  # each prompt's first candidate
            keep = (first + ranked[:, :num_images_per_prompt]).flatten()
            codes, pixels = codes[keep.to(codes.device)], pixels[keep]
            scores = scores[keep] if scores is not None else None
        images: list[Image.Image] | np.ndarray | torch.Tensor = pixels
        if output_type != "pt":
            images = to_uint8(pixels)
            if output_type == "pil":
                images = [Image.fromarray(image) for image in images]
        if return_dict:
            return TextToImageOutput(images=images, codes=codes, scores=scores)
        return (images, codes) if scores is None else (images, codes, scores)

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, H, W] of `codes` (fp32, on the CPU), decoded in the prior's inference precision: bf16 on
        a CPU with native bf16 (twice as fast; pixels move by a few levels of 255 at most), else the caller's."""
        weights = next(self.vqvae.parameters())
        dtype = inference_dtype(weights.device, weights.dtype)
        with torch.autocast(weights.device.type, dtype=dtype, enabled=dtype != weights.dtype):
            return self.vqvae.decode(codes.to(weights.device)).float().cpu()

    def _negative_prompts(self, negative_prompt: str | list[str] | None, num_prompts: int,
                          guidance_scale: float) -> list[str] | None:
        """One negative caption per prompt, or None (the empty caption)."""
        if negative_prompt is None:
            return None
        negatives = [negative_prompt] * num_prompts if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != num_prompts:
            raise ValueError(f"negative_prompt: give one, or one per prompt ({num_prompts}), got {len(negatives)}")
        if guidance_scale == 1.0:
            warnings.warn("negative_prompt has no effect at guidance_scale 1.0 (no guidance): use e.g. 3.0",
                          UserWarning, stacklevel=3)
        return negatives

    def _edit(self, image: Image.Image | torch.Tensor | None, mask_image: Image.Image | torch.Tensor | None,
              strength: float | None, variation: Variation, generator: torch.Generator | None) -> Edit | None:
        """The image's codes and which cells to resample, or None when the call draws from scratch."""
        if image is None:
            if mask_image is not None or strength is not None:
                raise ValueError("mask_image and strength edit an image: pass the image too (image=...)")
            return None
        if (mask_image is None) == (strength is None):
            raise ValueError("editing an image needs mask_image= (white: the region to repaint) or strength= (the "
                             "share of the code grid to resample, in [0, 1]), one of the two")
        size, grid = self.vqvae.config.image_size, self.prior.config.image_grid_size
        pixels = image_pixels(image, size)
        if mask_image is not None:
            repaint = mask_pixels(mask_image, image, size)
            resampled = cells_touched(repaint, grid)
        else:
            resampled = strength_cells(float(strength), grid, variation, generator)
            repaint = cells_to_pixels(resampled, size)
        vqvae_device = next(self.vqvae.parameters()).device
        codes = self.vqvae.encode(pixels.to(vqvae_device)).to(self.device)
        return Edit(pixels=pixels, codes=codes, kept=~resampled.view(1, grid, grid).to(self.device), repaint=repaint,
                    kept_after=kept_after_region(resampled).to(self.device))


@dataclass
class Edit:
    """An image to edit: its pixels [1, 3, S, S] and codes [1, g, g], the cells kept [1, g, g], the repainted
    pixels [S, S], and the kept cells after the first resampled one [g, g] (what inpainting ranks by)."""

    pixels: torch.Tensor
    codes: torch.Tensor
    kept: torch.Tensor
    repaint: torch.Tensor
    kept_after: torch.Tensor  # [g, g]
