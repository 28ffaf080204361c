"""The stage-2 prior's recipe for the one training loop (`dallekit.training.loop`).

    accelerate launch -m stage2_prior.train --config configs/prior/digits.yaml [--key value ...]

What is the prior's own: the BPE caption tokenizer (trained, or loaded from `tokenizer_path`), the
codes of every image encoded once by the frozen stage-1 model (shard by shard, each process its
shards, cached and resumable, a stream with `data.streaming` too; see `stage2_prior.pretokenize`),
with `augmentation.copies` shifted/scaled variants of each training image, then read memory-mapped;
caption dropout for classifier-free guidance, the validation loss it is selected by, sample grids
`output_dir/images/samples_step_N.png` (one row per validation prompt, decoded by the stage-1 model)
and the exports `output_dir/prior` and `output_dir/tokenizer`. The loop writes checkpoints
(`--resume_from_checkpoint latest`), logs, `best/` and `metrics.json`.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from huggingface_hub import HfApi
from torch.utils.data import DataLoader

from dallekit.data import AugmentationConfig, DataConfig, load_text_image_dataset, training_captions
from dallekit.data.cache import source_fingerprint
from dallekit.text_tokenizer import encode_captions, load_or_train_text_tokenizer
from dallekit.training.config import ConfigError, TrainingConfig, run_from_command_line
from dallekit.training.data import training_loader
from dallekit.training.images import save_image_grid
from dallekit.training.loop import StepOutput, TrainingTask
from dallekit.training.loop import train as train_task
from stage1_dvae import DVAEModel
from stage2_prior.configuration_prior import PriorConfig
from stage2_prior.lora import LORA_TARGET_MODULES, add_lora, delete_adapters, save_lora
from stage2_prior.modeling_prior import PriorModel
from stage2_prior.pretokenize import pretokenize

logger = logging.getLogger(__name__)


@dataclass
class LoraSettings:
    """LoRA adapters for the prior (peft): `rank` 0 trains every weight; above 0, only the adapters train (on the
    prior that `training.init_from` names), and the run exports them in peft's format (`output_dir/lora`)."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGET_MODULES))

    def __post_init__(self) -> None:
        if self.rank < 0 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError(f"lora needs rank >= 0, alpha > 0 and dropout in [0, 1), got rank {self.rank}, "
                             f"alpha {self.alpha}, dropout {self.dropout}")
        unknown = sorted(set(self.target_modules) - set(LORA_TARGET_MODULES))
        if unknown or not self.target_modules:
            raise ValueError(f"lora.target_modules must name some of {', '.join(LORA_TARGET_MODULES)}, got "
                             f"{self.target_modules}")


