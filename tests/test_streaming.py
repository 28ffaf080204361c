"""`data.streaming: true` on real WebDataset shards: stage 1 and the scorer train from the stream, a resumed run
ends where the uninterrupted one does, and two real processes read disjoint shards whose union is the set.

The shards: 6 tars of 8 samples, PNG, JPEG and WebP in turn, one corrupt image, every other caption in a
`.json` member only; the last shard is the validation split (`data.validation_source`).
"""

from __future__ import annotations

import io
import json
import socket
import subprocess
import tarfile
from pathlib import Path

import datasets
import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from safetensors.torch import load_file

from dallekit.data import DataConfig, load_text_image_dataset, make_shapes
from dallekit.data.shards import add_tar_member
from dallekit.scorer.train import ScorerTrainConfig
from dallekit.scorer.train import train as train_scorer
from dallekit.training.config import TrainingConfig, load_config
from dallekit.training.data import DataPosition, iterate_batches, resume_position, training_loader
from stage1_dvae.train import Stage1Config
from stage1_dvae.train import train as train_stage1
from tests.conftest import cpu_processes_env

ROOT = Path(__file__).resolve().parents[1]
FORMATS = (("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp"))
NUM_SHARDS, SHARD_SIZE, CORRUPT = 6, 8, 5  # sample 5 (a WebP in shard 0) is corrupt
TRAINING_CAPTIONS = {f"sample {index}" for index in range((NUM_SHARDS - 1) * SHARD_SIZE) if index != CORRUPT}
QUIET = ["--report_to", "none", "--progress", "false"]



@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shards; sample i is captioned "sample i" (in `.txt` when i is odd, in `.json` only when even)."""
    root = tmp_path_factory.mktemp("streaming") / "shards"
    root.mkdir()
    images = make_shapes(NUM_SHARDS * SHARD_SIZE, image_size=16, seed=4)
    for number in range(NUM_SHARDS):
        with tarfile.open(root / f"{number:05d}.tar", "w") as tar:
            for index in range(number * SHARD_SIZE, (number + 1) * SHARD_SIZE):
                kind, extension = FORMATS[index % len(FORMATS)]
                data = io.BytesIO()
                images[index][0].save(data, kind)
                add_tar_member(tar, f"{index:09d}.{extension}",
                           b"RIFF\x10\x00\x00\x00WEBP truncated" if index == CORRUPT else data.getvalue())
                caption = f"sample {index}"
                if index % 2:
                    add_tar_member(tar, f"{index:09d}.txt", caption.encode())
                else:
                    add_tar_member(tar, f"{index:09d}.json", json.dumps({"caption": caption}).encode())
    return root


def data_overrides(shards: Path) -> list[str]:
    return ["--data.source", str(shards), "--data.validation_source", str(shards / f"{NUM_SHARDS - 1:05d}.tar"),
            "--data.streaming", "true", "--data.max_examples", "null", "--data.shuffle_buffer_size", "16"]


def validations(metrics: dict) -> list[dict]:
    """A run's validation history without its training times."""
    return [{key: value for key, value in entry.items() if key != "train_seconds"} for entry in metrics["history"]]


def assert_same_weights(actual: Path, expected: Path) -> None:
    found, wanted = load_file(actual), load_file(expected)
    assert found.keys() == wanted.keys()
    for key in wanted:
        torch.testing.assert_close(found[key], wanted[key], rtol=1e-5, atol=1e-6, msg=key)


def test_a_stream_is_the_train_split_and_validation_is_read_once(shards: Path) -> None:
    config = DataConfig(source=str(shards), validation_source=str(shards / "00005.tar"), streaming=True,
                        image_size=16)
    splits = load_text_image_dataset(config)
    assert isinstance(splits["train"], datasets.IterableDataset) and splits["train"].num_shards == NUM_SHARDS - 1
    validation = splits["validation"]
    assert isinstance(validation, datasets.Dataset) and validation.cache_files, "memory-mapped from datasets' cache"
    in_memory = load_text_image_dataset(DataConfig(source=str(shards), validation_source=str(shards / "00005.tar"),
                                                   image_size=16))["validation"]
    assert validation["text"] == in_memory["text"] == [f"sample {index}" for index in range(40, 48)]
    assert validation["image"] == in_memory["image"]
    with pytest.raises(ValueError, match=r"DataConfig\.shuffle_buffer_size=0 is invalid: set it to a positive"):
        DataConfig(shuffle_buffer_size=0)


def test_a_streamed_pass_resumes_at_its_position_across_epochs() -> None:
    """A stream's batches from a saved position are the tail of the uninterrupted stream, passes rolled over:
    7 examples in 3 shards, batches of 2, 3 a pass (7 is odd: a pass also drops one)."""
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(dispatch_batches=False))
    stream = datasets.Dataset.from_dict({"n": list(range(7))}).to_iterable_dataset(num_shards=3)
    run = TrainingConfig(batch_size=2, seed=3, num_workers=0)

    def batches(position: DataPosition, count: int) -> tuple[list[list[int]], DataPosition]:
        loader = accelerator.prepare(training_loader(stream, run, shuffle_buffer_size=4))
        iterator = iterate_batches(accelerator, loader, position)
        return [next(iterator)["n"].tolist() for _ in range(count)], position

    full, end = batches(DataPosition(), 10)
    assert (end.epoch, end.offset) == (3, 1)
    assert full[0:3] != full[3:6], "each pass is reshuffled"
    assert all(len(set(sum(full[start:start + 3], []))) == 6 for start in (0, 3, 6)), "no example twice a pass"
    for start in (1, 3, 4, 8):
        position = DataPosition(*divmod(start, 3))
        assert batches(position, 10 - start)[0] == full[start:]
    assert batches(DataPosition(0, 3), 7)[0] == full[3:], "saved at the end of a pass: replayed, then the next"
    # A stream checkpointed by as many processes resumes at its saved position; by another number, a new pass.
    loader = accelerator.prepare(training_loader(stream, run, shuffle_buffer_size=4))
    assert resume_position(loader, 5, [[1, 2]], process_index=0) == DataPosition(1, 2)
    assert resume_position(loader, 5, [[1, 2], [2, 0]], process_index=0) == DataPosition(3, 0)
    with pytest.raises(ValueError, match="yields no batches"):
        next(iterate_batches(accelerator, accelerator.prepare(training_loader(stream.take(1), run, 4)),
                             DataPosition()))


def test_stage1_trains_from_the_stream_and_a_resumed_run_ends_where_it_would_have(shards: Path,
                                                                                   tmp_path: Path) -> None:
    """40 training samples (39 readable), batches of 8 from 2 loading workers: 5 a pass; 12 steps cross two
    passes, and the run resumed from step 6 (in the second pass) ends with the same weights and counts."""
    common = ["--config", str(ROOT / "configs" / "dvae" / "tiny.yaml"), *data_overrides(shards), *QUIET,
              "--batch_size", "8", "--num_workers", "2", "--max_steps", "12", "--checkpointing_steps", "6",
              "--eval_every", "6", "--image_every", "12", "--checkpoints_total_limit", "3"]
    full = train_stage1(load_config(Stage1Config, [*common, "--output_dir", str(tmp_path / "full")]))
    assert full["step"] == 12 and full["skipped_images"] == 1
    assert full["history"][-1]["num_images"] == SHARD_SIZE  # the validation shard, evaluated whole
    resumed = train_stage1(load_config(Stage1Config, [*common, "--output_dir", str(tmp_path / "resumed"),
                                                      "--resume_from_checkpoint",
                                                      str(tmp_path / "full" / "checkpoints" / "step_6")]))
    assert resumed["step"] == 12 and resumed["skipped_images"] == 1
    assert validations(resumed) == validations(full)
    assert_same_weights(tmp_path / "resumed" / "model" / "model.safetensors",
                        tmp_path / "full" / "model" / "model.safetensors")


