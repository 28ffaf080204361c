"""Shared fixtures: tiny real models and real data, small enough for a 2-core CPU."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

# Tests never reach a hub: fail fast instead of retrying a network that is not there.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from huggingface_hub import HfApi  # noqa: E402

from dallekit.data import DataConfig, TextImageCollator, load_text_image_dataset  # noqa: E402
from stage1_dvae import DVAEConfig  # noqa: E402


def cpu_processes_env() -> dict[str, str]:
    """Environment for `accelerate launch` of several CPU (gloo) processes, GPUs hidden where there are any."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def tiny_dvae_config(quantizer: str = "gumbel", **overrides) -> DVAEConfig:
    """A ~20k-parameter tokenizer for 16x16 images: 8x8 codes out of 64 (`quantizer`: gumbel, vq or fsq)."""
    values = dict(
        image_size=16, quantizer=quantizer, downsample_factor=2, hidden_channels=16,
        channel_multipliers=[1, 2], num_res_blocks=1, codebook_size=64, embedding_dim=16,
    )
    if quantizer == "fsq":
        values["fsq_levels"] = [4, 4, 4]  # 64 codes, like the other quantizers here
    values.update(overrides)
    return DVAEConfig(**values)


@pytest.fixture(scope="session")
def digit_pixels() -> torch.Tensor:
    """16 real digits at 16x16 in [-1, 1], shape [16, 3, 16, 16]."""
    splits = load_text_image_dataset(DataConfig(source="digits", image_size=16))
    examples = [splits["train"][i] for i in range(16)]
    return TextImageCollator(16)(examples)["pixel_values"]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_process_state() -> Iterator[None]:
    """Each test starts without the process-wide state an earlier in-process run left behind.

    accelerate keeps one device/precision state per process and refuses a different one later
    (a CPU-only test after a run that chose the GPU); `training.deterministic` sets a torch flag.
    """
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch.use_deterministic_algorithms(False)


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, list[dict]]:
    """Everything up to the network: `HfApi.create_repo` and `upload_folder` calls, each uploaded folder kept."""
    calls: dict[str, list[dict]] = {"create_repo": [], "upload_folder": []}

    def create_repo(self, repo_id: str, **kwargs) -> str:
        calls["create_repo"].append({"repo_id": repo_id, **kwargs})
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id: str, folder_path: str | Path, **kwargs) -> str:
        kept = shutil.copytree(folder_path, tmp_path / "uploaded" / str(len(calls["upload_folder"])))
        calls["upload_folder"].append({"repo_id": repo_id, "folder": kept, **kwargs})
        return f"commit-{kwargs['repo_type']}"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls
