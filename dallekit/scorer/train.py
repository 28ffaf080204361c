"""Train the contrastive text–image scorer on a dataset's training pairs.

    accelerate launch -m dallekit.scorer.train --config configs/scorer/digits.yaml [--key value ...]

Trains a BPE caption tokenizer on the training captions, decodes every image once, then trains a
`ScorerModel` with the symmetric InfoNCE loss on the training split's (image, caption) pairs,
each image randomly shifted by up to `max_shift` pixels. Every `eval_every` steps it measures, on
the validation split, the contrastive loss over all pairs at once (the selection metric) and
image→text / text→image retrieval top-1 and top-5 over the distinct captions
(`scorer.retrieval_accuracy`). Writes checkpoints (`--resume_from_checkpoint latest`), TensorBoard
logs, the best weights so far `output_dir/best`, and the export `output_dir/scorer` (model and
tokenizer, for `TextImageScorer.from_pretrained`) and `metrics.json`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate.logging import get_logger
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from dallekit.scorer.configuration_scorer import ScorerConfig
from dallekit.scorer.modeling_scorer import ScorerModel
from dallekit.scorer.scoring import TextImageScorer, retrieval_accuracy, unique_captions
from stage2_prior.text_tokenizer import encode_captions, train_text_tokenizer
from dallekit.data import DataConfig, decode_pairs, load_text_image_dataset, training_captions
from dallekit.data.transforms import random_shift
from dallekit.training.accelerator import create_accelerator, finish_training
from dallekit.training.checkpointing import CheckpointManager, TrainState, resolve_checkpoint
from dallekit.training.config import (
    PRIOR_ONLY_GRADIENT_CHECKPOINTING,
    ConfigError,
    TrainingConfig,
    run_from_command_line,
    to_dict,
)
from dallekit.training.data import iterate_batches
from dallekit.training.optim import create_lr_scheduler, create_optimizer
from dallekit.training.reporting import flat_hparams, format_metrics
from dallekit.training.selection import BEST_MODEL_DIR, BestModelSelector

logger = get_logger(__name__)


def _default_training() -> TrainingConfig:
    return TrainingConfig(output_dir="outputs/scorer", max_steps=150, batch_size=128, learning_rate=2e-3,
                          warmup_steps=20, eval_every=50, checkpointing_steps=150, log_every=10)


@dataclass
class ScorerTrainConfig:
    """Everything a scorer run needs; loaded from `configs/scorer/*.yaml` plus overrides.

    `model.image_size` is taken from `data.image_size`, and `model.text_vocab_size` is the BPE
    vocabulary size to train (the model is built with the size reached). The defaults are the
    recipe of `configs/scorer/digits.yaml`.
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: ScorerConfig = field(default_factory=ScorerConfig)
    training: TrainingConfig = field(default_factory=_default_training)
    max_shift: int = 2  # augmentation: shift each training image by up to this many pixels each way; 0: off

    def __post_init__(self) -> None:
        if not isinstance(self.max_shift, int) or self.max_shift < 0:
            raise ValueError(
                f"max_shift must be a number of pixels >= 0 (0 turns the shifts off), got {self.max_shift}"
            )
        if self.data.streaming:
            raise ValueError("data.streaming must be false: the scorer decodes every image of its splits once")
        if self.training.gradient_checkpointing:
            raise ValueError(PRIOR_ONLY_GRADIENT_CHECKPOINTING)
        self.model.image_size = self.data.image_size  # the model reads the images the data holds
        self.model.validate()


