"""`dallekit train` killed and started again resumes where it stopped; another configuration is refused."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_cli import DALLEKIT, ROOT, captioned_folder

pytestmark = pytest.mark.skipif(DALLEKIT is None, reason="the dallekit entry point is not installed (pip install -e .)")

TINY = ["--image-size", "16", "--stage1-config", "configs/dvae/tiny.yaml", "--stage2-config", "configs/prior/tiny.yaml",
        "--scorer-config", "configs/scorer/tiny.yaml", "--max-prompts", "4",
        "--stage2.training.max_steps", "16", "--stage2.training.checkpointing_steps", "4"]


def command(folder: Path, output_dir: Path, *extra: str) -> list[str]:
    return [DALLEKIT, "train", "--data", str(folder), "--output-dir", str(output_dir), *TINY, *extra]


def run(args: list[str], cache: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"DALLEKIT_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)


def test_killed_during_stage2_resumes_to_the_uninterrupted_weights(tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "images", num_images=48)
    cache = tmp_path / "cache"
    uninterrupted = run(command(folder, tmp_path / "full"), cache)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    output_dir = tmp_path / "killed"
    env = os.environ | {"DALLEKIT_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    process = subprocess.Popen(command(folder, output_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=env, cwd=ROOT)
    deadline = time.monotonic() + 900
    while not (output_dir / "stage2" / "checkpoints" / "step_4").is_dir():
        assert process.poll() is None and time.monotonic() < deadline, "stage 2 never wrote its first checkpoint"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (output_dir / "stage2" / "prior").exists()
    stage1_export = (output_dir / "stage1" / "model" / "model.safetensors").stat().st_mtime_ns

    resumed = run(command(folder, output_dir), cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "kept stage1: finished by an earlier run" in resumed.stderr
    assert "resuming stage2 from its checkpoint" in resumed.stderr
    assert (output_dir / "stage1" / "model" / "model.safetensors").stat().st_mtime_ns == stage1_export
    expected = load_file(tmp_path / "full" / "stage2" / "prior" / "model.safetensors")
    actual = load_file(output_dir / "stage2" / "prior" / "model.safetensors")
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)

    # Another configuration in the same directory: refused with the difference, then started over with --overwrite.
    changed = run(command(folder, output_dir, "--stage2.training.max_steps", "8"), cache)
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    assert "stage2.training.max_steps: 16 there, 8 now" in changed.stderr and "--overwrite" in changed.stderr
    over = run(command(folder, output_dir, "--stage2.training.max_steps", "8", "--overwrite"), cache)
    assert over.returncode == 0, over.stderr[-3000:]
    assert sorted(p.name for p in (output_dir / "stage2" / "checkpoints").iterdir()) == ["step_4", "step_8"]
    assert (output_dir / "stage1" / "model" / "model.safetensors").stat().st_mtime_ns != stage1_export  # retrained


def test_bad_stage_override_is_one_line(tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "images", num_images=48)
    result = run(command(folder, tmp_path / "run", "--stage2.training.max_stepz", "3"), tmp_path / "cache")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "training.max_stepz" in result.stderr and "max_steps" in result.stderr
    assert not (tmp_path / "run" / "stage1").exists()
