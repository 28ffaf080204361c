"""Generalisation of the demo prior over training time: adherence, copy rates and validation loss.

    python bench/generalisation.py [--stage1-model DIR] [--max-steps 800] [--point-every 100]
                                   [--variants demo no_regularisation ...] [--max-prompts 397]

Trains the stage-2 prior of `configs/prior/demo.yaml` once per variant to a fixed number of steps
(early stopping off, so the whole curve is drawn), keeping a checkpoint every `--point-every`
steps; then evaluates every checkpoint: validation loss (text and image parts), prompt adherence
at the default guidance scale, exact- and near-copy rates, Fréchet distance. Prints one JSON object
per point and one summary per variant: the step the demo's best-checkpoint selection exports and
its figures. Variants switch the demo's regularisation off, all at once or one knob at a time.
`minutes` counts from the start of the variant's training (tokenizer and pre-tokenisation
included) to the checkpoint, so it includes the periodic evaluations of the training loop.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from safetensors.torch import load_model
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dallekit.evaluation import evaluate_pipeline, load_or_train_classifier  # noqa: E402
from dallekit.training.checkpointing import list_checkpoints  # noqa: E402
from dallekit.training.config import load_config, recipe_path  # noqa: E402
from pipelines import TextToImagePipeline  # noqa: E402
from pipelines.judges import load_or_train_judge  # noqa: E402
from pipelines.train import RECIPES  # noqa: E402
from stage1_dvae import DVAEModel  # noqa: E402
from stage1_dvae.train import Stage1Config  # noqa: E402
from stage1_dvae.train import train as train_stage1  # noqa: E402
from stage2_prior import PriorConfig, PriorModel  # noqa: E402
from stage2_prior.train import Stage2Config  # noqa: E402
from stage2_prior.train import train as train_stage2  # noqa: E402

NO_DROPOUT = ["--attention_dropout", "0", "--residual_dropout", "0", "--embedding_dropout", "0"]
VARIANTS = {
    "demo": [],
    "no_regularisation": NO_DROPOUT + ["--weight_decay", "0", "--augmentation.copies", "0"],
    "no_dropout": NO_DROPOUT,
    "no_augmentation": ["--augmentation.copies", "0"],
    "no_weight_decay": ["--weight_decay", "0"],
}


def stage1_model(args: argparse.Namespace) -> Path:
    """The given stage-1 model, or the demo's trained into the bench directory (reused when present)."""
    if args.stage1_model:
        return Path(args.stage1_model)
    model_dir = args.output_dir / "stage1" / "model"
    if not model_dir.is_dir():
        train_stage1(load_config(Stage1Config, ["--config", str(recipe_path(RECIPES[32].stage1)), "--output_dir",
                                                str(args.output_dir / "stage1"), "--progress", "false"]))
    return model_dir


def run_variant(name: str, args: argparse.Namespace, stage1_dir: Path) -> list[dict]:
    """Train one variant with a checkpoint every `point_every` steps, then evaluate each checkpoint."""
    output_dir = args.output_dir / name
    config = load_config(Stage2Config, [
        "--config", str(recipe_path(RECIPES[32].stage2)), "--stage1_model", str(stage1_dir),
        "--output_dir", str(output_dir),
        "--max_steps", str(args.max_steps), "--checkpointing_steps", str(args.point_every),
        "--eval_every", str(args.point_every), "--checkpoints_total_limit", "null",
        "--early_stopping_patience", "null", "--select_best", "false",
        "--image_every", str(args.max_steps), "--progress", "false", *VARIANTS[name],
    ])
    start = time.time()
    validation = {entry["step"]: entry for entry in train_stage2(config)["history"]}  # the loop's evaluations

    vqvae = DVAEModel.from_pretrained(stage1_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(output_dir / "tokenizer")
    prior = PriorModel(PriorConfig.from_pretrained(output_dir / "prior"))
    classifier = load_or_train_classifier(config.data.source, vqvae.config.image_size)
    judge = load_or_train_judge(config.data.source, vqvae.config.image_size)
    points = []
    for checkpoint in list_checkpoints(output_dir / "checkpoints"):
        load_model(prior, checkpoint / "model.safetensors")
        pipe = TextToImagePipeline(vqvae, prior, tokenizer)
        evaluation = evaluate_pipeline(pipe, dataset=config.data.source, guidance_scales=(args.guidance_scale,),
                                       max_prompts=args.max_prompts, classifier=classifier, scorer=judge,
                                       progress=False)
        scores = evaluation["guidance"][str(float(args.guidance_scale))]
        step = int(checkpoint.name.removeprefix("step_"))
        point = {
            "variant": name,
            "step": step,
            "minutes": round((checkpoint.stat().st_mtime - start) / 60, 2),
            **{f"validation_{k}": validation[step][k] for k in ("loss", "text_loss", "image_loss")},
            "adherence": scores["adherence"],
            "exact_copy_rate": scores["exact_copy_rate"],
            "near_copy_rate": scores["near_copy_rate"],
            "frechet_distance": scores["frechet_distance"],
        }
        print(json.dumps(point), flush=True)
        points.append(point)
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage1-model", default=None, help="a trained stage-1 model (default: train the demo's)")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/bench-generalisation"))
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["demo", "no_regularisation"])
    parser.add_argument("--max-steps", type=int, default=800)
    parser.add_argument("--point-every", type=int, default=100)
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--max-prompts", type=int, default=None, help="validation captions per point (default: all)")
    args = parser.parse_args()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    stage1_dir = stage1_model(args)
    for name in args.variants:
        points = run_variant(name, args, stage1_dir)
        best = min(points, key=lambda point: point["validation_loss"])
        print(json.dumps({"variant": name, "summary": "the checkpoint best-by-validation-loss selection exports",
                          **{k: v for k, v in best.items() if k != "variant"},
                          "max_adherence": max(p["adherence"] for p in points),
                          "exact_copy_rate_at_end": points[-1]["exact_copy_rate"]}), flush=True)


if __name__ == "__main__":
    main()
