"""Generation quality of a text-to-image pipeline on a dataset's held-out captions.

One image per validation caption and guidance scale, judged by two independent judges trained on
real training data only: the classifier of `evaluation.classifier` (datasets with class labels:
prompt adherence, Fréchet distance, near copies in its feature space) and the contrastive scorer
of `evaluation.scorer_metrics` (any captioned dataset: R-precision, CLIPScore-style similarity,
Fréchet distance in its feature space); plus memorisation as exact copies of training code grids.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol

import datasets
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dallekit.data import DataConfig, TextImageCollator, decode_pairs, load_text_image_dataset
from dallekit.data.sources import Split
from dallekit.evaluation.classifier import ImageClassifier, class_columns, classify, load_or_train_classifier
from dallekit.evaluation.metrics import exact_copy_rate, frechet_distance, near_copy_rate, prompt_adherence
from dallekit.evaluation.scorer_metrics import judge_images
from dallekit.scorer import TextImageScorer
from stage1_dvae import DVAEModel

MAX_TRAIN_IMAGES = 10_000  # the training images generated ones are compared with (copies, real distances)
TRAIN_CHUNK = 256  # training images decoded at a time


@dataclasses.dataclass
class TrainingReference:
    """What the evaluation keeps of the training images: their code grids and judges' features, not their pixels."""

    codes: torch.Tensor  # [N, h, w]
    scorer_features: torch.Tensor  # [N, D]
    classifier_features: torch.Tensor | None  # [N, D'] with a classifier


def training_reference(split: Split, vqvae: DVAEModel, scorer: TextImageScorer, classifier: ImageClassifier | None,
                       image_size: int, max_images: int | None) -> TrainingReference:
    """The first `max_images` training images (all with None; a stream read no further), decoded
    `TRAIN_CHUNK` at a time and kept as codes and features only (unreadable images skipped)."""
    if max_images is not None:
        split = split.take(max_images) if isinstance(split, datasets.IterableDataset) \
            else split.select(range(min(max_images, len(split))))
    collator = TextImageCollator(image_size)
    device = next(vqvae.parameters()).device
    codes, scorer_features, classifier_features = [], [], []
    for batch in DataLoader(split.select_columns(["image", "text"]), batch_size=TRAIN_CHUNK, collate_fn=collator):
        pixels = batch["pixel_values"]
        if not len(pixels):
            continue
        codes.append(vqvae.encode(pixels.to(device)).cpu())
        scorer_features.append(scorer.image_features(pixels))
        if classifier is not None:
            classifier_features.append(classify(classifier, pixels)[0])
    if not codes:
        raise ValueError("the training split has no readable image to compare generated ones with")
    return TrainingReference(torch.cat(codes), torch.cat(scorer_features),
                             torch.cat(classifier_features) if classifier is not None else None)


class Pipeline(Protocol):
    """What `evaluate_pipeline` uses of a text-to-image pipeline (`pipelines.TextToImagePipeline`, a layer above)."""

    vqvae: DVAEModel

    @property
    def device(self) -> torch.device: ...

    def __call__(self, prompt: list[str], *, guidance_scale: float, generator: torch.Generator, num_candidates: int,
                 output_type: Literal["pt"], progress: bool) -> Any: ...


