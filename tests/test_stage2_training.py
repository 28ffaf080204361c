"""Stage-2 training: cached (augmented) pre-tokenisation, a real training run, best-model selection,
early stopping, exact resume, two processes."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dallekit.data import AugmentationConfig, DataConfig, TextImageCollator, load_text_image_dataset
from dallekit.training.checkpointing import list_checkpoints
from dallekit.training.config import ConfigError, load_config
from stage1_dvae import DVAEModel
from stage1_dvae.train import Stage1Config
from stage1_dvae.train import train as train_stage1
from stage2_prior import PriorModel
from stage2_prior.pretokenize import pretokenize
from stage2_prior.train import Stage2Config, train
from tests.conftest import cpu_processes_env

ROOT = Path(__file__).resolve().parents[1]
TINY_PRIOR = str(ROOT / "configs" / "prior" / "tiny.yaml")


@pytest.fixture(scope="session")
def stage1_dir(tmp_path_factory) -> Path:
    """A real (tiny) stage-1 tokenizer trained for a few steps."""
    output_dir = tmp_path_factory.mktemp("stage1")
    config = load_config(Stage1Config, ["--config", str(ROOT / "configs" / "dvae" / "tiny.yaml"),
                                        "--output_dir", str(output_dir), "--report_to", "none",
                                        "--progress", "false"])
    train_stage1(config)
    return output_dir / "model"


def tiny_config(output_dir: Path, stage1_dir: Path, *overrides: str) -> Stage2Config:
    return load_config(Stage2Config, ["--config", TINY_PRIOR, "--stage1_model", str(stage1_dir),
                                      "--output_dir", str(output_dir), "--report_to", "none",
                                      "--progress", "false", *overrides])


def test_pretokenization_is_cached_and_redone_when_the_tokenizer_changes(tmp_path: Path, stage1_dir: Path) -> None:
    splits = load_text_image_dataset(DataConfig(source="digits", image_size=16, max_examples=64))
    model = DVAEModel.from_pretrained(stage1_dir)
    calls = []
    model.encoder.register_forward_hook(lambda *_: calls.append(1))

    first = pretokenize(splits, model, tmp_path)
    assert calls and len(first["train"]) == 64 and len(first["train"][0]["codes"]) == 64  # 8x8 codes
    pixels = TextImageCollator(16)([splits["train"][0]])["pixel_values"]
    assert first["train"][0]["codes"] == model.encode(pixels).flatten().tolist()  # raster order

    calls.clear()
    again = pretokenize(splits, model, tmp_path)
    assert not calls, "the second run must load the cached codes, not encode again"
    assert again["train"]["codes"] == first["train"]["codes"]

    with torch.no_grad():
        model.decoder.conv_out.bias.add_(1.0)  # a different stage-1 checkpoint
    pretokenize(splits, model, tmp_path)
    assert calls, "a changed stage-1 checkpoint must be encoded again"
    assert len(list(tmp_path.glob("train-*/"))) == 2


def test_augmented_pretokenization_is_cached_and_redone_when_the_settings_change(
    tmp_path: Path, stage1_dir: Path
) -> None:
    splits = load_text_image_dataset(DataConfig(source="digits", image_size=16, max_examples=32))
    model = DVAEModel.from_pretrained(stage1_dir)
    calls = []
    model.encoder.register_forward_hook(lambda *_: calls.append(1))
    plain = pretokenize(splits, model, tmp_path)

    augmentation = AugmentationConfig(copies=2, max_translation=0.2, max_scale_change=0.2)
    calls.clear()
    augmented = pretokenize(splits, model, tmp_path, augmentation)
    assert calls
    train_split = augmented["train"]
    assert len(train_split) == 3 * 32 and train_split.column_names == plain["train"].column_names
    assert train_split["codes"][::3] == plain["train"]["codes"]  # each original, then its two copies
    assert train_split["text"][2::3] == plain["train"]["text"]  # with its caption
    assert sum(train_split["codes"][3 * i + 1] != train_split["codes"][3 * i] for i in range(32)) > 16
    assert augmented["validation"]["codes"] == plain["validation"]["codes"]  # never augmented: its cache is reused
    assert len(list(tmp_path.glob("validation-*/"))) == 1

    calls.clear()
    again = pretokenize(splits, model, tmp_path, dataclasses.replace(augmentation))
    assert not calls, "the same settings must load the cached codes, not encode again"
    assert again["train"]["codes"] == train_split["codes"]
    other_batches = pretokenize(splits, model, tmp_path / "other", augmentation, batch_size=5)
    assert other_batches["train"]["codes"] == train_split["codes"], "augmentation must not depend on batching"

    for change in ({"max_translation": 0.1}, {"max_scale_change": 0.1}, {"seed": 1}, {"copies": 1}):
        calls.clear()
        pretokenize(splits, model, tmp_path, dataclasses.replace(augmentation, **change))
        assert calls, f"changing {change} must encode again"
    assert len(list(tmp_path.glob("train-*/"))) == 6 and len(list(tmp_path.glob("validation-*/"))) == 1


def test_stage2_training_writes_prior_tokenizer_and_samples(tmp_path: Path, stage1_dir: Path) -> None:
    metrics = train(tiny_config(tmp_path, stage1_dir))
    assert metrics["step"] == 8 and metrics["image_loss"] < 4.2  # below log(64) = 4.16 + slack: it learns
    prior = PriorModel.from_pretrained(tmp_path / "prior")
    assert prior.config.image_vocab_size == 64 and prior.config.image_grid_size == 8
    assert (tmp_path / "tokenizer" / "tokenizer.json").is_file()
    assert (tmp_path / "images" / "samples_step_8.png").is_file()
    assert len((tmp_path / "images" / "samples_step_8.txt").read_text().splitlines()) == 2


def test_stage2_resume_matches_uninterrupted_run(tmp_path: Path, stage1_dir: Path) -> None:
    common = ["--max_steps", "8", "--checkpointing_steps", "4", "--checkpoints_total_limit", "3"]
    train(tiny_config(tmp_path / "full", stage1_dir, *common))
    train(tiny_config(tmp_path / "resumed", stage1_dir, *common,
                      "--resume_from_checkpoint", str(tmp_path / "full" / "checkpoints" / "step_4")))
    expected = load_file(tmp_path / "full" / "prior" / "model.safetensors")
    actual = load_file(tmp_path / "resumed" / "prior" / "model.safetensors")
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def test_best_validation_checkpoint_is_exported_and_patience_stops_the_run(tmp_path: Path, stage1_dir: Path) -> None:
    """A prior overfitted on 16 examples: its validation loss bottoms out at some step N and then rises.

    The export holds the weights of step N (those of the step-N checkpoint), training stops after
    3 evaluations without improvement, and a run resumed after step N reaches the same result.
    """
    overfit = ["--max_examples", "16", "--max_steps", "60", "--learning_rate", "1e-2", "--lr_schedule", "constant",
               "--warmup_steps", "0", "--eval_every", "2", "--early_stopping_patience", "3", "--image_every", "1000",
               "--checkpointing_steps", "2", "--checkpoints_total_limit", "null"]
    metrics = train(tiny_config(tmp_path / "run", stage1_dir, *overfit))
    best = metrics["best_step"]
    assert metrics["stopped_early"] and metrics["step"] == best + 3 * 2 < 60
    assert metrics["final_loss"] > metrics["best_loss"] == pytest.approx(metrics["loss"])
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["best_step"] == best

    exported = load_file(tmp_path / "run" / "prior" / "model.safetensors")
    at_best = load_file(tmp_path / "run" / "checkpoints" / f"step_{best}" / "model.safetensors")
    at_end = load_file(tmp_path / "run" / "checkpoints" / f"step_{metrics['step']}" / "model.safetensors")
    assert exported.keys() == at_best.keys()
    assert all(torch.equal(exported[key], at_best[key]) for key in exported)
    assert not all(torch.equal(exported[key], at_end[key]) for key in exported)

    after_best = tmp_path / "run" / "checkpoints" / f"step_{best + 2}"
    resumed = train(tiny_config(tmp_path / "resumed", stage1_dir, *overfit,
                                "--resume_from_checkpoint", str(after_best)))
    assert (resumed["best_step"], resumed["step"], resumed["stopped_early"]) == (best, metrics["step"], True)
    resumed_export = load_file(tmp_path / "resumed" / "prior" / "model.safetensors")
    assert all(torch.equal(resumed_export[key], exported[key]) for key in exported)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--residual_dropout", "1.0"], r"residual_dropout must be in \[0, 1\) \(0 turns it off\), got 1.0"),
        (["--model.attention_dropout", "-0.1"], r"attention_dropout must be in \[0, 1\)"),
        (["--augmentation.copies", "-1"], r"AugmentationConfig.copies=-1 is invalid"),
        (["--copies", "2", "--max_translation", "0", "--max_scale_change", "0"], r"raise max_translation or"),
        (["--early_stopping_patience", "0"], r"training.early_stopping_patience must be >= 1"),
    ],
)
def test_bad_regularisation_settings_fail_with_a_clear_message(
    tmp_path: Path, overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, tmp_path / "stage1", *overrides)


def test_missing_stage1_model_fails_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no stage-1 tokenizer"):
        train(tiny_config(tmp_path / "run", tmp_path / "nowhere"))
    assert not (tmp_path / "run").exists()


def test_stage2_two_process_cpu_run_stops_early_on_both_ranks(tmp_path: Path, stage1_dir: Path) -> None:
    """Both ranks leave the loop at the same step (a rank left behind would hang in the next all-reduce).

    A learning rate of 1e-20 leaves the weights unchanged, so the validation loss never improves
    after the first evaluation: with patience 2 the run stops after step 3.
    """
    result = subprocess.run(
        ["accelerate", "launch", "--config_file", str(ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"),
         "-m", "stage2_prior.train", "--config", TINY_PRIOR, "--stage1_model", str(stage1_dir),
         "--output_dir", str(tmp_path), "--max_steps", "8", "--checkpointing_steps", "2", "--progress", "false",
         "--learning_rate", "1e-20", "--eval_every", "1", "--early_stopping_patience", "2"],
        capture_output=True, text=True, cwd=ROOT, env=cpu_processes_env(), timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stderr
    assert result.stderr.count("stopping early at step 3") == 1
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (metrics["step"], metrics["best_step"], metrics["stopped_early"]) == (3, 1, True)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_2", "step_3"]
    assert len(list((tmp_path / "logs").glob("*/events.out.tfevents.*"))) == 1
    assert result.stderr.count("final validation") == 1


def test_compiled_training_matches_eager(tmp_path: Path, stage1_dir: Path) -> None:
    """`training.compile` (torch.compile, inductor) trains the same model, and exports plain weights."""
    common = ["--max_steps", "4", "--checkpointing_steps", "4"]
    eager = train(tiny_config(tmp_path / "eager", stage1_dir, *common))
    compiled = train(tiny_config(tmp_path / "compiled", stage1_dir, *common, "--compile", "true"))
    assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-3)
    weights = load_file(tmp_path / "compiled" / "prior" / "model.safetensors")
    assert weights.keys() == load_file(tmp_path / "eager" / "prior" / "model.safetensors").keys()
    assert not any("_orig_mod" in key for key in weights)
