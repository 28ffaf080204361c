"""The `dallekit` command line, run as users run it: the installed entry point in a subprocess."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from dallekit.data import DataConfig, load_text_image_dataset
from dallekit.evaluation import EVALUATION_SEED

ROOT = Path(__file__).resolve().parents[1]
DALLEKIT = shutil.which("dallekit")
pytestmark = pytest.mark.skipif(DALLEKIT is None, reason="the dallekit entry point is not installed (pip install -e .)")


def dallekit(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"DALLEKIT_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    return subprocess.run([DALLEKIT, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """`dallekit demo` on the tiny configs: both stages, the reranking scorer, evaluation, samples, pipeline."""
    root = tmp_path_factory.mktemp("cli")
    result = dallekit("demo", "--output-dir", str(root / "demo"), "--stage1-config", "configs/dvae/tiny.yaml",
                      "--stage2-config", "configs/prior/tiny.yaml", "--scorer-config", "configs/scorer/tiny.yaml",
                      "--max-prompts", "12", cache=root / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "demo", root / "cache"


def test_demo_writes_samples_metrics_and_a_pipeline(demo_run: tuple[Path, Path]) -> None:
    output_dir, cache = demo_run
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert {"stage1", "stage2", "scorer", "evaluation", "seconds"} <= metrics.keys()
    assert 0 <= metrics["scorer"]["image_to_text_top1"] <= 1 and metrics["seconds"]["scorer"] > 0
    assert set(metrics["evaluation"]["guidance"]) == {"1.0", "3.0", "5.0"}
    for row in metrics["evaluation"]["guidance"].values():
        assert 0 <= row["adherence"] <= 1 and 0 <= row["exact_copy_rate"] <= 1
    samples = Image.open(output_dir / "samples.png")
    assert samples.width > samples.height  # ten rows of eight images plus the prompts on the left
    index = json.loads((output_dir / "pipeline" / "model_index.json").read_text())
    assert {"vqvae", "prior", "tokenizer", "scorer"} <= index.keys()
    # The reranking scorer is not the evaluation scorer: its own run, another seed.
    scorer_config = yaml.safe_load((output_dir / "scorer" / "config.yaml").read_text())
    assert scorer_config["training"]["seed"] != EVALUATION_SEED and scorer_config["data"]["image_size"] == 16
    assert list((cache / "scorers").glob(f"digits-16px-seed{EVALUATION_SEED}-*"))
    card = (output_dir / "pipeline" / "README.md").read_text()
    assert "pipeline_tag: text-to-image" in card and "adherence" in card
    assert "| `scorer` |" in card and "own caption first for" in card and "num_candidates=16" in card


def test_generate_writes_one_row_per_prompt_and_is_seeded(demo_run: tuple[Path, Path], tmp_path: Path) -> None:
    output_dir, cache = demo_run
    grids = []
    for name, seed in (("a.png", "3"), ("b.png", "3"), ("c.png", "4")):
        result = dallekit("generate", "--model", str(output_dir / "pipeline"), "--prompt", "a handwritten digit seven",
                          "--prompt", "the number 3", "--num-images", "3", "--seed", seed, "--scale", "1",
                          "--out", str(tmp_path / name), cache=cache)
        assert result.returncode == 0, result.stderr[-3000:]
        grids.append(np.asarray(Image.open(tmp_path / name)))
    assert grids[0].shape[0] == 2 + 2 * (16 + 2)  # two rows of 16-pixel images with 2-pixel padding
    np.testing.assert_array_equal(grids[0], grids[1])
    assert not np.array_equal(grids[0], grids[2])


def test_generate_compiled_draws_the_eager_images(demo_run: tuple[Path, Path], tmp_path: Path) -> None:
    """`--compile` (the prior's compiled sampling step) draws the eager loop's images for a seed, but where
    rounding differs: an image whose codes part at one step is drawn differently from there on."""
    output_dir, cache = demo_run
    grids = []
    for name, flags in (("eager.png", ()), ("compiled.png", ("--compile",))):
        result = dallekit("generate", "--model", str(output_dir / "pipeline"), "--prompt", "a handwritten digit seven",
                          "--prompt", "the number 3", "--num-images", "3", "--seed", "3", "--scale", "1", *flags,
                          "--out", str(tmp_path / name), cache=cache)
        assert result.returncode == 0, result.stderr[-3000:]
        grid = np.asarray(Image.open(tmp_path / name))[:, -(3 * 18 + 2):]  # the images, right of the labels
        grids.append([grid[2 + 18 * row: 18 * (row + 1), 2 + 18 * column: 18 * (column + 1)]
                      for row in range(2) for column in range(3)])  # the six 16-pixel images
    same = sum(np.array_equal(eager, compiled) for eager, compiled in zip(*grids))
    assert same >= 4, f"only {same} of 6 images are the same"


def test_generate_reranks_candidates_with_the_saved_scorer(demo_run: tuple[Path, Path], tmp_path: Path) -> None:
    output_dir, cache = demo_run
    prompts = ["a handwritten digit seven", "the number 3"]
    result = dallekit("generate", "--model", str(output_dir / "pipeline"), "--prompt", prompts[0], "--prompt",
                      prompts[1], "--num-images", "2", "--candidates", "8", "--seed", "3", "--scale", "1",
                      "--out", str(tmp_path / "best.png"), cache=cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 images, the best of 8 per prompt by the scorer" in result.stdout
    printed = {line.split("'")[1]: [float(score) for score in line.split(": ")[1].split()]
               for line in result.stdout.splitlines() if line.startswith("scores for")}
    assert list(printed) == prompts and all(len(s) == 2 and s[0] >= s[1] for s in printed.values())
    assert np.asarray(Image.open(tmp_path / "best.png")).shape[0] == 2 + 2 * (16 + 2)


def test_edit_repaints_under_the_mask_and_keeps_the_rest(demo_run: tuple[Path, Path], tmp_path: Path) -> None:
    """`dallekit edit` on a real digit: a 32 px upload (the model draws 16 px) with a mask over its upper half; the
    grid holds the image, then the edits, whose lower half (pasted back) is the image's own."""
    output_dir, cache = demo_run
    digit = load_text_image_dataset(DataConfig(source="digits", image_size=32))["validation"][0]["image"]
    Image.open(io.BytesIO(digit["bytes"])).convert("RGB").save(tmp_path / "digit.png")
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[:16] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    result = dallekit("edit", "--model", str(output_dir / "pipeline"), "--image", str(tmp_path / "digit.png"),
                      "--mask", str(tmp_path / "mask.png"), "--prompt", "the number 3", "--negative-prompt",
                      "the number 8", "--num-images", "2", "--candidates", "4", "--paste-back", "--scale", "1",
                      "--out", str(tmp_path / "edits.png"), cache=cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "note: image is 32x32 and the model draws 16x16: resized to 16x16" in result.stderr
    assert f"2 edits of {tmp_path / 'digit.png'}, under {tmp_path / 'mask.png'}" in result.stdout
    grid = np.asarray(Image.open(tmp_path / "edits.png")).astype(int)[:, -(3 * 18 + 2):]  # right of the label
    image, *edits = [grid[2:18, 2 + 18 * column: 18 * (column + 1)] for column in range(3)]
    for edit in edits:
        assert np.abs(edit[11:] - image[11:]).max() <= 1  # below the soft edge: the upload's pixels
    assert any(np.abs(edit[:8] - image[:8]).max() > 16 for edit in edits)  # above: drawn anew


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "give --mask MASK.png (white: the region to repaint) or --strength S"),
        (["--strength", "1.5"], "strength must be in [0, 1]"),
        (["--mask", "pyproject.toml"], "--mask pyproject.toml: not an image that can be read"),
        (["--mask", "small.png"], "mask_image is 8x8 but the image is 16x16: give a mask of the image's size"),
    ],
    ids=["no mask or strength", "strength above 1", "mask not an image", "mask of another size"],
)
def test_edit_errors_are_one_line(extra: list[str], message: str, tmp_path: Path) -> None:
    from tests.test_pipeline import tiny_pipeline

    tiny_pipeline().save_pretrained(tmp_path / "pipeline")
    Image.new("RGB", (16, 16), (200, 0, 0)).save(tmp_path / "image.png")
    Image.new("L", (8, 8), 255).save(tmp_path / "small.png")
    extra = [str(tmp_path / arg) if arg == "small.png" else arg for arg in extra]
    result = dallekit("edit", "--model", str(tmp_path / "pipeline"), "--image", str(tmp_path / "image.png"), *extra,
                      "--out", str(tmp_path / "x.png"), cache=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if "dallekit edit: error: " in line]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "x.png").exists()


