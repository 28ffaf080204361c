"""The independent image classifier behind the generation metrics, trained on real images only.

One small CNN per built-in dataset, with a head per class-label column (digits: `label`; shapes:
`label`, `colour`, `position`). Its predictions measure prompt adherence; its penultimate layer is
the feature space of the Fréchet and nearest-neighbour distances. It never sees generated images.
Trained weights are cached as safetensors under `$DALLEKIT_CACHE/classifiers` (default
`~/.cache/dallekit/classifiers`), keyed by the data, the image size and the settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from dallekit.data import DataConfig, TextImageCollator, load_text_image_dataset
from dallekit.data.cache import dallekit_cache_dir, split_fingerprint
from dallekit.data.transforms import random_shift
from dallekit.evaluation.metrics import prompt_adherence

logger = logging.getLogger(__name__)

LABELLED_DATASETS = ("digits", "shapes")  # the built-in datasets with class-label columns
CACHE_FORMAT = 1  # part of the cache key: bump when the architecture or training loop changes


@dataclass
class ClassifierConfig:
    """Architecture and training settings of the classifier; every field is part of the cache key."""

    width: int = 32  # channels of the first block; the later blocks have twice as many
    feature_dim: int = 128  # D of `ImageClassifier.features`
    steps: int = 300
    batch_size: int = 64
    learning_rate: float = 3e-3  # peak of a one-cycle schedule
    weight_decay: float = 0.01
    max_shift: int = 2  # augmentation: random translation by up to this many pixels each way
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("width", "feature_dim", "steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ClassifierConfig.{name}={value!r} is invalid: set a positive integer.")
        if self.learning_rate <= 0 or self.weight_decay < 0:
            raise ValueError(
                f"ClassifierConfig needs learning_rate > 0 and weight_decay >= 0, "
                f"got {self.learning_rate} and {self.weight_decay}."
            )
        if not isinstance(self.max_shift, int) or self.max_shift < 0:
            raise ValueError(
                f"ClassifierConfig.max_shift={self.max_shift!r} is invalid: set 0 (no shifts) or a number of pixels."
            )


def _block(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU()
    )


class ImageClassifier(nn.Module):
    """Small CNN: pixels [B, 3, H, W] in [-1, 1] -> features [B, D] -> logits [B, classes] per attribute."""

    def __init__(self, num_classes: dict[str, int], width: int = 32, feature_dim: int = 128) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 4, stride=2, padding=1), nn.ReLU(),  # H/2
            _block(width, 2 * width, stride=2),  # H/4
            _block(2 * width, 2 * width),
            nn.AdaptiveAvgPool2d(4),  # a 4x4 grid, not a global pool: shapes' `position` is about where
            nn.Flatten(),
            nn.Linear(2 * width * 16, feature_dim), nn.ReLU(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, count) for name, count in num_classes.items()})

    @property
    def num_classes(self) -> dict[str, int]:
        return {name: head.out_features for name, head in self.heads.items()}

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Penultimate activations [B, D]: the feature space of the distance metrics."""
        return self.body(pixel_values)

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.features(pixel_values)
        return {name: head(features) for name, head in self.heads.items()}


