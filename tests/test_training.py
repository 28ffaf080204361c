"""Training scaffolding: config loading and validation, schedules, checkpoints, exact resume, multi-process."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from dallekit.training.budget import CALIBRATION_STEPS, REPLAN_STEPS, BudgetFit
from dallekit.training.checkpointing import TrainState, list_checkpoints, resolve_checkpoint
from dallekit.training.config import ConfigError, TrainingConfig, load_config
from dallekit.training.data import iterate_batches, resume_position
from dallekit.training.images import image_grid
from dallekit.training.loop import ModelSelection
from dallekit.training.schedules import cosine_anneal, linear_warmup
from stage1_dvae.train import Stage1Config, train
from tests.conftest import cpu_processes_env

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "dvae" / "tiny.yaml")


def tiny_config(output_dir: Path, *overrides: str) -> Stage1Config:
    return load_config(
        Stage1Config, ["--config", TINY, "--output_dir", str(output_dir), "--report_to", "none",
                       "--progress", "false", *overrides]
    )


# ---- config -------------------------------------------------------------------------------------


def test_yaml_and_command_line_overrides(tmp_path: Path) -> None:
    config = tiny_config(
        tmp_path, "--training.learning_rate", "1e-4", "--codebook_size=32", "--quantizer", "vq",
        "--mixed_precision", "no", "--temperature_anneal_steps", "null",
    )
    assert config.training.learning_rate == 1e-4 and isinstance(config.training.learning_rate, float)
    assert config.model.codebook_size == 32 and config.model.quantizer == "vq"
    assert config.model.hidden_channels == 16  # from the YAML file
    assert config.training.mixed_precision == "no"  # a string, not YAML's boolean
    assert config.schedule.temperature_anneal_steps is None
    assert config.data.max_examples == 256


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--training.learning_rat", "1e-3"], r"unknown config key 'training.learning_rat'.*Did you mean training.learning_rate"),
        (["--batch_size", "many"], r"'training.batch_size' = 'many' is invalid: expected int"),
        (["--mixed_precision", "fp8"], r"expected one of 'auto', 'no', 'bf16', 'fp16'"),
        (["--learning_rate", "-1"], r"training.learning_rate must be > 0, got -1"),
        (["--image_size", "32"], r"ambiguous: use one of --data.image_size, --model.image_size"),
        (["--data.image_size", "32"], r"model.image_size \(16\) differs from data.image_size \(32\)"),
        (["--model.downsample_factor", "3"], r"downsample_factor must be a power of two"),
        (["--data.source", ""], r"DataConfig.source=''"),
        (["--adversarial.enabled", "--gradient_accumulation_steps", "2"], r"adversarial.enabled needs"),
        (["--early_stopping_patience", "0"], r"training.early_stopping_patience must be >= 1 .* null \(off\), got 0"),
    ],
)
def test_bad_config_fails_with_a_clear_message(tmp_path: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, *overrides)


def test_bad_config_fails_before_any_work(tmp_path: Path) -> None:
    output_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "stage1_dvae.train", "--config", TINY, "--output_dir", str(output_dir),
         "--max_steps", "0"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode != 0
    assert "training.max_steps must be > 0, got 0" in result.stderr
    assert "Traceback" not in result.stderr
    assert not output_dir.exists()


def test_missing_config_file_is_reported() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(TrainingConfig, ["--config", "no/such/file.yaml"])


# ---- schedules and grids ------------------------------------------------------------------------


def test_schedules_hit_their_endpoints() -> None:
    assert cosine_anneal(0, 1.0, 1 / 16, 100) == pytest.approx(1.0)
    assert cosine_anneal(50, 1.0, 1 / 16, 100) == pytest.approx((1.0 + 1 / 16) / 2)
    assert cosine_anneal(100, 1.0, 1 / 16, 100) == cosine_anneal(500, 1.0, 1 / 16, 100) == 1 / 16
    assert linear_warmup(0, 6.6, 10) == 0 and linear_warmup(5, 6.6, 10) == pytest.approx(3.3)
    assert linear_warmup(20, 6.6, 10) == 6.6


def test_image_grid_puts_rows_above_each_other() -> None:
    top = -torch.ones(3, 3, 4, 4)  # black
    bottom = torch.ones(3, 3, 4, 4)  # white
    grid = np.asarray(image_grid(torch.cat([top, bottom]), num_rows=2))
    assert grid.shape == (2 * 6 + 2, 3 * 6 + 2, 3)
    assert grid[2:6, 2:6].max() == 0 and grid[8:12, 2:6].min() == 255


# ---- checkpoints and resume ---------------------------------------------------------------------


def test_latest_ignores_incomplete_checkpoints(tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    for name in ("step_4", "step_12", ".tmp-step_16", "step_8"):
        (checkpoints / name).mkdir(parents=True)
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step_4", "step_8", "step_12"]
    assert resolve_checkpoint("latest", tmp_path).name == "step_12"
    assert resolve_checkpoint("latest", tmp_path / "fresh") is None
    with pytest.raises(FileNotFoundError, match="pass 'latest' or a path"):
        resolve_checkpoint(str(tmp_path / "nope"), tmp_path)


@pytest.mark.parametrize("quantizer", ["gumbel", "vq"])
def test_resumed_run_matches_uninterrupted_run(tmp_path: Path, quantizer: str) -> None:
    """Resuming from the step-N checkpoint reaches the same weights at step 2N as the run that went on.

    256 images in batches of 16 with 2 accumulation steps: 8 steps per epoch, so the second half
    (steps 7-12) crosses into the reshuffled second epoch. `deterministic` makes it hold on a GPU
    too, where cuDNN's default convolution kernels sum in a varying order.
    """
    common = ["--quantizer", quantizer, "--max_steps", "12", "--checkpointing_steps", "6",
              "--checkpoints_total_limit", "5", "--gradient_accumulation_steps", "2", "--deterministic", "true"]
    full = tmp_path / "full"
    train(tiny_config(full, *common))
    assert [p.name for p in list_checkpoints(full / "checkpoints")] == ["step_6", "step_12"]

    resumed = tmp_path / "resumed"
    metrics = train(tiny_config(resumed, *common, "--resume_from_checkpoint", str(full / "checkpoints" / "step_6")))
    assert metrics["step"] == 12

    expected = load_file(full / "model" / "model.safetensors")
    actual = load_file(resumed / "model" / "model.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def test_interrupted_run_resumes_from_latest(tmp_path: Path) -> None:
    """A run killed after a checkpoint continues from it with `--resume_from_checkpoint latest`."""
    output_dir = tmp_path / "run"
    config = tiny_config(output_dir, "--max_steps", "4", "--checkpointing_steps", "2")
    train(config)
    (output_dir / "model").rename(tmp_path / "first_model")
    longer = tiny_config(output_dir, "--max_steps", "4", "--checkpointing_steps", "2",
                         "--resume_from_checkpoint", "latest")
    metrics = train(longer)  # the latest checkpoint is the final one: nothing left to train
    assert metrics["step"] == 4
    exported, first = load_file(output_dir / "model" / "model.safetensors"), load_file(
        tmp_path / "first_model" / "model.safetensors")
    assert exported.keys() == first.keys()
    assert all(torch.equal(exported[key], first[key]) for key in first)  # the same best, restored from the checkpoint


def test_training_writes_checkpoints_grids_logs_and_model(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, "--report_to", "tensorboard", "--checkpoints_total_limit", "1")
    metrics = train(config)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_8"]  # keeps the last 1
    assert (tmp_path / "images" / "reconstructions_step_4.png").is_file()
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "config.yaml").is_file()
    assert {"psnr", "mse", "codebook_usage", "perplexity", "train_images_per_second"} <= metrics.keys()
    # validated at steps 4 and 8; the export is the better of the two, also kept in best/ and in the checkpoint
    assert metrics["best_step"] in (4, 8) and metrics["mse"] == pytest.approx(metrics["best_mse"])
    assert metrics["best_mse"] <= metrics["final_mse"] and metrics["stopped_early"] is False
    exported = load_file(tmp_path / "model" / "model.safetensors")
    for best in (tmp_path / "best", tmp_path / "checkpoints" / "step_8" / "best"):
        saved = load_file(best / "model.safetensors")
        assert all(torch.equal(saved[key], exported[key]) for key in exported)


def logged_scalars(output_dir: Path, tag: str) -> dict[int, float]:
    """Step -> value of one TensorBoard scalar a run logged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for events in (output_dir / "logs").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            values |= {event.step: event.value for event in accumulator.Scalars(tag)}
    return values


