"""TextToImagePipeline: save/load (directory and offline Hub cache), load errors naming the file, batched calls,
output types, the model card, pushing to the Hub (with a Space)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard, SpaceCard
from huggingface_hub.errors import OfflineModeIsEnabled
from PIL import Image
from transformers import PreTrainedTokenizerFast

from dallekit.data import DataConfig, load_text_image_dataset
from dallekit.modeling_utils import inference_dtype
from dallekit.scorer import ScorerConfig, ScorerModel, TextImageScorer
from dallekit.text_tokenizer import train_text_tokenizer
from pipelines import TextToImagePipeline
from pipelines.text_to_image import PipelineLoadError
from stage1_dvae import DVAEModel
from stage2_prior import PriorConfig, PriorModel
from tests.conftest import tiny_dvae_config


def tiny_scorer(tokenizer: PreTrainedTokenizerFast, image_size: int = 16, seed: int = 1) -> TextImageScorer:
    """A tiny real text–image scorer (random weights, seeded) for `image_size`px images, reading `tokenizer`'s ids."""
    torch.manual_seed(seed)
    config = ScorerConfig(
        image_size=image_size, image_channels=[8, 16], text_vocab_size=len(tokenizer), text_len=16,
        text_hidden_size=32, text_intermediate_size=64, text_num_hidden_layers=1, projection_dim=32,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return TextImageScorer(ScorerModel(config), tokenizer)


def tiny_pipeline(with_scorer: bool = False) -> TextToImagePipeline:
    """Tiny real components (random weights): a stage-1 tokenizer, a caption BPE and a prior sized to both,
    and with `with_scorer` a tiny text–image scorer for reranking."""
    torch.manual_seed(0)
    captions = load_text_image_dataset(DataConfig(source="digits", image_size=16))["train"]["text"]
    tokenizer = train_text_tokenizer(captions, vocab_size=300, text_len=8)
    vqvae = DVAEModel(tiny_dvae_config("gumbel"))
    prior = PriorModel(PriorConfig(
        text_vocab_size=len(tokenizer), text_len=8, image_vocab_size=64, image_grid_size=8, hidden_size=32,
        intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
    ))
    scorer = tiny_scorer(tokenizer) if with_scorer else None
    return TextToImagePipeline(vqvae=vqvae, prior=prior, tokenizer=tokenizer, scorer=scorer)


@pytest.fixture(scope="module")
def pipe() -> TextToImagePipeline:
    return tiny_pipeline()


def generate(pipe: TextToImagePipeline, seed: int = 0) -> np.ndarray:
    return pipe(["a handwritten digit seven", "the number 3"], num_images_per_prompt=2, top_k=16,
                generator=torch.Generator().manual_seed(seed), output_type="np").images


def test_save_load_round_trip_gives_identical_images(pipe: TextToImagePipeline, tmp_path: Path) -> None:
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "TextToImagePipeline" and "_dallekit_version" in index
    assert {"vqvae", "prior", "tokenizer"} <= index.keys() and "scorer" not in index  # saved only when there is one
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pkl"))
    loaded = TextToImagePipeline.from_pretrained(tmp_path)
    np.testing.assert_array_equal(generate(loaded), generate(pipe))


def test_loading_from_an_offline_hub_cache_snapshot(pipe: TextToImagePipeline, tmp_path: Path) -> None:
    """A repository snapshot placed in the Hub cache loads by its id with HF_HUB_OFFLINE=1 (set in conftest)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = tmp_path / "cache" / "models--someone--tiny-dallekit"
    pipe.save_pretrained(repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    loaded = TextToImagePipeline.from_pretrained("someone/tiny-dallekit", cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(generate(loaded), generate(pipe))


def test_counts_shapes_and_output_types(pipe: TextToImagePipeline) -> None:
    images = generate(pipe)
    assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8
    output = pipe("a zero", num_images_per_prompt=3, output_type="pt", generator=torch.Generator().manual_seed(1))
    assert output.images.shape == (3, 3, 16, 16) and output.images.min() >= -1 and output.images.max() <= 1
    assert output.codes.shape == (3, 8, 8)
    pil = pipe("a zero", output_type="pil", generator=torch.Generator().manual_seed(1)).images
    assert len(pil) == 1 and isinstance(pil[0], Image.Image) and pil[0].size == (16, 16)
    images, codes = pipe("a zero", return_dict=False, output_type="np")
    assert images.shape == (1, 16, 16, 3) and codes.shape == (1, 8, 8)
    assert not np.array_equal(generate(pipe, seed=0), generate(pipe, seed=5))


def test_images_are_decoded_in_the_inference_precision(pipe: TextToImagePipeline) -> None:
    """The pipeline decodes under bf16 where it samples in bf16 (a CPU with native bf16, or a caller's bf16
    autocast): close to the fp32 decoding, not equal to it; elsewhere in fp32, exactly."""
    output = pipe("the number 3", num_images_per_prompt=4, generator=torch.Generator().manual_seed(0),
                  output_type="pt", progress=False)
    with torch.no_grad():
        fp32 = pipe.vqvae.decode(output.codes).float()
    if inference_dtype(torch.device("cpu"), torch.float32) == torch.float32:
        assert torch.equal(output.images, fp32)
    else:
        assert torch.equal(output.images, pipe._decode(output.codes)) and not torch.equal(output.images, fp32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = pipe._decode(output.codes)
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)
    assert (bf16 - fp32).abs().max() < 0.05  # of the [-1, 1] range: a few levels of 255


def test_incomplete_or_foreign_directories_fail_clearly(pipe: TextToImagePipeline, tmp_path: Path) -> None:
    good = pipe.save_pretrained(tmp_path / "good")
    no_prior = tmp_path / "no_prior"
    shutil.copytree(good, no_prior)
    shutil.rmtree(no_prior / "prior")
    with pytest.raises(FileNotFoundError, match="lacks the component"):
        TextToImagePipeline.from_pretrained(no_prior)
    foreign = tmp_path / "foreign"
    shutil.copytree(good, foreign)
    (foreign / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="not a TextToImagePipeline"):
        TextToImagePipeline.from_pretrained(foreign)
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        TextToImagePipeline.from_pretrained(good / "prior")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _set_json(path: Path, **values) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | values))


@pytest.mark.parametrize(
    ("broken", "damage", "problem"),
    [
        ("model_index.json", lambda path: path.write_text("{'_class_name': 1}"),
         "not a valid JSON file: Expecting property name enclosed in double quotes: line 1 column 2"),
        ("model_index.json", lambda path: path.write_text("[]"), "expected a JSON object, found a list"),
        ("vqvae/config.json", lambda path: path.write_text('{"image_size": 16,'), "not a valid JSON file"),
        ("prior/config.json", lambda path: _set_json(path, hidden_size="wide"),
         "not a valid PriorConfig: Validation error for field 'hidden_size'"),
        ("vqvae/model.safetensors", lambda path: path.write_bytes(b"not safetensors"),
         "not a valid DVAEModel weights file for that config: Error while deserializing header"),
        ("prior/model.safetensors", _truncate, "not a valid PriorModel weights file for that config"),
        ("prior/model.safetensors", lambda path: _set_json(path.parent / "config.json", hidden_size=64),
         "do not match the shapes its config.json describes"),
        ("tokenizer/tokenizer.json", _truncate, "not a valid JSON file"),
        ("tokenizer/tokenizer_config.json", lambda path: path.write_text("{"), "not a valid JSON file"),
        ("tokenizer", lambda path: (path / "tokenizer.json").write_text("{}"), "not a valid tokenizer directory"),
        ("README.md", lambda path: path.write_text("---\ndallekit: [unclosed\n---\n"),
         "not a valid model card (its YAML metadata)"),
    ],
)
def test_a_broken_file_is_named_with_what_is_wrong(
    pipe: TextToImagePipeline, tmp_path: Path, broken: str, damage, problem: str,
) -> None:
    pipe.save_pretrained(tmp_path)
    damage(tmp_path / broken)
    with pytest.raises(PipelineLoadError) as caught:
        TextToImagePipeline.from_pretrained(tmp_path)
    assert caught.value.path == tmp_path / broken
    assert str(caught.value).startswith(f"{tmp_path / broken}: ") and problem in str(caught.value)
    assert "\n" not in str(caught.value)  # one line: the CLI and the page show it whole


@pytest.mark.parametrize("missing", ["vqvae/model.safetensors", "prior/config.json", "tokenizer/tokenizer.json"])
def test_a_missing_component_file_is_named(pipe: TextToImagePipeline, tmp_path: Path, missing: str) -> None:
    pipe.save_pretrained(tmp_path)
    (tmp_path / missing).unlink()
    folder, filename = missing.split("/")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / folder} has no {filename}"):
        TextToImagePipeline.from_pretrained(tmp_path)


def test_components_that_were_not_trained_together_are_rejected(pipe: TextToImagePipeline) -> None:
    other_prior = PriorModel(PriorConfig(
        text_vocab_size=len(pipe.tokenizer), text_len=8, image_vocab_size=128, image_grid_size=8, hidden_size=32,
        intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
    ))
    with pytest.raises(ValueError, match="not trained together"):
        TextToImagePipeline(vqvae=pipe.vqvae, prior=other_prior, tokenizer=pipe.tokenizer)


def test_model_card_has_hub_metadata_and_survives_a_reload(pipe: TextToImagePipeline, tmp_path: Path) -> None:
    pipe.training_info = {"dataset": "digits", "metrics": {"classifier_validation_accuracy": 0.97,
                                                           "guidance": {"3.0": {"adherence": 0.91}}}}
    pipe.save_pretrained(tmp_path / "saved")
    card = ModelCard.load(tmp_path / "saved" / "README.md")
    assert card.data.library_name == "dallekit" and card.data.pipeline_tag == "text-to-image"
    assert "text-to-image" in card.data.tags
    assert "| 3.0 | 0.91 |" in card.text and 'from_pretrained("saved")' in card.text
    reloaded = TextToImagePipeline.from_pretrained(tmp_path / "saved")
    assert reloaded.training_info == pipe.training_info
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert all((tmp_path / "saved" / name).is_dir() for name in ("vqvae", "prior", "tokenizer") if name in index)


def _files(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()}


def test_push_to_hub_uploads_the_saved_pipeline_as_one_commit(pipe: TextToImagePipeline, hub: dict) -> None:
    assert pipe.push_to_hub("someone/tiny-dallekit", private=True) == "commit-model"
    assert hub["create_repo"] == [{"repo_id": "someone/tiny-dallekit", "private": True, "exist_ok": True,
                                   "repo_type": "model"}]
    [upload] = hub["upload_folder"]
    assert upload["repo_id"] == "someone/tiny-dallekit" and upload["commit_message"].startswith("Upload TextToImagePipeline")
    files = _files(upload["folder"])
    assert {"model_index.json", "README.md", "vqvae/model.safetensors", "vqvae/config.json",
            "prior/model.safetensors", "prior/config.json", "tokenizer/tokenizer.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    assert 'from_pretrained("someone/tiny-dallekit")' in (upload["folder"] / "README.md").read_text()
    loaded = TextToImagePipeline.from_pretrained(upload["folder"])  # the uploaded folder is a complete pipeline
    np.testing.assert_array_equal(generate(loaded), generate(pipe))


def test_push_to_hub_with_a_space_adds_a_gradio_app_for_the_model(pipe: TextToImagePipeline, hub: dict) -> None:
    """The Space's files; tests/test_serve.py runs its app.py."""
    import gradio  # the web extra, which the tests install

    assert pipe.push_to_hub("someone/tiny-dallekit", private=True, space_id="someone/try-tiny") == "commit-model"
    assert hub["create_repo"][1] == {"repo_id": "someone/try-tiny", "private": True, "exist_ok": True,
                                     "repo_type": "space", "space_sdk": "gradio"}
    model, space = hub["upload_folder"]
    assert model["repo_type"] == "model" and space["repo_id"] == "someone/try-tiny" and space["repo_type"] == "space"
    assert "https://huggingface.co/spaces/someone/try-tiny" in (model["folder"] / "README.md").read_text()
    assert {"app.py", "requirements.txt", "README.md", "pipelines/web.py", "stage2_prior/modeling_prior.py",
            "stage1_dvae/__init__.py"} <= _files(space["folder"])
    card = SpaceCard.load(space["folder"] / "README.md").data
    assert (card.sdk, card.sdk_version, card.app_file, card.models) == (
        "gradio", gradio.__version__, "app.py", ["someone/tiny-dallekit"])
    assert "load_app('someone/tiny-dallekit', revision=None)" in (space["folder"] / "app.py").read_text()
    requirements = (space["folder"] / "requirements.txt").read_text().split()
    assert any(line.startswith("torch") for line in requirements) and not any("pytest" in line for line in requirements)


def test_push_to_hub_offline_fails_before_uploading(pipe: TextToImagePipeline) -> None:
    with pytest.raises(OfflineModeIsEnabled):
        pipe.push_to_hub("someone/tiny-dallekit")


def test_every_sampling_entry_point_defaults_to_the_same_guidance_plausibility() -> None:
    """generate, the pipeline, the CLI (a literal, to keep its import light), the server's requests and the OpenAI
    body share `DEFAULT_GUIDANCE_PLAUSIBILITY`: a new default changes them all or fails here."""
    import inspect

    from pipelines.batching import GenerationRequest
    from pipelines.cli import build_parser
    from pipelines.openai_api import ImageGenerationBody
    from stage2_prior.modeling_prior import DEFAULT_GUIDANCE_PLAUSIBILITY

    defaults = {
        "PriorModel.generate": inspect.signature(PriorModel.generate).parameters["guidance_plausibility"].default,
        "pipe()": inspect.signature(TextToImagePipeline.__call__).parameters["guidance_plausibility"].default,
        "GenerationRequest": GenerationRequest(prompt="a").guidance_plausibility,
        "OpenAI body": ImageGenerationBody(prompt="a").guidance_plausibility,
    }
    for command in ("generate", "edit", "evaluate"):
        arguments = {"generate": ["--model", "m", "--prompt", "a", "--out", "o.png"], "evaluate": ["--model", "m"],
                     "edit": ["--model", "m", "--image", "i.png", "--out", "o.png"]}[command]
        defaults[f"dallekit {command}"] = build_parser().parse_args([command, *arguments]).guidance_plausibility
    assert defaults == dict.fromkeys(defaults, DEFAULT_GUIDANCE_PLAUSIBILITY)