def test_the_scorer_trains_from_the_stream_and_resumes(shards: Path, tmp_path: Path) -> None:
    """Its tokenizer is trained on the stream's captions, as on the in-memory split's; each image is decoded
    in its batch and paired with a caption; the corrupt one is counted; a resumed run ends the same."""
    common = ["--config", str(ROOT / "configs" / "scorer" / "tiny.yaml"), *data_overrides(shards), *QUIET,
              "--batch_size", "8", "--max_steps", "8", "--checkpointing_steps", "4", "--checkpoints_total_limit", "3"]
    full = train_scorer(load_config(ScorerTrainConfig, [*common, "--output_dir", str(tmp_path / "full")]))
    assert full["step"] == 8 and full["skipped_images"] == 1
    assert {"image_to_text_top1", "text_to_image_top5"} <= full.keys()
    resumed = train_scorer(load_config(ScorerTrainConfig, [*common, "--output_dir", str(tmp_path / "resumed"),
                                                           "--resume_from_checkpoint",
                                                           str(tmp_path / "full" / "checkpoints" / "step_4")]))
    assert resumed["step"] == 8 and resumed["skipped_images"] == 1
    assert_same_weights(tmp_path / "resumed" / "scorer" / "model.safetensors",
                        tmp_path / "full" / "scorer" / "model.safetensors")
    streamed_vocab = json.loads((tmp_path / "full" / "scorer" / "tokenizer.json").read_text())["model"]["vocab"]
    in_memory = load_config(ScorerTrainConfig, [*common, "--data.streaming", "false", "--max_steps", "1",
                                                "--output_dir", str(tmp_path / "in_memory")])
    train_scorer(in_memory)
    assert json.loads((tmp_path / "in_memory" / "scorer" / "tokenizer.json").read_text())["model"]["vocab"] == (
        streamed_vocab)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_read_their_own_shards_and_resume_exactly(shards: Path, tmp_path: Path) -> None:
    """Two real processes: in each pass they read disjoint whole shards whose union is the training set (the
    corrupt image counted once), validation gathers the 8 held-out images exactly, and a run resumed from its
    step-3 checkpoint (one process at the end of a pass, the other inside one) ends where it would have."""
    result = subprocess.run(
        ["accelerate", "launch", "--config_file", str(ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"),
         "--main_process_port", str(free_port()), "-m", "tests.streaming_worker", str(tmp_path),
         "--config", str(ROOT / "configs" / "dvae" / "tiny.yaml"), *data_overrides(shards), "--batch_size", "8"],
        capture_output=True, text=True, cwd=ROOT, env=cpu_processes_env(), timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(2)]
    assert [report["num_processes"] for report in reports] == [2, 2]
    for number in range(2):
        texts = [report["passes"][number]["texts"] for report in reports]
        assert set(texts[0]).isdisjoint(texts[1]) and set(texts[0]) | set(texts[1]) == TRAINING_CAPTIONS
        assert sum(len(part) for part in texts) == len(TRAINING_CAPTIONS), "each sample read once a pass"
        shard_sets = [{int(text.split()[1]) // SHARD_SIZE for text in part} for part in texts]
        assert shard_sets[0].isdisjoint(shard_sets[1]), "each process reads whole shards of its own"
        assert sum(report["passes"][number]["skipped"] for report in reports) == 1
    assert all(report["passes"][0]["texts"] != report["passes"][1]["texts"] for report in reports), "reshuffled"
    for report in reports:
        assert report["full"]["skipped_images"] == report["resumed"]["skipped_images"] == 1
        assert [entry["num_images"] for entry in report["full"]["history"]] == [SHARD_SIZE, SHARD_SIZE]
        assert validations(report["resumed"]) == validations(report["full"])
    assert_same_weights(tmp_path / "resumed" / "model" / "model.safetensors",
                        tmp_path / "full" / "model" / "model.safetensors")
