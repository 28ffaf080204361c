"""A wheel built from the repository works outside the source tree: recipes found, no top-level name clashes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.test_cli import captioned_folder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding dallekit from a wheel; its dependencies are this environment's (a .pth entry)."""
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(root / "dist"),
                    str(ROOT)], check=True, capture_output=True, text=True, timeout=600)
    (wheel,) = (root / "dist").glob("dallekit-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # the dependencies (torch, transformers, ...) from this environment, without its editable dallekit finder
    Path(purelib, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    str(wheel)], check=True, capture_output=True, text=True, timeout=600)
    return venv


def test_the_wheel_installs_namespaced_packages_and_recipes(wheel_venv: Path, tmp_path: Path) -> None:
    probe = (
        "import importlib.util, json, dallekit, stage1_dvae\n"
        "from dallekit.training.config import recipe_path\n"
        "print(json.dumps({'dallekit': dallekit.__file__, 'stage1': stage1_dvae.__file__,\n"
        "    'recipe': str(recipe_path('configs/dvae/demo.yaml')),\n"
        "    'top_level': [n for n in ('training', 'evaluation', 'scorer', 'textimage_data', 'configs')\n"
        "                  if importlib.util.find_spec(n)]}))\n"
    )
    result = subprocess.run([wheel_venv / "bin" / "python", "-c", probe], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout)
    for key in ("dallekit", "stage1", "recipe"):
        assert str(wheel_venv) in found[key] and str(ROOT) not in found[key], found
    assert found["top_level"] == []  # nothing that could shadow another project's modules


def test_dallekit_train_from_the_wheel_finds_its_recipes(wheel_venv: Path, tmp_path: Path) -> None:
    """`dallekit train` on a tiny folder, run outside the source tree: the shipped recipes load by name."""
    folder = captioned_folder(tmp_path / "my_images", num_images=48)
    env = os.environ | {"DALLEKIT_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    result = subprocess.run(
        [wheel_venv / "bin" / "dallekit", "train", "--data", str(folder), "--image-size", "16", "--output-dir", "run",
         "--stage1-config", "configs/dvae/tiny.yaml", "--stage2-config", "prior/tiny.yaml",
         "--scorer-config", "configs/scorer/tiny.yaml", "--max-prompts", "4"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert str(ROOT) not in result.stderr  # nothing was read from the source tree
    assert (tmp_path / "run" / "pipeline" / "model_index.json").is_file()
    missing = subprocess.run([wheel_venv / "bin" / "dallekit", "train", "--data", str(folder), "--image-size", "16",
                              "--stage1-config", "configs/dvae/nope.yaml", "--stage2-config", "prior/tiny.yaml",
                              "--scorer-config", "scorer/tiny.yaml"],
                             capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert missing.returncode == 2 and "configs/dvae/nope.yaml" in missing.stderr
    assert "Traceback" not in missing.stderr
