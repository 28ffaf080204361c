"""The `dallekit` command line, run as users run it: the installed entry point in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DALLEKIT = shutil.which("dallekit")
pytestmark = pytest.mark.skipif(DALLEKIT is None, reason="the dallekit entry point is not installed (pip install -e .)")


def dallekit(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"DALLEKIT_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    return subprocess.run([DALLEKIT, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """`dallekit demo` on the tiny configs: both stages, evaluation, samples, pipeline."""
    root = tmp_path_factory.mktemp("cli")
    result = dallekit("demo", "--output-dir", str(root / "demo"), "--stage1-config", "configs/dvae/tiny.yaml",
                      "--stage2-config", "configs/prior/tiny.yaml", "--max-prompts", "12", cache=root / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "demo", root / "cache"


def test_demo_writes_samples_metrics_and_a_pipeline(demo_run: tuple[Path, Path]) -> None:
    output_dir, _ = demo_run
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert {"stage1", "stage2", "evaluation", "seconds"} <= metrics.keys()
    assert set(metrics["evaluation"]["guidance"]) == {"1.0", "3.0", "5.0"}
    for row in metrics["evaluation"]["guidance"].values():
        assert 0 <= row["adherence"] <= 1 and 0 <= row["exact_copy_rate"] <= 1
    samples = Image.open(output_dir / "samples.png")
    assert samples.width > samples.height  # ten rows of eight images plus the prompts on the left
    index = json.loads((output_dir / "pipeline" / "model_index.json").read_text())
    assert {"vqvae", "prior", "tokenizer"} <= index.keys()
    card = (output_dir / "pipeline" / "README.md").read_text()
    assert "pipeline_tag: text-to-image" in card and "adherence" in card


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
        (["evaluate", "--model", "./missing", "--dataset", "cats"], "unknown dataset 'cats'"),
        (["demo", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["demo", "--stage1-config", "configs/dvae/nope.yaml"], "not found"),
        (["generate", "--model", "tests", "--prompt", "a seven", "--out", "x.png"], "no model_index.json"),
        (["evaluate-tokenizer", "--model", "./missing"], "does not exist"),
    ],
)
def test_user_errors_are_one_line_without_traceback(args: list[str], message: str, tmp_path: Path) -> None:
    result = dallekit(*args, cache=tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
