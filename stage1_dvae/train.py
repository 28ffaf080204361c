"""The stage-1 image tokenizer's recipe for the one training loop (`dallekit.training.loop`).

    accelerate launch -m stage1_dvae.train --config configs/dvae/digits.yaml [--key value ...]

Same command on one CPU, several CPU processes (gloo), GPUs (DDP) or FSDP: pick the launch
config with `accelerate launch --config_file configs/accelerate/<name>.yaml`. What is the
tokenizer's own: the Gumbel temperature and KL schedules, the optional PatchGAN discriminator
(stepped after the tokenizer on the same batch), the validation reconstruction MSE it is selected
by, reconstruction grids `output_dir/images/reconstructions_step_N.png` (originals above
reconstructions) and the export `output_dir/model` (`DVAEModel.from_pretrained`). The loop writes
checkpoints (`--resume_from_checkpoint latest`), logs, `best/` and `metrics.json`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType
from torch.utils.data import DataLoader

from dallekit.data import DataConfig, TextImageCollator, load_text_image_dataset
from dallekit.training.config import (
    PRIOR_ONLY_GRADIENT_CHECKPOINTING,
    ConfigError,
    TrainingConfig,
    run_from_command_line,
)
from dallekit.training.data import training_loader
from dallekit.training.images import save_image_grid
from dallekit.training.loop import StepOutput, TrainingTask
from dallekit.training.loop import train as train_task
from dallekit.training.optim import create_optimizer
from dallekit.training.schedules import cosine_anneal, linear_warmup
from stage1_dvae.adversarial import AdversarialLoss, PatchDiscriminator
from stage1_dvae.configuration_dvae import DVAEConfig
from stage1_dvae.metrics import reconstruction_metrics
from stage1_dvae.modeling_dvae import DVAEModel

logger = get_logger(__name__)


@dataclass
class ScheduleConfig:
    """Annealing of the Gumbel temperature τ and warm-up of the KL weight (DALL·E)."""

    temperature_start: float = 1.0
    temperature_end: float = 1 / 16
    temperature_anneal_steps: int | None = None  # None: over the whole run (the steps a time budget plans)
    kl_warmup_steps: int = 500

    def __post_init__(self) -> None:
        if not 0 < self.temperature_end <= self.temperature_start:
            raise ValueError(
                f"schedule needs 0 < temperature_end <= temperature_start, got "
                f"{self.temperature_end} and {self.temperature_start}"
            )
        if self.kl_warmup_steps < 0:
            raise ValueError(f"schedule.kl_warmup_steps must be >= 0, got {self.kl_warmup_steps}")


@dataclass
class AdversarialConfig:
    """The optional PatchGAN loss (VQGAN), off by default."""

    enabled: bool = False
    start_step: int = 2000
    loss: Literal["hinge", "non_saturating"] = "hinge"
    weight: float = 0.5
    disc_hidden_channels: int = 64
    disc_num_layers: int = 2
    disc_learning_rate: float | None = None  # None: training.learning_rate

    def __post_init__(self) -> None:
        if self.start_step < 0 or self.weight < 0 or self.disc_num_layers < 1:
            raise ValueError("adversarial.start_step and adversarial.weight must be >= 0, disc_num_layers >= 1")


@dataclass
class Stage1Config:
    """Everything a stage-1 run needs; loaded from `configs/dvae/*.yaml` plus overrides."""

    data: DataConfig = field(default_factory=DataConfig)
    model: DVAEConfig = field(default_factory=DVAEConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    num_grid_images: int = 8

    def __post_init__(self) -> None:
        if self.model.image_size != self.data.image_size:
            raise ValueError(
                f"model.image_size ({self.model.image_size}) differs from data.image_size "
                f"({self.data.image_size}); set both to the same value"
            )
        if self.adversarial.enabled and self.training.gradient_accumulation_steps != 1:
            raise ValueError(
                "adversarial.enabled needs training.gradient_accumulation_steps = 1 (the discriminator "
                "steps on every batch); raise training.batch_size instead"
            )
        if self.num_grid_images < 1:
            raise ValueError(f"num_grid_images must be >= 1, got {self.num_grid_images}")
        if self.training.gradient_checkpointing:
            raise ValueError(PRIOR_ONLY_GRADIENT_CHECKPOINTING)


def dead_code_warning(model: DVAEConfig, images_per_step: int) -> str | None:
    """A warning when the VQ-VAE's `dead_code_threshold` restarts codes in use: the threshold counts a code's uses
    per step (an EMA), and above half the average uses per step (`images_per_step` x positions / codes), codes
    that are merely less frequent than average keep being restarted (measured: a third of the codebook unused)."""
    if model.quantizer != "vq" or not model.dead_code_threshold:
        return None
    average_uses = images_per_step * model.latent_size**2 / model.codebook_size
    if model.dead_code_threshold <= average_uses / 2:
        return None
    return (
        f"model.dead_code_threshold {model.dead_code_threshold:g} is above half the average uses of a code per step "
        f"({images_per_step} images x {model.latent_size**2} positions / {model.codebook_size} codes = "
        f"{average_uses:g}): codes in use will keep being restarted; set it to {average_uses / 4:g} or raise "
        "training.batch_size"
    )


def _temperature_and_kl_weight(config: Stage1Config, step: int, planned_steps: int) -> tuple[float, float]:
    schedule = config.schedule
    anneal_steps = schedule.temperature_anneal_steps or planned_steps
    temperature = cosine_anneal(step, schedule.temperature_start, schedule.temperature_end, anneal_steps)
    return temperature, linear_warmup(step, config.model.kl_weight, schedule.kl_warmup_steps)


class Stage1Task(TrainingTask[Stage1Config]):
    """The image tokenizer: reconstruction (+ quantizer, + optional adversarial) loss, selected by validation MSE."""

    name = "stage 1"
    metric = "mse"
    forward_methods = ("encode", "decode")

    def setup(self, accelerator: Accelerator) -> None:
        if self.config.adversarial.enabled and accelerator.distributed_type == DistributedType.FSDP:
            # Refused before any work, not at adversarial.start_step: VQGAN's adaptive weight differentiates the
            # losses with respect to the decoder's last weight, which FSDP holds sharded outside its unit's forward
            # (not the tensor the graph used), and accelerate applies one auto-wrap policy to the tokenizer and
            # the discriminator alike (a class-based one names classes the discriminator lacks).
            raise ConfigError(
                "adversarial.enabled is not supported under FSDP: train the tokenizer with DDP "
                "(configs/accelerate/multi_gpu.yaml; it is small enough for every process to hold it whole)"
            )
        warning = dead_code_warning(self.config.model, self.run.batch_size * accelerator.num_processes)
        if warning:
            logger.warning(warning)
        self.splits = load_text_image_dataset(self.config.data)
        self.collator = TextImageCollator(self.config.data.image_size)
        grid_loader = DataLoader(self.splits["validation"], batch_size=self.config.num_grid_images,
                                 collate_fn=self.collator)
        self.grid_pixels = next(iter(grid_loader))["pixel_values"]
        self.device = accelerator.device

    def build_model(self) -> DVAEModel:
        return DVAEModel(self.config.model)

    def train_loader(self) -> DataLoader:
        return training_loader(self.splits["train"], self.run, self.config.data.shuffle_buffer_size, self.collator)

    def validation_loader(self) -> DataLoader:
        return DataLoader(self.splits["validation"], batch_size=self.run.batch_size, collate_fn=self.collator)

    def prepare(self, accelerator: Accelerator, model: torch.nn.Module) -> None:
        self.tokenizer: DVAEModel = accelerator.unwrap_model(model, keep_torch_compile=False)
        self.adversarial = None
        settings = self.config.adversarial
        if settings.enabled:
            self.adversarial = AdversarialLoss(settings.loss, settings.weight)
            discriminator = PatchDiscriminator(self.config.model.num_channels, settings.disc_hidden_channels,
                                               settings.disc_num_layers)
            disc_run = dataclasses.replace(self.run, learning_rate=settings.disc_learning_rate or self.run.learning_rate)
            self.discriminator, self.disc_optimizer = accelerator.prepare(
                discriminator, create_optimizer(discriminator, disc_run))

    def is_empty(self, batch: dict[str, Any]) -> bool:
        return batch["pixel_values"].shape[0] == 0

    def _uses_adversarial(self, step: int) -> bool:
        return self.adversarial is not None and step >= self.config.adversarial.start_step

    def training_step(self, model: torch.nn.Module, batch: dict[str, Any], step: int, micro_batch: int) -> StepOutput:
        pixel_values = batch["pixel_values"]
        temperature, kl_weight = _temperature_and_kl_weight(self.config, step, self.planned_steps)
        output = model(pixel_values, temperature=temperature, kl_weight=kl_weight)
        terms = {
            "reconstruction_loss": output.reconstruction_loss.detach(),
            "quantizer_loss": output.quantizer_loss.detach(),
            "perplexity": output.perplexity.detach(),
            "mse": ((output.reconstruction.detach().float() - pixel_values.float()) / 2).pow(2).mean(),
        }
        loss = output.loss
        if self._uses_adversarial(step):
            generator_loss = self.adversarial.generator_loss(self.discriminator(output.reconstruction))
            adaptive = self.adversarial.adaptive_weight(
                output.reconstruction_loss, generator_loss, self.tokenizer.get_last_layer())
            loss = loss + adaptive * generator_loss
            terms |= {"generator_loss": generator_loss.detach(), "adaptive_weight": torch.as_tensor(adaptive, device=loss.device)}
        self.reconstruction = output.reconstruction
        return StepOutput(loss=loss, terms=terms, num_examples=pixel_values.shape[0])

    def after_optimizer_step(self, accelerator: Accelerator, batch: dict[str, Any], output: StepOutput,
                             step: int) -> None:
        """The discriminator's step on the same batch, once the adversarial loss is on."""
        if not self._uses_adversarial(step):
            return
        self.disc_optimizer.zero_grad(set_to_none=True)  # drop what the generator loss left in its gradients
        disc_loss = self.adversarial.discriminator_loss(
            self.discriminator(batch["pixel_values"]), self.discriminator(self.reconstruction.detach()))
        accelerator.backward(disc_loss)
        self.disc_optimizer.step()
        self.disc_optimizer.zero_grad(set_to_none=True)
        output.terms["disc_loss"] = disc_loss.detach()

    def log_values(self, step: int) -> dict[str, float]:
        temperature, kl_weight = _temperature_and_kl_weight(self.config, max(step - 1, 0), self.planned_steps)
        return {"temperature": temperature, "kl_weight": kl_weight}

    def validate(self, model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator) -> dict[str, float]:
        tokenizer = accelerator.unwrap_model(model, keep_torch_compile=False)
        return reconstruction_metrics(tokenizer, (batch["pixel_values"] for batch in loader),
                                      gather=accelerator.gather_for_metrics)

    def write_grid(self, model: DVAEModel, step: int) -> None:
        """The originals on the top row, their reconstructions (encode -> decode) below."""
        pixel_values = self.grid_pixels.to(self.device)
        with torch.no_grad():
            reconstruction = model.eval().decode(model.encode(pixel_values))
        model.train()
        save_image_grid(torch.cat([pixel_values.cpu(), reconstruction.cpu()]),
                        Path(self.run.output_dir) / "images" / f"reconstructions_step_{step}.png", num_rows=2)

    def export(self, model: DVAEModel, output_dir: Path) -> Path:
        model.save_pretrained(output_dir / "model")
        return output_dir / "model"


def train(config: Stage1Config, accelerator: Accelerator | None = None) -> dict[str, Any]:
    """Train the image tokenizer to `training.max_steps` (or an early stop); returns the run's `metrics.json`."""
    return train_task(Stage1Task(config), accelerator)


def main(argv: list[str] | None = None) -> None:
    run_from_command_line(Stage1Config, train, argv)


if __name__ == "__main__":
    main()
