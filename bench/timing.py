"""What every benchmark shares: the machine it ran on, and interleaved median timings."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import torch

from dallekit.modeling_utils import cpu_supports_fast_bf16


def cpu_name() -> str:
    """The CPU's model name as `lscpu` gives it (`platform.processor()` is empty on Linux)."""
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name:"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or platform.machine()


def machine() -> dict:
    """The CPU's name, its threads in use, whether it has native bf16, and the 1-minute load average."""
    return {"cpu": cpu_name(), "threads": torch.get_num_threads(), "cpu_bf16": cpu_supports_fast_bf16(),
            "load_average": round(os.getloadavg()[0], 2)}


def synchronize(device: torch.device) -> None:
    """Wait for `device`'s queued work (a no-op on the CPU), so wall times cover it."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def median_seconds(
    calls: dict[str, Callable[[], object]], repeats: int, device: torch.device = torch.device("cpu"),
    warmup: bool = True,
) -> dict[str, float]:
    """Median wall time of each call, the calls interleaved `repeats` times (after one untimed round if `warmup`),
    so that a machine's changing load falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_index in range(repeats + warmup):
        for name, call in calls.items():
            synchronize(device)
            start = time.perf_counter()
            call()
            synchronize(device)
            if round_index or not warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(seconds) for name, seconds in times.items()}
