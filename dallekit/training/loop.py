"""The one training loop every dallekit model trains with: the image tokenizer, the prior and the scorer.

A model hands the loop a `TrainingTask`: what is its own (its data, how to build it, the loss of a
batch, validation metrics, the image grid, the export). The loop does the rest, the same way for all:

- mixed precision, gradient accumulation and clipping (accelerate), AdamW with warmup and cosine;
- atomic checkpoints every `checkpointing_steps`, the last `checkpoints_total_limit` kept, exact resume
  (the data position is the number of micro-batches consumed, empty batches included, and for a stream
  each process's pass and offset in it: `training.data`);
- validation every `eval_every` steps on every process, each on its share, gathered
  (`gather_for_metrics`); the best weights so far in `output_dir/best`, early stop on patience;
- logs (trackers, progress bar or log lines), throughput over training time only (validation, grids,
  checkpoints and logging are left out), unreadable images counted;
- `config.yaml` written once the model's sizes are known, `metrics.json` with one schema for every
  model, the export of the selected weights, and an optional push to the Hub.

Correct under one process, DDP and FSDP (FSDP2): validation runs the sharded model on every rank;
the best weights, the grids and the export take the full weights with `accelerator.get_state_dict`
on every rank and are written once, by the main process, from a full copy of the model.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
import yaml
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, set_seed
from safetensors.torch import load_model
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from dallekit.training.accelerator import create_accelerator, finish_training
from dallekit.training.budget import BudgetFit
from dallekit.training.checkpointing import (
    CheckpointManager,
    TrainState,
    list_checkpoints,
    resolve_checkpoint,
    write_directory,
)
from dallekit.training.config import ConfigError, TrainingConfig, to_dict
from dallekit.training.data import gather_positions, iterate_batches, resume_position
from dallekit.training.optim import create_lr_scheduler, create_optimizer
from dallekit.training.reporting import flat_hparams, format_metrics

logger = get_logger(__name__)  # the main process logs, the others stay quiet

BEST_MODEL_DIR = "best"
ConfigT = TypeVar("ConfigT")


@dataclass
class StepOutput:
    """What one micro-batch's forward pass gives the loop."""

    loss: torch.Tensor  # the loss to backpropagate
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # logged, averaged over processes
    num_examples: int = 0  # examples (images, or caption–image sequences) in the micro-batch on this process
    num_tokens: int = 0  # tokens in the micro-batch on this process, for models that count them


class TrainingTask(ABC, Generic[ConfigT]):
    """One model's recipe: everything the loop needs that is the model's own.

    `config` is the model's run config (a dataclass with a `training: TrainingConfig` section).
    Called in this order: `setup`, `build_model`, `train_loader`/`validation_loader`, then
    `training_step` (and `after_optimizer_step`) each micro-batch; `validate` on every process;
    `write_grid`, `export` and `push_to_hub` on the main process, with a model holding the full weights.
    """

    name: str  # tracker project, progress-bar label and log prefix ("stage 1")
    metric: str  # the validation metric selection minimises
    counts_tokens: bool = False  # throughput in tokens/s as well as images/s
    forward_methods: tuple[str, ...] = ()  # model methods other than forward run under FSDP (e.g. "encode")

    def __init__(self, config: ConfigT) -> None:
        self.config = config
        self.num_skipped = 0  # unreadable images dropped before training (pre-tokenization, decoding)
        # the run's length: training.max_steps, or fewer where training.max_train_seconds holds fewer (set by
        # the loop; the schedules of a task's own, e.g. the Gumbel temperature, end with it)
        self.planned_steps = config.training.max_steps

    @property
    def run(self) -> TrainingConfig:
        return self.config.training

    def setup(self, accelerator: Accelerator) -> None:
        """Load and prepare the data; set the model sizes the data decides (vocabulary, grid)."""

    @abstractmethod
    def build_model(self) -> PreTrainedModel:
        """A freshly initialised model (the loop seeds the RNG first); also builds the full copies under FSDP."""

    def adapt(self, model: PreTrainedModel) -> PreTrainedModel:
        """The model as it trains, once its initial weights are in (`training.init_from`): e.g. with LoRA
        adapters added and the rest frozen. By default, the model itself."""
        return model

    @abstractmethod
    def train_loader(self) -> DataLoader:
        """The training batches, shuffled by a generator seeded with `training.seed`."""

    @abstractmethod
    def validation_loader(self) -> DataLoader:
        """The validation batches (sharded over processes by the loop)."""

    def prepare(self, accelerator: Accelerator, model: torch.nn.Module) -> None:
        """Prepare what else trains beside the model (a discriminator and its optimiser)."""

    @abstractmethod
    def training_step(self, model: torch.nn.Module, batch: Any, step: int, micro_batch: int) -> StepOutput | None:
        """The loss of one micro-batch (None when it holds no example); `step` counts optimiser steps,
        `micro_batch` the micro-batches of the run so far (for augmentations that must replay on resume)."""

    def is_empty(self, batch: Any) -> bool:
        """Whether this micro-batch holds no example (every image unreadable): then every process skips it."""
        return False

    def after_optimizer_step(self, accelerator: Accelerator, batch: Any, output: StepOutput, step: int) -> None:
        """Anything that steps after the model's optimiser on the same micro-batch (a discriminator)."""

    def log_values(self, step: int) -> dict[str, float]:
        """Scheduled values to log beside the loss terms (temperature, KL weight)."""
        return {}

    @abstractmethod
    def validate(self, model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator) -> dict[str, float]:
        """Validation metrics over the whole split, equal on every process (each its share, then gathered)."""

    def write_grid(self, model: PreTrainedModel, step: int) -> None:
        """Write step `step`'s image grid under `training.output_dir/images`; main process, full weights."""

    @abstractmethod
    def export(self, model: PreTrainedModel, output_dir: Path) -> Path:
        """Save what users load (`save_pretrained`) under `output_dir`; returns the model's directory."""

    def push_to_hub(self, model: PreTrainedModel, repo_id: str, message: str) -> None:
        """Upload the export to the Hub repository `repo_id`."""
        model.push_to_hub(repo_id, commit_message=message)

    def config_dict(self) -> dict[str, Any]:
        """The run's config as written to `config.yaml` (after `setup` and `build_model`: with the real sizes)."""
        return to_dict(self.config)


