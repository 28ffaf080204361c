"""The contrastive text–image scorer: its loss, retrieval and R-precision by hand, training, resume, evaluation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModel

import pipelines.judges

#                                                                         a tiny untrained 16px pipeline)
from dallekit.data import DataConfig, decode_pairs, load_text_image_dataset
from dallekit.evaluation import ImageClassifier, evaluate_pipeline, r_precision
from dallekit.scorer import ScorerConfig, ScorerModel, TextImageScorer, retrieval_accuracy, top_k_hits, unique_captions
from dallekit.scorer.train import ScorerTrainConfig, train
from dallekit.text_tokenizer import train_text_tokenizer
from dallekit.training.checkpointing import list_checkpoints
from dallekit.training.config import ConfigError, load_config
from pipelines import TextToImagePipeline
from pipelines.judges import load_or_train_judge
from tests.conftest import cpu_processes_env
from tests.test_evaluation import cache_dir, digits_classifier, pipe  # noqa: F401 (fixtures: a quick classifier,

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "scorer" / "tiny.yaml")
# A short run on all 1,400 training digits at 16px: a few seconds on 2 cores.
LEARNING = ["--max_examples", "null", "--max_steps", "60", "--batch_size", "64", "--eval_every", "30",
            "--checkpointing_steps", "60", "--learning_rate", "3e-3", "--warmup_steps", "10"]


def tiny_config(output_dir: Path, *overrides: str) -> ScorerTrainConfig:
    return load_config(ScorerTrainConfig, ["--config", TINY, "--output_dir", str(output_dir), "--report_to", "none",
                                           "--progress", "false", *overrides])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, float]]:
    """A scorer trained briefly on the real 16px digits: its run directory and final metrics."""
    output_dir = tmp_path_factory.mktemp("scorer")
    return output_dir, train(tiny_config(output_dir, *LEARNING))


# ---- the loss, retrieval and R-precision on hand-made cases ---------------------------------------


def test_repeated_captions_are_not_false_negatives() -> None:
    """With captions repeated in a batch, CLIP's loss equals, value and gradient, the multi-positive one
    that counts every pair with identical captions as positive: identical ids, identical columns."""
    model = ScorerModel(ScorerConfig(image_size=16, image_channels=[8, 16], text_vocab_size=300, text_len=8))
    ids = torch.tensor([[5, 6, 2, 0, 0, 0, 0, 0], [7, 2, 0, 0, 0, 0, 0, 0]])[torch.tensor([0, 1, 0, 0, 1, 1])]
    pixels = torch.rand(6, 3, 16, 16) * 2 - 1
    output = model(pixels, ids)
    positives = (ids.unsqueeze(1) == ids.unsqueeze(0)).all(dim=-1).float()
    targets = positives / positives.sum(dim=1, keepdim=True)  # symmetric: the same for both directions
    logits = output.logits_per_image
    multi_positive = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    torch.testing.assert_close(output.loss, multi_positive)
    for expected, actual in zip(torch.autograd.grad(multi_positive, model.parameters(), retain_graph=True),
                                torch.autograd.grad(output.loss, model.parameters())):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6)


def test_ties_are_broken_at_random_in_expectation() -> None:
    true = torch.tensor([0.5, 0.5, 0.9])
    others = torch.tensor([[0.5, 0.5, 0.1], [0.7, 0.5, 0.1], [0.1, 0.2, 0.3]])
    assert top_k_hits(true, others, k=1).tolist() == pytest.approx([1 / 3, 0.0, 1.0])
    assert top_k_hits(true, others, k=2).tolist() == pytest.approx([2 / 3, 0.5, 1.0])
    assert top_k_hits(true, others, k=3).tolist() == pytest.approx([1.0, 1.0, 1.0])
    counted = torch.tensor([[False, True, True]] * 3)
    assert top_k_hits(true, others, k=1, counted=counted).tolist() == pytest.approx([0.5, 0.5, 1.0])


def test_retrieval_counts_any_equal_caption_as_correct() -> None:
    tokenizer = train_text_tokenizer(["a cat", "a dog", "a bird"], vocab_size=300, text_len=8)
    captions, index = unique_captions(["A cat ", "a dog", "a cat", "a bird"], tokenizer)
    assert captions == ["a cat", "a dog", "a bird"] and index.tolist() == [0, 1, 0, 2]
    similarity = torch.tensor([  # 4 images x 3 captions
        [0.9, 0.5, 0.0],  # image 0 (a cat): right
        [0.0, 0.2, 0.8],  # image 1 (a dog): "a bird" first, "a dog" second
        [0.1, 0.9, 0.0],  # image 2 (a cat): "a dog" first, "a cat" second
        [0.0, 0.0, 0.7],  # image 3 (a bird): right
    ])
    metrics = retrieval_accuracy(similarity, index, ks=(1, 2))
    assert metrics["image_to_text_top1"] == pytest.approx(0.5) and metrics["image_to_text_top2"] == 1.0
    # "a cat": its best image (0) comes first; "a dog": its image 1 (0.2) is third, behind images 2 (0.9)
    # and 0 (0.5); "a bird": its image 3 (0.7) is second, behind image 1 (0.8)
    assert metrics["text_to_image_top1"] == pytest.approx(1 / 3)
    assert metrics["text_to_image_top2"] == pytest.approx(2 / 3)


def test_r_precision_of_a_perfect_a_constant_and_a_random_scorer() -> None:
    num_captions = 150
    pool = torch.arange(num_captions).repeat(3)  # every held-out caption three times
    prompts = torch.arange(num_captions)
    perfect = torch.nn.functional.one_hot(prompts, num_captions).float()  # image i matches caption i only
    assert r_precision(perfect, prompts, pool, generator=torch.Generator().manual_seed(0)) == 1.0
    constant = torch.zeros(num_captions, num_captions)
    assert r_precision(constant, prompts, pool) == pytest.approx(0.01)
    noise = torch.rand(num_captions, num_captions, generator=torch.Generator().manual_seed(0))
    draws = [r_precision(noise, prompts, pool, generator=torch.Generator().manual_seed(seed)) for seed in (1, 1, 2)]
    assert draws[0] == draws[1] and draws[0] < 0.05  # seeded; chance is 0.01
    with pytest.raises(ValueError, match=r"num_distractors=99.*only 10"):
        r_precision(perfect[:11, :11], prompts[:11], torch.arange(11))


# ---- training, saving, resuming ------------------------------------------------------------------


def test_the_scorer_learns_digits_and_saving_keeps_its_scores(trained: tuple[Path, dict[str, float]],
                                                              tmp_path: Path) -> None:
    output_dir, metrics = trained
    # chance: top-1 0.02, top-5 0.1 of 50 captions; the five phrasings of a digit cap top-1 near 0.2
    assert metrics["step"] == 60 and metrics["image_to_text_top5"] > 0.6 and metrics["image_to_text_top1"] > 0.1
    assert metrics["text_to_image_top5"] > 0.3
    assert json.loads((output_dir / "metrics.json").read_text()) == metrics
    assert [p.name for p in list_checkpoints(output_dir / "checkpoints")] == ["step_60"]

    scorer = TextImageScorer.from_pretrained(output_dir / "scorer")
    splits = load_text_image_dataset(DataConfig(source="digits", image_size=16))
    pixels, texts, *_ = decode_pairs(splits["validation"], 16)
    captions, index = unique_captions(texts, scorer.tokenizer)
    reloaded = retrieval_accuracy(scorer.similarity(pixels, captions), index)
    assert reloaded == pytest.approx({k: v for k, v in metrics.items() if "_top" in k}, abs=1e-6)  # as in training

    scorer.save_pretrained(tmp_path / "copy")
    again = TextImageScorer.from_pretrained(tmp_path / "copy")
    assert torch.equal(again.score(pixels[:8], texts[:8]), scorer.score(pixels[:8], texts[:8]))
    assert isinstance(AutoModel.from_pretrained(tmp_path / "copy"), ScorerModel)
    with pytest.raises(ValueError, match="resize the images to 16x16"):
        scorer.image_features(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="pass a list of 8 captions"):
        scorer.score(pixels[:8], "a handwritten digit seven")
    (tmp_path / "copy" / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        TextImageScorer.from_pretrained(tmp_path / "copy")


def test_resumed_run_matches_uninterrupted_run(tmp_path: Path) -> None:
    """Steps 5-8 after resuming from the step-4 checkpoint: the same batches, shifts and weights."""
    common = ["--max_steps", "8", "--checkpointing_steps", "4", "--checkpoints_total_limit", "3"]
    train(tiny_config(tmp_path / "full", *common))
    train(tiny_config(tmp_path / "resumed", *common,
                      "--resume_from_checkpoint", str(tmp_path / "full" / "checkpoints" / "step_4")))
    expected = load_file(tmp_path / "full" / "scorer" / "model.safetensors")
    actual = load_file(tmp_path / "resumed" / "scorer" / "model.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--max_shift", "-1"], r"max_shift must be a number of pixels >= 0"),
        (["--image_channels", "[12]"], r"image_channels must list at least one multiple of 8"),
        (["--image_channels", "[8,16,32,64]"], r"drop a level from image_channels"),
    ],
)
def test_bad_config_fails_with_a_clear_message(tmp_path: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, *overrides)


# ---- evaluation without labels -------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluation_scorer(tmp_path_factory: pytest.TempPathFactory) -> tuple[TextImageScorer, Path]:
    scorers_dir = tmp_path_factory.mktemp("scorers")
    return load_or_train_judge("digits", 16, config=tiny_config(scorers_dir), cache_dir=scorers_dir), scorers_dir


def test_evaluation_scorer_is_cached_and_leaves_the_random_state_alone(
    evaluation_scorer: tuple[TextImageScorer, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    scorer, scorers_dir = evaluation_scorer
    [entry] = scorers_dir.glob("digits-16px-seed1234-*")
    info = json.loads((entry / "info.json").read_text())
    assert info["config"]["training"]["seed"] == 1234 and info["metrics"]["step"] == 8

    def no_training(*args, **kwargs) -> None:
        raise AssertionError("retrained although the scorer is cached")

    monkeypatch.setattr(pipelines.judges, "train", no_training)
    again = load_or_train_judge("digits", 16, config=tiny_config(scorers_dir), cache_dir=scorers_dir)
    # a recipe's time budget (the reranking scorer's) is not the judge's: the same judge, from the cache
    load_or_train_judge("digits", 16, config=tiny_config(scorers_dir, "--max_train_seconds", "0.001"),
                        cache_dir=scorers_dir)
    pixels = torch.rand(4, 3, 16, 16) * 2 - 1
    assert torch.equal(again.image_features(pixels), scorer.image_features(pixels))
    with pytest.raises(AssertionError, match="retrained"):  # another seed is another scorer
        load_or_train_judge("digits", 16, seed=0, config=tiny_config(scorers_dir), cache_dir=scorers_dir)

    monkeypatch.undo()
    state = torch.random.get_rng_state()
    with torch.no_grad():  # as in evaluate_pipeline
        small = load_or_train_judge("digits", 8, config=tiny_config(scorers_dir, "--max_steps", "1"),
                                     cache_dir=scorers_dir)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert small.model.config.image_size == 8 and small.image_features(pixels[:, :, :8, :8]).shape == (4, 32)


JUDGE_IN_A_PROCESS = """
import sys
from pathlib import Path
from pipelines.judges import load_or_train_judge
from tests.test_scorer import tiny_config
cache = Path(sys.argv[1])
if sys.argv[2] == "after-training":  # as in `dallekit train`: the process's accelerator exists, at auto precision
    from dallekit.training.accelerator import create_accelerator
    from dallekit.training.config import TrainingConfig
    create_accelerator(TrainingConfig(output_dir=str(cache / "run"), report_to="none"))