@torch.no_grad()
def classify(
    classifier: ImageClassifier, pixel_values: torch.Tensor, batch_size: int = 256
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Features [N, D] and predicted classes `{name: LongTensor [N]}` of pixels [N, 3, H, W], on the CPU."""
    was_training = classifier.training
    classifier.eval()
    device = next(classifier.parameters()).device
    features, predictions = [], []
    for batch in pixel_values.split(batch_size):
        batch_features = classifier.features(batch.to(device))
        features.append(batch_features.cpu())
        predictions.append({name: head(batch_features).argmax(-1).cpu() for name, head in classifier.heads.items()})
    classifier.train(was_training)
    return torch.cat(features), {name: torch.cat([batch[name] for batch in predictions]) for name in classifier.heads}


@torch.enable_grad()  # also when called under no_grad, as in evaluate_pipeline
def train_classifier(
    pixel_values: torch.Tensor,
    targets: dict[str, torch.Tensor],
    num_classes: dict[str, int],
    config: ClassifierConfig | None = None,
) -> ImageClassifier:
    """Train an `ImageClassifier` on the CPU on real pixels [N, 3, H, W] and their classes `{name: [N]}`.

    AdamW with a one-cycle schedule, the summed cross-entropy of all heads, random shifts;
    seeded by `config.seed`, without touching the global random state.
    """
    config = config or ClassifierConfig()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = ImageClassifier(num_classes, config.width, config.feature_dim)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.learning_rate, total_steps=config.steps)
    model.train()
    for _ in range(config.steps):
        index = torch.randint(len(pixel_values), (config.batch_size,), generator=generator)
        logits = model(random_shift(pixel_values[index], config.max_shift, generator))
        loss = sum(F.cross_entropy(logits[name], targets[name][index]) for name in num_classes)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def load_labelled_splits(dataset: str, image_size: int) -> datasets.DatasetDict:
    """`train`/`validation` of a built-in dataset with class labels; ValueError naming the supported ones."""
    if dataset not in LABELLED_DATASETS:
        raise ValueError(
            f"dataset={dataset!r} has no class labels to classify: use one of {', '.join(LABELLED_DATASETS)}."
        )
    return load_text_image_dataset(DataConfig(source=dataset, image_size=image_size))


def class_columns(split: datasets.Dataset) -> dict[str, int]:
    """The split's class-label columns and their number of classes, e.g. `{"label": 10}`."""
    features = split.features.items()
    return {name: feature.num_classes for name, feature in features if isinstance(feature, datasets.ClassLabel)}


def decode_split(split: datasets.Dataset, image_size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Every image of a built-in split as pixels [N, 3, S, S] in [-1, 1], and its class labels `{name: [N]}`."""
    pixel_values = TextImageCollator(image_size)(list(split))["pixel_values"]  # built-in images always decode
    return pixel_values, {name: torch.tensor(split[name]) for name in class_columns(split)}


def load_or_train_classifier(
    dataset: str,
    image_size: int,
    config: ClassifierConfig | None = None,
    cache_dir: str | Path | None = None,
) -> ImageClassifier:
    """The classifier of a built-in dataset at `image_size`: from the cache, or trained on its real train split.

    The cache holds `{dataset}-{image_size}px-{key}.safetensors` and a `.json` with the settings,
    heads, validation accuracy and training time; `key` hashes the splits' fingerprints, the
    image size and `config`, so any change to them trains a new classifier.
    """
    config = config or ClassifierConfig()
    splits = load_labelled_splits(dataset, image_size)
    num_classes = class_columns(splits["train"])
    key = {
        "format": CACHE_FORMAT,
        "dataset": dataset,
        "image_size": image_size,
        "fingerprints": [split_fingerprint(splits["train"]), split_fingerprint(splits["validation"])],
        "config": asdict(config),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    stem = Path(cache_dir or dallekit_cache_dir("classifiers")) / f"{dataset}-{image_size}px-{digest}"
    weights_path, info_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    if weights_path.is_file() and info_path.is_file():  # the JSON is written last: both mean a complete entry
        model = ImageClassifier(num_classes, config.width, config.feature_dim)
        model.load_state_dict(load_file(weights_path))
        logger.info("Loaded the %s classifier from %s", dataset, weights_path)
        return model.eval()

    start = time.perf_counter()
    model = train_classifier(*decode_split(splits["train"], image_size), num_classes, config)
    seconds = time.perf_counter() - start
    validation_pixels, validation_targets = decode_split(splits["validation"], image_size)
    accuracy = prompt_adherence(classify(model, validation_pixels)[1], validation_targets)
    logger.info("Trained the %s classifier in %.1f s: validation accuracy %s", dataset, seconds, accuracy)
    stem.parent.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), weights_path)
    info = {"num_classes": num_classes, "validation_accuracy": accuracy, "train_seconds": seconds} | key
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return model
