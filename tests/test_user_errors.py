"""A user's own data and arguments: every problem is one line (rc 2, no traceback) before anything trains,
limits come with their reasons, and a saved card publishes no local path and carries the licence given."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from huggingface_hub import ModelCard
from PIL import Image

from dallekit.data import DataConfig, DataError, DataSourceNotFoundError, load_text_image_dataset
from dallekit.data.sources import check_source_exists
from dallekit.scorer.train import ScorerTrainConfig
from dallekit.training.config import ConfigError, load_config
from dallekit.training.data import fitted_batch_size
from pipelines.text_to_image import MAX_IMAGES_PER_CALL, TextToImagePipeline
from stage1_dvae.train import Stage1Config
from stage2_prior.train import Stage2Config
from tests.test_pipeline import tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
DALLEKIT = shutil.which("dallekit")
needs_entry_point = pytest.mark.skipif(DALLEKIT is None, reason="the dallekit entry point is not installed")
TINY = ["--image-size", "16", "--stage1-config", "configs/dvae/tiny.yaml", "--stage2-config", "configs/prior/tiny.yaml",
        "--scorer-config", "configs/scorer/tiny.yaml"]
DEAD_PROXY = "http://127.0.0.1:9"  # refuses connections: "no network", whether or not this machine has one


def dallekit(*args: str, cache: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {name: value for name, value in os.environ.items() if name.lower() != "no_proxy"}
    environment |= {"DALLEKIT_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"} | env
    return subprocess.run([DALLEKIT, *args], capture_output=True, text=True, env=environment, cwd=ROOT, timeout=300)


def one_line_error(result: subprocess.CompletedProcess, command: str) -> str:
    """The single stderr line of a user error, after checking rc 2 and that there is no traceback."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"dallekit {command}: error: ")
    return lines[0]


def images(folder: Path, count: int = 6) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"{index}.png" for index in range(count)]
    for index, name in enumerate(names):
        Image.new("RGB", (16, 16), (40 * index, 0, 0)).save(folder / name)
    return names


def jsonl(folder: Path, rows: list[dict]) -> None:
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def captioned_pictures(folder: Path, count: int) -> Path:
    """A valid folder of `count` pictures, each captioned with its file name."""
    jsonl(folder, [{"file_name": name, "text": f"picture {name}"} for name in images(folder, count)])
    return folder


def no_metadata(folder: Path) -> list[str]:
    images(folder)
    return ["no metadata file found in", str(folder), 'add metadata.jsonl with one {"file_name": "0.png", "text"']


def caption_column(folder: Path) -> list[str]:
    jsonl(folder, [{"file_name": name, "caption": f"picture {name}"} for name in images(folder)])
    return [f"{folder / 'metadata.jsonl'} has no 'text' column (columns: file_name, caption)",
            "rename 'caption' to 'text'", "--caption-column caption"]


def files_missing(folder: Path) -> list[str]:
    images(folder)
    jsonl(folder, [{"file_name": f"photos/{index}.jpg", "text": "a red square"} for index in range(6)])
    return ["none of the 6 files", str(folder / "photos" / "0.jpg"), "line 1"]


def malformed_json(folder: Path) -> list[str]:
    names = images(folder)
    lines = [json.dumps({"file_name": name, "text": "a red square"}) for name in names]
    lines[2] = lines[2][:-1]  # the closing brace lost
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return [f"{folder / 'metadata.jsonl'}, line 3: not valid JSON"]


def latin1_jsonl(folder: Path) -> list[str]:
    names = images(folder)
    lines = [json.dumps({"file_name": name, "text": "a red square"}, ensure_ascii=False) for name in names]
    lines[1] = json.dumps({"file_name": names[1], "text": "un carré rouge"}, ensure_ascii=False)
    (folder / "metadata.jsonl").write_bytes("\n".join(lines).encode("latin-1") + b"\n")
    return [f"{folder / 'metadata.jsonl'}, line 2: byte 0xe9", "convert it to UTF-8, e.g. iconv -f latin1 -t utf-8"]


