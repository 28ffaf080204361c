"""Benchmark the stage-1 tokenizer on built-in digits: speed, memory and reconstruction quality.

    python bench/stage1.py                      # both quantizers, their default configs
    python bench/stage1.py --quantizer vq --max_steps 200   # any config override after the flags

Prints one JSON object per quantizer. Targets (2 CPU cores, <= 10 minutes of training each):
validation PSNR >= 26 dB at 32x32 and codebook usage >= 90% of K.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"gumbel": ROOT / "configs/dvae/digits.yaml", "vq": ROOT / "configs/dvae/digits_vq.yaml"}
TARGETS = {"psnr": 26.0, "codebook_usage": 0.90, "train_seconds": 600.0}


def run_one(quantizer: str, overrides: list[str]) -> dict:
    """Train one config in this process and measure it."""
    sys.path.insert(0, str(ROOT))
    import torch

    from stage1_dvae.train import Stage1Config, train
    from training.accelerator import resolve_mixed_precision
    from training.config import load_config

    with tempfile.TemporaryDirectory() as output_dir:
        config = load_config(Stage1Config, ["--config", str(CONFIGS[quantizer]), "--output_dir", output_dir,
                                            "--report_to", "none", "--progress", "false", *overrides])
        start = time.perf_counter()
        metrics = train(config)
        seconds = time.perf_counter() - start
    result = {
        "benchmark": "stage1",
        "quantizer": quantizer,
        "dataset": config.data.source,
        "image_size": config.data.image_size,
        "codebook_size": config.model.codebook_size,
        "steps": metrics["step"],
        "batch_size": config.training.batch_size,
        "mixed_precision": resolve_mixed_precision(config.training.mixed_precision),
        "train_seconds": round(seconds, 1),
        "train_images_per_second": round(metrics["train_images_per_second"], 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "validation_psnr": round(metrics["psnr"], 2),
        "validation_codebook_usage": round(metrics["codebook_usage"], 4),
        "validation_perplexity": round(metrics["perplexity"], 1),
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    result["meets_targets"] = (
        result["validation_psnr"] >= TARGETS["psnr"]
        and result["validation_codebook_usage"] >= TARGETS["codebook_usage"]
        and result["train_seconds"] <= TARGETS["train_seconds"]
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quantizer", choices=sorted(CONFIGS), action="append")
    args, overrides = parser.parse_known_args()
    if args.quantizer and len(args.quantizer) == 1:
        print(json.dumps(run_one(args.quantizer[0], overrides)), flush=True)
        return
    # One child process per quantizer, so each peak-memory figure is its own.
    for quantizer in args.quantizer or sorted(CONFIGS):
        child = subprocess.run([sys.executable, __file__, "--quantizer", quantizer, *overrides],
                               capture_output=True, text=True, cwd=ROOT)
        if child.returncode != 0:
            sys.exit(child.stderr[-2000:])
        print(child.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
