"""Generation quality of a text-to-image pipeline on a built-in dataset's held-out captions.

One image per validation caption and guidance scale, judged by the independent classifier of
`evaluation.classifier`: prompt adherence, Fréchet distance to the real validation images, and
memorisation as exact copies of training code grids and near copies in the feature space.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from evaluation.classifier import (
    ImageClassifier,
    class_columns,
    classify,
    decode_split,
    load_labelled_splits,
    load_or_train_classifier,
)
from evaluation.metrics import exact_copy_rate, frechet_distance, near_copy_rate, prompt_adherence

if TYPE_CHECKING:
    from pipelines import TextToImagePipeline


@torch.no_grad()
def evaluate_pipeline(
    pipe: TextToImagePipeline,
    dataset: str = "digits",
    guidance_scales: Sequence[float] = (1.0, 3.0, 5.0),
    seed: int = 0,
    batch_size: int = 64,
    max_prompts: int | None = None,
    classifier: ImageClassifier | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generation metrics of `pipe` on `dataset` ("digits" or "shapes") per guidance scale, JSON-serialisable.

    Prompts are the validation captions (the first `max_prompts`, or all), one image each, the
    targets their label columns; every scale samples with a generator seeded by `seed`. The
    classifier is `load_or_train_classifier(dataset, image_size)` unless given. Returns::

        {"dataset", "image_size", "num_prompts", "seed", "seconds",
         "classifier_validation_accuracy": all attributes right, on the real validation images (the ceiling),
         "classifier_attribute_accuracy": {attribute: accuracy},
         "real_frechet_distance": real train vs real validation features (a floor for the FDs below),
         "near_copy_threshold": p5 of validation-to-nearest-training feature distances,
         "real_nearest_train_distance": {"p5", "p50", "p95"} of those distances,
         "guidance": {"3.0": {"adherence": share with every prompted attribute recognised,
                              "attribute_adherence": {attribute: share},
                              "frechet_distance": generated vs real validation features,
                              "exact_copy_rate": share of code grids equal to a training image's,
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
    splits = load_labelled_splits(dataset, image_size)
    if classifier is None:
        classifier = load_or_train_classifier(dataset, image_size)
    if classifier.num_classes != class_columns(splits["train"]):
        raise ValueError(
            f"the classifier predicts {classifier.num_classes} but {dataset!r} has classes "
            f"{class_columns(splits['train'])}: pass a classifier trained on {dataset!r}, or none"
        )
    train_pixels, _ = decode_split(splits["train"], image_size)
    validation_pixels, validation_targets = decode_split(splits["validation"], image_size)
    train_features, _ = classify(classifier, train_pixels)
    validation_features, validation_predictions = classify(classifier, validation_pixels)
    ceiling = prompt_adherence(validation_predictions, validation_targets)
    device = next(pipe.vqvae.parameters()).device
    train_codes = torch.cat([pipe.vqvae.encode(batch.to(device)).cpu() for batch in train_pixels.split(batch_size)])

    num_prompts = len(splits["validation"]) if max_prompts is None else min(max_prompts, len(splits["validation"]))
    prompts = splits["validation"]["text"][:num_prompts]
    targets = {name: labels[:num_prompts] for name, labels in validation_targets.items()}
    batches = range(0, num_prompts, batch_size)
    bar = tqdm(total=len(guidance_scales) * len(batches), desc="evaluating", unit="batch", disable=not progress)
    per_scale = {}
    for scale in guidance_scales:
        generator = torch.Generator(pipe.device).manual_seed(seed)
        images, codes = [], []
        for first in batches:
            output = pipe(prompts[first : first + batch_size], guidance_scale=scale, generator=generator,
                          output_type="pt", progress=False)
            images.append(output.images)
            codes.append(output.codes.cpu())
            bar.update()
        features, predictions = classify(classifier, torch.cat(images))
        adherence = prompt_adherence(predictions, targets)
        copies = near_copy_rate(features, train_features, validation_features)
        per_scale[str(float(scale))] = {
            "adherence": adherence.pop("all"),
            "attribute_adherence": adherence,
            "frechet_distance": frechet_distance(features, validation_features),
            "exact_copy_rate": exact_copy_rate(torch.cat(codes), train_codes),
            "near_copy_rate": copies["near_copy_rate"],
            "nearest_train_distance": copies["generated_to_train"],
        }
    bar.close()
    return {
        "dataset": dataset,
        "image_size": image_size,
        "num_prompts": num_prompts,
        "seed": seed,
        "classifier_validation_accuracy": ceiling.pop("all"),
        "classifier_attribute_accuracy": ceiling,
        "real_frechet_distance": frechet_distance(train_features, validation_features),
        "near_copy_threshold": copies["threshold"],
        "real_nearest_train_distance": copies["validation_to_train"],
        "guidance": per_scale,
        "seconds": time.perf_counter() - start,
    }
