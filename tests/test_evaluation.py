"""Generation metrics: copy rates, Fréchet distance, prompt adherence, the cached classifier, evaluate_pipeline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import dallekit.evaluation.classifier
from dallekit.data import DataConfig, TextImageCollator, load_text_image_dataset
from dallekit.data.cache import dallekit_cache_dir
from dallekit.evaluation import (
    ClassifierConfig,
    ImageClassifier,
    evaluate_pipeline,
    exact_copy_rate,
    frechet_distance,
    load_or_train_classifier,
    near_copy_rate,
    prompt_adherence,
    train_classifier,
)
from dallekit.evaluation.reconstruction import judge_reconstructions
from dallekit.scorer import TextImageScorer
from dallekit.scorer.train import ScorerTrainConfig
from dallekit.text_tokenizer import train_text_tokenizer
from dallekit.training.config import load_config
from pipelines import TextToImagePipeline
from pipelines.judges import load_or_train_judge
from pipelines.text_to_image import TextToImageOutput
from stage1_dvae import DVAEModel
from stage2_prior import PriorConfig, PriorModel
from tests.conftest import tiny_dvae_config

QUICK = ClassifierConfig(steps=60)  # ~1 s on real 16x16 digits


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("classifiers")


@pytest.fixture(scope="module")
def digits_classifier(cache_dir: Path) -> ImageClassifier:
    """Trained briefly on the real 16x16 digits, cached in `cache_dir`."""
    return load_or_train_classifier("digits", 16, QUICK, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def digits_scorer(cache_dir: Path) -> TextImageScorer:
    """The evaluation scorer, trained for a few seconds (`configs/scorer/tiny.yaml`) on the real 16x16 digits."""
    tiny = Path(__file__).resolve().parents[1] / "configs" / "scorer" / "tiny.yaml"
    config = load_config(ScorerTrainConfig, ["--config", str(tiny), "--progress", "false"])
    return load_or_train_judge("digits", 16, config=config, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def pipe() -> TextToImagePipeline:
    """Tiny randomly initialised components for 16x16 images, 8x8 codes out of 64."""
    torch.manual_seed(0)
    captions = load_text_image_dataset(DataConfig(source="digits", image_size=16))["train"]["text"]
    tokenizer = train_text_tokenizer(captions, vocab_size=300, text_len=16)
    prior = PriorModel(PriorConfig(
        text_vocab_size=len(tokenizer), text_len=16, image_vocab_size=64, image_grid_size=8, hidden_size=32,
        intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
    ))
    return TextToImagePipeline(vqvae=DVAEModel(tiny_dvae_config("gumbel")), prior=prior, tokenizer=tokenizer)


def test_reconstruction_metrics_show_what_an_untrained_tokenizer_loses(
    digits_classifier: ImageClassifier, cache_dir: Path
) -> None:
    """An untrained tokenizer's reconstructions: far from real images, and no longer recognisable as their digit."""
    torch.manual_seed(0)
    result = judge_reconstructions(DVAEModel(tiny_dvae_config("vq")), "digits", classifier_config=QUICK,
                                             cache_dir=cache_dir)
    assert result["real_frechet_distance"] < result["reconstruction_frechet_distance"]
    assert set(result["real_accuracy"]) == set(result["reconstruction_accuracy"]) == {"label"}
    assert result["real_accuracy"]["label"] > 0.8
    assert result["reconstruction_accuracy"]["label"] < result["real_accuracy"]["label"] - 0.4


class CopyingPipeline(TextToImagePipeline):
    """A fully memorising model: whatever the prompt, it returns real training images and their codes."""

    def __init__(self, pipe: TextToImagePipeline, training_pixels: torch.Tensor) -> None:
        super().__init__(vqvae=pipe.vqvae, prior=pipe.prior, tokenizer=pipe.tokenizer)
        self.training_pixels = training_pixels

    def __call__(self, prompt: list[str], **kwargs) -> TextToImageOutput:
        images = self.training_pixels[: len(prompt)]
        return TextToImageOutput(images=images, codes=self.vqvae.encode(images))


def whitened(num: int, dim: int) -> torch.Tensor:
    """`num` points whose sample mean is exactly 0 and sample covariance exactly the identity."""
    points = torch.randn(num, dim, dtype=torch.float64)
    orthonormal, _ = torch.linalg.qr(points - points.mean(dim=0))
    return orthonormal * math.sqrt(num - 1)


