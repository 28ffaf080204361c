"""Train the stage-1 image tokenizer.

    accelerate launch -m stage1_dvae.train --config configs/dvae/digits.yaml [--key value ...]

Same command on one CPU, several CPU processes (gloo), GPUs (DDP) or FSDP: pick the launch
config with `accelerate launch --config_file configs/accelerate/<name>.yaml`. Writes
`output_dir/checkpoints/step_N` (resume with `--resume_from_checkpoint latest`), TensorBoard logs,
reconstruction grids `output_dir/images/reconstructions_step_N.png` (originals above
reconstructions), the tokenizer with the best validation reconstruction MSE so far in
`output_dir/best`, and the export `output_dir/model` (`DVAEModel.from_pretrained`): that best
tokenizer, or the last step's when `training.select_best` is false.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import yaml
from accelerate import Accelerator
from accelerate.logging import get_logger
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dallekit.evaluation.reconstruction import evaluate_tokenizer, psnr_from_mse
from stage1_dvae.adversarial import AdversarialLoss, PatchDiscriminator
from stage1_dvae.configuration_dvae import DVAEConfig
from stage1_dvae.modeling_dvae import DVAEModel
from dallekit.data import DataConfig, TextImageCollator, load_text_image_dataset
from dallekit.training.accelerator import create_accelerator, finish_training
from dallekit.training.checkpointing import CheckpointManager, TrainState, resolve_checkpoint
from dallekit.training.config import PRIOR_ONLY_GRADIENT_CHECKPOINTING, TrainingConfig, run_from_command_line, to_dict
from dallekit.training.data import iterate_batches
from dallekit.training.images import save_image_grid
from dallekit.training.optim import create_lr_scheduler, create_optimizer
from dallekit.training.reporting import TrainingClock, flat_hparams, format_metrics
from dallekit.training.schedules import cosine_anneal, linear_warmup
from dallekit.training.selection import BEST_MODEL_DIR, BestModelSelector

logger = get_logger(__name__)


@dataclass
class ScheduleConfig:
    """Annealing of the Gumbel temperature τ and warm-up of the KL weight (DALL·E)."""

    temperature_start: float = 1.0
    temperature_end: float = 1 / 16
    temperature_anneal_steps: int | None = None  # None: anneal over the whole run
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


def _temperature_and_kl_weight(config: Stage1Config, step: int) -> tuple[float, float]:
    schedule = config.schedule
    anneal_steps = schedule.temperature_anneal_steps or config.training.max_steps
    temperature = cosine_anneal(step, schedule.temperature_start, schedule.temperature_end, anneal_steps)
    return temperature, linear_warmup(step, config.model.kl_weight, schedule.kl_warmup_steps)


def _validation_batches(loader: DataLoader):
    for batch in loader:
        yield batch["pixel_values"]


def _any_rank_empty(accelerator: Accelerator, batch_size: int) -> bool:
    """True when this process's batch (or, with several processes, any process's) has no images."""
    if accelerator.num_processes == 1:
        return batch_size == 0
    empty = torch.tensor(int(batch_size == 0), device=accelerator.device)
    return bool(accelerator.reduce(empty, "max"))


def _write_reconstructions(model: DVAEModel, pixel_values: torch.Tensor, path: Path) -> None:
    """PNG grid: the originals on the top row, their reconstructions (encode -> decode) below."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        reconstruction = model.decode(model.encode(pixel_values))
    model.train(was_training)
    save_image_grid(torch.cat([pixel_values.cpu(), reconstruction.cpu()]), path, num_rows=2)


