"""The 64px prior recipe within its time budget, one change at a time, against one fixed image tokenizer.

    python bench/prior_recipe.py --stage1-model outputs/demo/stage1/model
                                 [--config configs/prior/emoji_8x8.yaml] [--variants recipe dropout ...]
                                 [--output-dir runs/prior-recipe] [--max-prompts 394] [--guidance-scales 1 2 3]
                                 [--guidance-plausibilities 0 0.1]

Trains the stage-2 prior of `--config` (default: the emoji recipe, `dallekit train`'s at 64 px) on the
codes of `--stage1-model` (a trained 64px tokenizer, e.g. `outputs/demo/stage1/model` after `dallekit
demo --dataset emoji`) once per variant, each within the recipe's `training.max_train_seconds` (a
variant may change it), then judges the exported prior with the evaluation scorer on the held-out
captions at each of `--guidance-scales` (default 3) and `--guidance-plausibilities` (default 0.1, the
pipeline's). Prints one JSON object per variant: steps trained, validation loss (text and image parts),
tokens/s, per guidance plausibility and scale R-precision, CLIPScore, exact- and near-copy rates, and the
machine. The `budget_third` variant trains for a third of the recipe's time: the steps a CPU three times
slower (a 2-core AVX2 EPYC against an AMX Xeon) gets in the recipe's budget. The variants' figures are comparable with each other only from one run
on a machine nothing else uses (the budget decides the steps). The codes are encoded once, into the first
variant's directory, and shared.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from timing import machine  # noqa: E402

from dallekit.evaluation import evaluate_pipeline  # noqa: E402
from dallekit.training.config import load_config  # noqa: E402
from pipelines import TextToImagePipeline  # noqa: E402
from pipelines.judges import load_or_train_judge  # noqa: E402
from stage1_dvae import DVAEModel  # noqa: E402
from stage2_prior import PriorModel  # noqa: E402
from stage2_prior.train import Stage2Config  # noqa: E402
from stage2_prior.train import train as train_stage2  # noqa: E402

DROPOUT = ["--model.residual_dropout", "0.1", "--model.embedding_dropout", "0.1"]  # the recipe before 2026-12-07
VARIANTS = {
    "recipe": [],
    "dropout": DROPOUT,
    "dropout_batch16": [*DROPOUT, "--training.batch_size", "16"],
    "dropout_lr2e-3": [*DROPOUT, "--training.learning_rate", "2e-3"],
    "lr2e-3": ["--training.learning_rate", "2e-3"],
    "hidden192": ["--model.hidden_size", "192", "--model.intermediate_size", "512"],
    "budget_x2": ["--training.max_train_seconds", "1080"],
    "budget_third": ["--training.max_train_seconds", "180"],
    "no_augmentation": ["--augmentation.copies", "0"],
    "augmentation_x8": ["--augmentation.copies", "8"],
    "image_loss_only": ["--model.text_loss_weight", "0"],
    "p_uncond_0.2": ["--p_uncond", "0.2"],
}


def run_variant(name: str, args: argparse.Namespace, shared_codes: Path) -> dict:
    """Train one variant's prior within its budget and judge it."""
    output_dir = args.output_dir / name
    output_dir.mkdir(parents=True, exist_ok=True)
    if not (output_dir / "pretokenized").exists() and shared_codes.exists():
        (output_dir / "pretokenized").symlink_to(shared_codes.resolve(), target_is_directory=True)
    config = load_config(Stage2Config, ["--config", str(args.config), "--stage1_model", str(args.stage1_model),
                                        "--training.progress", "false", "--training.overwrite", "true",
                                        *VARIANTS[name], "--output_dir", str(output_dir)])
    metrics = train_stage2(config)
    pipe = TextToImagePipeline(vqvae=DVAEModel.from_pretrained(args.stage1_model),
                               prior=PriorModel.from_pretrained(output_dir / "prior"),
                               tokenizer=PreTrainedTokenizerFast.from_pretrained(output_dir / "tokenizer"))
    judge = load_or_train_judge(config.data, pipe.vqvae.config.image_size)
    judged = {plausibility: evaluate_pipeline(
        pipe, dataset=config.data, guidance_scales=tuple(args.guidance_scales), scorer=judge,
        max_prompts=args.max_prompts, progress=False, pipe_kwargs={"guidance_plausibility": plausibility})["guidance"]
        for plausibility in args.guidance_plausibilities}
    return {
        "variant": name, "overrides": VARIANTS[name], "steps": metrics["step"],
        "train_seconds": round(metrics["train_seconds"], 1),
        "tokens_per_second": round(metrics["train_tokens_per_second"]),
        "validation_loss": round(metrics["loss"], 4), "validation_image_loss": round(metrics["image_loss"], 4),
        "validation_text_loss": round(metrics["text_loss"], 4),
        "by_plausibility": {str(plausibility): {
            scale: {"r_precision": round(figures["r_precision"], 4), "clip_score": round(figures["clip_score"], 4),
                    "exact_copy_rate": figures["exact_copy_rate"], "near_copy_rate": figures["near_copy_rate"]}
            for scale, figures in by_scale.items()} for plausibility, by_scale in judged.items()},
        **machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage1-model", type=Path, required=True, help="a trained 64px image tokenizer")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "prior" / "emoji_8x8.yaml")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--output-dir", type=Path, default=Path("runs/prior-recipe"))
    parser.add_argument("--max-prompts", type=int, default=None, help="judge on this many held-out captions")
    parser.add_argument("--guidance-scales", type=float, nargs="+", default=[3.0],
                        help="judge the samples at each of these classifier-free guidance scales (default: 3)")
    parser.add_argument("--guidance-plausibilities", type=float, nargs="+", default=[0.1],
                        help="and at each of these guidance plausibilities (0: plain guidance; default: 0.1)")
    args = parser.parse_args()
    if not (args.stage1_model / "config.json").is_file():
        parser.error(f"--stage1-model {args.stage1_model}: no trained image tokenizer there (config.json missing); "
                     "give a `stage1/model` directory of `dallekit demo --dataset emoji`")
    shared_codes = args.output_dir / args.variants[0] / "pretokenized"
    for name in args.variants:
        print(json.dumps(run_variant(name, args, shared_codes)), flush=True)


if __name__ == "__main__":
    main()
