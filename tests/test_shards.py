"""WebDataset shards: `dallekit data to-shards`, shards as a training source, and the 128px recipe, on real files."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from dallekit.data import (
    DataConfig,
    DataError,
    decode_pairs,
    load_text_image_dataset,
    make_shapes,
)
from dallekit.data.shards import expand_braces

ROOT = Path(__file__).resolve().parents[1]
DALLEKIT = shutil.which("dallekit")
pytestmark = pytest.mark.skipif(DALLEKIT is None, reason="the dallekit entry point is not installed (pip install -e .)")
FORMATS = (("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp"))
TINY = ["--stage1-config", "configs/dvae/tiny.yaml", "--stage2-config", "configs/prior/tiny.yaml",
        "--scorer-config", "configs/scorer/tiny.yaml", "--max-prompts", "2"]


def dallekit(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"DALLEKIT_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    return subprocess.run([DALLEKIT, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200,
                          check=False)


def mixed_folder(root: Path, num_images: int = 30, image_size: int = 24) -> Path:
    """Coloured shapes as PNG, JPEG and WebP files in turn, one corrupt JPEG, captions in `metadata.jsonl`."""
    root.mkdir(parents=True)
    rows = []
    for index, (image, caption, _) in enumerate(make_shapes(num_images, image_size=image_size, seed=2)):
        kind, extension = FORMATS[index % len(FORMATS)]
        image.save(root / f"{index:03d}.{extension}", kind)
        rows.append({"file_name": f"{index:03d}.{extension}", "text": f"{caption}, number {index}"})
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 a truncated jpeg")
    rows.append({"file_name": "corrupt.jpg", "text": "a corrupt file"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def rewrite_shards(shards: Path, output: Path, keep_txt: bool, json_field: str = "caption") -> Path:
    """Copies of the shards without `.txt` members (captions in JSON only), the JSON caption under `json_field`."""
    output.mkdir()
    for path in sorted(shards.glob("*.tar")):
        with tarfile.open(path) as source, tarfile.open(output / path.name, "w") as target:
            for member in source.getmembers():
                data = source.extractfile(member).read()
                if member.name.endswith(".txt") and not keep_txt:
                    continue
                if member.name.endswith(".json"):
                    metadata = json.loads(data)
                    data = json.dumps({json_field: metadata.pop("caption"), **metadata}).encode()
                    member.size = len(data)
                target.addfile(member, io.BytesIO(data))
    return output


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the folder, its shards) written by `dallekit data to-shards`, 8 samples a shard: 31 samples in 4 shards."""
    root = tmp_path_factory.mktemp("shards")
    folder = mixed_folder(root / "folder")
    result = dallekit("data", "to-shards", str(folder), str(root / "shards"), "--shard-size", "8", cache=root / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "31 samples in 4 shard(s)" in result.stdout and f"dallekit train --data {root / 'shards'}" in result.stdout
    return folder, root / "shards"


def pairs_by_caption(config: DataConfig) -> tuple[dict[str, np.ndarray], int]:
    """Every readable image of both splits as pixels, by caption, and the number of unreadable ones skipped."""
    splits = load_text_image_dataset(config)
    found, skipped = {}, 0
    for split in splits.values():
        pairs = decode_pairs(split, config.image_size)
        found |= dict(zip(pairs.texts, pairs.pixel_values.numpy(), strict=True))
        skipped += pairs.num_skipped
    return found, skipped


def test_expand_braces() -> None:
    assert expand_braces("s/{00008..00010}.tar") == ["s/00008.tar", "s/00009.tar", "s/00010.tar"]
    assert expand_braces("{a,b}/{0..1}.tar") == ["a/0.tar", "a/1.tar", "b/0.tar", "b/1.tar"]
    assert expand_braces("one.tar") == ["one.tar"]


def test_to_shards_writes_img2dataset_layout_unchanged_bytes_deterministically(written: tuple[Path, Path],
                                                                                tmp_path: Path) -> None:
    folder, shards = written
    assert sorted(path.name for path in shards.iterdir()) == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    with tarfile.open(shards / "00000.tar") as tar:
        members = tar.getmembers()
        assert [member.name for member in members[:6]] == ["000000000.png", "000000000.txt", "000000000.json",
                                                           "000000001.jpg", "000000001.txt", "000000001.json"]
        assert {member.mtime for member in members} == {0}
        metadata = json.loads(tar.extractfile("000000002.json").read())
        assert metadata == {"caption": tar.extractfile("000000002.txt").read().decode(), "file_name": "002.webp"}
        assert tar.extractfile("000000002.webp").read() == (folder / "002.webp").read_bytes()
    with tarfile.open(shards / "00003.tar") as tar:  # the last shard: the rest, the corrupt file as it was
        names = tar.getnames()
        assert len(names) == 3 * 7
        corrupt = next(name for name in names if json.loads(tar.extractfile(name.replace(
            name.rsplit(".", 1)[1], "json")).read())["file_name"] == "corrupt.jpg")
        assert tar.extractfile(corrupt).read() == (folder / "corrupt.jpg").read_bytes()
    again = dallekit("data", "to-shards", str(folder), str(tmp_path / "again"), "--shard-size", "8",
                     cache=tmp_path / "cache")
    assert again.returncode == 0, again.stderr[-3000:]
    assert all((tmp_path / "again" / name).read_bytes() == (shards / name).read_bytes()
               for name in ("00000.tar", "00003.tar"))


@pytest.mark.parametrize("layout", ["txt", "json only", "json field"])
def test_shards_load_the_folder_images_and_captions_and_count_the_corrupt_member(
        written: tuple[Path, Path], tmp_path: Path, layout: str) -> None:
    folder, shards = written
    field = "alt_text" if layout == "json field" else "caption"
    if layout != "txt":
        shards = rewrite_shards(shards, tmp_path / "json", keep_txt=False, json_field=field)
    expected, expected_skipped = pairs_by_caption(DataConfig(source=str(folder), image_size=16))
    found, skipped = pairs_by_caption(DataConfig(source=f"{shards}/{{00000..00003}}.tar", image_size=16,
                                                 caption_json_field=field))
    assert expected_skipped == skipped == 1  # the corrupt member, counted like the folder's corrupt file
    assert found.keys() == expected.keys() and len(found) == 30
    assert all(np.array_equal(found[caption], expected[caption]) for caption in expected)


def test_validation_holds_out_whole_shards_or_the_named_ones(written: tuple[Path, Path]) -> None:
    _, shards = written
    by_share = load_text_image_dataset(DataConfig(source=str(shards), validation_fraction=0.25, image_size=16))
    held_out = {int(image["path"].split(".")[0]) // 8 for image in by_share["validation"]["image"]}  # shard numbers
    assert len(held_out) == 1 and len(by_share["validation"]) == (7 if held_out == {3} else 8)  # one whole shard
    assert len(by_share["train"]) + len(by_share["validation"]) == 31
    named = load_text_image_dataset(DataConfig(source=str(shards), validation_source=str(shards / "00000.tar")))
    assert len(named["train"]) == 23
    assert [image["path"] for image in named["validation"]["image"]][:2] == ["000000000.png", "000000001.jpg"]
    few = load_text_image_dataset(DataConfig(source=str(shards / "00000.tar"), validation_fraction=0.25))
    assert (len(few["train"]), len(few["validation"])) == (6, 2)  # one shard: samples held out


def test_bad_shards_fail_in_one_line(written: tuple[Path, Path], tmp_path: Path) -> None:
    _, shards = written
    with pytest.raises(DataError, match=r"no shard matches .*\{00000\.\.00009\}.*none of which exists"):
        load_text_image_dataset(DataConfig(source=f"{tmp_path}/{{00000..00009}}.tar"))
    with tarfile.open(tmp_path / "captions.tar", "w") as tar:
        info = tarfile.TarInfo("000000000.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    with pytest.raises(DataError, match=r"none of the 1 samples of its shards has an image member"):
        load_text_image_dataset(DataConfig(source=str(tmp_path / "captions.tar")))
    json_only = rewrite_shards(shards, tmp_path / "json", keep_txt=False)
    with pytest.raises(DataError, match=r"31 of the 31 samples have no caption.*'alt_text'.*set data.caption_json_"):
        load_text_image_dataset(DataConfig(source=str(json_only), caption_json_field="alt_text"))
    with pytest.raises(ValueError, match="caption_json_field=''"):
        DataConfig(caption_json_field="")
    result = dallekit("train", "--data", f"{tmp_path}/{{00000..00009}}.tar", *TINY, "--output-dir",
                      str(tmp_path / "run"), cache=tmp_path / "cache")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("dallekit train: error: no shard matches")


@pytest.mark.parametrize("streaming", [False, True], ids=["in-memory", "streamed-json-captions"])
def test_train_on_shards_trains_every_stage_and_counts_the_corrupt_member(written: tuple[Path, Path],
                                                                          tmp_path: Path, streaming: bool) -> None:
    _, shards = written
    if streaming:  # captions in the JSON members only, every stage reading the shards as a stream
        shards = rewrite_shards(shards, tmp_path / "json-shards", keep_txt=False)
    result = dallekit("train", "--data", f"{shards}/{{00000..00003}}.tar", "--image-size", "16", *TINY,
                      "--data.validation_source", str(shards / "00000.tar"), f"--data.streaming={streaming}",
                      *(f"--{stage}.training.{name}={value}" for stage in ("stage1", "stage2", "scorer")
                        for name, value in (("max_steps", 2), ("batch_size", 8))),
                      "--output-dir", str(tmp_path / "run"), cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [metrics[stage]["step"] for stage in ("stage1", "stage2", "scorer")] == [2, 2, 2]
    assert metrics["stage1"]["skipped_images"] == 1 and metrics["stage2"]["skipped_images"] == 1
    assert (tmp_path / "run" / "pipeline" / "model_index.json").is_file()


def test_the_128px_recipe_trains_a_few_steps_on_a_cpu_and_warns(tmp_path: Path) -> None:
    """`dallekit train` picks the 128px recipe for 128px images, warns that it is GPU-sized with the time it
    would take, and trains (a few steps, small batches)."""
    folder = tmp_path / "folder"
    folder.mkdir()
    rows = []
    for index, (image, caption, _) in enumerate(make_shapes(12, image_size=128, seed=3)):
        image.save(folder / f"{index:03d}.jpg", "JPEG")
        rows.append({"file_name": f"{index:03d}.jpg", "text": caption})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    steps = [f"--{stage}.training.{name}={value}" for stage in ("stage1", "stage2", "scorer")
             for name, value in (("max_steps", 1), ("batch_size", 2), ("eval_every", 1))]
    result = dallekit("train", "--data", str(folder), "--image-size", "128", "--max-prompts", "2",
                      "--output-dir", str(tmp_path / "run"), *steps, cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the 128px recipe is sized for a GPU" in result.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["image_size"] == 128 and metrics["stage1"]["step"] == 1
    assert "fsq_128px.yaml" in result.stdout and "small.yaml" in result.stdout and "128px.yaml" in result.stdout
    with PIL.Image.open(tmp_path / "run" / "samples.png") as grid:
        assert grid.height > 128