@torch.no_grad()
def evaluate_pipeline(
    pipe: Pipeline,
    dataset: str | DataConfig = "digits",
    guidance_scales: Sequence[float] = (1.0, 3.0, 5.0),
    seed: int = 0,
    batch_size: int = 64,
    max_prompts: int | None = None,
    num_candidates: int = 1,
    classifier: ImageClassifier | None = None,
    progress: bool = True,
    *,
    scorer: TextImageScorer,
    max_train_images: int | None = MAX_TRAIN_IMAGES,
    pipe_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Generation metrics of `pipe` on `dataset` per guidance scale, JSON-serialisable.

    `dataset` is any `DataConfig.source` (a built-in name, a caption folder, a Hub id), or a whole
    `DataConfig` (e.g. with `caption_languages`; its image size is the pipeline's). Prompts are
    its validation captions (the first `max_prompts`, or all), one image each (the best of
    `num_candidates` by the pipeline's own scorer, `pipe.scorer`, when more than one); every scale samples
    with a generator seeded by `seed`; `pipe_kwargs` go to every pipeline call (e.g. `guidance_plausibility`,
    `top_k`). `scorer` is the evaluation scorer (never a reranking one:
    `pipelines.judges.load_or_train_judge` trains one); the classifier, for a dataset with
    class-label columns (digits, shapes) only, is `load_or_train_classifier(dataset, image_size)`
    unless given. Copies, and the real train-vs-validation distances, are measured against the first
    `max_train_images` training images (all with None), encoded chunk by chunk: a large or streamed
    training split is never decoded whole. Returns::

        {"dataset", "image_size", "num_prompts", "num_candidates", "seed", "seconds",
         "num_train_images": the training images compared with (readable ones, at most `max_train_images`),
         "sampling_seconds": {"3.0": seconds in the pipeline's calls (drawing, decoding, reranking), ...},
         "real_r_precision": R-precision of the real validation images (the ceiling),
         "real_clip_score": their CLIPScore-style similarity to their captions,
         "real_scorer_frechet_distance": real train vs real validation scorer features (a floor),
         # with class labels only:
         "classifier_validation_accuracy": all attributes right, on the real validation images (the ceiling),
         "classifier_attribute_accuracy": {attribute: accuracy},
         "real_frechet_distance": real train vs real validation features (a floor for the FDs below),
         # in the classifier's feature space with class labels, else in the scorer's:
         "near_copy_threshold": p5 of validation-to-nearest-training feature distances,
         "real_nearest_train_distance": {"p5", "p50", "p95"} of those distances,
         "guidance": {"3.0": {"r_precision": share of images whose prompt beats 99 other held-out captions,
                              "clip_score": mean 2.5 * max(cos, 0) of image and prompt,
                              "scorer_frechet_distance": generated vs real validation scorer features,
                              "exact_copy_rate": share of code grids equal to a training image's,
                              # with class labels only:
                              "adherence": share with every prompted attribute recognised,
                              "attribute_adherence": {attribute: share},
                              "frechet_distance": generated vs real validation classifier features,
                              # classifier features with class labels, else scorer features:
                              "near_copy_rate": share within the near-copy threshold of a training image
                                                (about 0.05 for novel images),
                              "nearest_train_distance": {"p5", "p50", "p95"}}, ...}}

    Fréchet distances from few prompts are biased upwards: compare runs with equal `max_prompts`.
    """
    if not guidance_scales or batch_size < 1 or (max_prompts is not None and max_prompts < 2):
        raise ValueError(
            f"evaluate_pipeline needs at least one guidance scale, batch_size >= 1 and max_prompts None or >= 2 "
            "(a Fréchet distance needs two images), "
            f"got {tuple(guidance_scales)}, {batch_size} and {max_prompts}"
        )
    start = time.perf_counter()
    image_size = pipe.vqvae.config.image_size
    data = dataset if isinstance(dataset, DataConfig) else DataConfig(source=dataset)
    data = dataclasses.replace(data, image_size=image_size)
    dataset = data.source
    splits = load_text_image_dataset(data)
    classes = class_columns(splits["train"])
    if classifier is not None and classifier.num_classes != classes:
        raise ValueError(
            f"the classifier predicts {classifier.num_classes} but {dataset!r} has classes "
            f"{classes or 'none'}: pass a classifier trained on {dataset!r}, or none"
        )
    if classes and classifier is None:
        classifier = load_or_train_classifier(dataset, image_size)
    if scorer.model.config.image_size != image_size:
        raise ValueError(
            f"the scorer reads {scorer.model.config.image_size}px images but the pipeline makes {image_size}px ones: "
            f"pass a scorer trained at {image_size}px, or none"
        )
    train = training_reference(splits["train"], pipe.vqvae, scorer, classifier, image_size, max_train_images)
    validation_pixels, validation_texts, *_ = decode_pairs(splits["validation"], image_size)
    real_scores, validation_scorer_features = judge_images(
        scorer, validation_pixels, validation_texts, validation_texts, seed)
    real = {f"real_{name}": value for name, value in real_scores.items()}
    real["real_scorer_frechet_distance"] = frechet_distance(train.scorer_features, validation_scorer_features)
    train_codes = train.codes
    if classifier is None:  # near copies in the scorer's feature space instead of the classifier's
        train_features, validation_features = train.scorer_features, validation_scorer_features
    else:
        validation_targets = {name: torch.tensor(splits["validation"][name]) for name in classes}  # built-ins decode
        train_features = train.classifier_features
        validation_features, validation_predictions = classify(classifier, validation_pixels)
        ceiling = prompt_adherence(validation_predictions, validation_targets)

    num_prompts = len(validation_texts) if max_prompts is None else min(max_prompts, len(validation_texts))
    prompts = validation_texts[:num_prompts]
    batches = range(0, num_prompts, batch_size)
    bar = tqdm(total=len(guidance_scales) * len(batches), desc="evaluating", unit="batch", disable=not progress)
    per_scale, sampling_seconds = {}, {}
    for scale in guidance_scales:
        generator = torch.Generator(pipe.device).manual_seed(seed)
        images, codes = [], []
        sampling_start = time.perf_counter()
        for first in batches:
            output = pipe(prompts[first : first + batch_size], guidance_scale=scale, generator=generator,
                          num_candidates=num_candidates, output_type="pt", progress=False, **(pipe_kwargs or {}))
            images.append(output.images)
            codes.append(output.codes.cpu())
            bar.update()
        sampling_seconds[str(float(scale))] = time.perf_counter() - sampling_start
        images = torch.cat(images)
        metrics = {}
        if classifier is not None:
            features, predictions = classify(classifier, images)
            adherence = prompt_adherence(predictions, {name: labels[:num_prompts]
                                                       for name, labels in validation_targets.items()})
            copies = near_copy_rate(features, train_features, validation_features)
            metrics = {
                "adherence": adherence.pop("all"),
                "attribute_adherence": adherence,
                "frechet_distance": frechet_distance(features, validation_features),
                "near_copy_rate": copies["near_copy_rate"],
                "nearest_train_distance": copies["generated_to_train"],
            }
        scores, scorer_features = judge_images(scorer, images, prompts, validation_texts, seed)
        if classifier is None:
            copies = near_copy_rate(scorer_features, train_features, validation_features)
            metrics = {"near_copy_rate": copies["near_copy_rate"], "nearest_train_distance": copies["generated_to_train"]}
        per_scale[str(float(scale))] = metrics | scores | {
            "scorer_frechet_distance": frechet_distance(scorer_features, validation_scorer_features),
            "exact_copy_rate": exact_copy_rate(torch.cat(codes), train_codes),
        }
    bar.close()
    result = {"dataset": dataset, "image_size": image_size, "num_prompts": num_prompts,
              "num_candidates": num_candidates, "seed": seed, "num_train_images": len(train_codes)}
    if classifier is not None:
        result |= {
            "classifier_validation_accuracy": ceiling.pop("all"),
            "classifier_attribute_accuracy": ceiling,
            "real_frechet_distance": frechet_distance(train_features, validation_features),
        }
    result |= {"near_copy_threshold": copies["threshold"], "real_nearest_train_distance": copies["validation_to_train"]}
    return result | real | {"guidance": per_scale, "sampling_seconds": sampling_seconds,
                            "seconds": time.perf_counter() - start}
