"""A Hugging Face Space that serves a Hub model's web page: `write_space(folder, repo_id)`.

The Space's `app.py` runs `pipelines.web.load_app` on the model; this module writes the files and
imports neither Gradio nor the pipeline, so `TextToImagePipeline.push_to_hub` can use it.
"""

from __future__ import annotations

import shutil
from importlib.metadata import PackageNotFoundError, distribution, requires
from importlib.metadata import version as package_version
from importlib.util import find_spec
from pathlib import Path

from huggingface_hub import SpaceCard, SpaceCardData

from pipelines.model_card import dallekit_version

SPACE_APP = '''"""A page to try the dallekit text-to-image model {repo_id} (written by dallekit {version})."""

from pipelines.web import load_app

load_app({repo_id!r}, revision={revision!r}).launch()
'''


def require_gradio() -> str:
    """The installed Gradio's version, which a Space pins; an ImportError saying how to install it if there is none."""
    try:
        return package_version("gradio")
    except PackageNotFoundError as error:
        raise ImportError('a Gradio Space needs Gradio, which is not installed: pip install -e ".[web]" '
                          "(from the dallekit checkout)") from error


def write_space(folder: str | Path, repo_id: str, revision: str | None = None) -> Path:
    """Write a Gradio Space that serves the Hub model `repo_id` to `folder`.

    It holds `app.py`, `requirements.txt` (dallekit's dependencies), the Space card `README.md`
    (pinned to the installed Gradio, linked to the model) and a copy of dallekit's own packages: dallekit
    is not on PyPI, and so the Space runs the code that pushed the model.
    """
    gradio_version = require_gradio()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "app.py").write_text(SPACE_APP.format(repo_id=repo_id, revision=revision, version=dallekit_version()))
    dependencies = [requirement for requirement in requires("dallekit") or [] if "extra ==" not in requirement]
    (folder / "requirements.txt").write_text("\n".join(dependencies) + "\n")
    for package in distribution("dallekit").read_text("top_level.txt").split():
        source = Path(find_spec(package).origin).parent
        shutil.copytree(source, folder / package, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    card = SpaceCardData(
        title=f"dallekit {repo_id.split('/')[-1]}", sdk="gradio", sdk_version=gradio_version,
        app_file="app.py", models=[repo_id], tags=["dallekit", "text-to-image"], emoji="🎨", colorFrom="indigo",
        colorTo="pink",
    )
    SpaceCard(
        f"---\n{card.to_yaml()}\n---\n\nA page to try the text-to-image model [{repo_id}]"
        f"(https://huggingface.co/{repo_id}), trained with dallekit: type a prompt, get images.\n"
    ).save(folder / "README.md")
    return folder