def test_exact_copy_rate_counts_generated_grids_found_in_training() -> None:
    training = torch.randint(0, 64, (50, 4, 4))
    novel = (training[:4] + 1) % 64
    assert exact_copy_rate(training[10:20], training) == 1.0
    assert exact_copy_rate(novel, training) == 0.0
    assert exact_copy_rate(torch.cat([training[:3], novel[:1]]), training) == 0.75
    one_code_off = training[:1].clone()
    one_code_off[0, 3, 3] = (one_code_off[0, 3, 3] + 1) % 64
    assert exact_copy_rate(one_code_off, training) == 0.0
    assert exact_copy_rate(training[:5].flatten(1), training) == 1.0  # [N, L] and [N, h, w] alike
    with pytest.raises(ValueError, match="as long as"):
        exact_copy_rate(torch.zeros(2, 3, 3, dtype=torch.long), training)


def test_near_copy_rate_flags_copies_and_near_duplicates_not_novel_samples() -> None:
    training, validation, novel = torch.randn(400, 8), torch.randn(100, 8), torch.randn(200, 8)
    copies = near_copy_rate(training[:50], training, validation)
    assert copies["near_copy_rate"] == 1.0 and copies["generated_to_train"]["p95"] == 0.0
    # held-out images score the percentile itself: 5 of 100 distances lie at or below their 5th percentile
    held_out = near_copy_rate(validation, training, validation)
    assert held_out["near_copy_rate"] == 0.05 and held_out["threshold"] > 0
    assert held_out["validation_to_train"] == held_out["generated_to_train"]
    assert near_copy_rate(novel, training, validation)["near_copy_rate"] < 0.15
    near_duplicate = (training[7] + 0.01 * torch.randn(8))[None]
    assert near_copy_rate(near_duplicate, training, validation)["near_copy_rate"] == 1.0
    assert near_copy_rate(near_duplicate + 5.0, training, validation)["near_copy_rate"] == 0.0
    assert exact_copy_rate(near_duplicate, training) == 0.0
    with pytest.raises(ValueError, match="percentile"):
        near_copy_rate(novel, training, validation, percentile=100)


def test_frechet_distance_matches_closed_forms_and_is_symmetric() -> None:
    points = whitened(500, 6)  # mean 0, covariance I
    shift = torch.tensor([1.0, -2.0, 0.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    scale = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0, 0.1], dtype=torch.float64)
    assert frechet_distance(points, points) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(points, points + shift) == pytest.approx(shift.square().sum().item())
    # diagonal covariances: |mu_a - mu_b|² + sum_i (sigma_a,i - sigma_b,i)²
    expected = shift.square().sum() + (1 - scale).square().sum()
    assert frechet_distance(points, points * scale + shift) == pytest.approx(expected.item())
    other = torch.randn(300, 6) @ torch.randn(6, 6) + 1.0
    assert frechet_distance(points, other) == pytest.approx(frechet_distance(other, points), rel=1e-6)
    assert frechet_distance(points, other) > 1.0
    few = frechet_distance(torch.randn(4, 16), torch.randn(5, 16))  # singular covariances
    assert math.isfinite(few) and few > 0
    with pytest.raises(ValueError, match="N, M >= 2"):
        frechet_distance(points[:1], points)


def test_prompt_adherence_needs_every_prompted_attribute() -> None:
    prompted = {"label": torch.tensor([0, 1, 2, 0]), "colour": torch.tensor([0, 1, 2, 3]),
                "position": torch.tensor([4, 3, 2, 1])}
    predicted = {"label": torch.tensor([0, 1, 2, 1]), "colour": torch.tensor([0, 1, 0, 3]),
                 "position": torch.tensor([4, 3, 2, 1])}
    assert prompt_adherence(predicted, prompted) == {"all": 0.5, "label": 0.75, "colour": 0.75, "position": 1.0}
    digits = prompt_adherence({"label": torch.tensor([3, 5, 7])}, {"label": torch.tensor([3, 3, 7])})
    assert digits == {"all": pytest.approx(2 / 3), "label": pytest.approx(2 / 3)}
    with pytest.raises(ValueError, match="differ"):
        prompt_adherence({"label": torch.tensor([1])}, prompted)