class TrainingClock:
    """Seconds spent training: time inside `paused()` (validation, grids, checkpoints, logs) is left out."""

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self._paused = 0.0

    @contextmanager
    def paused(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - start

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self._start - self._paused


class ModelSelection:
    """Best-by-validation bookkeeping in the checkpointed `TrainState`, identical on every process."""

    def __init__(self, state: TrainState, run: TrainingConfig, metric: str) -> None:
        self.state, self.metric = state, metric
        self.select_best, self.patience = run.select_best, run.early_stopping_patience

    @property
    def should_stop(self) -> bool:
        """True once `early_stopping_patience` evaluations in a row brought no improvement."""
        return self.patience is not None and self.state.evaluations_since_best >= self.patience

    @property
    def export_step(self) -> int:
        """The step whose weights the export holds: the best one with `select_best`, else the last."""
        if self.select_best and self.state.best_step is not None:
            return self.state.best_step
        return self.state.step

    def update(self, value: float) -> bool:
        """Record this step's validation metric; returns whether it is the best so far."""
        state = self.state
        state.last_metric = value
        improved = math.isfinite(value) and (state.best_metric is None or value < state.best_metric)
        if improved:
            state.best_metric, state.best_step, state.evaluations_since_best = value, state.step, 0
        else:
            state.evaluations_since_best += 1
        return improved

    def summary(self, max_steps: int) -> dict[str, Any]:
        return {
            "export_step": self.export_step,
            "best_step": self.state.best_step,
            f"best_{self.metric}": self.state.best_metric,
            f"final_{self.metric}": self.state.last_metric,
            "stopped_early": self.should_stop and self.state.step < max_steps,
        }


def load_initial_weights(model: PreTrainedModel, init_from: str) -> None:
    """Start from the weights saved at `init_from` (a directory or Hub id of the same kind of model, as
    `from_pretrained` reads it): fine-tuning. Sizes that differ (another vocabulary, grid or width) are a
    ConfigError naming them, before any step."""
    try:
        pretrained = type(model).from_pretrained(init_from)
    except (OSError, ValueError) as error:
        raise ConfigError(f"training.init_from={init_from!r}: no {type(model).__name__} can be loaded from it "
                          f"({' '.join(str(error).split())[:200]})") from error
    theirs, ours = pretrained.config.to_diff_dict(), model.config.to_diff_dict()
    differences = [f"{key} {theirs.get(key)} there, {ours.get(key)} here" for key in sorted(theirs.keys() | ours.keys())
                   if key.endswith(("_size", "_len", "_layers", "_heads", "_levels", "_channels", "_factor", "_multipliers"))
                   and theirs.get(key) != ours.get(key)]
    try:
        model.load_state_dict(pretrained.state_dict())
    except RuntimeError as error:
        detail = ", ".join(differences) or str(error).splitlines()[-1].strip()
        raise ConfigError(f"training.init_from={init_from!r} holds a {type(model).__name__} of other sizes "
                          f"({detail}): fine-tune it on data and settings of the same sizes") from error
    logger.info("%s: starting from the weights of %s", type(model).__name__, init_from)


def full_weights_model(accelerator: Accelerator, model: torch.nn.Module, task: TrainingTask) -> PreTrainedModel | None:
    """A model holding the full weights on the main process (None on the others); call on every process.

    Without FSDP that is the unwrapped training model itself; under FSDP the weights are gathered
    (`accelerator.get_state_dict`, a collective) into a fresh copy from `task.build_model()`, built
    without drawing from the global RNG, so that the main process's training randomness (caption
    dropout, Gumbel noise) is the same as without FSDP.
    """
    if accelerator.distributed_type != DistributedType.FSDP:
        return accelerator.unwrap_model(model, keep_torch_compile=False) if accelerator.is_main_process else None
    state_dict = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return None
    with torch.random.fork_rng(devices=[]):  # the copy's random initialisation is overwritten anyway
        copy = task.adapt(task.build_model())
    copy.load_state_dict(state_dict)
    return copy.to(accelerator.device).eval()


def _any_process(accelerator: Accelerator, flag: bool) -> bool:
    """True when `flag` is true on this process or, with several processes, on any of them."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor(int(flag), device=accelerator.device), "max"))


def register_forward_methods(accelerator: Accelerator, model: torch.nn.Module, names: tuple[str, ...]) -> None:
    """Under FSDP2, let `model.<name>()` gather its shards as `forward` does (validation calls `encode`/`decode`)."""
    if accelerator.distributed_type != DistributedType.FSDP or not names:
        return
    from torch.distributed.fsdp import register_fsdp_forward_method

    for name in names:
        register_fsdp_forward_method(model, name)


EARLIER_RUN_FILES = ("checkpoints", BEST_MODEL_DIR, "images", "logs", "metrics.json", "config.yaml")


def start_over_or_resume(run: TrainingConfig, accelerator: Accelerator) -> None:
    """Refuse to train from scratch over an earlier run's checkpoints (they would be mixed with this run's and
    `latest` could pick theirs), unless `overwrite` removes that run's files; a resumed run goes on with them."""
    output_dir = Path(run.output_dir)
    earlier = list_checkpoints(output_dir / "checkpoints")
    if run.resume_from_checkpoint is not None or not earlier:
        return
    if not run.overwrite:
        raise ConfigError(
            f"{output_dir} holds the checkpoints of an earlier run ({', '.join(p.name for p in earlier)}): pass "
            "--resume_from_checkpoint latest to continue it, --overwrite true to start over (removes them), or "
            "another --output_dir"
        )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for name in EARLIER_RUN_FILES:
            path = output_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        logger.warning("--overwrite: removed the earlier run's checkpoints, best weights, grids and logs in %s",
                       output_dir)
    accelerator.wait_for_everyone()


