"""Train the stage-2 prior on captions and the image codes of a frozen stage-1 tokenizer.

    accelerate launch -m stage2_prior.train --config configs/prior/digits.yaml [--key value ...]

Trains (or loads) the BPE caption tokenizer, encodes every image once with the stage-1 model
(cached, with `augmentation.copies` shifted/scaled variants of each training image), then trains
the prior on integers only, evaluating the validation loss every `eval_every` steps. Writes
checkpoints (`--resume_from_checkpoint latest`), TensorBoard logs, sample grids
`output_dir/images/samples_step_N.png` (one row per validation prompt, decoded by the stage-1
model), the best prior so far `output_dir/best`, and the exports `output_dir/prior` (the best
validation loss unless `training.select_best` is false), `output_dir/tokenizer`, `metrics.json`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from accelerate.logging import get_logger
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from stage1_dvae import DVAEModel
from stage2_prior.configuration_prior import PriorConfig
from stage2_prior.modeling_prior import PriorModel
from stage2_prior.pretokenize import pretokenize
from stage2_prior.text_tokenizer import encode_captions, train_text_tokenizer
from dallekit.data import AugmentationConfig, DataConfig, load_text_image_dataset, training_captions
from dallekit.training.accelerator import create_accelerator, finish_training
from dallekit.training.checkpointing import CheckpointManager, TrainState, resolve_checkpoint
from dallekit.training.config import ConfigError, TrainingConfig, run_from_command_line, to_dict
from dallekit.training.data import iterate_batches
from dallekit.training.images import save_image_grid
from dallekit.training.optim import create_lr_scheduler, create_optimizer
from dallekit.training.reporting import flat_hparams, format_metrics
from dallekit.training.selection import BEST_MODEL_DIR, BestModelSelector

logger = get_logger(__name__)


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


def build_datasets(config: Stage2Config, splits, stage1: DVAEModel, tokenizer: PreTrainedTokenizerFast):
    """Train/validation splits of `text_ids` [text_len] and `codes` [h*w] as torch tensors."""
    encoded = pretokenize(splits, stage1, Path(config.training.output_dir) / "pretokenized", config.augmentation)
    encoded = encoded.select_columns(["text", "codes"])  # list columns (captions, skin tones) cannot be batched

    def add_text_ids(batch: dict[str, list]) -> dict[str, list]:
        return {"text_ids": encode_captions(tokenizer, batch["text"], config.model.text_len).tolist()}

    encoded = encoded.map(add_text_ids, batched=True, desc="tokenizing captions")
    return encoded.with_format("torch", columns=["text_ids", "codes"], output_all_columns=True)


def drop_captions(text_ids: torch.Tensor, model: PriorModel, probability: float) -> torch.Tensor:
    """Replace each caption by the empty caption with `probability` (classifier-free guidance training)."""
    if probability == 0:
        return text_ids
    dropped = torch.rand(text_ids.shape[0], device=text_ids.device) < probability
    empty = model.empty_text_ids(text_ids.shape[0], text_ids.device)
    return torch.where(dropped.unsqueeze(1), empty, text_ids)


@torch.no_grad()
def validation_loss(model: PriorModel, loader: DataLoader, device: torch.device) -> dict[str, float]:
    """Mean weighted, text and image loss over the validation split."""
    was_training = model.training
    model.eval()
    totals, batches = {"loss": 0.0, "text_loss": 0.0, "image_loss": 0.0}, 0
    for batch in loader:
        codes = batch["codes"].to(device)
        grid = model.config.image_grid_size
        input_ids = model.build_input_ids(batch["text_ids"].to(device), codes.view(-1, grid, grid))
        output = model(input_ids, return_logits=False)
        for key in totals:
            totals[key] += getattr(output, key).item()
        batches += 1
    model.train(was_training)
    return {key: value / max(batches, 1) for key, value in totals.items()}


def write_samples(
    config: Stage2Config, model: PriorModel, stage1: DVAEModel, tokenizer: PreTrainedTokenizerFast,
    prompts: list[str], path: Path,
) -> None:
    """A grid with one row per prompt: `samples_per_prompt` guided samples decoded by stage 1."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    text_ids = encode_captions(tokenizer, prompts, config.model.text_len).to(device)
    text_ids = text_ids.repeat_interleave(config.samples_per_prompt, dim=0)
    generator = torch.Generator(device=device).manual_seed(config.training.seed)
    codes = model.generate(text_ids, guidance_scale=config.sample_guidance_scale, top_k=config.sample_top_k,
                           generator=generator)
    save_image_grid(stage1.decode(codes.to(next(stage1.parameters()).device)), path, num_rows=len(prompts))
    (path.with_suffix(".txt")).write_text("\n".join(prompts) + "\n")
    model.train(was_training)


