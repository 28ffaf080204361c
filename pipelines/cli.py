"""The `dallekit` command line.

    dallekit demo [--dataset digits] [--output-dir DIR] [--quantizer gumbel|vq] [--max-steps N]
    dallekit evaluate-tokenizer --model DIR_OR_HUB_ID [--dataset digits] [--subfolder vqvae]

User errors (a missing model, an unknown dataset, a bad number) print one line and exit with 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


class UserError(Exception):
    """A mistake in the command line: reported as one line, without a traceback."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def _demo(args: argparse.Namespace) -> None:
    """Train the stage-1 tokenizer on a built-in dataset and report its validation metrics."""
    from stage1_dvae.train import Stage1Config, train
    from textimage_data import BUILTIN_DATASETS
    from training.config import ConfigError, load_config

    if args.dataset not in BUILTIN_DATASETS:
        raise UserError(f"unknown dataset {args.dataset!r}; built-in datasets: {', '.join(sorted(BUILTIN_DATASETS))}")
    name = "digits" if args.quantizer == "gumbel" else "digits_vq"
    config_path = CONFIG_DIR / "dvae" / f"{name}.yaml"
    if not config_path.is_file():
        raise UserError(f"demo config {config_path} not found: run dallekit from a source checkout (pip install -e .)")
    overrides = ["--config", str(config_path), "--data.source", args.dataset, "--output_dir", str(args.output_dir)]
    if args.max_steps is not None:
        overrides += ["--max_steps", str(args.max_steps)]
    try:
        config = load_config(Stage1Config, overrides)
    except ConfigError as error:
        raise UserError(str(error)) from None
    metrics = train(config)
    print(json.dumps(metrics, indent=2))
    grids = sorted((Path(args.output_dir) / "images").glob("reconstructions_step_*.png"),
                   key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    if grids:
        print(f"reconstructions (originals above, reconstructions below): {grids[-1]}")
    print(f"tokenizer: {Path(args.output_dir) / 'model'}")


def _evaluate_tokenizer(args: argparse.Namespace) -> None:
    """Print MSE, PSNR, codebook usage and perplexity of a saved tokenizer on a validation split as JSON."""
    import torch
    from torch.utils.data import DataLoader

    from evaluation.reconstruction import evaluate_tokenizer
    from stage1_dvae import DVAEModel
    from textimage_data import DataConfig, TextImageCollator, load_text_image_dataset

    location = Path(args.model) / (args.subfolder or "")
    looks_local = Path(args.model).exists() or Path(args.model).parent.is_dir()  # a Hub id's "user" is no folder
    if looks_local and not location.is_dir():
        raise UserError(f"model directory {location} does not exist")
    try:
        model = DVAEModel.from_pretrained(args.model, subfolder=args.subfolder or "")
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load a tokenizer from {args.model!r}: {str(error).splitlines()[0]}") from None
    try:
        data_config = DataConfig(source=args.dataset, image_size=model.config.image_size)
        splits = load_text_image_dataset(data_config)
    except (ValueError, OSError, ConnectionError) as error:
        raise UserError(str(error).splitlines()[0]) from None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loader = DataLoader(splits["validation"], batch_size=args.batch_size, collate_fn=TextImageCollator(data_config.image_size))
    metrics = evaluate_tokenizer(model.to(device), (batch["pixel_values"] for batch in loader))
    print(json.dumps({"model": str(args.model), "dataset": args.dataset, **metrics}, indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dallekit", description="DALL·E-style text-to-image: train, evaluate.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train the image tokenizer on built-in data and report its metrics")
    demo.add_argument("--dataset", default="digits", help="built-in dataset (default: digits)")
    demo.add_argument("--output-dir", default="outputs/demo", type=Path)
    demo.add_argument("--quantizer", choices=["gumbel", "vq"], default="gumbel")
    demo.add_argument("--max-steps", type=_positive_int, default=None, help="override the config's step count")
    demo.set_defaults(run=_demo)

    evaluate = commands.add_parser("evaluate-tokenizer", help="reconstruction metrics of a saved tokenizer as JSON")
    evaluate.add_argument("--model", required=True, help="directory or Hub id of a saved DVAEModel")
    evaluate.add_argument("--subfolder", default=None, help="subfolder holding the tokenizer (e.g. vqvae)")
    evaluate.add_argument("--dataset", default="digits", help="built-in name, image folder or Hub dataset id")
    evaluate.add_argument("--batch-size", type=_positive_int, default=128)
    evaluate.set_defaults(run=_evaluate_tokenizer)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        args.run(args)
    except UserError as error:
        sys.exit(f"dallekit {args.command}: error: {error}")
