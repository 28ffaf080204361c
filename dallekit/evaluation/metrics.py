"""Generation metrics as pure functions: prompt adherence, Fréchet distance, exact and near copies."""

from __future__ import annotations

from collections.abc import Mapping

import torch

SUMMARY_PERCENTILES = (5, 50, 95)


def prompt_adherence(
    predicted: Mapping[str, torch.Tensor], prompted: Mapping[str, torch.Tensor]
) -> dict[str, float]:
    """Share of images whose predicted classes equal the prompted ones, all attributes at once and each alone.

    Both map attribute names to class indices [N]. Returns `{"all": ..., name: ...}`; with the
    true labels as `prompted` this is the classifier's accuracy.
    """
    if set(predicted) != set(prompted):
        raise ValueError(f"predicted attributes {sorted(predicted)} differ from prompted ones {sorted(prompted)}")
    matches = {name: predicted[name].eq(prompted[name]) for name in prompted}
    every = torch.stack(list(matches.values())).all(dim=0)
    if every.numel() == 0:
        raise ValueError("no images: prompt adherence needs at least one prediction")
    shares = {name: match.double().mean().item() for name, match in matches.items()}
    return {"all": every.double().mean().item()} | shares


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N, D] and [M, D].

    `|mu_a - mu_b|² + tr(S_a) + tr(S_b) - 2 tr((S_a^½ S_b S_a^½)^½)`, in float64; the trace term
    comes from eigenvalues of symmetric PSD matrices, so it stays real for singular covariances.
    """
    a, b = features_a.double(), features_b.double()
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(
            "frechet_distance needs two feature sets [N, D] and [M, D] with N, M >= 2, "
            f"got {list(a.shape)} and {list(b.shape)}"
        )
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov_a)
    sqrt_a = eigenvectors @ torch.diag(eigenvalues.clamp_min(0).sqrt()) @ eigenvectors.T
    trace_sqrt = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp_min(0).sqrt().sum()
    distance = (a.mean(0) - b.mean(0)).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt
    return max(distance.item(), 0.0)  # >= 0 in exact arithmetic; clip rounding error


def exact_copy_rate(generated_codes: torch.Tensor, training_codes: torch.Tensor) -> float:
    """Share of generated code sequences [N, L] (or [N, h, w]) equal to some training sequence [M, ...]."""
    generated = generated_codes.reshape(len(generated_codes), -1)
    training = training_codes.reshape(len(training_codes), -1)
    if len(generated) == 0 or generated.shape[1] != training.shape[1]:
        raise ValueError(
            f"exact_copy_rate needs N >= 1 generated sequences as long as the training ones, "
            f"got {list(generated_codes.shape)} and {list(training_codes.shape)}"
        )
    seen = set(map(tuple, training.tolist()))
    return sum(tuple(sequence) in seen for sequence in generated.tolist()) / len(generated)


def near_copy_rate(
    generated_features: torch.Tensor,
    training_features: torch.Tensor,
    validation_features: torch.Tensor,
    percentile: float = 5.0,
) -> dict[str, float | dict[str, float]]:
    """Share of generated images closer to their nearest training image than real held-out images usually are.

    The threshold is the `percentile`-th percentile of validation-to-training nearest-neighbour
    distances (Euclidean, features [N, D]); novel samples score about `percentile`%, copies ~100%.
    Returns `near_copy_rate`, `threshold` and p5/p50/p95 of both distance distributions
    (`generated_to_train`, `validation_to_train`).
    """
    if not 0 < percentile < 100:
        raise ValueError(f"percentile must lie strictly between 0 and 100, got {percentile}")
    training = training_features.double()

    def nearest(queries: torch.Tensor) -> torch.Tensor:  # [N] distance of each query to its nearest training row
        return torch.cdist(queries.double(), training, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values

    generated, validation = nearest(generated_features), nearest(validation_features)
    threshold = torch.quantile(validation, percentile / 100).item()
    return {
        "near_copy_rate": (generated <= threshold).double().mean().item(),
        "threshold": threshold,
        "generated_to_train": _distance_summary(generated),
        "validation_to_train": _distance_summary(validation),
    }


def _distance_summary(distances: torch.Tensor) -> dict[str, float]:
    """The 5th, 50th and 95th percentiles of `distances` [N] as `{"p5", "p50", "p95"}`."""
    values = torch.quantile(distances.double(), torch.tensor(SUMMARY_PERCENTILES, dtype=torch.float64) / 100)
    return {f"p{p}": value for p, value in zip(SUMMARY_PERCENTILES, values.tolist())}