def train(config: Stage2Config) -> dict[str, float]:
    """Run stage-2 training to `training.max_steps` (or an early stop); returns the exported prior's metrics."""
    run = config.training
    stage1 = load_stage1(config)  # before anything is written: a missing tokenizer fails at once
    accelerator = create_accelerator(run, project_name="stage2_prior")
    output_dir = Path(run.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))

    images = load_text_image_dataset(config.data)
    if config.tokenizer_path:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(config.tokenizer_path)
    else:
        tokenizer = train_text_tokenizer(training_captions(images["train"]), config.model.text_vocab_size,
                                         config.model.text_len)
    config.model.text_vocab_size = len(tokenizer)
    config.model.image_vocab_size = stage1.config.codebook_size
    config.model.image_grid_size = stage1.config.latent_size
    config.model.pad_token_id = tokenizer.pad_token_id
    config.model.bos_token_id = tokenizer.bos_token_id
    config.model.eos_token_id = tokenizer.eos_token_id

    # the main process encodes (under the run's mixed precision: bf16 encodes 1.7x faster on CPU), the others
    # load its cache
    with accelerator.main_process_first(), accelerator.autocast():
        splits = build_datasets(config, images, stage1.to(accelerator.device), tokenizer)
    train_loader = DataLoader(
        splits["train"], batch_size=run.batch_size, shuffle=True, drop_last=True, num_workers=run.num_workers,
        generator=torch.Generator().manual_seed(run.seed),
    )
    validation_loader = DataLoader(splits["validation"], batch_size=run.batch_size)
    prompts = list(dict.fromkeys(splits["validation"]["text"]))[: config.sample_prompts]

    model = PriorModel(config.model)
    if run.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
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
        accelerator.init_trackers("stage2_prior", config=flat_hparams(config))

    unwrapped: PriorModel = accelerator.unwrap_model(model, keep_torch_compile=False)  # eval, sampling, export
    selector = BestModelSelector(accelerator, unwrapped, state, run, metric="loss")
    grid = config.model.image_grid_size
    tokens_per_step = run.batch_size * accelerator.num_processes * run.gradient_accumulation_steps * (
        config.model.max_seq_len - 1)
    progress = tqdm(total=run.max_steps, initial=state.step, desc="stage 2", unit="step",
                    disable=not (run.progress and accelerator.is_local_main_process))
    batches = iterate_batches(accelerator, train_loader, start=state.step * run.gradient_accumulation_steps)
    window_start, window_tokens, run_start, run_start_step = time.perf_counter(), 0, time.perf_counter(), state.step
    model.train()
    while state.step < run.max_steps and not selector.should_stop:
        batch = next(batches)
        with accelerator.accumulate(model):
            text_ids = drop_captions(batch["text_ids"], unwrapped, config.p_uncond)
            input_ids = unwrapped.build_input_ids(text_ids, batch["codes"].view(-1, grid, grid))
            output = model(input_ids, return_logits=False)
            accelerator.backward(output.loss)
            if accelerator.sync_gradients and run.max_grad_norm is not None:
                accelerator.clip_grad_norm_(model.parameters(), run.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        window_tokens += input_ids.numel() * accelerator.num_processes
        if not accelerator.sync_gradients:
            continue

        lr_scheduler.step()
        state.step += 1
        state.images_seen += run.batch_size * accelerator.num_processes * run.gradient_accumulation_steps
        progress.update(1)
        if state.step % run.log_every == 0 or state.step == run.max_steps:
            terms = {"loss": output.loss.detach(), "text_loss": output.text_loss.detach(),
                     "image_loss": output.image_loss.detach()}
            terms = {k: v.item() for k, v in accelerator.reduce(terms, "mean").items()}
            logs = {f"train/{k}": v for k, v in terms.items()} | {
                "train/lr": lr_scheduler.get_last_lr()[0],
                "train/tokens_per_second": window_tokens / (time.perf_counter() - window_start),
            }
            accelerator.log(logs, step=state.step)
            progress.set_postfix(loss=f"{terms['loss']:.3f}", image_loss=f"{terms['image_loss']:.3f}",
                                 tok_s=f"{logs['train/tokens_per_second']:.0f}")
            if progress.disable:
                logger.info("step %d: %s", state.step, format_metrics({k.removeprefix("train/"): v for k, v in logs.items()}))
            window_start, window_tokens = time.perf_counter(), 0
        if state.step % run.eval_every == 0 or state.step == run.max_steps:
            metrics = None
            if accelerator.is_main_process:
                metrics = validation_loss(unwrapped, validation_loader, accelerator.device)
                accelerator.log({f"validation/{k}": v for k, v in metrics.items()}, step=state.step)
                logger.info("step %d validation: %s", state.step, format_metrics(metrics))
            selector.update(metrics)
        last = state.step == run.max_steps or selector.should_stop
        if state.step % run.image_every == 0 or last:
            if accelerator.is_main_process:
                write_samples(config, unwrapped, stage1, tokenizer, prompts,
                              output_dir / "images" / f"samples_step_{state.step}.png")
            accelerator.wait_for_everyone()
        if state.step % run.checkpointing_steps == 0 or last:
            checkpoints.save(state.step)
    progress.close()

    seconds = time.perf_counter() - run_start
    metrics = {}
    if accelerator.is_main_process:
        selector.load_best()
        metrics = validation_loss(unwrapped, validation_loader, accelerator.device)
        trained = state.step - run_start_step
        metrics |= {"step": state.step, "train_tokens_per_second": trained * tokens_per_step / seconds if trained else 0.0}
        metrics |= selector.summary()
        unwrapped.save_pretrained(output_dir / "prior")
        tokenizer.save_pretrained(output_dir / "tokenizer")
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        logger.info("final validation: %s; prior (weights of step %d) saved to %s",
                    format_metrics(metrics), selector.export_step, output_dir / "prior")
        if run.push_to_hub:
            unwrapped.push_to_hub(run.hub_model_id, commit_message=f"stage-2 prior, step {selector.export_step}")
    accelerator.wait_for_everyone()
    finish_training(accelerator)
    return metrics


def main(argv: list[str] | None = None) -> None:
    run_from_command_line(Stage2Config, train, argv)


if __name__ == "__main__":
    main()