load_or_train_judge("digits", 16, config=tiny_config(cache / "run", "--mixed_precision", "auto"), cache_dir=cache)
"""


def test_evaluate_finds_the_judge_that_a_training_process_cached(tmp_path: Path) -> None:
    """`dallekit train` trains the judge under its accelerator's precision (resolved); `dallekit evaluate`, in a
    process without one, must resolve the recipe's `auto` the same way and load it, not train another."""
    for process in ("after-training", "alone"):
        subprocess.run([sys.executable, "-c", JUDGE_IN_A_PROCESS, str(tmp_path), process], cwd=ROOT, check=True,
                       capture_output=True, env=cpu_processes_env())
    assert len(list(tmp_path.glob("digits-16px-seed1234-*"))) == 1


def test_evaluate_pipeline_reports_scorer_metrics_with_and_without_labels(
    pipe: TextToImagePipeline, digits_classifier: ImageClassifier, trained: tuple[Path, dict[str, float]],  # noqa: F811
    tmp_path: Path,
) -> None:
    scorer = TextImageScorer.from_pretrained(trained[0] / "scorer")
    labelled = evaluate_pipeline(pipe, "digits", guidance_scales=(1.0,), max_prompts=6, batch_size=6,
                                 classifier=digits_classifier, scorer=scorer, progress=False)
    assert json.loads(json.dumps(labelled)) == labelled
    # chance is 0.01; five phrasings of each digit among the 99 distractors cap the real images' score
    assert labelled["real_r_precision"] > 0.1 > labelled["guidance"]["1.0"]["r_precision"]  # untrained: noise
    assert labelled["real_clip_score"] > labelled["guidance"]["1.0"]["clip_score"] >= 0
    assert 0 < labelled["real_scorer_frechet_distance"] < labelled["guidance"]["1.0"]["scorer_frechet_distance"]
    assert {"adherence", "r_precision", "clip_score", "exact_copy_rate"} <= set(labelled["guidance"]["1.0"])
    assert "classifier_validation_accuracy" in labelled

    # The same images as a caption folder: no class labels, so the scorer alone judges.
    splits = load_text_image_dataset(DataConfig(source="digits", image_size=16))
    for name, size in (("train", 64), ("validation", 150)):
        folder = tmp_path / "folder" / name
        folder.mkdir(parents=True)
        rows = [{"file_name": f"{i}.png", "text": splits[name][i]["text"]} for i in range(size)]
        for i in range(size):
            (folder / f"{i}.png").write_bytes(splits[name][i]["image"]["bytes"])
        (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    unlabelled = evaluate_pipeline(pipe, str(tmp_path / "folder"), guidance_scales=(1.0,), max_prompts=6,
                                   batch_size=6, scorer=scorer, progress=False)
    assert "classifier_validation_accuracy" not in unlabelled and "adherence" not in unlabelled["guidance"]["1.0"]
    assert set(unlabelled["guidance"]["1.0"]) == {"r_precision", "r_precision_distractors", "clip_score",
                                                   "scorer_frechet_distance", "exact_copy_rate", "near_copy_rate",
                                                   "nearest_train_distance"}
    assert 0 <= unlabelled["guidance"]["1.0"]["near_copy_rate"] <= 1  # in the scorer's feature space
    assert unlabelled["real_r_precision"] > 0.1


def test_the_evaluation_scorer_recipe_fits_smaller_images() -> None:
    """The emoji recipe (four levels, made for 64px) keeps the levels that 16px images allow and builds there."""
    from dallekit.scorer import ScorerConfig
    from pipelines.judges import levels_for_image_size

    recipe = ScorerConfig(image_size=64, image_channels=[16, 32, 64, 64])
    assert levels_for_image_size(recipe, 64).image_channels == [16, 32, 64, 64]
    small = levels_for_image_size(recipe, 16)
    assert small.image_channels == [16, 32, 64] and recipe.image_channels == [16, 32, 64, 64]
    small.image_size = 16
    small.validate()
