"""Stage-2 training: cached pre-tokenisation, a real training run, exact resume, two processes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stage1_dvae import DVAEModel
from stage1_dvae.train import Stage1Config
from stage1_dvae.train import train as train_stage1
from stage2_prior import PriorModel
from stage2_prior.pretokenize import pretokenize
from stage2_prior.train import Stage2Config, train
from textimage_data import DataConfig, TextImageCollator, load_text_image_dataset
from training.checkpointing import list_checkpoints
from training.config import ConfigError, load_config

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
    assert len(list(tmp_path.glob("train-*.arrow"))) == 2


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


def test_missing_stage1_model_fails_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no stage-1 tokenizer"):
        train(tiny_config(tmp_path / "run", tmp_path / "nowhere"))
    assert not (tmp_path / "run").exists()


def test_stage2_two_process_cpu_run(tmp_path: Path, stage1_dir: Path) -> None:
    result = subprocess.run(
        ["accelerate", "launch", "--config_file", str(ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"),
         "-m", "stage2_prior.train", "--config", TINY_PRIOR, "--stage1_model", str(stage1_dir),
         "--output_dir", str(tmp_path), "--max_steps", "4", "--checkpointing_steps", "2", "--progress", "false"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stderr
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_2", "step_4"]
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