def test_gumbel_schedules_follow_the_config_and_resume_exactly(tmp_path: Path) -> None:
    """τ follows its cosine from temperature_start to temperature_end, the KL weight its linear warm-up,
    and a run resumed from a checkpoint logs the same values at the same steps."""
    common = ["--quantizer", "gumbel", "--max_steps", "8", "--log_every", "1", "--checkpointing_steps", "4",
              "--report_to", "tensorboard", "--temperature_start", "2.0", "--temperature_end", "0.25",
              "--temperature_anneal_steps", "6", "--kl_weight", "0.5", "--kl_warmup_steps", "4", "--deterministic", "true"]
    full = tmp_path / "full"
    train(tiny_config(full, *common))
    temperatures, kl_weights = logged_scalars(full, "train/temperature"), logged_scalars(full, "train/kl_weight")
    assert sorted(temperatures) == list(range(1, 9))
    for step, value in temperatures.items():  # logged after the update of step `step`, computed at step - 1
        assert value == pytest.approx(cosine_anneal(step - 1, 2.0, 0.25, 6), rel=1e-6)
    assert temperatures[7] == temperatures[8] == pytest.approx(0.25)
    assert [round(kl_weights[step], 6) for step in range(1, 9)] == [0.0, 0.125, 0.25, 0.375, 0.5, 0.5, 0.5, 0.5]

    resumed = tmp_path / "resumed"
    train(tiny_config(resumed, *common, "--resume_from_checkpoint", str(full / "checkpoints" / "step_4")))
    assert logged_scalars(resumed, "train/temperature") == {step: temperatures[step] for step in range(5, 9)}
    assert logged_scalars(resumed, "train/kl_weight") == {step: kl_weights[step] for step in range(5, 9)}
    expected, actual = load_file(full / "model" / "model.safetensors"), load_file(resumed / "model" / "model.safetensors")
    assert all(torch.equal(actual[key], expected[key]) for key in expected)


