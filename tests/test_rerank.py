"""Reranking in TextToImagePipeline: the best k of N candidates by its scorer, the scorer component saved and
loaded with the pipeline, and `evaluate_pipeline` judging reranked images; tiny real models throughout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dallekit.data import DataConfig, load_text_image_dataset
from dallekit.evaluation import ClassifierConfig, evaluate_pipeline, load_or_train_classifier
from pipelines import TextToImageOutput, TextToImagePipeline
from pipelines.editing import image_pixels
from pipelines.text_to_image import PipelineLoadError
from tests.test_pipeline import tiny_pipeline, tiny_scorer

PROMPTS = ["a handwritten digit seven", "the number 3"]


@pytest.fixture(scope="module")
def pipe() -> TextToImagePipeline:
    return tiny_pipeline(with_scorer=True)


@pytest.fixture(scope="module")
def plain(pipe: TextToImagePipeline) -> TextToImagePipeline:
    """The same stages without a scorer."""
    return TextToImagePipeline(vqvae=pipe.vqvae, prior=pipe.prior, tokenizer=pipe.tokenizer)


def draw(pipe: TextToImagePipeline, seed: int = 0, **kwargs) -> TextToImageOutput:
    return pipe(PROMPTS, generator=torch.Generator().manual_seed(seed), output_type="pt", progress=False, **kwargs)


def captions_for(num_per_prompt: int) -> list[str]:
    return [prompt for prompt in PROMPTS for _ in range(num_per_prompt)]


def test_reranking_keeps_the_best_candidates_of_each_prompt_best_first(pipe: TextToImagePipeline) -> None:
    # All 6 candidates of each prompt, drawn in prior calls of 5 sequences (one call spans both prompts).
    candidates = draw(pipe, num_images_per_prompt=6, batch_size=5)
    own_scores = pipe.scorer.score(candidates.images, captions_for(6))
    torch.testing.assert_close(candidates.scores, own_scores)

    kept = draw(pipe, num_images_per_prompt=2, num_candidates=6, batch_size=5)
    best = torch.cat([own_scores[6 * i : 6 * i + 6].argsort(descending=True)[:2] + 6 * i for i in range(2)])
    assert not torch.equal(best, torch.tensor([0, 1, 6, 7]))  # the scorer did reorder these candidates
    assert torch.equal(kept.images, candidates.images[best]) and torch.equal(kept.codes, candidates.codes[best])
    torch.testing.assert_close(kept.scores, own_scores[best])
    assert kept.scores.dtype == torch.float32 and kept.scores.shape == (4,)
    assert all(kept.scores[2 * i] >= kept.scores[2 * i + 1] for i in range(2))

    again = draw(pipe, num_images_per_prompt=2, num_candidates=6, batch_size=5)
    assert torch.equal(again.images, kept.images) and torch.equal(again.scores, kept.scores)
    assert not torch.equal(draw(pipe, seed=1, num_images_per_prompt=2, num_candidates=6, batch_size=5).images,
                           kept.images)


def test_as_many_candidates_as_images_changes_nothing(pipe: TextToImagePipeline, plain: TextToImagePipeline) -> None:
    unscored = draw(plain, num_images_per_prompt=3)
    assert unscored.scores is None
    for output in (draw(pipe, num_images_per_prompt=3), draw(pipe, num_images_per_prompt=3, num_candidates=3)):
        assert torch.equal(output.images, unscored.images) and torch.equal(output.codes, unscored.codes)
        torch.testing.assert_close(output.scores, pipe.scorer.score(unscored.images, captions_for(3)))
    # A scorer given to the call reranks a pipeline that has none, as its own scorer would.
    given = draw(plain, num_images_per_prompt=2, num_candidates=4, scorer=pipe.scorer)
    assert torch.equal(given.images, draw(pipe, num_images_per_prompt=2, num_candidates=4).images)


def test_output_types_tuples_and_priming_work_with_reranking(pipe: TextToImagePipeline) -> None:
    generator = torch.Generator().manual_seed(0)
    images, codes, scores = pipe(PROMPTS, num_images_per_prompt=2, num_candidates=4, generator=generator,
                                 output_type="np", return_dict=False, progress=False)
    assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8 and codes.shape == (4, 8, 8)
    assert scores.shape == (4,)
    pil = pipe("a zero", num_candidates=3, generator=torch.Generator().manual_seed(0), progress=False).images
    assert len(pil) == 1 and isinstance(pil[0], Image.Image)

    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    primed = draw(pipe, num_images_per_prompt=2, num_candidates=5, batch_size=3, image=init, strength=5 / 8)
    expected = pipe.vqvae.encode(image_pixels(init, 16))[0, :3]
    assert all(torch.equal(codes[:3], expected) for codes in primed.codes)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"num_images_per_prompt": 3, "num_candidates": 2},
         r"num_candidates \(2\) must be at least num_images_per_prompt \(3\)"),
        ({"num_images_per_prompt": 1, "num_candidates": 4, "batch_size": 0}, r"batch_size .* must be >= 1, got 0"),
    ],
)
def test_bad_reranking_settings_fail_clearly(pipe: TextToImagePipeline, settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        draw(pipe, **settings)


def test_reranking_needs_a_scorer_that_reads_these_images(
    pipe: TextToImagePipeline, plain: TextToImagePipeline,
) -> None:
    with pytest.raises(ValueError, match=r"num_candidates=4 > num_images_per_prompt=1 needs a scorer .* scorer="):
        draw(plain, num_candidates=4)
    other_size = "reads 32px 3-channel images but the pipeline makes 16px 3-channel ones: train a scorer"
    with pytest.raises(ValueError, match=other_size):
        draw(plain, num_candidates=4, scorer=tiny_scorer(pipe.tokenizer, image_size=32))
    with pytest.raises(ValueError, match="reads 32px 3-channel images"):
        TextToImagePipeline(vqvae=pipe.vqvae, prior=pipe.prior, tokenizer=pipe.tokenizer,
                            scorer=tiny_scorer(pipe.tokenizer, image_size=32))
    with pytest.raises(ValueError, match="scorer must be a scorer.TextImageScorer .* got a ScorerModel"):
        draw(plain, num_candidates=4, scorer=pipe.scorer.model)


def test_the_scorer_is_saved_and_loaded_with_the_pipeline(
    pipe: TextToImagePipeline, plain: TextToImagePipeline, tmp_path: Path,
) -> None:
    pipe.save_pretrained(tmp_path / "with")
    index = json.loads((tmp_path / "with" / "model_index.json").read_text())
    assert index["scorer"] == ["scorer", "TextImageScorer"]
    saved = {path.name for path in (tmp_path / "with" / "scorer").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= saved
    card = (tmp_path / "with" / "README.md").read_text()
    assert "| `scorer` |" in card and "num_candidates=16" in card and "--candidates 32" in card
    loaded = TextToImagePipeline.from_pretrained(tmp_path / "with")
    expected, actual = (draw(p, num_images_per_prompt=2, num_candidates=5) for p in (pipe, loaded))
    assert torch.equal(actual.images, expected.images) and torch.equal(actual.scores, expected.scores)

    plain.save_pretrained(tmp_path / "without")
    assert "scorer" not in json.loads((tmp_path / "without" / "model_index.json").read_text())
    assert not (tmp_path / "without" / "scorer").exists()
    assert "`scorer`" not in (tmp_path / "without" / "README.md").read_text()
    assert TextToImagePipeline.from_pretrained(tmp_path / "without").scorer is None


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    ("broken", "damage", "error", "problem"),
    [
        ("scorer/config.json", lambda path: path.write_text('{"image_size": 16,'), PipelineLoadError,
         "not a valid JSON file"),
        ("scorer/model.safetensors", _truncate, PipelineLoadError,
         "not a valid ScorerModel weights file for that config"),
        ("scorer", lambda path: (path / "tokenizer.json").write_text("{}"), PipelineLoadError,
         "not a valid tokenizer directory"),
        ("scorer", shutil.rmtree, FileNotFoundError, "lacks the component(s) scorer named in model_index.json"),
        ("scorer/model.safetensors", Path.unlink, FileNotFoundError, "has no model.safetensors"),
    ],
)
def test_a_broken_or_missing_scorer_is_named(
    pipe: TextToImagePipeline, tmp_path: Path, broken: str, damage, error: type[Exception], problem: str,
) -> None:
    pipe.save_pretrained(tmp_path)
    damage(tmp_path / broken)
    with pytest.raises(error) as caught:
        TextToImagePipeline.from_pretrained(tmp_path)
    assert problem in str(caught.value)
    if error is PipelineLoadError:
        assert caught.value.path == tmp_path / broken and str(caught.value).startswith(f"{tmp_path / broken}: ")


def test_evaluate_pipeline_judges_the_reranked_images(pipe: TextToImagePipeline, tmp_path: Path) -> None:
    """The judge is another scorer than the one that reranks; it scores exactly what the pipeline keeps."""
    judge = tiny_scorer(pipe.tokenizer, seed=2)
    classifier = load_or_train_classifier("digits", 16, ClassifierConfig(steps=20), cache_dir=tmp_path)
    result = evaluate_pipeline(pipe, "digits", guidance_scales=(1.0,), max_prompts=4, batch_size=4,
                               num_candidates=3, classifier=classifier, scorer=judge, progress=False)
    assert result["num_candidates"] == 3 and result["sampling_seconds"]["1.0"] > 0
    prompts = load_text_image_dataset(DataConfig(source="digits", image_size=16))["validation"]["text"][:4]
    kept = pipe(prompts, num_candidates=3, guidance_scale=1.0, generator=torch.Generator().manual_seed(0),
                output_type="pt", progress=False)
    judged = 2.5 * judge.score(kept.images, prompts).clamp(min=0)
    assert result["guidance"]["1.0"]["clip_score"] == pytest.approx(judged.mean().item(), abs=1e-5)