def test_training_is_seeded_and_leaves_the_global_random_state_alone(digit_pixels: torch.Tensor) -> None:
    targets = {"label": torch.arange(16) % 10}
    state = torch.random.get_rng_state()
    first, second = (train_classifier(digit_pixels, targets, {"label": 10}, ClassifierConfig(steps=3, batch_size=8))
                     for _ in range(2))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert first.features(digit_pixels).shape == (16, 128) and first(digit_pixels)["label"].shape == (16, 10)


def test_classifier_learns_real_digits_and_its_cache_is_reused(
    digits_classifier: ImageClassifier, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    [info_path] = cache_dir.glob("digits-16px-*.json")
    info = json.loads(info_path.read_text())
    assert info["num_classes"] == {"label": 10} and info["config"]["steps"] == QUICK.steps
    assert info["validation_accuracy"]["all"] > 0.8  # chance is 0.1
    assert info_path.with_suffix(".safetensors").is_file() and not list(cache_dir.glob("*.pt*"))

    load_or_train_classifier("digits", 16, ClassifierConfig(steps=5), cache_dir=cache_dir)  # other settings
    assert len(list(cache_dir.glob("digits-16px-*.json"))) == 2

    def no_training(*args, **kwargs) -> None:
        raise AssertionError("retrained although the classifier is cached")

    monkeypatch.setattr(dallekit.evaluation.classifier, "train_classifier", no_training)
    again = load_or_train_classifier("digits", 16, QUICK, cache_dir=cache_dir)
    pixels = torch.rand(4, 3, 16, 16) * 2 - 1
    assert torch.equal(again.features(pixels), digits_classifier.features(pixels))
    with pytest.raises(AssertionError, match="retrained"):  # a new image size is a new key
        load_or_train_classifier("digits", 8, QUICK, cache_dir=cache_dir)
    monkeypatch.setenv("DALLEKIT_CACHE", str(cache_dir / "elsewhere"))
    assert dallekit_cache_dir("classifiers") == cache_dir / "elsewhere" / "classifiers"
    with pytest.raises(ValueError, match="digits, shapes"):
        load_or_train_classifier("cifar10", 16, QUICK, cache_dir=cache_dir)


def test_evaluate_pipeline_end_to_end(
    pipe: TextToImagePipeline, digits_classifier: ImageClassifier, digits_scorer: TextImageScorer
) -> None:
    result = evaluate_pipeline(pipe, "digits", guidance_scales=(1.0, 3.0), max_prompts=6, batch_size=4,
                               classifier=digits_classifier, scorer=digits_scorer, progress=False)
    assert json.loads(json.dumps(result)) == result
    assert result["num_prompts"] == 6 and result["image_size"] == 16 and set(result["guidance"]) == {"1.0", "3.0"}
    assert result["classifier_validation_accuracy"] > 0.8
    assert result["classifier_attribute_accuracy"] == {"label": result["classifier_validation_accuracy"]}
    assert 0 < result["real_frechet_distance"] < math.inf and result["near_copy_threshold"] > 0
    for metrics in result["guidance"].values():
        assert 0 <= metrics["adherence"] <= 1 and metrics["attribute_adherence"] == {"label": metrics["adherence"]}
        assert 0 <= metrics["near_copy_rate"] <= 1 and metrics["exact_copy_rate"] == 0.0  # untrained: noise
        assert result["real_frechet_distance"] < metrics["frechet_distance"] < math.inf
    with pytest.raises(ValueError, match="pass a classifier trained on 'shapes'"):
        evaluate_pipeline(pipe, "shapes", classifier=digits_classifier, scorer=digits_scorer, progress=False)
    with pytest.raises(ValueError, match="max_prompts"):
        evaluate_pipeline(pipe, "digits", max_prompts=1, classifier=digits_classifier, scorer=digits_scorer,
                          progress=False)


def test_a_pipeline_that_returns_training_images_is_all_copies(
    pipe: TextToImagePipeline, digits_classifier: ImageClassifier, digits_scorer: TextImageScorer
) -> None:
    train = load_text_image_dataset(DataConfig(source="digits", image_size=16))["train"]
    training_pixels = TextImageCollator(16)([train[i] for i in range(16)])["pixel_values"]
    result = evaluate_pipeline(CopyingPipeline(pipe, training_pixels), "digits", guidance_scales=(1.0,),
                               max_prompts=16, batch_size=16, classifier=digits_classifier, scorer=digits_scorer,
                               progress=False)
    assert result["guidance"]["1.0"]["exact_copy_rate"] == 1.0
    assert result["guidance"]["1.0"]["near_copy_rate"] == 1.0
