"""Turning metrics and configs into log lines and tracker hyperparameters."""

from __future__ import annotations

from typing import Any

from dallekit.training.config import to_dict


def format_metrics(metrics: dict[str, Any]) -> str:
    """`key=value` pairs with 4 significant digits for floats, for one-line logs."""
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def flat_hparams(config: Any) -> dict[str, float | int | str | bool]:
    """Scalar hyperparameters of a config tree as `section.key` (TensorBoard's hparams take scalars only)."""
    flat = {}
    for section, values in to_dict(config).items():
        items = values.items() if isinstance(values, dict) else [("", values)]
        for key, value in items:
            if isinstance(value, (int, float, str, bool)):
                flat[f"{section}.{key}".rstrip(".")] = value
    return flat