def latin1_csv(folder: Path) -> list[str]:
    names = images(folder)
    rows = ["file_name,text"] + [f"{name},a red square" for name in names]
    rows[2] = f"{names[1]},un carré rouge"
    (folder / "metadata.csv").write_bytes("\n".join(rows).encode("latin-1") + b"\n")
    return [f"{folder / 'metadata.csv'}, line 3: byte 0xe9", "convert it to UTF-8, e.g. iconv -f latin1 -t utf-8"]


BAD_FOLDERS: dict[str, Callable[[Path], list[str]]] = {
    "images without metadata": no_metadata,
    "caption instead of text": caption_column,
    "every named file missing": files_missing,
    "malformed JSON line": malformed_json,
    "Latin-1 metadata.jsonl": latin1_jsonl,
    "Latin-1 metadata.csv": latin1_csv,
}


@needs_entry_point
@pytest.mark.parametrize("problem", list(BAD_FOLDERS))
def test_a_bad_folder_is_one_line_before_anything_trains(problem: str, tmp_path: Path) -> None:
    folder = tmp_path / "my images"
    expected = BAD_FOLDERS[problem](folder)
    output_dir = tmp_path / "run"
    result = dallekit("train", "--data", str(folder), "--output-dir", str(output_dir), *TINY, cache=tmp_path / "cache")
    line = one_line_error(result, "train")
    assert all(part in line for part in expected), line
    assert not (output_dir / "stage1" / "checkpoints").exists()


@needs_entry_point
@pytest.mark.parametrize(
    ("data", "env", "expected"),
    [
        ("my_images", {"HF_HUB_OFFLINE": "0", "HTTPS_PROXY": DEAD_PROXY, "HTTP_PROXY": DEAD_PROXY},
         [f"no folder {ROOT / 'my_images'}: 'my_images' is not a built-in dataset"]),  # never sent to the Hub
        ("someone/no-such-images", {}, ["'someone/no-such-images' is not in the local cache", "HF_HUB_OFFLINE=1"]),
        ("someone/no-such-images", {"HF_HUB_OFFLINE": "0", "HTTPS_PROXY": DEAD_PROXY, "HTTP_PROXY": DEAD_PROXY},
         ["cannot reach the Hub to download the dataset 'someone/no-such-images'", "check the network"]),
    ],
    ids=["relative name of no folder", "Hub id offline", "Hub id without network"],
)
def test_a_source_that_is_not_there_is_one_line(data: str, env: dict[str, str], expected: list[str],
                                                 tmp_path: Path) -> None:
    output_dir = tmp_path / "run"
    result = dallekit("train", "--data", data, "--output-dir", str(output_dir), *TINY, cache=tmp_path / "cache",
                      HF_HOME=str(tmp_path / "hf"), **env)
    line = one_line_error(result, "train")
    assert all(part in line for part in expected), line
    assert not (output_dir / "stage1").exists()


@needs_entry_point
def test_a_batch_chosen_too_large_for_the_folder_is_one_line(tmp_path: Path) -> None:
    """The tiny configs' batch of 16 on 12 images (10 to train on): refused before stage 1, naming a batch that fits."""
    folder, output_dir = captioned_pictures(tmp_path / "pictures", 12), tmp_path / "run"
    result = dallekit("train", "--data", str(folder), "--output-dir", str(output_dir), *TINY, cache=tmp_path / "cache")
    line = one_line_error(result, "train")
    assert ("stage1: training.batch_size 16 x 1 process(es) needs 16 training images, and the training split has 10: "
            "pass --stage1.training.batch_size 4") in line
    assert not (output_dir / "stage1").exists()


