"""Stage-2 pre-tokenization split over processes: the same codes in the same order for any number of
processes, one cache shared by all process counts, a killed run's leftovers encoded again."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import datasets
import pytest

from dallekit.data import AugmentationConfig, DataConfig, load_text_image_dataset
from stage1_dvae import DVAEModel
from stage2_prior.pretokenize import pretokenize, shard_bounds
from tests.conftest import cpu_processes_env, tiny_dvae_config

ROOT = Path(__file__).resolve().parents[1]
UNREADABLE = (5, 30)  # train rows with broken image bytes: one in each process's share
BATCH_SIZE = 4  # 37 train rows: 10 batches, rows 0-19 on process 0 and 20-36 on process 1
AUGMENTATION = AugmentationConfig(copies=2, max_translation=0.2, max_scale_change=0.2, seed=5)  # as the worker's


def break_image(example: dict, index: int) -> dict:
    if index in UNREADABLE:
        return {"image": {"bytes": b"not an image", "path": None}}
    return {"image": example["image"]}


def add_captions(example: dict) -> dict:
    return {"captions": [example["text"], example["text"].upper(), example["text"] + "!"]}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """A saved random tiny stage-1 model and saved small digits splits (captions, two broken images)."""
    root = tmp_path_factory.mktemp("inputs")
    DVAEModel(tiny_dvae_config()).save_pretrained(root / "model")
    splits = load_text_image_dataset(DataConfig(source="digits", image_size=16, max_examples=37))
    train = splits["train"].map(break_image, with_indices=True).map(add_captions)
    validation = splits["validation"].select(range(21))
    datasets.DatasetDict({"train": train, "validation": validation}).save_to_disk(root / "data")
    return root / "model", root / "data"


def load_inputs(inputs: tuple[Path, Path]) -> tuple[DVAEModel, datasets.DatasetDict, list]:
    """The model, with a hook counting encoder calls, and the splits: as each worker process loads them."""
    model = DVAEModel.from_pretrained(inputs[0])
    calls = []
    model.encoder.register_forward_hook(lambda *_: calls.append(1))
    return model, datasets.load_from_disk(inputs[1]), calls


@pytest.mark.parametrize("num_rows, batch_size, num_shards",
                         [(37, 4, 2), (21, 4, 2), (5, 4, 3), (0, 4, 2), (100, 7, 8)])
def test_shards_are_contiguous_runs_of_whole_batches(num_rows: int, batch_size: int, num_shards: int) -> None:
    bounds = [shard_bounds(num_rows, batch_size, num_shards, index) for index in range(num_shards)]
    assert bounds[0][0] == 0 and bounds[-1][1] == num_rows
    assert all(stop == start for (_, stop), (start, _) in zip(bounds, bounds[1:]))
    assert all(start % batch_size == 0 for start, stop in bounds if start < num_rows)
    sizes = [-(-(stop - start) // batch_size) for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1  # batches spread evenly


def test_two_processes_give_the_one_process_result_and_share_its_cache(tmp_path: Path, inputs) -> None:
    model, splits, calls = load_inputs(inputs)
    one, two = tmp_path / "one", tmp_path / "two"
    reference = pretokenize(splits, model, one, AUGMENTATION, batch_size=BATCH_SIZE)
    assert calls and reference.num_skipped == {"train": len(UNREADABLE), "validation": 0}
    assert len(reference["train"]) == 3 * (37 - len(UNREADABLE)) and len(reference["validation"]) == 21
    expected = {name: split.to_dict() for name, split in reference.items()}

    # Two processes: into a new cache (both encode their share), then into the one-process cache (reused).
    result = subprocess.run(
        ["accelerate", "launch", "--config_file", str(ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"),
         str(ROOT / "tests" / "pretokenize_worker.py"), str(inputs[0]), str(inputs[1]), str(tmp_path),
         str(BATCH_SIZE), str(AUGMENTATION.copies), str(two), str(one)],
        capture_output=True, text=True, cwd=ROOT, env=cpu_processes_env(), timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "encoded by 2 process(es)" in result.stderr and "loaded from" in result.stderr
    for rank in range(2):
        report = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        assert report["num_processes"] == 2
        fresh, reused = report["runs"]
        assert fresh["encoder_calls"] > 0, f"process {rank} must encode its share"
        assert fresh["splits"] == expected, f"process {rank}: two processes must give the one-process table"
        assert fresh["num_skipped"] == {"train": len(UNREADABLE), "validation": 0}, "skipped images, all processes"
        assert reused["encoder_calls"] == 0, f"process {rank} must load the one-process cache"
        assert reused["splits"] == expected and reused["num_skipped"] == fresh["num_skipped"]

    # The same key whatever the process count, parts joined and cleared away.
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert len(list(two.glob("train-*.arrow"))) == 1 and len(list(two.glob("validation-*.arrow"))) == 1

    # One process reuses the cache two processes wrote.
    written = {path: path.stat().st_mtime_ns for path in two.iterdir()}
    calls.clear()
    again = pretokenize(splits, model, two, AUGMENTATION, batch_size=BATCH_SIZE)
    assert not calls, "one process must load the cache two processes wrote, not encode again"
    assert {name: split.to_dict() for name, split in again.items()} == expected
    assert again.num_skipped == reference.num_skipped
    assert {path: path.stat().st_mtime_ns for path in two.iterdir()} == written


def test_a_cache_left_incomplete_by_a_killed_run_is_encoded_again(tmp_path: Path, inputs) -> None:
    model, splits, calls = load_inputs(inputs)
    first = pretokenize(splits, model, tmp_path, AUGMENTATION, batch_size=BATCH_SIZE)
    expected = first["train"].to_dict()
    (cache_file,) = tmp_path.glob("train-*.arrow")

    # A run killed before its main process joined the parts: parts and a half-written join, no cache file.
    cache_file.unlink()
    parts = cache_file.with_suffix(".parts")
    parts.mkdir()
    (parts / "part-0-of-2.arrow").write_bytes(b"half a part")
    half_written = cache_file.with_name(cache_file.name + ".incomplete-12345")
    half_written.write_bytes(b"half a join")

    calls.clear()
    again = pretokenize(splits, model, tmp_path, AUGMENTATION, batch_size=BATCH_SIZE)
    assert calls, "the train split has no complete cache: it must be encoded again"
    assert again["train"].to_dict() == expected and again.num_skipped == first.num_skipped
    assert cache_file.is_file() and not parts.exists()

    calls.clear()
    pretokenize(splits, model, tmp_path, AUGMENTATION, batch_size=BATCH_SIZE)
    assert not calls, "a complete cache is loaded"
