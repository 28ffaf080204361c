"""The documentation: the site builds strictly, and the examples of README.md and docs/ run.

- `mkdocs build --strict` builds `docs/` (Material theme, mkdocstrings API reference): a broken link
  or anchor, a page left out of the navigation, or an API reference to a name that no longer exists
  fails.
- Every fenced ```python or ```bash block preceded by the line `<!-- runnable -->` runs: Python in
  this process, each block on its own; shell in a subprocess. They share one temporary working
  directory holding what they load: tiny real components (random weights) with the demo's shapes
  (32 px, 8x8 codes out of 128), saved where `dallekit demo` saves its own (`outputs/demo/...`), and
  an image folder `my_images/`. The evaluation judges that an example trains are trained with tiny
  settings (a few steps) to keep the examples quick.
- Every block, runnable or not, is checked without running it: Python compiles and its imports
  resolve; each `dallekit` command line parses with the real command-line parser; each training
  module's arguments (`python -m stage1_dvae.train --config ...`, under `accelerate launch` too) load
  as its config, so keys and values are validated; each script and launch config named exists; each
  line of a ```json block parses (the `metadata.jsonl` examples).
- README.md keeps the quick-start commands that CI runs byte for byte, links only to files and
  anchors that exist, and stays a front door (at most 250 lines).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

from dallekit.data import DataConfig

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
RUNNABLE = "<!-- runnable -->"
DEMO_COMMAND = ('python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && '
                'pip install -e ".[test]" && dallekit demo')
TEST_COMMAND = ('python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && '
                'pip install -e ".[test,web]" && python -m pytest -q tests')
OPTIONAL_MODULES = {"gradio", "gradio_client"}  # the `web` extra
STAGES = ("stage1", "stage2", "scorer")  # the prefixes of `dallekit train`'s per-stage overrides


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    runnable: bool

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def code_blocks(page: Path) -> list[Block]:
    """The fenced code blocks of `page`, each marked runnable when the line before its fence is `RUNNABLE`."""
    lines = page.read_text().splitlines()
    blocks, index = [], 0
    while index < len(lines):
        opening = re.match(r"^```(\w*)\s*$", lines[index])
        if not opening:
            index += 1
            continue
        end = next((i for i in range(index + 1, len(lines)) if lines[i].strip() == "```"), None)
        assert end is not None, f"{page.relative_to(ROOT)}:{index + 1}: a code fence is never closed"
        runnable = index > 0 and lines[index - 1].strip() == RUNNABLE
        blocks.append(Block(page, index + 1, opening.group(1), "\n".join(lines[index + 1:end]) + "\n", runnable))
        index = end + 1
    return blocks


BLOCKS = [block for page in PAGES for block in code_blocks(page)]


def blocks(language: str, runnable: bool | None = None) -> list:
    chosen = [b for b in BLOCKS if b.language == language and (runnable is None or b.runnable == runnable)]
    return [pytest.param(b, id=b.name) for b in chosen]


# ---- the site ----------------------------------------------------------------------------------


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings_handlers") is None:
        pytest.fail('mkdocs, mkdocs-material and mkdocstrings[python] are in the test extra: pip install -e ".[test]"')
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
        env=os.environ | {"NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "site" / "reference" / "index.html").is_file()
    assert "TextToImagePipeline" in (tmp_path / "site" / "reference" / "index.html").read_text()


def test_every_page_is_in_the_navigation() -> None:
    navigation = (ROOT / "mkdocs.yml").read_text()
    pages = sorted(path.relative_to(ROOT / "docs").as_posix() for path in (ROOT / "docs").rglob("*.md"))
    assert [page for page in pages if f": {page}" not in navigation] == []


# ---- README.md as the front door ------------------------------------------------------------------


def slug(heading: str) -> str:
    """The anchor Python-Markdown's `toc` extension gives a heading (code spans and links as their text)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", text).strip().lower())


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)  # no comments in code
    return {slug(match) for match in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.MULTILINE)}


def test_the_readme_keeps_the_commands_ci_runs_byte_for_byte() -> None:
    readme = (ROOT / "README.md").read_text()
    assert f"```bash\n{DEMO_COMMAND}\n```" in readme
    assert f"```bash\n{TEST_COMMAND}\n```" in readme


def test_the_readme_is_a_front_door() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines: move reference material into docs/"


def test_the_readme_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", readme)
    assert targets
    broken = []
    for target in targets:
        if re.match(r"^[a-z]+:", target):  # an absolute URL
            continue
        path, _, anchor = target.partition("#")
        file = ROOT / path if path else ROOT / "README.md"
        if not file.exists():
            broken.append(f"{target}: no file {path}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: {path or 'README.md'} has no heading #{anchor}")
    assert broken == []