@needs_entry_point
def test_a_folder_smaller_than_the_recipes_batch_trains_with_a_fitted_one(tmp_path: Path) -> None:
    """The shipped 32px recipe (batches 64, 64, 128) on 24 images: every stage trains with batch 8, and says so."""
    folder, output_dir = captioned_pictures(tmp_path / "pictures", 24), tmp_path / "run"
    few_steps = [f"--{stage}.training.max_steps=2" for stage in ("stage1", "stage2", "scorer")]
    result = dallekit("train", "--data", str(folder), "--image-size", "32", "--output-dir", str(output_dir),
                      "--max-prompts", "2", *few_steps, cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    for stage, batch in (("stage1", 64), ("stage2", 64), ("scorer", 128)):
        assert (f"{stage}: the training split has 21 images (21 per process), fewer than the recipe's batch {batch}: "
                f"training with batch 8 (choose with --{stage}.training.batch_size)") in result.stderr
        saved = yaml.safe_load((output_dir / stage / "config.yaml").read_text())
        assert saved["training"]["batch_size"] == 8
    assert (output_dir / "pipeline" / "model_index.json").is_file()


# ----------------------------------------------------------------------------- the library: the same checks, in-process


def test_missing_files_and_empty_captions_are_counted_not_fatal(tmp_path: Path, caplog) -> None:
    folder = tmp_path / "pictures"
    names = images(folder, 10)
    rows = [{"file_name": name, "text": "" if index in (3, 4) else f"picture {index}"}
            for index, name in enumerate(names)] + [{"file_name": "gone.png", "text": "lost"}]
    jsonl(folder, rows)
    with caplog.at_level(logging.WARNING, logger="dallekit.data"):
        splits = load_text_image_dataset(DataConfig(source=str(folder), image_size=8))
    assert len(splits["train"]) + len(splits["validation"]) == 11
    missing = f"1 of the 11 files named in {folder}'s metadata are missing (the first: {folder / 'gone.png'}"
    assert missing in caplog.text
    assert f"2 of the 11 captions in {folder} are empty (the first: {folder / 'metadata.jsonl'}, line 4)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dallekit.data"):
        load_text_image_dataset(DataConfig(source=str(folder), image_size=8))
    assert "missing" not in caplog.text  # an unchanged folder is checked once per process


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ("file_name,text\n0.png,a cat\n1.png,a cat, sitting\n", r"metadata.csv, line 3: 3 fields, but the header has"),
        ("file_name,text\n0.png,a cat\n1.png,\n", r"metadata.csv, line 3: text is empty, which a CSV reader reads as a"),
        ("file_name,text\n0.png,None\n1.png,a cat\n", r"metadata.csv, line 2: text is 'None', which a CSV reader"),
        ("file_name,text\n0.png,7\n1.png,3\n", r"every text in .*metadata.csv is a number"),
        ("file_name,label\n0.png,7\n", r"has no 'text' column \(columns: file_name, label\): rename 'label'"),
    ],
    ids=["unquoted comma", "empty CSV caption", "None as a caption", "numbers as captions", "other caption column"],
)
def test_csv_problems_name_the_line(rows: str, expected: str, tmp_path: Path) -> None:
    folder = tmp_path / "pictures"
    images(folder, 2)
    (folder / "metadata.csv").write_text(rows)
    with pytest.raises(DataError, match=expected):
        load_text_image_dataset(DataConfig(source=str(folder), image_size=8))


def test_the_caption_column_is_data_config_text_column(tmp_path: Path) -> None:
    folder = tmp_path / "pictures"
    jsonl(folder, [{"file_name": name, "caption": f"picture {name}"} for name in images(folder)])
    splits = load_text_image_dataset(DataConfig(source=str(folder), image_size=8, text_column="caption"))
    texts = [*splits["train"]["text"], *splits["validation"]["text"]]
    assert sorted(texts) == [f"picture {index}.png" for index in range(6)]
    check_source_exists(str(folder), text_column="caption")
    with pytest.raises(DataError, match="--caption-column caption"):
        check_source_exists(str(folder))


