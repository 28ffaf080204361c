"""The classifier's judgement of a stage-1 tokenizer's reconstructions (Fréchet distance, class accuracy).

MSE, PSNR and codebook usage are the tokenizer's own (`stage1_dvae.metrics`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dallekit.evaluation.classifier import (
    ClassifierConfig,
    classify,
    decode_split,
    load_labelled_splits,
    load_or_train_classifier,
)
from dallekit.evaluation.metrics import frechet_distance


@torch.no_grad()
def reconstruct(model, pixel_values: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """`decode(encode(pixels))` of pixels [N, C, H, W] in [-1, 1], batch by batch, on the CPU."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batches = [model.decode(model.encode(batch.to(device))).float().cpu() for batch in pixel_values.split(batch_size)]
    model.train(was_training)
    return torch.cat(batches)


def judge_reconstructions(
    model, dataset: str, batch_size: int = 128, classifier_config: ClassifierConfig | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """The classifier's view of a tokenizer's reconstructions of a labelled built-in's validation images.

    Fréchet distance, in the feature space of the independent classifier
    (`evaluation.classifier`), between the reconstructed validation images and the real training
    images (`reconstruction_frechet_distance`), beside the same distance for the real validation
    images (`real_frechet_distance`, the floor a perfect tokenizer would reach); and, per class
    attribute, the share of reconstructions the classifier puts in their image's true class
    (`reconstruction_accuracy`, e.g. a square still seen as a square) beside the same on the real
    images (`real_accuracy`): what the tokenizer alone caps adherence at.
    """
    image_size = model.config.image_size
    splits = load_labelled_splits(dataset, image_size)
    classifier = load_or_train_classifier(dataset, image_size, classifier_config, cache_dir=cache_dir)
    train_features = classify(classifier, decode_split(splits["train"], image_size)[0])[0]
    validation_pixels, labels = decode_split(splits["validation"], image_size)
    reconstructions = reconstruct(model, validation_pixels, batch_size)
    real_features, real_predictions = classify(classifier, validation_pixels)
    features, predictions = classify(classifier, reconstructions)

    def accuracy(predicted: dict[str, torch.Tensor]) -> dict[str, float]:
        return {name: (predicted[name] == labels[name]).float().mean().item() for name in labels}

    return {
        "reconstruction_frechet_distance": frechet_distance(features, train_features),
        "real_frechet_distance": frechet_distance(real_features, train_features),
        "reconstruction_accuracy": accuracy(predictions),
        "real_accuracy": accuracy(real_predictions),
    }