def test_batch_iteration_resumes_at_the_same_position() -> None:
    """The batch stream from micro-batch k equals the tail of the stream from 0, across epochs."""
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=0))

    def stream(start: int, count: int) -> list[list[int]]:
        loader = DataLoader(list(range(10)), batch_size=3, shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(0))
        prepared = accelerator.prepare(loader)
        batches = iterate_batches(accelerator, prepared, resume_position(prepared, start, [], process_index=0))
        return [next(batches).tolist() for _ in range(count)]

    full = stream(0, 9)
    assert stream(4, 5) == full[4:]
    assert full[0:3] != full[3:6], "each epoch is reshuffled"


# ---- model selection ----------------------------------------------------------------------------


@pytest.mark.parametrize("select_best", [True, False])
def test_selection_tracks_the_best_and_stops_after_patience(select_best: bool) -> None:
    """Metrics 3, 2, 2.5, 1, 1.5, 1.2 with patience 2: best at step 4, stop after step 6; a restored state agrees."""
    state = TrainState()
    config = TrainingConfig(select_best=select_best, early_stopping_patience=2)
    selection = ModelSelection(state, config, metric="mse")
    for step, value in enumerate([3.0, 2.0, 2.5, 1.0, 1.5, 1.2], start=1):
        assert not selection.should_stop
        state.step = step
        assert selection.update(value) == (step in (1, 2, 4))
    assert selection.should_stop and state.evaluations_since_best == 2
    assert selection.summary(max_steps=10) == {"export_step": 4 if select_best else 6, "best_step": 4,
                                               "best_mse": 1.0, "final_mse": 1.2, "stopped_early": True}
    resumed = TrainState()
    resumed.load_state_dict(state.state_dict())  # what a checkpoint restores
    assert ModelSelection(resumed, config, metric="mse").should_stop


# ---- multi-process ------------------------------------------------------------------------------


