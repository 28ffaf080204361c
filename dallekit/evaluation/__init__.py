"""Metrics of both stages: tokenizer reconstruction, and generation quality judged by two independent judges
(a classifier for datasets with class labels, a contrastive text–image scorer for any captioned data)."""

from .classifier import ClassifierConfig, ImageClassifier, load_or_train_classifier, train_classifier
from .generation import evaluate_pipeline
from .metrics import exact_copy_rate, frechet_distance, near_copy_rate, prompt_adherence
from .reconstruction import judge_reconstructions
from .scorer_metrics import EVALUATION_SEED, clip_score, judge_images, r_precision

__all__ = [
    "EVALUATION_SEED",
    "ClassifierConfig",
    "ImageClassifier",
    "clip_score",
    "evaluate_pipeline",
    "exact_copy_rate",
    "frechet_distance",
    "judge_images",
    "judge_reconstructions",
    "load_or_train_classifier",
    "near_copy_rate",
    "prompt_adherence",
    "r_precision",
    "train_classifier",
]