# ---- checks of every block, without running it -------------------------------------------------------


@pytest.mark.parametrize("block", blocks("python"))
def test_python_examples_compile_and_their_imports_resolve(block: Block) -> None:
    tree = ast.parse(block.code, filename=block.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            targets = [(node.module, alias.name) for alias in node.names]
        else:
            continue
        for module_name, attribute in targets:
            if module_name.split(".")[0] in OPTIONAL_MODULES and importlib.util.find_spec(module_name.split(".")[0]) is None:
                pytest.skip(f"{module_name} is in the web extra, not installed here")
            module = importlib.import_module(module_name)
            if attribute is not None and not hasattr(module, attribute):
                importlib.import_module(f"{module_name}.{attribute}")  # a submodule, or ModuleNotFoundError


@pytest.mark.parametrize("block", blocks("json"))
def test_json_examples_parse_line_by_line(block: Block) -> None:
    for line in block.code.splitlines():
        if line.strip():
            json.loads(line)


def commands(script: str) -> list[list[str]]:
    """The simple commands of a shell script: continuation lines joined, comments dropped, split at && || ; |."""
    found = []
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        command: list[str] = []
        for token in lexer:
            if token in ("&&", "||", ";", "|", "&"):
                found.append(command)
                command = []
            else:
                command.append(token)
        found.append(command)
    return [command for command in found if command]


def check_dallekit_arguments(arguments: list[str]) -> None:
    """`arguments` (after `dallekit`) parse with the real parser; extras only as train/demo per-stage overrides."""
    from pipelines.cli import build_parser

    assert "--help" not in arguments and "-h" not in arguments
    try:
        parsed, extra = build_parser().parse_known_args(arguments)
    except SystemExit:
        pytest.fail(f"dallekit {shlex.join(arguments)}: the command-line parser refuses it")
    for token in extra:
        if token.startswith("--"):
            group, _, name = token[2:].partition(".")
            known = group in STAGES or (group == "data" and name in {f.name for f in dataclasses.fields(DataConfig)})
            assert parsed.command in ("train", "demo") and known, (
                f"dallekit {shlex.join(arguments)}: unknown option {token}")


def config_class(module: str) -> type | None:
    """The config dataclass of a training entry point."""
    if module == "stage1_dvae.train":
        from stage1_dvae.train import Stage1Config
        return Stage1Config
    if module == "stage2_prior.train":
        from stage2_prior.train import Stage2Config
        return Stage2Config
    if module == "dallekit.scorer.train":
        from dallekit.scorer.train import ScorerTrainConfig
        return ScorerTrainConfig
    return None


def check_module_arguments(module: str, arguments: list[str]) -> None:
    from dallekit.training.config import load_config

    assert importlib.util.find_spec(module) is not None, f"python -m {module}: no such module"
    if module == "pipelines.cli":
        check_dallekit_arguments(arguments)
    elif (cls := config_class(module)) is not None:
        load_config(cls, arguments)  # raises ConfigError naming a bad key or value


def check_command(command: list[str]) -> None:
    program, *arguments = command
    if program == "dallekit":
        check_dallekit_arguments(arguments)
    elif program in ("python", "python3") and arguments[:1] == ["-m"]:
        check_module_arguments(arguments[1], arguments[2:])
    elif program in ("python", "python3") and arguments and arguments[0].endswith(".py"):
        assert (ROOT / arguments[0]).is_file(), f"no script {arguments[0]}"
    elif program == "accelerate" and arguments[:1] == ["launch"]:
        launch = arguments[1:arguments.index("-m")]
        if "--config_file" in launch:
            launch_config = launch[launch.index("--config_file") + 1]
            assert (ROOT / launch_config).is_file(), f"no launch config {launch_config}"
        module = arguments[arguments.index("-m") + 1]
        check_module_arguments(module, arguments[arguments.index("-m") + 2:])


@pytest.mark.parametrize("block", blocks("bash"))
def test_shell_examples_name_real_commands_options_and_files(block: Block) -> None:
    for command in commands(block.code):
        check_command(command)


# ---- running the examples marked runnable --------------------------------------------------------------


def save_tiny_demo(directory: Path) -> None:
    """Tiny real components with the demo's shapes, saved where `dallekit demo` saves its own."""
    from dallekit.data import DataConfig, load_text_image_dataset
    from dallekit.scorer import ScorerConfig, ScorerModel, TextImageScorer
    from dallekit.text_tokenizer import train_text_tokenizer
    from pipelines import TextToImagePipeline
    from stage1_dvae import DVAEModel
    from stage2_prior import PriorConfig, PriorModel
    from tests.conftest import tiny_dvae_config

    torch.manual_seed(0)
    captions = load_text_image_dataset(DataConfig(source="digits", image_size=32))["train"]["text"]
    tokenizer = train_text_tokenizer(captions, vocab_size=300, text_len=16)
    vqvae = DVAEModel(tiny_dvae_config("vq", image_size=32, downsample_factor=4, channel_multipliers=[1, 2, 2],
                                       codebook_size=128))
    prior = PriorModel(PriorConfig(
        text_vocab_size=len(tokenizer), text_len=16, image_vocab_size=128, image_grid_size=8, hidden_size=32,
        intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
    ))
    scorer = TextImageScorer(ScorerModel(ScorerConfig(
        image_size=32, image_channels=[8, 16, 32], text_vocab_size=len(tokenizer), text_len=16,
        text_hidden_size=32, text_intermediate_size=64, text_num_hidden_layers=1, projection_dim=32,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )), tokenizer)
    demo = directory / "outputs" / "demo"
    vqvae.save_pretrained(demo / "stage1" / "model")
    prior.save_pretrained(demo / "stage2" / "prior")
    tokenizer.save_pretrained(demo / "stage2" / "tokenizer")
    scorer.save_pretrained(demo / "scorer" / "scorer")
    training_info = {"dataset": "digits", "example_prompts": ["a handwritten digit seven", "the number 3"]}
    TextToImagePipeline(vqvae=vqvae, prior=prior, tokenizer=tokenizer, scorer=scorer,
                        training_info=training_info).save_pretrained(demo / "pipeline")


def save_image_folder(directory: Path) -> None:
    """`my_images/` as docs/data.md lays it out: train/ and validation/, each with images and metadata.jsonl."""
    colours = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "grey": (128, 128, 128)}
    for split, count in (("train", 8), ("validation", 2)):
        folder = directory / "my_images" / split
        folder.mkdir(parents=True)
        rows = []
        for index in range(count):
            name, colour = list(colours.items())[index % len(colours)]
            file_name = f"{index + 1:04d}.{'jpg' if index % 2 else 'png'}"
            Image.new("RGB", (48 + 8 * index, 40), colour).save(folder / file_name)
            rows.append({"file_name": file_name, "text": f"a {name} rectangle"})
        rows[0]["captions"] = [rows[0]["text"], f"a plain {rows[0]['text'].split()[1]} picture"]
        (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("docs_examples")
    save_tiny_demo(directory)
    save_image_folder(directory)
    return directory


@pytest.fixture
def quick_judges(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The evaluation judges an example trains (`load_or_train_judge`, the classifier `evaluate_pipeline` trains),
    trained for a few steps and cached in the working directory."""
    from dallekit.evaluation import ClassifierConfig, generation
    from dallekit.scorer.train import ScorerTrainConfig
    from dallekit.training.config import load_config, recipe_path
    from pipelines import judges

    cache = workdir / "cache"
    monkeypatch.setenv("DALLEKIT_CACHE", str(cache))
    tiny = load_config(ScorerTrainConfig, ["--config", str(recipe_path("scorer/tiny.yaml")), "--progress", "false"])
    train_judge, train_classifier = judges.load_or_train_judge, generation.load_or_train_classifier

    def quick_judge(dataset, image_size, seed=judges.EVALUATION_SEED, config=None, cache_dir=None):
        return train_judge(dataset, image_size, seed, config or tiny, cache_dir or cache / "scorers")

    def quick_classifier(dataset, image_size, config=None, cache_dir=None):
        return train_classifier(dataset, image_size, config or ClassifierConfig(steps=20), cache_dir or cache)

    monkeypatch.setattr(judges, "load_or_train_judge", quick_judge)
    monkeypatch.setattr(generation, "load_or_train_classifier", quick_classifier)


@pytest.mark.parametrize("block", blocks("python", runnable=True))
def test_runnable_python_examples_run(block: Block, workdir: Path, quick_judges: None,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workdir)
    exec(compile(block.code, block.name, "exec"), {"__name__": "__docs_example__"})  # noqa: S102 (the example)


@pytest.mark.parametrize("block", blocks("bash", runnable=True))
def test_runnable_shell_examples_run(block: Block, workdir: Path) -> None:
    environment = os.environ | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # this venv's dallekit
        "DALLEKIT_CACHE": str(workdir / "cache"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "TQDM_DISABLE": "1",
    }
    result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block.code], cwd=workdir, env=environment,
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, f"{block.name} failed:\n{block.code}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


def test_every_kind_of_example_is_collected() -> None:
    """The marker is found: a page whose examples silently stopped running would pass the tests above."""
    marked = [block for block in BLOCKS if block.runnable]
    assert {block.language for block in marked} == {"python", "bash"}
    assert {block.page.name for block in marked} >= {"README.md", "data.md", "training.md", "sampling.md",
                                                      "pipeline.md", "evaluation.md"}