def test_path_like_names_never_reach_the_hub(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("my_images", "./my_images", "../my_images", "data/sub/my_images"):
        with pytest.raises(DataSourceNotFoundError, match="is not a built-in dataset"):
            check_source_exists(name)
    with pytest.raises(FileNotFoundError, match=r"'~/' starts with a ~ that no shell expanded"):
        check_source_exists("~/")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images and no metadata.jsonl"):
        check_source_exists("empty")


# ----------------------------------------------------------------------------- limits with reasons


@pytest.fixture(scope="module")
def pipe() -> TextToImagePipeline:
    return tiny_pipeline()


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        ({"prompt": "a seven", "num_images_per_prompt": MAX_IMAGES_PER_CALL + 1},
         r"1,025 images, more than the 1,024 one call returns: a call holds all its images in memory"),
        ({"prompt": ["a seven", "a two"], "num_images_per_prompt": 600}, r"2 prompt\(s\) x 600 images per prompt"),
        ({"prompt": "a seven", "num_candidates": 10_000}, r"10,000 candidates, more than the 8,192"),
        ({"prompt": "a seven", "guidance_scale": float("inf")}, r"guidance_scale must be a finite number, got inf"),
        ({"prompt": "a seven", "guidance_scale": float("nan")}, r"got nan"),
        ({"prompt": "a seven", "temperature": float("inf")}, r"temperature must be a finite number > 0, got inf"),
    ],
    ids=["too many images", "too many over prompts", "too many candidates", "inf guidance", "nan guidance",
         "inf temperature"],
)
def test_a_call_beyond_the_limits_is_refused_with_the_reason(pipe: TextToImagePipeline, call: dict,
                                                             expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        pipe(**call, progress=False)


def test_long_prompts_are_counted_in_one_warning_per_call(pipe: TextToImagePipeline) -> None:
    long_prompt = "a handwritten digit seven " * 10
    prompts = ["a seven", *[f"{index} {long_prompt}" for index in range(5)]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe(prompts, output_type="pt", progress=False)
    cut = [str(warning.message) for warning in caught if "longer than the model reads" in str(warning.message)]
    assert len(cut) == 1
    assert cut[0].startswith("5 of 6 captions are longer than the model reads and were cut: caption 1 (")
    assert "caption 3 (" in cut[0] and "caption 4 (" not in cut[0] and cut[0].endswith("; and 2 more: text_len is 8")


@pytest.fixture(scope="module")
def saved_pipeline(pipe: TextToImagePipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pipe.save_pretrained(tmp_path_factory.mktemp("generate") / "pipeline")


@needs_entry_point
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--num-images", "1000000"], "1 prompt(s) x 1,000,000 images per prompt is 1,000,000 images, more than the "
                                      "1,024 one call returns"),
        (["--num-images", "8", "--candidates", "100000"], "100,000 candidates, more than the 8,192"),
        (["--guidance-scale", "inf"], "argument --guidance-scale: expected a positive finite number, got 'inf'"),
        (["--guidance-scale", "nan"], "expected a positive finite number, got 'nan'"),
        (["--guidance-plausibility", "1"], "argument --guidance-plausibility: expected a number in [0, 1)"),
    ],
    ids=["num images", "candidates", "inf guidance", "nan guidance", "plausibility one"],
)
def test_generate_refuses_what_a_call_cannot_do(saved_pipeline: Path, args: list[str], expected: str,
                                                tmp_path: Path) -> None:
    result = dallekit("generate", "--model", str(saved_pipeline), "--prompt", "a seven", *args,
                      "--out", str(tmp_path / "grid.png"), cache=tmp_path / "cache")
    assert expected in one_line_error(result, "generate")
    assert not (tmp_path / "grid.png").exists()