def test_two_process_cpu_run_writes_once(tmp_path: Path) -> None:
    """`accelerate launch --num_processes 2` on CPU (gloo): both ranks train, rank 0 alone writes."""
    result = subprocess.run(
        ["accelerate", "launch", "--config_file", str(ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"),
         "-m", "stage1_dvae.train", "--config", TINY, "--output_dir", str(tmp_path),
         "--max_steps", "4", "--checkpointing_steps", "2", "--quantizer", "vq", "--progress", "false"],
        capture_output=True, text=True, cwd=ROOT, env=cpu_processes_env(), timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stderr
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_2", "step_4"]
    step_dir = tmp_path / "checkpoints" / "step_4"
    assert sorted(p.name for p in step_dir.glob("random_states_*")) == ["random_states_0.pkl", "random_states_1.pkl"]
    assert len(list((tmp_path / "logs").glob("*/events.out.tfevents.*"))) == 1
    # two checkpoints, the best model (first evaluated at step 4, so also in that checkpoint) and the export
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("model.safetensors")) == [
        "best/model.safetensors", "checkpoints/step_2/model.safetensors", "checkpoints/step_4/best/model.safetensors",
        "checkpoints/step_4/model.safetensors", "model/model.safetensors",
    ]
    assert result.stderr.count("final validation") == 1


def test_a_launch_that_starts_fewer_processes_than_asked_warns(tmp_path: Path) -> None:
    """`accelerate launch --num_processes 2` without `--multi_cpu` starts one process on a CPU: the log says so."""
    result = subprocess.run(
        ["accelerate", "launch", "--num_processes", "2", "-m", "stage1_dvae.train", "--config", TINY,
         "--output_dir", str(tmp_path), "--max_steps", "1", "--progress", "false"],
        capture_output=True, text=True, cwd=ROOT, env=cpu_processes_env(), timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "accelerator: 1 process(es)" in result.stderr
    assert "accelerate launch was asked for 2 processes but started 1: on CPU, add --multi_cpu" in result.stderr


def test_fsdp_launch_on_cpu_processes_says_it_runs_ddp(tmp_path: Path) -> None:
    """`configs/accelerate/fsdp.yaml` on two CPU processes (GPUs hidden): accelerate runs DDP there, and the log
    says so."""
    result = subprocess.run(
        ["accelerate", "launch", "--config_file", str(ROOT / "configs" / "accelerate" / "fsdp.yaml"),
         "--num_processes", "2", "-m", "stage1_dvae.train", "--config", TINY,
         "--output_dir", str(tmp_path), "--max_steps", "2", "--quantizer", "vq", "--progress", "false"],
        capture_output=True, text=True, cwd=ROOT, env=cpu_processes_env(), timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "accelerator: 2 process(es), strategy DDP" in result.stderr
    assert "the launch config asks for FSDP, but accelerate" in result.stderr
    assert "this run is DDP, every process holds the whole model" in result.stderr
    assert (tmp_path / "model" / "model.safetensors").is_file()


# ---- robustness and the adversarial loss ----------------------------------------------------------


def test_training_skips_and_counts_corrupt_images(tmp_path: Path) -> None:
    """A folder with an unreadable file trains to the end and counts it once, not once per epoch."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 32), ("validation", 8)):
        folder = tmp_path / "data" / split
        folder.mkdir(parents=True)
        rows = []
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
            rows.append(f'{{"file_name": "{i}.png", "text": "noise {i}"}}')
        if split == "train":
            (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
            rows.append('{"file_name": "broken.png", "text": "broken"}')
        (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    # 33 training files in batches of 11: every epoch sees the broken one; 8 steps are 2 2/3 epochs.
    config = tiny_config(tmp_path / "run", "--data.source", str(tmp_path / "data"), "--batch_size", "11")
    metrics = train(config)
    assert metrics["step"] == 8
    assert metrics["skipped_images"] == 1


def test_resume_over_unreadable_images_matches_uninterrupted_run(tmp_path: Path) -> None:
    """With most files unreadable, whole batches are skipped; the data position still counts them, so a run
    resumed from its middle checkpoint ends with the uninterrupted run's weights and skipped count."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, good, broken in (("train", 6, 18), ("validation", 8, 0)):
        folder = tmp_path / "data" / split
        folder.mkdir(parents=True)
        rows = []
        for i in range(good):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
            rows.append(f'{{"file_name": "{i}.png", "text": "noise {i}"}}')
        for i in range(broken):
            (folder / f"broken{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
            rows.append(f'{{"file_name": "broken{i}.png", "text": "broken {i}"}}')
        (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    common = ["--data.source", str(tmp_path / "data"), "--data.max_examples", "null", "--batch_size", "4",
              "--max_steps", "8", "--checkpointing_steps", "4", "--checkpoints_total_limit", "3"]
    full = train(tiny_config(tmp_path / "full", *common))
    resumed = train(tiny_config(tmp_path / "resumed", *common, "--resume_from_checkpoint",
                                str(tmp_path / "full" / "checkpoints" / "step_4")))
    assert full["step"] == resumed["step"] == 8
    assert full["skipped_images"] == resumed["skipped_images"] > 0
    expected = load_file(tmp_path / "full" / "model" / "model.safetensors")
    actual = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def test_adversarial_loss_terms_by_hand() -> None:
    from stage1_dvae.adversarial import AdversarialLoss

    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    hinge = AdversarialLoss("hinge")
    assert hinge.discriminator_loss(real, fake).item() == pytest.approx(0.5 * ((0 + 0.5) / 2 + (0 + 1.5) / 2))
    assert hinge.generator_loss(fake).item() == pytest.approx(0.75)
    non_saturating = AdversarialLoss("non_saturating")
    assert non_saturating.generator_loss(torch.zeros(3)).item() == pytest.approx(np.log(2))

    weight = torch.ones(3, requires_grad=True)
    reconstruction_loss = (3 * weight).sum()  # gradient norm 3 * sqrt(3)
    generator_loss = (weight * 0.5).sum()  # gradient norm 0.5 * sqrt(3)
    adaptive = AdversarialLoss("hinge", weight=0.5).adaptive_weight(reconstruction_loss, generator_loss, weight)
    assert adaptive.item() == pytest.approx(0.5 * 3 / 0.5, rel=1e-3)


def test_adversarial_training_runs_and_checkpoints_the_discriminator(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, "--adversarial.enabled", "true", "--adversarial.start_step", "2",
                         "--max_steps", "4", "--checkpointing_steps", "4", "--report_to", "tensorboard")
    metrics = train(config)
    assert np.isfinite(metrics["psnr"])
    step_dir = tmp_path / "checkpoints" / "step_4"
    assert (step_dir / "model.safetensors").is_file() and (step_dir / "model_1.safetensors").is_file()
    discriminator = load_file(step_dir / "model_1.safetensors")
    assert any(key.startswith("layers.") for key in discriminator)


def test_help_lists_every_key_with_its_default(capsys) -> None:
    from dallekit.training.config import run_from_command_line

    run_from_command_line(Stage1Config, train, ["--help"])
    usage = capsys.readouterr().out
    assert "--training.learning_rate  (float, default 0.001)" in usage
    assert "--model.quantizer  (one of 'gumbel', 'vq', 'fsq', default 'gumbel')" in usage
    assert "return_dict" not in usage  # transformers' own config fields are not ours to set


def test_a_time_budget_stops_training_and_exports(tmp_path: Path) -> None:
    """`training.max_train_seconds`: the run stops at the first step past the budget, validated, checkpointed and
    exported as at max_steps."""
    metrics = train(tiny_config(tmp_path, "--max_steps", "1000", "--max_train_seconds", "1e-6"))
    assert metrics["step"] == 1 and [entry["step"] for entry in metrics["history"]] == [1]
    assert (tmp_path / "model" / "model.safetensors").is_file() and (tmp_path / "checkpoints" / "step_1").is_dir()


def test_a_time_budget_too_short_for_max_steps_shortens_the_schedule(tmp_path: Path) -> None:
    """`training.max_train_seconds` that holds fewer than `max_steps`: the run plans fewer steps; its learning
    rate warms up as configured, then only decays (re-plans go on from where the cosine is) and reaches the
    minimum on the last planned step; a resumed run keeps the plan."""
    warmup = CALIBRATION_STEPS + 5  # the first plan is made during the warmup, which does not depend on the length
    overrides = ["--max_steps", "100000", "--max_train_seconds", "10", "--warmup_steps", str(warmup), "--log_every", "1",
                 "--eval_every", "100000", "--image_every", "100000", "--checkpointing_steps", "100000",
                 "--report_to", "tensorboard", "--quantizer", "vq"]
    config = tiny_config(tmp_path, *overrides)
    metrics = train(config)
    planned, peak = metrics["max_steps"], config.training.learning_rate
    assert warmup < planned < 100000 and metrics["step"] <= planned
    logged = logged_scalars(tmp_path, "train/lr")
    assert list(logged) == list(range(1, metrics["step"] + 1))
    assert all(logged[step] == pytest.approx(peak * min(step, warmup) / warmup, rel=1e-5) for step in range(1, warmup + 1))
    decay = [logged[step] for step in range(warmup, metrics["step"] + 1)]
    assert all(later <= earlier * (1 + 1e-6) for earlier, later in zip(decay, decay[1:]))
    if metrics["step"] == planned:  # not stopped by the budget itself (slower steps at the very end)
        assert logged[planned] == pytest.approx(peak * config.training.min_lr_ratio)

    resumed = train(tiny_config(tmp_path, *overrides, "--resume_from_checkpoint", "latest"))
    assert resumed["max_steps"] == planned


def test_a_time_budget_anneals_the_gumbel_temperature_over_the_planned_steps(tmp_path: Path) -> None:
    """The Gumbel temperature, annealed over the whole run, ends near `temperature_end` on the last planned step
    of a run a time budget shortens (not at the unreached `max_steps`)."""
    overrides = ["--max_steps", "100000", "--max_train_seconds", "10", "--log_every", "1", "--eval_every", "100000",
                 "--image_every", "100000", "--checkpointing_steps", "100000", "--report_to", "tensorboard"]
    config = tiny_config(tmp_path, *overrides)
    metrics = train(config)
    planned = metrics["max_steps"]
    assert planned < 100000
    temperature = logged_scalars(tmp_path, "train/temperature")
    start, end = config.schedule.temperature_start, config.schedule.temperature_end
    assert temperature[1] == pytest.approx(start)
    last = metrics["step"]  # logged values are those of the step before; the last follows the final plan's cosine
    assert temperature[last] == pytest.approx(cosine_anneal(last - 1, start, end, planned), rel=1e-5)


def test_a_budget_replans_from_all_timed_steps_without_a_jump_in_the_learning_rate() -> None:
    """`BudgetFit` on a synthetic clock: steps of 0.1 s for the calibration give the first plan, exactly the
    cosine of a run started with that length; when later steps take 0.2 s the next plans shorten the run, the
    learning rate goes on from where it was, and it still reaches the minimum on the last planned step."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    from dallekit.training.optim import create_lr_scheduler

    run = TrainingConfig(max_steps=10_000, max_train_seconds=100.0, warmup_steps=50, learning_rate=1.0, min_lr_ratio=0.1)
    state = TrainState()
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=run.learning_rate)
    scheduler = create_lr_scheduler(optimizer, run)
    budget = BudgetFit(run, state, Accelerator(cpu=True))
    seconds, rates, plans = 0.0, {}, []
    while state.step < budget.max_steps:
        optimizer.step()
        scheduler.step()
        state.step += 1
        seconds += 0.1 if state.step <= 1 + CALIBRATION_STEPS else 0.2
        if budget.observe(seconds, scheduler, optimizer, "test"):
            plans.append((state.step, budget.max_steps))
        rates[state.step] = scheduler.get_last_lr()[0]
        if state.step % 50 == 0:  # a checkpoint, as the loop writes it: the training time so far, this run's included
            state.train_seconds = seconds
    calibrated, first_plan = plans[0]  # 100 s at 0.1 s/step: 1,000 steps (one fewer where rounding falls short)
    assert calibrated == 1 + CALIBRATION_STEPS and first_plan in (999, 1000)
    reference = get_cosine_with_min_lr_schedule_with_warmup(optimizer, run.warmup_steps, first_plan, min_lr_rate=0.1)
    for step in range(1, 1 + CALIBRATION_STEPS + REPLAN_STEPS + 1):  # up to and including the second plan's step
        assert rates[step] == pytest.approx(reference.lr_lambdas[0](step), rel=1e-6)
    assert [step for step, _ in plans[1:]] == list(range(1 + CALIBRATION_STEPS + REPLAN_STEPS, state.step, REPLAN_STEPS))[:len(plans) - 1]
    assert all(later < earlier for (_, earlier), (_, later) in zip(plans, plans[1:]))  # slower steps: shorter plans
    assert abs(seconds - 100.0) < 2.0  # the last plan ends the run when the budget does
    decay = [rates[step] for step in range(run.warmup_steps, state.step + 1)]
    steps = [earlier - later for earlier, later in zip(decay, decay[1:])]
    assert min(steps) >= 0 and max(steps) < 3 * math.pi / 2 * 0.9 / (state.step - run.warmup_steps)  # no jump
    assert rates[state.step] == pytest.approx(run.min_lr_ratio)


def test_a_compile_that_fails_warns_and_trains_eagerly(tmp_path: Path) -> None:
    """`training.compile: true` where inductor cannot build its kernels (here: no C++ compiler, through the
    public `CXX` variable) warns once and trains the same run eagerly to the end."""
    env = {**cpu_processes_env(), "CXX": "/nonexistent/c++", "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    result = subprocess.run(
        [sys.executable, "-m", "stage1_dvae.train", "--config", TINY, "--output_dir", str(tmp_path / "run"),
         "--max_steps", "4", "--checkpointing_steps", "4", "--compile", "true", "--progress", "false"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("torch.compile failed, training eagerly instead") == 1
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_4"]
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