def train(task: TrainingTask, accelerator: Accelerator | None = None) -> dict[str, Any]:
    """Train `task`'s model to `training.max_steps` (or an early stop); returns what `metrics.json` holds.

    `accelerator`: the process's accelerator when one already exists (`dallekit train` trains three
    models in one process); by default one is created from `training`.
    """
    run = task.run
    accelerator = accelerator or create_accelerator(run)
    output_dir = Path(run.output_dir)
    start_over_or_resume(run, accelerator)
    set_seed(run.seed)
    task.setup(accelerator)
    set_seed(run.seed)  # the model's initial weights: the same on every process, whatever the setup drew
    model = task.build_model()
    if run.init_from is not None:
        load_initial_weights(model, run.init_from)
    model = task.adapt(model)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(task.config_dict(), sort_keys=False))
    optimizer = create_optimizer(model, run)
    lr_scheduler = create_lr_scheduler(optimizer, run)  # stepped by hand once per optimiser step
    state = TrainState()
    accelerator.register_for_checkpointing(lr_scheduler, state)
    accelerator.gradient_accumulation_steps = run.gradient_accumulation_steps
    accelerator.dataloader_config.data_seed = run.seed  # the shuffle: a function of (seed, epoch) on every process
    model, optimizer, train_loader, validation_loader = accelerator.prepare(
        model, optimizer, task.train_loader(), task.validation_loader()
    )
    set_seed(run.seed, device_specific=True)  # dropout and augmentations differ between processes
    register_forward_methods(accelerator, model, task.forward_methods)
    training_model = torch.compile(model) if run.compile else model
    compile_untried = run.compile  # until the first compiled step has run: if it fails to compile, train eagerly
    task.prepare(accelerator, model)

    checkpoints = CheckpointManager(accelerator, output_dir, run.checkpoints_total_limit, carry=[BEST_MODEL_DIR])
    resume_path = resolve_checkpoint(run.resume_from_checkpoint, output_dir)
    if resume_path is not None:
        checkpoints.load(resume_path)
    budget = BudgetFit(run, state, accelerator)  # max_steps, or fewer where training.max_train_seconds holds fewer
    budget.apply(lr_scheduler, optimizer)
    task.planned_steps = budget.max_steps
    if run.report_to != "none":
        accelerator.init_trackers(task.name.replace(" ", "_"), config=flat_hparams(task.config))

    selection = ModelSelection(state, run, task.metric)
    progress = tqdm(total=budget.max_steps, initial=state.step, desc=task.name, unit="step",
                    disable=not (run.progress and accelerator.is_local_main_process))
    position = resume_position(train_loader, state.micro_batches, state.data_positions, accelerator.process_index)
    batches = iterate_batches(accelerator, train_loader, position)
    clock = TrainingClock()
    seconds_before = state.train_seconds  # spent by the runs this one resumes
    run_start = {"step": state.step, "images": state.images_seen, "tokens": state.tokens_seen}
    window = {"seconds": clock.seconds, "images": state.images_seen, "tokens": state.tokens_seen}
    pending_skipped = 0
    model.train()
    out_of_time = False  # training.max_train_seconds spent (by this run and the ones it resumes)
    while state.step < budget.max_steps and not selection.should_stop and not out_of_time:
        batch = next(batches)
        micro_batch = state.micro_batches
        state.micro_batches += 1  # the data position: a resumed run continues after this batch, even a skipped one
        if isinstance(batch, dict) and position.epoch == 0:  # each unreadable file counted once: in the first pass
            pending_skipped += batch.get("num_skipped", 0)
        if _any_process(accelerator, task.is_empty(batch)):  # every image of some process's batch was unreadable
            continue
        with accelerator.accumulate(model):
            try:
                output = task.training_step(training_model, batch, state.step, micro_batch)
            except Exception as error:  # torch.compile compiles at the first call, and fails there (no C++ compiler)
                if not compile_untried:
                    raise
                logger.warning("%s: torch.compile failed, training eagerly instead (training.compile: false "
                               "skips the attempt): %s", task.name, str(error).strip().splitlines()[0])
                training_model = model
                output = task.training_step(model, batch, state.step, micro_batch)
            compile_untried = False
            accelerator.backward(output.loss)
            if accelerator.sync_gradients and run.max_grad_norm is not None:
                accelerator.clip_grad_norm_(model.parameters(), run.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        task.after_optimizer_step(accelerator, batch, output, state.step)
        counts = torch.tensor([output.num_examples, output.num_tokens, pending_skipped], device=accelerator.device)
        pending_skipped = 0
        images, tokens, skipped = (int(v) for v in accelerator.reduce(counts, "sum"))
        state.images_seen, state.tokens_seen, state.num_skipped = (
            state.images_seen + images, state.tokens_seen + tokens, state.num_skipped + skipped)
        if not accelerator.sync_gradients:
            continue

        lr_scheduler.step()
        state.step += 1
        progress.update(1)
        if budget.observe(clock.seconds, lr_scheduler, optimizer, task.name):
            progress.total = task.planned_steps = budget.max_steps
        out_of_time = run.max_train_seconds is not None and seconds_before + clock.seconds >= run.max_train_seconds
        if out_of_time:
            logger.info("%s: stopping at step %d: training.max_train_seconds (%g s) spent", task.name, state.step,
                        run.max_train_seconds)
        last = state.step == budget.max_steps or out_of_time
        with clock.paused():
            if state.step % run.log_every == 0 or last:
                seconds = clock.seconds - window["seconds"]
                rates = {"images_per_second": (state.images_seen - window["images"]) / max(seconds, 1e-9)}
                if task.counts_tokens:
                    rates["tokens_per_second"] = (state.tokens_seen - window["tokens"]) / max(seconds, 1e-9)
                terms = {"loss": output.loss.detach(), **{k: v.detach() for k, v in output.terms.items()}}
                terms = {k: float(v) for k, v in accelerator.reduce(terms, "mean").items()}
                logs = terms | task.log_values(state.step) | {"lr": lr_scheduler.get_last_lr()[0]} | rates | {
                    "skipped_images": state.num_skipped}
                accelerator.log({f"train/{k}": v for k, v in logs.items()}, step=state.step)
                rate = rates.get("tokens_per_second", rates["images_per_second"])
                progress.set_postfix(loss=f"{terms['loss']:.4f}",
                                     **{"tok_s" if task.counts_tokens else "img_s": f"{rate:.0f}"})
                if progress.disable:
                    logger.info("%s step %d: %s", task.name, state.step, format_metrics(logs))
                window = {"seconds": clock.seconds, "images": state.images_seen, "tokens": state.tokens_seen}
            if state.step % run.eval_every == 0 or last:
                metrics = task.validate(model, validation_loader, accelerator)
                accelerator.log({f"validation/{k}": v for k, v in metrics.items()}, step=state.step)
                logger.info("%s step %d validation: %s", task.name, state.step, format_metrics(metrics))
                state.history.append({"step": state.step, "train_seconds": round(seconds_before + clock.seconds, 2)}
                                     | metrics)
                improved = selection.update(metrics[task.metric])
                if improved and run.select_best:
                    full = full_weights_model(accelerator, model, task)
                    if accelerator.is_main_process:
                        write_directory(output_dir / BEST_MODEL_DIR, full.save_pretrained)
                        logger.info("%s: new best validation %s %.4g at step %d", task.name, task.metric,
                                    state.best_metric, state.step)
                    accelerator.wait_for_everyone()
                if selection.should_stop:
                    logger.info("%s: stopping early at step %d: validation %s has not improved on %.4g (step %d) "
                                "in %d evaluations", task.name, state.step, task.metric, state.best_metric,
                                state.best_step, state.evaluations_since_best)
            finishing = last or selection.should_stop
            if state.step % run.image_every == 0 or finishing:
                full = full_weights_model(accelerator, model, task)
                if accelerator.is_main_process:
                    task.write_grid(full, state.step)
                accelerator.wait_for_everyone()
            if state.step % run.checkpointing_steps == 0 or finishing:
                state.train_seconds = seconds_before + clock.seconds
                state.data_positions = gather_positions(accelerator, position)
                checkpoints.save(state.step)
    progress.close()

    seconds = clock.seconds
    trained = {key: getattr(state, f"{key}_seen") - run_start[key] for key in ("images", "tokens")}
    exported = next(({k: v for k, v in entry.items() if k not in ("step", "train_seconds")}
                     for entry in state.history if entry["step"] == selection.export_step), {})
    metrics: dict[str, Any] = exported | {
        "step": state.step,
        "train_seconds": seconds,
        "train_images_per_second": trained["images"] / seconds if state.step > run_start["step"] else 0.0,
        "train_tokens_per_second": (trained["tokens"] / seconds if state.step > run_start["step"] else 0.0)
        if task.counts_tokens else None,
        "skipped_images": state.num_skipped + task.num_skipped,
        "max_steps": budget.max_steps,
    } | selection.summary(budget.max_steps) | {"history": state.history}
    full = full_weights_model(accelerator, model, task)
    if accelerator.is_main_process:
        if selection.export_step != state.step:
            load_model(full, output_dir / BEST_MODEL_DIR / "model.safetensors")
        export_dir = task.export(full, output_dir)
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        logger.info("%s: final validation %s; weights of step %d saved to %s", task.name,
                    format_metrics({k: v for k, v in exported.items()}), selection.export_step, export_dir)
        if metrics["skipped_images"]:
            logger.warning("%s: skipped %d unreadable image(s)", task.name, metrics["skipped_images"])
        if run.push_to_hub:
            task.push_to_hub(full, run.hub_model_id, f"{task.name}, weights of step {selection.export_step}")
    accelerator.wait_for_everyone()
    finish_training(accelerator)
    return metrics