@needs_entry_point
def test_generate_cuts_a_long_row_label(saved_pipeline: Path, tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    result = dallekit("generate", "--model", str(saved_pipeline), "--prompt", "a seven " * 1000, "--num-images", "2",
                      "--out", str(out), "--no-compile", cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    assert Image.open(out).width < 1000  # the label is cut to 60 characters, not 8,000 (about 50,000 px)


# ----------------------------------------------------------------------------- cards


def test_the_card_holds_no_local_path_and_the_licence_given(pipe: TextToImagePipeline, tmp_path: Path) -> None:
    folder = tmp_path / "private" / "holiday photos"
    pipe.training_info = {
        "dataset": str(folder),
        "data_description": f"`{folder}` (train split) at 16x16, trained with `dallekit train`.",
        "metrics": {"dataset": str(folder), "guidance": {"3.0": {"clip_score": 0.5}}},
        "license": "CC-BY-4.0",
    }
    pipe.save_pretrained(tmp_path / "saved")
    text = (tmp_path / "saved" / "README.md").read_text()
    assert str(tmp_path) not in text and "holiday photos" in text  # neither the data's nor the pipeline's path
    assert 'from_pretrained("saved")' in text
    card = ModelCard.load(tmp_path / "saved" / "README.md")
    assert card.data.license == "cc-by-4.0"
    assert "Licence of the training data, which this model carries: CC-BY-4.0." in card.text
    info = TextToImagePipeline.from_pretrained(tmp_path / "saved").training_info
    assert info["dataset"] == "holiday photos" and info["metrics"]["dataset"] == "holiday photos"
    assert info["data_description"].startswith("`holiday photos` (train split)")

    pipe.training_info = {"dataset": "someone/pictures", "license": "my own terms (see LICENSE.txt)"}
    pipe.save_pretrained(tmp_path / "hub")
    card = ModelCard.load(tmp_path / "hub" / "README.md")
    assert (card.data.license, card.data.license_name) == ("other", "my-own-terms-see-license.txt")
    assert "(someone/pictures)" in card.text  # a Hub id is kept


@pytest.mark.parametrize(("num_images", "num_processes", "expected"), [(21, 1, 8), (21, 2, 4), (200, 2, 32), (5, 2, 2)])
def test_fitted_batch_leaves_two_batches_per_process(num_images: int, num_processes: int, expected: int) -> None:
    assert fitted_batch_size(num_images, num_processes) == expected
    assert expected * num_processes <= num_images


def test_batches_are_checked_for_every_stage_and_process_before_training(tmp_path: Path, caplog) -> None:
    """On 2 processes: recipe batches are lowered, a chosen one is refused naming the stage, too few images refused."""
    from pipelines.train import fit_batches_to_data

    def configs() -> dict[str, Any]:
        return {name: load_config(cls, ["--config", f"configs/{path}"]) for name, cls, path in
                (("stage1", Stage1Config, "dvae/tiny.yaml"), ("stage2", Stage2Config, "prior/tiny.yaml"),
                 ("scorer", ScorerTrainConfig, "scorer/tiny.yaml"))}  # batches 16, 16, 32

    fitted = configs()
    with caplog.at_level(logging.WARNING, logger="pipelines.train"):
        fit_batches_to_data(fitted, train_images=40, num_processes=2, chosen=set())
    assert [config.training.batch_size for config in fitted.values()] == [16, 16, 8]  # 32 x 2 > 40
    assert "scorer: the training split has 40 images (20 per process), fewer than the recipe's batch 32" in caplog.text
    with pytest.raises(ConfigError, match=r"scorer: training.batch_size 32 x 2 process\(es\) needs 64 training images, "
                                          r"and the training split has 40: pass --scorer.training.batch_size 8"):
        fit_batches_to_data(configs(), train_images=40, num_processes=2, chosen={"scorer"})
    with pytest.raises(DataError, match=r"has 3 image\(s\), too few for 2 process\(es\): .* at least 4"):
        fit_batches_to_data(configs(), train_images=3, num_processes=2, chosen=set())