def test_train_init_from_fine_tunes_a_pipeline_with_lora(demo_run: tuple[Path, Path], tmp_path: Path) -> None:
    """`dallekit train --init-from PIPELINE --lora-rank 4`: the image tokenizer kept as it was, an adapter trained
    and saved with the pipeline, the card naming the base model; `generate --lora` takes the adapter alone."""
    output_dir, cache = demo_run
    folder = captioned_folder(tmp_path / "my_shapes", num_images=48, broken=0, image_size=16)
    tiny = ["--stage1-config", "configs/dvae/tiny.yaml", "--stage2-config", "configs/prior/tiny.yaml",
            "--scorer-config", "configs/scorer/tiny.yaml", "--max-prompts", "2"]
    result = dallekit("train", "--data", str(folder), "--init-from", str(output_dir / "pipeline"), "--lora-rank", "4",
                      "--output-dir", str(tmp_path / "run"), "--stage2.training.max_steps", "6", *tiny, cache=cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "keeping the image tokenizer of" in result.stdout and "LoRA rank 4 on q_proj" in result.stderr
    base_tokenizer = (output_dir / "pipeline" / "vqvae" / "model.safetensors").read_bytes()
    assert (tmp_path / "run" / "pipeline" / "vqvae" / "model.safetensors").read_bytes() == base_tokenizer
    assert (tmp_path / "run" / "pipeline" / "lora" / "my_shapes" / "adapter_model.safetensors").is_file()
    card = (tmp_path / "run" / "pipeline" / "README.md").read_text()
    assert "base_model: pipeline" in card and "Fine-tuned from `pipeline`, with the LoRA adapter(s) `my_shapes`" in card
    adapter = tmp_path / "run" / "stage2" / "lora"
    drawn = dallekit("generate", "--model", str(output_dir / "pipeline"), "--lora", str(adapter), "--prompt",
                     "a red circle on the left", "--num-images", "2", "--out", str(tmp_path / "adapted.png"), cache=cache)
    assert drawn.returncode == 0, drawn.stderr[-3000:]
    wrong = dallekit("train", "--data", str(folder), "--init-from", str(output_dir / "pipeline"), "--image-size", "32",
                     "--output-dir", str(tmp_path / "other"), *tiny, cache=cache)
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert ("--image-size 32, but the pipeline at" in wrong.stderr and "draws 16px images: fine-tuning keeps its image "
            "tokenizer; pass --image-size 16 (or none)" in wrong.stderr)
    bad = dallekit("generate", "--model", str(output_dir / "pipeline"), "--lora", str(tmp_path), "--prompt", "a seven",
                   "--out", str(tmp_path / "x.png"), cache=cache)
    assert bad.returncode == 2 and f"--lora {tmp_path}: {tmp_path} is not a LoRA adapter" in bad.stderr
    retrained = dallekit("train", "--data", str(folder), "--init-from", str(output_dir / "pipeline"),
                         "--finetune-image-tokenizer", "--output-dir", str(tmp_path / "both"),
                         "--stage1.training.max_steps", "2", "--stage2.training.max_steps", "2", *tiny, cache=cache)
    assert retrained.returncode == 0, retrained.stderr[-3000:]
    assert f"DVAEModel: starting from the weights of {output_dir / 'pipeline' / 'vqvae'}" in retrained.stderr
    assert "image code sequences in 1 shard(s)" in retrained.stderr and "1 encoded by 1 process(es)" in retrained.stderr
    assert (tmp_path / "both" / "pipeline" / "vqvae" / "model.safetensors").read_bytes() != base_tokenizer


def test_generate_candidates_without_a_scorer_is_one_line(tmp_path: Path) -> None:
    from tests.test_pipeline import tiny_pipeline

    tiny_pipeline().save_pretrained(tmp_path / "pipeline")
    result = dallekit("generate", "--model", str(tmp_path / "pipeline"), "--prompt", "a seven", "--num-images", "2",
                      "--candidates", "4", "--out", str(tmp_path / "x.png"), cache=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "dallekit generate: error: --candidates needs a pipeline with a scorer to rerank")


def captioned_folder(root: Path, num_images: int = 60, broken: int = 3, image_size: int = 24) -> Path:
    """A user's image folder: coloured shapes as PNGs with their captions in `metadata.jsonl`, and a few broken files."""
    from dallekit.data import make_shapes

    root.mkdir(parents=True)
    rows = []
    for index, (image, caption, _) in enumerate(make_shapes(num_images, image_size=image_size, seed=1)):
        image.save(root / f"{index:03d}.png")
        rows.append({"file_name": f"{index:03d}.png", "text": caption})
    for index in range(broken):
        (root / f"broken_{index}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
        rows.append({"file_name": f"broken_{index}.png", "text": "a broken file"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def test_train_on_a_folder_end_to_end_and_the_pipeline_samples(tmp_path: Path) -> None:
    """`dallekit train --data DIR`: both stages and the scorer on a folder with broken files, judged without labels."""
    folder = captioned_folder(tmp_path / "my_images")
    output_dir = tmp_path / "run"
    result = dallekit("train", "--data", str(folder), "--image-size", "16", "--output-dir", str(output_dir),
                      "--stage1-config", "configs/dvae/tiny.yaml", "--stage2-config", "configs/prior/tiny.yaml",
                      "--scorer-config", "configs/scorer/tiny.yaml", cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["image_size"] == 16 and metrics["stage1"]["skipped_images"] > 0  # the broken files, counted
    evaluation = metrics["evaluation"]
    assert "adherence" not in evaluation["guidance"]["3.0"]  # no class labels: the scorer judges
    assert {"r_precision", "clip_score", "near_copy_rate", "exact_copy_rate"} <= set(evaluation["guidance"]["3.0"])
    card = (output_dir / "pipeline" / "README.md").read_text()
    assert str(folder) not in card and "my_images" in card and "r_precision" in card  # no absolute local path
    generated = dallekit("generate", "--model", str(output_dir / "pipeline"), "--prompt", "a red circle on the left",
                         "--num-images", "2", "--candidates", "4", "--out", str(tmp_path / "mine.png"),
                         cache=tmp_path / "cache")
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert Image.open(tmp_path / "mine.png").height == 2 + 16 * 2 + 2
    evaluated = dallekit("evaluate", "--model", str(output_dir / "pipeline"), "--dataset", str(folder),
                         "--guidance-scales", "3", "--max-prompts", "4", cache=tmp_path / "cache")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "r_precision" in json.loads(evaluated.stdout)["guidance"]["3.0"]


def test_train_at_64px_saves_loads_and_samples_64px_images(tmp_path: Path) -> None:
    """Both stages at 64x64 (a tiny tokenizer with 8x8 codes), then the saved pipeline loads and draws 64x64 images."""
    from pipelines import TextToImagePipeline

    folder = captioned_folder(tmp_path / "my_images", num_images=48, broken=0, image_size=64)
    stage1 = yaml.safe_load((ROOT / "configs/dvae/tiny.yaml").read_text())
    stage1["model"] |= {"downsample_factor": 8, "channel_multipliers": [1, 1, 2, 2]}  # 8x8 codes at 64px
    (tmp_path / "tiny64.yaml").write_text(yaml.safe_dump(stage1))
    output_dir = tmp_path / "run"
    result = dallekit("train", "--data", str(folder), "--image-size", "64", "--output-dir", str(output_dir),
                      "--stage1-config", str(tmp_path / "tiny64.yaml"), "--stage2-config", "configs/prior/tiny.yaml",
                      "--scorer-config", "configs/scorer/tiny.yaml", cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((output_dir / "metrics.json").read_text())["image_size"] == 64
    pipe = TextToImagePipeline.from_pretrained(output_dir / "pipeline")
    assert pipe.vqvae.config.image_size == 64 and pipe.scorer is not None
    output = pipe(["a red circle on the left"], num_images_per_prompt=2, num_candidates=4, guidance_scale=3.0)
    assert [image.size for image in output.images] == [(64, 64), (64, 64)] and len(output.scores) == 2
    with Image.open(output_dir / "samples.png") as grid:
        assert grid.width > 8 * 64  # eight 64px samples per row, the prompt beside them


def test_train_in_two_caption_languages_reports_each_language(tmp_path: Path) -> None:
    """The emoji captioned in English and Spanish: one model, judged once per language on the same held-out images."""
    output_dir = tmp_path / "run"
    result = dallekit("train", "--data", "emoji", "--image-size", "16", "--caption-languages", "en", "es",
                      "--output-dir", str(output_dir), "--stage1-config", "configs/dvae/tiny.yaml",
                      "--stage2-config", "configs/prior/tiny.yaml", "--scorer-config", "configs/scorer/tiny.yaml",
                      "--max-prompts", "6", cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    by_language = json.loads((output_dir / "metrics.json").read_text())["evaluation"]["by_language"]
    assert set(by_language) == {"en", "es"}
    for figures in by_language.values():
        assert figures["guidance_scale"] == 3.0 and 0.0 <= figures["r_precision"] <= 1.0
        assert 0.0 <= figures["real_r_precision"] <= 1.0


def test_train_under_accelerate_launch_trains_on_two_processes_and_reports_once(tmp_path: Path) -> None:
    """`accelerate launch` of `dallekit train`: every stage trains on both processes, one process evaluates."""
    from tests.conftest import cpu_processes_env

    output_dir = tmp_path / "run"
    result = subprocess.run(
        ["accelerate", "launch", "--config_file", "configs/accelerate/cpu_2proc.yaml", "-m", "pipelines.cli",
         "train", "--data", "digits", "--output-dir", str(output_dir), "--stage1-config", "configs/dvae/tiny.yaml",
         "--stage2-config", "configs/prior/tiny.yaml", "--scorer-config", "configs/scorer/tiny.yaml",
         "--max-prompts", "8"],
        capture_output=True, text=True, cwd=ROOT, timeout=900,
        env=cpu_processes_env() | {"DALLEKIT_CACHE": str(tmp_path / "cache"), "TQDM_DISABLE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # stage 1, stage 2, the reranking scorer and the evaluation scorer, each on both ranks; no private accelerate
    # state reset in between (one accelerate process state, four accelerators)
    assert result.stderr.count("accelerator: 2 process(es), strategy DDP") == 8
    assert "strategy single process" not in result.stderr
    # the log names the batch an optimiser step sees: 16 per process (stages) or 32 (scorer), on 2 processes
    assert result.stderr.count("effective batch 32 (16 per process x 2 process(es) x 1 accumulation step(s))") == 4
    assert result.stderr.count("effective batch 64 (32 per process x 2 process(es) x 1 accumulation step(s))") == 2
    assert result.stdout.count("[4/5] evaluating") == 1 and result.stdout.count("took ") == 1
    for stage in ("stage1", "stage2", "scorer"):  # both ranks' random states: both trained
        assert len(list((output_dir / stage / "checkpoints").glob("step_8/random_states_*"))) == 2
    assert json.loads((output_dir / "metrics.json").read_text())["evaluation"]["guidance"]
    assert (output_dir / "pipeline" / "model_index.json").is_file()


def test_evaluate_prints_json(demo_run: tuple[Path, Path]) -> None:
    output_dir, cache = demo_run
    result = dallekit("evaluate", "--model", str(output_dir / "pipeline"), "--max-prompts", "8",
                      "--guidance-scales", "1", "3", cache=cache)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(result.stdout)
    assert metrics["dataset"] == "digits" and set(metrics["guidance"]) == {"1.0", "3.0"}
    assert 0 <= metrics["classifier_validation_accuracy"] <= 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "--model", "no/such/dir", "--prompt", "a seven", "--out", "x.png"], "does not exist"),
        (["generate", "--model", "./missing", "--prompt", "a seven", "--num-images", "-2", "--out", "x.png"],
         "expected a positive whole number"),
        (["evaluate", "--model", "./missing"], "does not exist"),
        (["evaluate", "--model", "./missing", "--dataset", "./no/such/folder"], "is not a built-in dataset"),
        (["demo", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["demo", "--stage1-config", "configs/dvae/nope.yaml"], "there is no recipe 'configs/dvae/nope.yaml'; the shipped dvae recipes are: dvae/demo.yaml"),
        (["train", "--data", "./no_such_folder"], "no_such_folder"),
        (["train", "--data", "digits", "--image-size", "48"], "no training recipe for 48px"),
        (["generate", "--model", "tests", "--prompt", "a seven", "--out", "x.png"], "no model_index.json"),
        (["evaluate-tokenizer", "--model", "./missing"], "does not exist"),
        (["generate", "--model", "./missing", "--prompt", "a seven", "--num-images", "4", "--candidates", "2",
          "--out", "x.png"], "--candidates 2 is fewer than --num-images 4"),
    ],
)
def test_user_errors_are_one_line_without_traceback(args: list[str], message: str, tmp_path: Path) -> None:
    result = dallekit(*args, cache=tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
