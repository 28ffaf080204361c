"""`TextToImagePipeline`: prompt -> caption ids -> prior samples image codes -> stage-1 decoder -> images.

A pipeline directory holds `model_index.json` (pipeline class, dallekit version, components),
one subfolder per component: `vqvae/` (stage 1), `prior/` (stage 2), `tokenizer/` (captions), and
the model card `README.md`. Loading reads safetensors only; a Hub id goes through
`huggingface_hub.snapshot_download`, so the Hub cache and `HF_HUB_OFFLINE=1` work as usual.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from huggingface_hub import CommitInfo, HfApi, ModelCard, snapshot_download
from PIL import Image
from transformers import PreTrainedTokenizerFast

from pipelines.model_card import make_model_card, read_training_info
from stage1_dvae import DVAEModel
from stage2_prior import PriorModel
from stage2_prior.text_tokenizer import encode_captions
from textimage_data import ImageTransform
from training.images import to_uint8

MODEL_INDEX = "model_index.json"
COMPONENTS = {
    "vqvae": ("stage1_dvae", "DVAEModel"),
    "prior": ("stage2_prior", "PriorModel"),
    "tokenizer": ("transformers", "PreTrainedTokenizerFast"),
}


def dallekit_version() -> str:
    try:
        return version("dallekit")
    except PackageNotFoundError:
        return "unknown"


@dataclass
class TextToImageOutput:
    """Images in the requested format (list of PIL, np.ndarray [N, H, W, 3] uint8, or tensor [N, 3, H, W] in [-1, 1])."""

    images: list[Image.Image] | np.ndarray | torch.Tensor
    codes: torch.Tensor  # [N, h, w] image codes, N = len(prompts) * num_images_per_prompt


class TextToImagePipeline:
    """The two stages behind one call: `pipe("a handwritten digit seven", num_images_per_prompt=4).images`.

    `training_info` (dataset, evaluation metrics, an example prompt) goes into the model card.
    """

    def __init__(
        self, vqvae: DVAEModel, prior: PriorModel, tokenizer: PreTrainedTokenizerFast,
        training_info: dict | None = None,
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
        self.training_info = dict(training_info or {})

    @property
    def device(self) -> torch.device:
        return next(self.prior.parameters()).device

    def to(self, device: str | torch.device) -> TextToImagePipeline:
        self.vqvae.to(device)
        self.prior.to(device)
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
        location = Path(pretrained_path_or_repo_id)
        if not location.is_dir():
            location = Path(snapshot_download(
                str(pretrained_path_or_repo_id), revision=revision, token=token, cache_dir=cache_dir,
                allow_patterns=["*.json", "*.safetensors", "*.txt", "README.md"],
            ))
        index_path = location / MODEL_INDEX
        if not index_path.is_file():
            raise FileNotFoundError(f"{location} has no {MODEL_INDEX}: it is not a saved TextToImagePipeline")
        index = json.loads(index_path.read_text())
        if index.get("_class_name") != cls.__name__:
            raise ValueError(f"{index_path} describes a {index.get('_class_name')!r}, not a {cls.__name__}")
        missing = [name for name in COMPONENTS if name not in index or not (location / name).is_dir()]
        if missing:
            raise FileNotFoundError(f"{location} lacks the component(s) {', '.join(missing)} named in {MODEL_INDEX}")
        dtype = {"dtype": torch_dtype} if torch_dtype is not None else {}
        card_path = location / "README.md"
        pipe = cls(
            vqvae=DVAEModel.from_pretrained(location / "vqvae", **dtype),
            prior=PriorModel.from_pretrained(location / "prior", **dtype),
            tokenizer=PreTrainedTokenizerFast.from_pretrained(location / "tokenizer"),
            training_info=read_training_info(ModelCard.load(card_path)) if card_path.is_file() else None,
        )
        return pipe.to(device) if device is not None else pipe

    def save_pretrained(self, save_directory: str | Path, repo_id: str | None = None) -> Path:
        """Write `model_index.json`, the three components (safetensors) and the model card to `save_directory`.

        The card's usage snippet loads from `repo_id` when given, else from `save_directory`.
        """
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.vqvae.save_pretrained(directory / "vqvae")
        self.prior.save_pretrained(directory / "prior")
        self.tokenizer.save_pretrained(directory / "tokenizer")
        index = {"_class_name": type(self).__name__, "_dallekit_version": dallekit_version()}
        index |= {name: list(library_and_class) for name, library_and_class in COMPONENTS.items()}
        (directory / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        make_model_card(self, repo_id or str(directory), self.training_info).save(directory / "README.md")
        return directory

    def push_to_hub(
        self,
        repo_id: str,
        private: bool | None = None,
        token: str | bool | None = None,
        commit_message: str | None = None,
        revision: str | None = None,
    ) -> CommitInfo:
        """Save the pipeline to a temporary folder and upload it as one commit to the Hub model `repo_id`."""
        api = HfApi(token=token)
        with tempfile.TemporaryDirectory(prefix="dallekit-upload-") as folder:
            self.save_pretrained(folder, repo_id=repo_id)
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            return api.upload_folder(
                repo_id=repo_id, folder_path=folder, repo_type="model", revision=revision,
                commit_message=commit_message or f"Upload {type(self).__name__} (dallekit {dallekit_version()})",
            )

    # ---- generation ---------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_images_per_prompt: int = 1,
        guidance_scale: float = 3.0,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        init_image: torch.Tensor | Image.Image | list[Image.Image] | None = None,
        init_rows: int = 0,
        output_type: Literal["pil", "np", "pt"] = "pil",
        return_dict: bool = True,
        progress: bool = True,
    ) -> TextToImageOutput | tuple:
        """Images for `prompt` (one or a list), `num_images_per_prompt` each, in one batched prior call."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or num_images_per_prompt < 1:
            raise ValueError("give at least one prompt and num_images_per_prompt >= 1")
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        text_ids = encode_captions(self.tokenizer, prompts, self.prior.config.text_len).to(self.device)
        text_ids = text_ids.repeat_interleave(num_images_per_prompt, dim=0)
        init_codes = None
        if init_rows:
            if init_image is None:
                raise ValueError("init_rows needs init_image: the image whose first rows of codes are kept")
            init_codes = self.vqvae.encode(self._init_pixels(init_image)).to(self.device)
            init_codes = init_codes.expand(text_ids.shape[0], -1, -1) if init_codes.shape[0] == 1 else (
                init_codes.repeat_interleave(num_images_per_prompt, dim=0))
        codes = self.prior.generate(
            text_ids, guidance_scale=guidance_scale, temperature=temperature, top_k=top_k, top_p=top_p,
            generator=generator, init_codes=init_codes, init_rows=init_rows, progress=progress,
        )
        pixels = self.vqvae.decode(codes.to(next(self.vqvae.parameters()).device)).float().cpu()
        images: list[Image.Image] | np.ndarray | torch.Tensor = pixels
        if output_type != "pt":
            images = to_uint8(pixels)
            if output_type == "pil":
                images = [Image.fromarray(image) for image in images]
        return TextToImageOutput(images=images, codes=codes) if return_dict else (images, codes)

    def _init_pixels(self, init_image: torch.Tensor | Image.Image | list[Image.Image]) -> torch.Tensor:
        if isinstance(init_image, torch.Tensor):
            pixels = init_image if init_image.ndim == 4 else init_image.unsqueeze(0)
        else:
            transform = ImageTransform(self.vqvae.config.image_size)
            images = init_image if isinstance(init_image, list) else [init_image]
            pixels = torch.stack([transform(image) for image in images])
        return pixels.to(next(self.vqvae.parameters()).device)
