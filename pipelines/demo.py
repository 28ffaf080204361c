"""`dallekit demo`: both stages trained on a built-in dataset, evaluated, saved as one pipeline.

    output_dir/stage1/      the image tokenizer's run (checkpoints, logs, reconstruction grids, model/)
    output_dir/stage2/      the prior's run (checkpoints, logs, sample grids, prior/, tokenizer/)
    output_dir/pipeline/    the saved TextToImagePipeline with its model card
    output_dir/samples.png  one row per prompt, the prompt written beside it
    output_dir/metrics.json stage-1 and stage-2 validation metrics, the evaluation, the time taken
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast

from evaluation import evaluate_pipeline
from pipelines.text_to_image import TextToImagePipeline
from stage1_dvae import DVAEModel
from stage1_dvae.train import Stage1Config
from stage1_dvae.train import train as train_stage1
from stage2_prior import PriorModel
from stage2_prior.train import Stage2Config
from stage2_prior.train import train as train_stage2
from textimage_data import DataConfig, load_text_image_dataset
from training.config import load_config
from training.images import save_image_grid

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEMO_CONFIGS = (CONFIG_DIR / "dvae" / "demo.yaml", CONFIG_DIR / "prior" / "demo.yaml")


def demo_prompts(dataset: str, image_size: int, num_rows: int = 10) -> list[str]:
    """Validation captions for the sample grid: one per class first (sorted by class), then other captions."""
    validation = load_text_image_dataset(DataConfig(source=dataset, image_size=image_size))["validation"]
    by_class: dict[int, str] = {}
    labels = validation["label"] if "label" in validation.column_names else []
    for caption, label in zip(validation["text"], labels):
        by_class.setdefault(label, caption)
    prompts = [by_class[label] for label in sorted(by_class)][:num_rows]
    for caption in validation["text"]:
        if len(prompts) >= num_rows:
            break
        if caption not in prompts:
            prompts.append(caption)
    return prompts


def _banner(step: int, text: str) -> None:
    print(f"\n[{step}/4] {text}", flush=True)


def run_demo(
    dataset: str = "digits",
    output_dir: str | Path = "outputs/demo",
    stage1_config: str | Path = DEMO_CONFIGS[0],
    stage2_config: str | Path = DEMO_CONFIGS[1],
    guidance_scales: tuple[float, ...] = (1.0, 3.0, 5.0),
    max_prompts: int | None = None,
    images_per_prompt: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """Train, evaluate and save; returns what `metrics.json` holds. Configs are validated before any training."""
    output_dir = Path(output_dir)
    stage1 = load_config(Stage1Config, ["--config", str(stage1_config), "--data.source", dataset,
                                         "--output_dir", str(output_dir / "stage1")])
    stage2 = load_config(Stage2Config, ["--config", str(stage2_config), "--data.source", dataset,
                                         "--stage1_model", str(output_dir / "stage1" / "model"),
                                         "--output_dir", str(output_dir / "stage2")])
    seconds: dict[str, float] = {}
    start = time.perf_counter()

    _banner(1, f"training the image tokenizer on {dataset} ({Path(stage1_config).name})")
    stage1_metrics = train_stage1(stage1)
    seconds["stage1"] = time.perf_counter() - start

    _banner(2, f"training the prior on captions and image codes ({Path(stage2_config).name})")
    stage2_metrics = train_stage2(stage2)
    seconds["stage2"] = time.perf_counter() - start - seconds["stage1"]

    pipe = TextToImagePipeline(
        vqvae=DVAEModel.from_pretrained(output_dir / "stage1" / "model"),
        prior=PriorModel.from_pretrained(output_dir / "stage2" / "prior"),
        tokenizer=PreTrainedTokenizerFast.from_pretrained(output_dir / "stage2" / "tokenizer"),
    )
    _banner(3, f"evaluating prompt adherence, Fréchet distance and copying at guidance {guidance_scales}")
    evaluation = evaluate_pipeline(pipe, dataset=dataset, guidance_scales=guidance_scales, seed=seed,
                                   max_prompts=max_prompts)
    seconds["evaluation"] = time.perf_counter() - start - seconds["stage1"] - seconds["stage2"]

    _banner(4, "drawing samples and saving the pipeline")
    prompts = demo_prompts(dataset, pipe.vqvae.config.image_size)
    output = pipe(prompts, num_images_per_prompt=images_per_prompt, generator=torch.Generator().manual_seed(seed),
                  output_type="pt")
    save_image_grid(output.images, output_dir / "samples.png", num_rows=len(prompts), scale=2, row_labels=prompts)
    pipe.training_info = {
        "dataset": dataset,
        "data_description": f"dallekit's built-in `{dataset}` dataset (train split), trained with `dallekit demo`.",
        "example_prompt": prompts[0],
        "example_prompts": prompts,
        "metrics": evaluation,
    }
    pipe.save_pretrained(output_dir / "pipeline")
    seconds["total"] = time.perf_counter() - start
    metrics = {"dataset": dataset, "stage1": stage1_metrics, "stage2": stage2_metrics, "evaluation": evaluation,
               "seconds": seconds}
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
