"""Reconstruction metrics of a stage-1 tokenizer: MSE, PSNR, codebook usage, perplexity, Fréchet distance."""

from __future__ import annotations

import math
from collections.abc import Iterable
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


def mse(reconstruction: torch.Tensor, target: torch.Tensor) -> float:
    """Mean squared error on the [0, 1] pixel scale of images given in [-1, 1]."""
    return ((reconstruction.float() - target.float()) / 2).pow(2).mean().item()


def psnr_from_mse(mean_squared_error: float) -> float:
    """Peak signal-to-noise ratio in dB for pixels in [0, 1]."""
    return 10 * math.log10(1.0 / max(mean_squared_error, 1e-12))


def codebook_statistics(code_counts: torch.Tensor) -> dict[str, float]:
    """Usage (share of the K codes seen at least once) and perplexity (exp entropy) of a code histogram."""
    counts = code_counts.double()
    probs = counts / counts.sum().clamp_min(1)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum().item()
    return {"codebook_usage": (counts > 0).double().mean().item(), "perplexity": math.exp(entropy)}


@torch.no_grad()
def evaluate_tokenizer(model, batches: Iterable[torch.Tensor]) -> dict[str, float]:
    """MSE, PSNR, codebook usage and perplexity of `model` over batches of pixels [B, C, H, W] in [-1, 1].

    The tokenizer is evaluated as it is used by stage 2: deterministic codes, then `decode(codes)`.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    squared_error, num_values, num_images = 0.0, 0, 0
    counts = torch.zeros(model.config.codebook_size, dtype=torch.long)
    for pixel_values in batches:
        if pixel_values.shape[0] == 0:
            continue
        pixel_values = pixel_values.to(device)
        codes = model.encode(pixel_values)
        reconstruction = model.decode(codes)
        squared_error += ((reconstruction.float() - pixel_values.float()) / 2).pow(2).sum().item()
        num_values += pixel_values.numel()
        num_images += pixel_values.shape[0]
        counts += torch.bincount(codes.flatten().cpu(), minlength=model.config.codebook_size)
    model.train(was_training)
    if num_images == 0:
        raise ValueError("no images to evaluate: the evaluation split is empty or every image was unreadable")
    mean_squared_error = squared_error / num_values
    return {
        "mse": mean_squared_error,
        "psnr": psnr_from_mse(mean_squared_error),
        **codebook_statistics(counts),
        "num_images": num_images,
    }


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
