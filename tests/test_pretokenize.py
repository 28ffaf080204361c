"""Stage-2 pre-tokenization into code shards: the same codes in the same order for any number of processes
and any shard size, one cache shared by all process counts, each process its own shards, a killed run
resumed at its first unfinished shard, and a streamed source giving the in-memory path's codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest

from dallekit.data import AugmentationConfig, DataConfig, load_text_image_dataset, make_shapes
from dallekit.data.cache import source_fingerprint
from dallekit.data.shards import write_shards
from stage1_dvae import DVAEModel
from stage2_prior.pretokenize import pretokenize
from tests.conftest import cpu_processes_env, tiny_dvae_config

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "pretokenize_worker.py"
UNREADABLE = (5, 30)  # train rows with broken image bytes: in the first and the fourth shard
BATCH_SIZE = 4
SHARD_SIZE = 8  # 37 train rows: 5 shards (processes 0 and 1 of 2 encode shards 0, 2, 4 and 1, 3)
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


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """WebDataset shards of 30 shapes and a corrupt file, 6 samples a shard (6 shards), and 6 validation samples
    in `validation/` (2 shards)."""
    root = tmp_path_factory.mktemp("shards")
    for name, count, seed in (("train", 30, 3), ("validation", 6, 4)):
        folder = root / f"{name}-folder"
        folder.mkdir()
        rows = []
        for index, (image, caption, _) in enumerate(make_shapes(count, image_size=16, seed=seed)):
            image.save(folder / f"{index:03d}.png")
            rows.append({"file_name": f"{index:03d}.png", "text": f"{caption} {index}"})
        if name == "train":
            (folder / "zz-corrupt.png").write_bytes(b"\x89PNG not really")
            rows.append({"file_name": "zz-corrupt.png", "text": "a corrupt file"})
        (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        write_shards(folder, root / name, shard_size=6 if name == "train" else 3)
    (root / "validation").rename(root / "train" / "validation")
    return root / "train"


def load_inputs(inputs: tuple[Path, Path]) -> tuple[DVAEModel, datasets.DatasetDict, list]:
    """The model, with a hook counting encoder calls, and the splits: as each worker process loads them."""
    model = DVAEModel.from_pretrained(inputs[0])
    calls = []
    model.encoder.register_forward_hook(lambda *_: calls.append(1))
    return model, datasets.load_from_disk(inputs[1]), calls


def columns(splits: datasets.DatasetDict) -> dict[str, dict[str, list]]:
    return {name: split.to_dict() for name, split in splits.items()}


def stream_config(shards: Path, streaming: bool = True) -> DataConfig:
    return DataConfig(source=str(shards), image_size=16, streaming=streaming)


def worker(model: Path, data: Path, out: Path, copies: int, *cache_dirs: Path, processes: int = 2,
           env: dict[str, str] | None = None) -> subprocess.Popen:
    """`tests/pretokenize_worker.py` under `accelerate launch` (2 processes) or plain python (1)."""
    launch = (["accelerate", "launch", "--config_file", str(ROOT / "configs" / "accelerate" / "cpu_2proc.yaml")]
              if processes == 2 else [sys.executable])
    arguments = [str(WORKER), str(model), str(data), str(out), str(BATCH_SIZE), str(SHARD_SIZE), str(copies),
                 *map(str, cache_dirs)]
    return subprocess.Popen(launch + arguments, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=env or cpu_processes_env(), start_new_session=True)


def finish(process: subprocess.Popen) -> str:
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    return stderr


def test_shard_size_cuts_the_files_not_the_codes(tmp_path: Path, inputs) -> None:
    model, splits, _ = load_inputs(inputs)
    whole = pretokenize(splits, model, tmp_path / "whole", batch_size=BATCH_SIZE, shard_size=1000)
    cut = pretokenize(splits, model, tmp_path / "cut", batch_size=BATCH_SIZE, shard_size=SHARD_SIZE)
    # The same batches, so the same codes (the caption draws are seeded by (shard, row): they differ).
    assert all(cut[name]["codes"] == whole[name]["codes"] for name in ("train", "validation"))
    assert cut.num_skipped == whole.num_skipped == {"train": 2, "validation": 0}
    (folder,) = (tmp_path / "cut").glob("train-*")
    files = sorted(folder.glob("shard-*.arrow"))
    assert [path.name for path in files] == [f"shard-{index:05d}-of-00005.arrow" for index in range(5)]
    records = [json.loads(path.with_suffix(".json").read_text()) for path in files]
    assert [record["rows"] for record in records] == [8, 8, 8, 8, 5]
    assert [record["skipped"] for record in records] == [1, 0, 0, 1, 0]


def test_a_repeated_row_has_its_unaugmented_image_encoded_once(tmp_path: Path, inputs) -> None:
    """Replay repeats the new data (passes): each repeat's augmented copies are drawn anew and encoded, its
    unaugmented image is not encoded again but gets the codes it got the first time."""
    model, splits, _ = load_inputs(inputs)
    images = []
    model.encoder.register_forward_hook(lambda module, args, output: images.append(len(args[0])))
    rows = splits["train"].select(range(6, 14))  # eight readable rows
    once = pretokenize({"train": rows}, model, tmp_path / "once", AUGMENTATION, batch_size=BATCH_SIZE)
    per_image = 1 + AUGMENTATION.copies
    images.clear()
    three_passes = datasets.concatenate_datasets([rows] * 3)
    repeated = pretokenize({"train": three_passes}, model, tmp_path / "repeated", AUGMENTATION, batch_size=BATCH_SIZE)
    assert sum(images) == 8 * per_image + 2 * 8 * AUGMENTATION.copies
    codes = list(repeated["train"]["codes"])
    assert len(codes) == 3 * 8 * per_image and codes[: 8 * per_image] == once["train"]["codes"]
    originals = codes[::per_image]
    assert originals[:8] == originals[8:16] == originals[16:]
    copies = [sequence for index, sequence in enumerate(codes) if index % per_image]
    assert copies[: 8 * AUGMENTATION.copies] != copies[8 * AUGMENTATION.copies: 16 * AUGMENTATION.copies]

    images.clear()  # without augmentation a repeated row is not even decoded again
    plain = pretokenize({"train": three_passes}, model, tmp_path / "plain", batch_size=BATCH_SIZE)
    plain_codes = list(plain["train"]["codes"])
    assert sum(images) == 8 and len(plain_codes) == 24 and plain_codes == plain_codes[:8] * 3


def test_two_processes_give_the_one_process_result_and_share_its_cache(tmp_path: Path, inputs) -> None:
    model, splits, calls = load_inputs(inputs)
    one, two = tmp_path / "one", tmp_path / "two"
    reference = pretokenize(splits, model, one, AUGMENTATION, batch_size=BATCH_SIZE, shard_size=SHARD_SIZE)
    assert calls and reference.num_skipped == {"train": len(UNREADABLE), "validation": 0}
    assert len(reference["train"]) == 3 * (37 - len(UNREADABLE)) and len(reference["validation"]) == 21
    expected = columns(reference)

    # Two processes: into a new cache (both encode their shards), then into the one-process cache (reused).
    stderr = finish(worker(inputs[0], inputs[1], tmp_path, AUGMENTATION.copies, two, one))
    assert "encoded by 2 process(es)" in stderr and "all loaded" in stderr
    reports = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(2)]
    for rank, report in enumerate(reports):
        assert report["num_processes"] == 2
        fresh, reused = report["runs"]
        assert fresh["encoder_calls"] > 0, f"process {rank} must encode its shards"
        assert fresh["splits"] == expected, f"process {rank}: two processes must give the one-process table"
        assert fresh["num_skipped"] == {"train": len(UNREADABLE), "validation": 0}, "skipped images, all processes"
        assert reused["encoder_calls"] == 0, f"process {rank} must load the one-process cache"
        assert reused["splits"] == expected and reused["num_skipped"] == fresh["num_skipped"]
    first, second = (report["runs"][0]["encoded_shards"] for report in reports)
    assert first == {"train": [0, 2, 4], "validation": [0, 2]} and second == {"train": [1, 3], "validation": [1]}

    # The same key whatever the process count; one process reuses the cache two processes wrote.
    assert sorted(path.name for path in two.rglob("*")) == sorted(path.name for path in one.rglob("*"))
    written = {path: path.stat().st_mtime_ns for path in two.rglob("*")}
    calls.clear()
    again = pretokenize(splits, model, two, AUGMENTATION, batch_size=BATCH_SIZE, shard_size=SHARD_SIZE)
    assert not calls, "one process must load the cache two processes wrote, not encode again"
    assert columns(again) == expected and again.num_skipped == reference.num_skipped
    assert {path: path.stat().st_mtime_ns for path in two.rglob("*")} == written


def test_a_run_resumes_at_its_unfinished_shards(tmp_path: Path, inputs) -> None:
    model, splits, calls = load_inputs(inputs)
    first = pretokenize(splits, model, tmp_path, AUGMENTATION, batch_size=BATCH_SIZE, shard_size=SHARD_SIZE)
    (folder,) = tmp_path.glob("train-*")
    # As a killed run leaves it: shards 1 and 3 never renamed into place, a half-written file beside.
    for index in (1, 3):
        (folder / f"shard-{index:05d}-of-00005.arrow").unlink()
    (folder / "shard-00001-of-00005.arrow.incomplete-12345").write_bytes(b"half a shard")
    kept = {path: path.stat().st_mtime_ns for path in folder.glob("shard-*.arrow")}

    calls.clear()
    again = pretokenize(splits, model, tmp_path, AUGMENTATION, batch_size=BATCH_SIZE, shard_size=SHARD_SIZE)
    assert again.encoded_shards == {"train": [1, 3], "validation": []}
    assert len(calls) == 4, "two shards of 8 rows in batches of 4: four encoder calls"
    assert columns(again) == columns(first) and again.num_skipped == first.num_skipped
    assert {path: path.stat().st_mtime_ns for path in kept} == kept, "finished shards are not written again"


def test_streamed_codes_equal_the_in_memory_codes(tmp_path: Path, inputs, shards: Path) -> None:
    model = DVAEModel.from_pretrained(inputs[0])
    streamed_config = stream_config(shards)
    streamed_splits = load_text_image_dataset(streamed_config)
    assert isinstance(streamed_splits["train"], datasets.IterableDataset) and streamed_splits["train"].n_shards == 6
    streamed = pretokenize(streamed_splits, model, tmp_path / "streamed", batch_size=BATCH_SIZE,
                           source_fingerprint=source_fingerprint(streamed_config))
    in_memory = pretokenize(load_text_image_dataset(stream_config(shards, streaming=False)), model,
                            tmp_path / "in-memory", batch_size=BATCH_SIZE, shard_size=6)
    for name in ("train", "validation"):
        assert streamed[name]["codes"] == in_memory[name]["codes"] and streamed[name]["text"] == in_memory[name]["text"]
    assert len(streamed["train"]) == 30 and streamed.num_skipped["train"] == 1 == in_memory.num_skipped["train"]
    assert len(list((tmp_path / "streamed").glob("train-*/shard-*-of-00006.arrow"))) == 6, "one code shard a tar"

    # A stream needs the source's fingerprint; a changed source file gives a new cache.
    with pytest.raises(ValueError, match="source_fingerprint"):
        pretokenize(streamed_splits, model, tmp_path / "streamed", batch_size=BATCH_SIZE)
    before = source_fingerprint(streamed_config)
    tar = sorted(shards.glob("*.tar"))[0]
    os.utime(tar, ns=(tar.stat().st_atime_ns, tar.stat().st_mtime_ns + 1))
    assert source_fingerprint(streamed_config) != before


def test_two_processes_stream_disjoint_shards_and_a_killed_run_resumes(tmp_path: Path, inputs, shards: Path) -> None:
    model = DVAEModel.from_pretrained(inputs[0])
    config = stream_config(shards)
    reference = pretokenize(load_text_image_dataset(config), model, tmp_path / "reference", AUGMENTATION,
                            batch_size=BATCH_SIZE, source_fingerprint=source_fingerprint(config))

    # Two processes: each encodes its own tar shards, the union is every shard, the result the one-process one.
    stderr = finish(worker(inputs[0], shards, tmp_path, AUGMENTATION.copies, tmp_path / "two"))
    reports = [json.loads((tmp_path / f"rank-{rank}.json").read_text())["runs"][0] for rank in range(2)]
    assert [report["encoded_shards"]["train"] for report in reports] == [[0, 2, 4], [1, 3, 5]], stderr[-2000:]
    assert all(report["splits"] == columns(reference) for report in reports)

    # One process, killed (SIGKILL) once it has finished some shards, then run again to the end.
    cache = tmp_path / "killed"
    slow = cpu_processes_env() | {"PRETOKENIZE_WORKER_DELAY": "0.3"}
    process = worker(inputs[0], shards, tmp_path, AUGMENTATION.copies, cache, processes=1, env=slow)
    deadline = time.monotonic() + 120
    while not list(cache.glob("train-*/shard-*.arrow")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done = {path.name: path.stat().st_mtime_ns for path in cache.glob("train-*/shard-*.arrow")}
    assert 1 <= len(done) < 6, f"killed with {len(done)} of 6 shards done"
    finish(worker(inputs[0], shards, tmp_path, AUGMENTATION.copies, cache, processes=1))
    resumed = json.loads((tmp_path / "rank-0.json").read_text())["runs"][0]
    assert len(resumed["encoded_shards"]["train"]) == 6 - len(done), "only the unfinished shards are encoded"
    assert resumed["splits"] == columns(reference) and resumed["num_skipped"]["train"] == 1
    assert {path.name: path.stat().st_mtime_ns for path in cache.glob("train-*/shard-*.arrow")
            if path.name in done} == done