def augmentation_generator(seed: int, process_index: int, micro_batch: int) -> torch.Generator:
    """The generator of the shifts of one micro-batch: a function of its position, so a resumed run draws the same."""
    state = np.random.SeedSequence([seed, process_index, micro_batch]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


@torch.no_grad()
def validate(
    model: ScorerModel, pixel_values: torch.Tensor, text_ids: torch.Tensor, caption_ids: torch.Tensor,
    caption_index: torch.Tensor, batch_size: int,
) -> dict[str, float]:
    """Contrastive loss over all N held-out pairs at once, and retrieval over the T distinct captions.

    `text_ids` [N, L] are the pairs' captions, `caption_ids` [T, L] the distinct ones and
    `caption_index` [N] each pair's caption among them.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    image_embeds = torch.cat([model.get_image_features(b.to(device)) for b in pixel_values.split(batch_size)])
    text_embeds = torch.cat([model.get_text_features(b.to(device)) for b in text_ids.split(batch_size)])
    caption_embeds = torch.cat([model.get_text_features(b.to(device)) for b in caption_ids.split(batch_size)])
    loss, _ = model.contrastive_loss(image_embeds, text_embeds)
    model.train(was_training)
    retrieval = retrieval_accuracy((image_embeds @ caption_embeds.T).float().cpu(), caption_index)
    return {"loss": loss.item(), **retrieval, "logit_scale": model.temperature_scale.item()}


def train(config: ScorerTrainConfig) -> dict[str, float]:
    """Run scorer training to `training.max_steps` (or an early stop); returns the exported scorer's metrics."""
    run = config.training
    accelerator = create_accelerator(run, project_name="scorer")
    output_dir = Path(run.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))

    splits = load_text_image_dataset(config.data)
    tokenizer = train_text_tokenizer(training_captions(splits["train"]), config.model.text_vocab_size,
                                     config.model.text_len)
    config.model.text_vocab_size = len(tokenizer)
    config.model.pad_token_id = tokenizer.pad_token_id
    config.model.bos_token_id = tokenizer.bos_token_id
    config.model.eos_token_id = tokenizer.eos_token_id
    train_pixels, _, train_captions = decode_pairs(splits["train"], config.data.image_size)
    # One pair per caption of each image (several with aliases or caption languages), the image shared by index.
    image_index = torch.tensor([index for index, captions in enumerate(train_captions) for _ in captions])
    train_texts = [caption for captions in train_captions for caption in captions]
    if len(train_texts) < run.batch_size:
        raise ConfigError(
            f"the training split has {len(train_texts)} readable pairs, fewer than training.batch_size "
            f"{run.batch_size}: lower training.batch_size"
        )
    validation_pixels, validation_texts, _ = decode_pairs(splits["validation"], config.data.image_size)
    captions, caption_index = unique_captions(validation_texts, tokenizer)
    validation_ids = encode_captions(tokenizer, validation_texts, config.model.text_len)
    caption_ids = encode_captions(tokenizer, captions, config.model.text_len)
    train_loader = DataLoader(
        TensorDataset(image_index, encode_captions(tokenizer, train_texts, config.model.text_len)),
        batch_size=run.batch_size, shuffle=True, drop_last=True, num_workers=run.num_workers,
        generator=torch.Generator().manual_seed(run.seed),
    )

    model = ScorerModel(config.model)
    optimizer = create_optimizer(model, run)
    lr_scheduler = create_lr_scheduler(optimizer, run)  # stepped by hand once per optimiser step
    state = TrainState()
    accelerator.register_for_checkpointing(lr_scheduler, state)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    checkpoints = CheckpointManager(accelerator, output_dir, run.checkpoints_total_limit, carry=[BEST_MODEL_DIR])
    resume_path = resolve_checkpoint(run.resume_from_checkpoint, output_dir)
    if resume_path is not None:
        checkpoints.load(resume_path)
    if run.report_to != "none":
        accelerator.init_trackers("scorer", config=flat_hparams(config))

    unwrapped: ScorerModel = accelerator.unwrap_model(model, keep_torch_compile=False)  # validation, export
    selector = BestModelSelector(accelerator, unwrapped, state, run, metric="loss")

    def validation_metrics() -> dict[str, float]:
        return validate(unwrapped, validation_pixels, validation_ids, caption_ids, caption_index, run.batch_size)

    images_per_step = run.batch_size * accelerator.num_processes * run.gradient_accumulation_steps
    progress = tqdm(total=run.max_steps, initial=state.step, desc="scorer", unit="step",
                    disable=not (run.progress and accelerator.is_local_main_process))
    micro_batch = state.step * run.gradient_accumulation_steps
    batches = iterate_batches(accelerator, train_loader, start=micro_batch)
    window_start, window_steps, run_start, run_start_step = time.perf_counter(), 0, time.perf_counter(), state.step
    model.train()
    while state.step < run.max_steps and not selector.should_stop:
        indices, text_ids = next(batches)
        pixel_values = train_pixels[indices.cpu()].to(text_ids.device)
        if config.max_shift:
            generator = augmentation_generator(run.seed, accelerator.process_index, micro_batch)
            pixel_values = random_shift(pixel_values, config.max_shift, generator)
        micro_batch += 1
        with accelerator.accumulate(model):
            output = model(pixel_values, text_ids)
            accelerator.backward(output.loss)
            if accelerator.sync_gradients and run.max_grad_norm is not None:
                accelerator.clip_grad_norm_(model.parameters(), run.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            continue

        lr_scheduler.step()
        state.step += 1
        state.images_seen += images_per_step
        window_steps += 1
        progress.update(1)
        if state.step % run.log_every == 0 or state.step == run.max_steps:
            loss = accelerator.reduce(output.loss.detach(), "mean").item()
            logs = {"train/loss": loss, "train/lr": lr_scheduler.get_last_lr()[0],
                    "train/logit_scale": unwrapped.temperature_scale.item(),
                    "train/images_per_second": window_steps * images_per_step / (time.perf_counter() - window_start)}
            accelerator.log(logs, step=state.step)
            progress.set_postfix(loss=f"{loss:.3f}", img_s=f"{logs['train/images_per_second']:.0f}")
            if progress.disable:
                logger.info("step %d: %s", state.step,
                            format_metrics({k.removeprefix("train/"): v for k, v in logs.items()}))
            window_start, window_steps = time.perf_counter(), 0
        if state.step % run.eval_every == 0 or state.step == run.max_steps:
            metrics = None
            if accelerator.is_main_process:
                metrics = validation_metrics()
                accelerator.log({f"validation/{k}": v for k, v in metrics.items()}, step=state.step)
                logger.info("step %d validation: %s", state.step, format_metrics(metrics))
            selector.update(metrics)
        if state.step % run.checkpointing_steps == 0 or state.step == run.max_steps or selector.should_stop:
            checkpoints.save(state.step)
    progress.close()

    seconds = time.perf_counter() - run_start
    metrics = {}
    if accelerator.is_main_process:
        selector.load_best()
        trained = state.step - run_start_step
        metrics = validation_metrics() | {
            "step": state.step, "train_seconds": seconds,
            "train_images_per_second": trained * images_per_step / seconds if trained else 0.0,
        } | selector.summary()
        TextImageScorer(unwrapped, tokenizer).save_pretrained(output_dir / "scorer")
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        logger.info("final validation: %s; scorer (weights of step %d) saved to %s",
                    format_metrics(metrics), selector.export_step, output_dir / "scorer")
        if run.push_to_hub:
            message = f"text-image scorer, step {selector.export_step}"
            unwrapped.push_to_hub(run.hub_model_id, commit_message=message)
            tokenizer.push_to_hub(run.hub_model_id, commit_message=message)
    accelerator.wait_for_everyone()
    finish_training(accelerator)
    return metrics


def main(argv: list[str] | None = None) -> None:
    run_from_command_line(ScorerTrainConfig, train, argv)


if __name__ == "__main__":
    main()