def train(config: Stage1Config) -> dict[str, float]:
    """Run stage-1 training to `training.max_steps` (or an early stop); returns the exported tokenizer's metrics."""
    run = config.training
    accelerator = create_accelerator(run, project_name="stage1_dvae")
    output_dir = Path(run.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))

    splits = load_text_image_dataset(config.data)
    collator = TextImageCollator(config.data.image_size)
    train_loader = DataLoader(
        splits["train"], batch_size=run.batch_size, shuffle=True, drop_last=True,
        collate_fn=collator, num_workers=run.num_workers,
        # Its own generator: starting an epoch must not draw from the global RNG the model samples from.
        generator=torch.Generator().manual_seed(run.seed),
    )
    validation_loader = DataLoader(splits["validation"], batch_size=run.batch_size, collate_fn=collator)
    grid_pixels = next(iter(DataLoader(splits["validation"], batch_size=config.num_grid_images, collate_fn=collator)))[
        "pixel_values"
    ]

    model = DVAEModel(config.model)
    optimizer = create_optimizer(model, run)
    # Stepped by hand once per optimiser step (a prepared scheduler would step once per process).
    lr_scheduler = create_lr_scheduler(optimizer, run)
    state = TrainState()
    accelerator.register_for_checkpointing(lr_scheduler, state)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)

    adversarial = None
    if config.adversarial.enabled:
        adversarial = AdversarialLoss(config.adversarial.loss, config.adversarial.weight)
        discriminator = PatchDiscriminator(
            config.model.num_channels, config.adversarial.disc_hidden_channels, config.adversarial.disc_num_layers
        )
        disc_run = dataclasses.replace(run, learning_rate=config.adversarial.disc_learning_rate or run.learning_rate)
        disc_optimizer = create_optimizer(discriminator, disc_run)
        discriminator, disc_optimizer = accelerator.prepare(discriminator, disc_optimizer)

    checkpoints = CheckpointManager(accelerator, output_dir, run.checkpoints_total_limit, carry=[BEST_MODEL_DIR])
    resume_path = resolve_checkpoint(run.resume_from_checkpoint, output_dir)
    if resume_path is not None:
        checkpoints.load(resume_path)
    if run.report_to != "none":
        accelerator.init_trackers("stage1_dvae", config=flat_hparams(config))

    unwrapped: DVAEModel = accelerator.unwrap_model(model, keep_torch_compile=False)  # eval, grids, export
    selector = BestModelSelector(accelerator, unwrapped, state, run, metric="mse")  # reconstruction MSE
    world_batch = run.batch_size * accelerator.num_processes * run.gradient_accumulation_steps
    progress = tqdm(
        total=run.max_steps, initial=state.step, desc="stage 1", unit="step",
        disable=not (run.progress and accelerator.is_local_main_process),
    )
    batches = iterate_batches(accelerator, train_loader, start=state.step * run.gradient_accumulation_steps)
    window_start, window_images, run_start_step = time.perf_counter(), 0, state.step
    clock = TrainingClock()
    history: list[dict[str, float]] = []  # validation metrics of this run's evaluations, with the training time so far
    pending_skipped = 0
    model.train()
    while state.step < run.max_steps and not selector.should_stop:
        batch = next(batches)
        pixel_values = batch["pixel_values"]
        pending_skipped += batch["num_skipped"]
        if _any_rank_empty(accelerator, pixel_values.shape[0]):
            logger.warning("skipping a batch in which every image was unreadable")
            continue
        temperature, kl_weight = _temperature_and_kl_weight(config, state.step)
        use_adversarial = adversarial is not None and state.step >= config.adversarial.start_step
        with accelerator.accumulate(model):
            output = model(pixel_values, temperature=temperature, kl_weight=kl_weight)
            loss = output.loss
            if use_adversarial:
                generator_loss = adversarial.generator_loss(discriminator(output.reconstruction))
                adaptive = adversarial.adaptive_weight(
                    output.reconstruction_loss, generator_loss, unwrapped.get_last_layer()
                )
                loss = loss + adaptive * generator_loss
            accelerator.backward(loss)
            if accelerator.sync_gradients and run.max_grad_norm is not None:
                accelerator.clip_grad_norm_(model.parameters(), run.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if use_adversarial:
            disc_optimizer.zero_grad(set_to_none=True)  # drop what the generator loss left in its gradients
            disc_loss = adversarial.discriminator_loss(
                discriminator(pixel_values), discriminator(output.reconstruction.detach())
            )
            accelerator.backward(disc_loss)
            disc_optimizer.step()
            disc_optimizer.zero_grad(set_to_none=True)
        window_images += pixel_values.shape[0] * accelerator.num_processes
        if not accelerator.sync_gradients:
            continue

        state.num_skipped += int(accelerator.reduce(torch.tensor(pending_skipped, device=accelerator.device), "sum"))
        pending_skipped = 0
        lr_scheduler.step()
        state.step += 1
        state.images_seen += world_batch
        progress.update(1)
        if state.step % run.log_every == 0 or state.step == run.max_steps:
            terms = {
                "loss": output.loss.detach(),
                "reconstruction_loss": output.reconstruction_loss.detach(),
                "quantizer_loss": output.quantizer_loss.detach(),
                "perplexity": output.perplexity.detach(),
                "mse": ((output.reconstruction.detach().float() - pixel_values.float()) / 2).pow(2).mean(),
            }
            if use_adversarial:
                terms |= {"generator_loss": generator_loss.detach(), "disc_loss": disc_loss.detach(),
                          "adaptive_weight": adaptive}
            terms = {k: v.item() for k, v in accelerator.reduce(terms, "mean").items()}
            elapsed = time.perf_counter() - window_start
            logs = {
                f"train/{key}": value for key, value in terms.items()
            } | {
                "train/psnr": psnr_from_mse(terms["mse"]),
                "train/temperature": temperature,
                "train/kl_weight": kl_weight,
                "train/lr": lr_scheduler.get_last_lr()[0],
                "train/images_per_second": window_images / elapsed,
                "train/skipped_images": state.num_skipped,
            }
            accelerator.log(logs, step=state.step)
            progress.set_postfix(loss=f"{terms['loss']:.4f}", psnr=f"{logs['train/psnr']:.1f}",
                                 img_s=f"{logs['train/images_per_second']:.0f}")
            if progress.disable:
                logger.info("step %d: %s", state.step, format_metrics({k.removeprefix("train/"): v for k, v in logs.items()}))
            window_start, window_images = time.perf_counter(), 0
        with clock.paused():
            if state.step % run.eval_every == 0 or state.step == run.max_steps:
                metrics = None
                if accelerator.is_main_process:
                    metrics = evaluate_tokenizer(unwrapped, _validation_batches(validation_loader))
                    accelerator.log({f"validation/{k}": v for k, v in metrics.items()}, step=state.step)
                    logger.info("step %d validation: %s", state.step, format_metrics(metrics))
                    history.append({"step": state.step, "train_seconds": round(clock.seconds, 2)} | metrics)
                selector.update(metrics)
            last = state.step == run.max_steps or selector.should_stop
            if state.step % run.image_every == 0 or last:
                if accelerator.is_main_process:
                    _write_reconstructions(
                        unwrapped, grid_pixels.to(accelerator.device),
                        output_dir / "images" / f"reconstructions_step_{state.step}.png",
                    )
                accelerator.wait_for_everyone()
            if state.step % run.checkpointing_steps == 0 or last:
                checkpoints.save(state.step)
    progress.close()

    seconds = clock.seconds
    trained_steps = state.step - run_start_step
    metrics = {}
    if accelerator.is_main_process:
        selector.load_best()
        metrics = evaluate_tokenizer(unwrapped, _validation_batches(validation_loader))
        metrics |= {
            "step": state.step,
            "train_seconds": seconds,
            "train_images_per_second": trained_steps * world_batch / seconds if trained_steps else 0.0,
            "skipped_images": state.num_skipped,
        } | selector.summary() | {"history": history}
        model_dir = output_dir / "model"
        unwrapped.save_pretrained(model_dir)
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        logger.info("final validation: %s; tokenizer (weights of step %d) saved to %s",
                    format_metrics({k: v for k, v in metrics.items() if k != "history"}), selector.export_step, model_dir)
        if state.num_skipped:
            logger.warning("skipped %d unreadable image(s) during training", state.num_skipped)
        if run.push_to_hub:
            unwrapped.push_to_hub(run.hub_model_id, commit_message=f"stage-1 tokenizer, step {selector.export_step}")
    accelerator.wait_for_everyone()
    finish_training(accelerator)
    return metrics


def main(argv: list[str] | None = None) -> None:
    run_from_command_line(Stage1Config, train, argv)


if __name__ == "__main__":
    main()
