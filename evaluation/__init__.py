"""Metrics of both stages: tokenizer reconstruction, and generation quality judged by an independent classifier."""

from .classifier import ClassifierConfig, ImageClassifier, load_or_train_classifier, train_classifier
from .generation import evaluate_pipeline
from .metrics import exact_copy_rate, frechet_distance, near_copy_rate, prompt_adherence
from .reconstruction import codebook_statistics, evaluate_tokenizer, mse, psnr_from_mse

__all__ = [
    "ClassifierConfig",
    "ImageClassifier",
    "codebook_statistics",
    "evaluate_pipeline",
    "evaluate_tokenizer",
    "exact_copy_rate",
    "frechet_distance",
    "load_or_train_classifier",
    "mse",
    "near_copy_rate",
    "prompt_adherence",
    "psnr_from_mse",
    "train_classifier",
]