@dataclass
class Stage2Config:
    """Everything a stage-2 run needs; loaded from `configs/prior/*.yaml` plus overrides.

    `model.text_vocab_size` is the BPE vocabulary size to train; the prior is then built with
    the size actually reached, `image_vocab_size`/`image_grid_size` from the stage-1 model.
    """

    stage1_model: str = "outputs/dvae-digits/model"
    stage1_subfolder: str = ""
    tokenizer_path: str | None = None  # a saved caption tokenizer; None: train one on the captions
    data: DataConfig = field(default_factory=DataConfig)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    model: PriorConfig = field(default_factory=PriorConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    p_uncond: float = 0.1
    sample_prompts: int = 4
    samples_per_prompt: int = 6
    sample_guidance_scale: float = 3.0
    sample_top_k: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.p_uncond < 1:
            raise ValueError(f"p_uncond must be in [0, 1), got {self.p_uncond}")
        if self.sample_prompts < 1 or self.samples_per_prompt < 1:
            raise ValueError("sample_prompts and samples_per_prompt must be >= 1")
        if self.training.init_from and not self.tokenizer_path:
            raise ValueError("training.init_from needs tokenizer_path: the caption tokenizer the prior there reads "
                             "(a saved pipeline's tokenizer/)")
        if self.lora.rank and not self.training.init_from:
            raise ValueError("lora.rank > 0 adapts a trained prior: name it in training.init_from (a saved "
                             "pipeline's prior/)")


def load_stage1(config: Stage2Config) -> DVAEModel:
    """The frozen stage-1 tokenizer, with a clear error when it is missing."""
    try:
        model = DVAEModel.from_pretrained(config.stage1_model, subfolder=config.stage1_subfolder)
    except OSError as error:
        raise ConfigError(
            f"no stage-1 tokenizer at stage1_model={config.stage1_model!r}: train one first "
            f"(accelerate launch -m stage1_dvae.train --config configs/dvae/digits.yaml) or point "
            f"stage1_model at its directory"
        ) from error
    if model.config.image_size != config.data.image_size:
        raise ConfigError(
            f"the stage-1 tokenizer works on {model.config.image_size}px images but data.image_size is "
            f"{config.data.image_size}; set data.image_size to {model.config.image_size}"
        )
    return model.eval().requires_grad_(False)


def drop_captions(text_ids: torch.Tensor, model: PriorModel, probability: float) -> torch.Tensor:
    """Replace each caption by the empty caption with `probability` (classifier-free guidance training)."""
    if probability == 0:
        return text_ids
    dropped = torch.rand(text_ids.shape[0], device=text_ids.device) < probability
    empty = model.empty_text_ids(text_ids.shape[0], text_ids.device)
    return torch.where(dropped.unsqueeze(1), empty, text_ids)


class Stage2Task(TrainingTask[Stage2Config]):
    """The prior: next-token loss over [caption ; image codes], selected by validation loss."""

    name = "stage 2"
    metric = "loss"
    counts_tokens = True

    def setup(self, accelerator: Accelerator) -> None:
        config = self.config
        self.stage1 = load_stage1(config).to(accelerator.device)
        images = load_text_image_dataset(config.data)
        self.tokenizer = load_or_train_text_tokenizer(config.tokenizer_path, training_captions(images["train"]),
                                                      config.model.text_vocab_size, config.model.text_len)
        config.model.text_vocab_size = len(self.tokenizer)
        config.model.image_vocab_size = self.stage1.config.codebook_size
        config.model.image_grid_size = self.stage1.config.latent_size
        config.model.pad_token_id = self.tokenizer.pad_token_id
        config.model.bos_token_id = self.tokenizer.bos_token_id
        config.model.eos_token_id = self.tokenizer.eos_token_id
        # each process encodes its share (under the run's mixed precision: bf16 encodes 1.7x faster on CPU)
        with accelerator.autocast():
            encoded = pretokenize(images, self.stage1, Path(self.run.output_dir) / "pretokenized",
                                  config.augmentation, accelerator=accelerator,
                                  source_fingerprint=source_fingerprint(config.data) if config.data.streaming else None)
        self.num_skipped = sum(encoded.num_skipped.values())
        encoded = encoded.select_columns(["text", "codes"])  # list columns (captions, skin tones) cannot be batched

        def add_text_ids(batch: dict[str, list]) -> dict[str, list]:
            return {"text_ids": encode_captions(self.tokenizer, batch["text"], config.model.text_len).tolist()}

        with accelerator.main_process_first():  # one process writes the map's cache, the others read it
            encoded = encoded.map(add_text_ids, batched=True, desc="tokenizing captions")
        self.splits = encoded.with_format("torch", columns=["text_ids", "codes"], output_all_columns=True)
        self.prompts = list(dict.fromkeys(self.splits["validation"]["text"]))[: config.sample_prompts]

    def build_model(self) -> PriorModel:
        model = PriorModel(self.config.model)
        if self.run.gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        return model

    def adapt(self, model: PriorModel) -> PriorModel:
        """With `lora.rank`: the prior frozen, LoRA adapters added to its decoder (only they train)."""
        settings = self.config.lora
        if settings.rank:
            model.requires_grad_(False)
            add_lora(model, settings.rank, settings.alpha, settings.target_modules, settings.dropout)
            trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
            total = sum(parameter.numel() for parameter in model.parameters())
            logger.info("LoRA rank %d on %s: %s trainable parameters of %s (%.2f%%)", settings.rank,
                        ", ".join(settings.target_modules), f"{trainable:,}", f"{total:,}", 100 * trainable / total)
        return model

    def train_loader(self) -> DataLoader:
        return training_loader(self.splits["train"], self.run, self.config.data.shuffle_buffer_size)

    def validation_loader(self) -> DataLoader:
        return DataLoader(self.splits["validation"], batch_size=self.run.batch_size)

    def prepare(self, accelerator: Accelerator, model: torch.nn.Module) -> None:
        self.prior: PriorModel = accelerator.unwrap_model(model, keep_torch_compile=False)

    def _input_ids(self, text_ids: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        grid = self.config.model.image_grid_size
        return self.prior.build_input_ids(text_ids, codes.view(-1, grid, grid))

    def training_step(self, model: torch.nn.Module, batch: dict[str, Any], step: int, micro_batch: int) -> StepOutput:
        text_ids = drop_captions(batch["text_ids"], self.prior, self.config.p_uncond)
        input_ids = self._input_ids(text_ids, batch["codes"])
        output = model(input_ids, return_logits=False)
        return StepOutput(loss=output.loss, terms={"text_loss": output.text_loss.detach(),
                                                   "image_loss": output.image_loss.detach()},
                          num_examples=input_ids.shape[0], num_tokens=input_ids.shape[0] * (input_ids.shape[1] - 1))

    @torch.no_grad()
    def validate(self, model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator) -> dict[str, float]:
        """Weighted, text and image loss, each the mean over validation examples (every batch weighted by its size)."""
        was_training = model.training
        model.eval()
        losses: dict[str, list[torch.Tensor]] = {"loss": [], "text_loss": [], "image_loss": []}
        for batch in loader:
            output = model(self._input_ids(batch["text_ids"], batch["codes"]), return_logits=False)
            size = batch["codes"].shape[0]
            for key, values in losses.items():  # the batch mean once per example, so gathering drops padding
                values.append(accelerator.gather_for_metrics(getattr(output, key).detach().float().expand(size)))
        model.train(was_training)
        return {key: torch.cat(values).mean().item() for key, values in losses.items()}

    def write_grid(self, model: PriorModel, step: int) -> None:
        """One row per prompt: `samples_per_prompt` guided samples decoded by stage 1."""
        config = self.config
        model.eval()
        device = next(model.parameters()).device
        text_ids = encode_captions(self.tokenizer, self.prompts, config.model.text_len).to(device)
        text_ids = text_ids.repeat_interleave(config.samples_per_prompt, dim=0)
        generator = torch.Generator(device=device).manual_seed(self.run.seed)
        codes = model.generate(text_ids, guidance_scale=config.sample_guidance_scale, top_k=config.sample_top_k,
                               generator=generator)
        path = Path(self.run.output_dir) / "images" / f"samples_step_{step}.png"
        save_image_grid(self.stage1.decode(codes.to(next(self.stage1.parameters()).device)), path,
                        num_rows=len(self.prompts))
        path.with_suffix(".txt").write_text("\n".join(self.prompts) + "\n")
        model.train()

    def export(self, model: PriorModel, output_dir: Path) -> Path:
        """The prior and its tokenizer; with LoRA, the adapter alone in peft's format (`lora/`) beside the base
        prior it adapts (`prior/`, as `training.init_from` gave it)."""
        self.tokenizer.save_pretrained(output_dir / "tokenizer")
        if not self.config.lora.rank:
            model.save_pretrained(output_dir / "prior")
            return output_dir / "prior"
        save_lora(model, output_dir / "lora")
        base = copy.deepcopy(model)
        delete_adapters(base)
        base.save_pretrained(output_dir / "prior")
        return output_dir / "lora"

    def push_to_hub(self, model: PriorModel, repo_id: str, message: str) -> None:
        """The prior and the caption tokenizer it reads, in one repository (both load with `from_pretrained`);
        with LoRA, the adapter alone (`TextToImagePipeline.load_lora_weights` reads it)."""
        if self.config.lora.rank:
            with tempfile.TemporaryDirectory(prefix="dallekit-lora-") as folder:
                HfApi().create_repo(repo_id, exist_ok=True)
                HfApi().upload_folder(repo_id=repo_id, folder_path=save_lora(model, folder), commit_message=message)
            return
        model.push_to_hub(repo_id, commit_message=message)
        self.tokenizer.push_to_hub(repo_id, commit_message=message)


def train(config: Stage2Config, accelerator: Accelerator | None = None) -> dict[str, Any]:
    """Train the prior to `training.max_steps` (or an early stop); returns the run's `metrics.json`."""
    return train_task(Stage2Task(config), accelerator)


def main(argv: list[str] | None = None) -> None:
    run_from_command_line(Stage2Config, train, argv)


if __name__ == "__main__":
    main()
