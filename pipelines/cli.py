"""The `dallekit` command line.

    dallekit demo [--dataset digits|shapes|emoji] [--output-dir outputs/demo] [--image-size 32]
    dallekit train --data DIR_OR_HUB_ID [--image-size 64] [--output-dir outputs/train] [--caption-languages en es]
                   [--init-from PIPELINE [--lora-rank 8] [--finetune-image-tokenizer]]
    dallekit generate --model DIR_OR_HUB_ID --prompt "..." [--prompt ...] [--num-images 8] [--candidates N]
                      [--guidance-scale 3] [--guidance-plausibility 0.1] [--negative-prompt "..."] [--top-k K]
                      [--temperature T] [--seed 0] [--[no-]compile] --out samples.png
    dallekit edit --model DIR_OR_HUB_ID --image in.png (--mask mask.png | --strength S [--variation rows|random])
                  [--prompt "..."] [--negative-prompt "..."] [--num-images 4] [--candidates N] [--paste-back]
                  --out edits.png
    dallekit evaluate --model DIR_OR_HUB_ID [--dataset digits] [--guidance-scales 1 3 5] [--guidance-plausibility 0.1]
                      [--max-prompts N]
    dallekit evaluate-tokenizer --model DIR_OR_HUB_ID [--dataset digits] [--subfolder vqvae]
    dallekit serve --model DIR_OR_HUB_ID [--host 127.0.0.1] [--port 7860] [--[no-]compile] [--max-batch-images 64]
                   [--max-queue 64] [--threads N]   (needs the `web` extra; the page, /v1/images/generations, /health)
    (generate, edit and serve take --lora DIR_OR_HUB_ID, repeated for several adapters)
    dallekit data to-shards DIR OUT [--shard-size 10000] [--caption-column text]   (an image folder as tar shards)

User errors (a missing model, an unknown dataset, a bad number) print one line and exit with 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
from pathlib import Path

ROW_LABEL_WIDTH = 60  # characters of a prompt written beside its row of the `generate` grid


class UserError(Exception):
    """A mistake in the command line: reported as one line, without a traceback."""


class _OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (what is wrong, where to look) instead of usage + error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def _plausibility(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1) (0: plain guidance), got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 1 to 65535, got {text!r}")
    return value


def _check_model_location(model: str) -> None:
    """A path that looks local but is not there is reported as such, not as a failed Hub download."""
    path = Path(model)  # a Hub id is "user/name", and its "user" is no local folder
    looks_local = path.is_absolute() or model.startswith(".") or len(path.parts) != 2 or path.parent.is_dir()
    if looks_local and not path.exists():
        raise UserError(f"model directory {model} does not exist (give a saved pipeline directory or a Hub id)")


def _load_pipeline(model: str, adapters: list[str] | None = None):
    """The saved pipeline at `model` (a directory or Hub id), on the accelerator when there is one, with the LoRA
    adapters `adapters` (directories or Hub ids) loaded and active."""
    import torch

    from pipelines.text_to_image import TextToImagePipeline

    _check_model_location(model)
    try:
        pipe = TextToImagePipeline.from_pretrained(model, device=torch.accelerator.current_accelerator())
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load a pipeline from {model!r}: {str(error).splitlines()[0]}") from None
    for adapter in adapters or []:
        try:
            pipe.load_lora_weights(adapter)
        except ValueError as error:  # LoraAdapterError: missing, unreadable, or made for another prior
            raise UserError(f"--lora {adapter}: {str(error).splitlines()[0]}") from None
    return pipe.to(pipe.device)


def _check_builtin(dataset: str) -> None:
    from dallekit.data import BUILTIN_DATASETS

    if dataset not in BUILTIN_DATASETS:
        raise UserError(f"unknown dataset {dataset!r}; built-in datasets: {', '.join(sorted(BUILTIN_DATASETS))}")


def _train(args: argparse.Namespace) -> None:
    """Train both stages and the reranking scorer on any captioned data, evaluate, write samples.png,
    metrics.json and the pipeline (`dallekit demo` is this on a built-in dataset)."""
    from dallekit.training.config import ConfigError
    from pipelines.train import train_pipeline

    data = args.dataset if args.command == "demo" else args.data
    if args.command == "demo":
        _check_builtin(data)
    overrides = ["--data.caption_languages", f"[{', '.join(args.caption_languages)}]"] if args.caption_languages else []
    try:
        metrics = train_pipeline(data, args.output_dir, args.image_size, args.stage1_config, args.stage2_config,
                                 args.scorer_config, data_overrides=overrides, stage_overrides=args.stage_overrides,
                                 overwrite=args.overwrite, data_license=args.license,
                                 caption_column=args.caption_column, max_prompts=args.max_prompts,
                                 init_from=args.init_from, finetune_image_tokenizer=args.finetune_image_tokenizer,
                                 lora_rank=args.lora_rank, lora_alpha=args.lora_alpha)
    except (ConfigError, FileNotFoundError) as error:
        raise UserError(str(error).splitlines()[0]) from None
    if not metrics:  # another process of an `accelerate launch`: the main one evaluates and reports
        return
    print(json.dumps(metrics["evaluation"], indent=2))
    output_dir = Path(args.output_dir)
    print(f"samples (one row per prompt): {output_dir / 'samples.png'}")
    print(f"metrics: {output_dir / 'metrics.json'}")
    print(f"pipeline: {output_dir / 'pipeline'}  (dallekit generate --model {output_dir / 'pipeline'} --prompt ...)")
    print(f"took {metrics['seconds']['total'] / 60:.1f} min")


def _compile_mode(args: argparse.Namespace) -> bool | str:
    """`--compile` / `--no-compile`, else the pipeline's `auto`."""
    return "auto" if args.compile is None else args.compile


def _check_sampling_arguments(args: argparse.Namespace, num_prompts: int) -> None:
    """What `generate` and `edit` refuse before the pipeline loads: the output's format, fewer candidates than
    images, a call too large for one grid, a scale that is not a number."""
    from pipelines.text_to_image import check_call_limits

    if args.out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise UserError(f"--out {args.out} must end in .png, .jpg or .webp")
    if args.candidates is not None and args.candidates < args.num_images:
        raise UserError(f"--candidates {args.candidates} is fewer than --num-images {args.num_images}: "
                        "the best --num-images of --candidates drawn per prompt are kept")
    try:
        check_call_limits(num_prompts, args.num_images, args.candidates, args.guidance_scale, args.temperature)
    except ValueError as error:
        raise UserError(str(error)) from None


def _sampling_settings(args: argparse.Namespace, pipe) -> dict:
    """The pipeline call's keyword arguments shared by `generate` and `edit`."""
    import torch

    return {"num_images_per_prompt": args.num_images, "num_candidates": args.candidates,
            "guidance_scale": args.guidance_scale, "negative_prompt": args.negative_prompt,
            "guidance_plausibility": args.guidance_plausibility, "temperature": args.temperature,
            "top_k": args.top_k, "output_type": "pt",
            "generator": torch.Generator(device=pipe.device).manual_seed(args.seed), "compile": _compile_mode(args)}


def _generate(args: argparse.Namespace) -> None:
    """Draw `--num-images` images for each `--prompt` into one grid (one row per prompt), the best of
    `--candidates` by the pipeline's scorer when given; print the scores when there is a scorer."""
    from dallekit.training.images import save_image_grid

    _check_sampling_arguments(args, len(args.prompt))
    reranking = args.candidates is not None and args.candidates > args.num_images
    pipe = _load_pipeline(args.model, args.lora)
    if reranking and pipe.scorer is None:
        raise UserError(f"--candidates needs a pipeline with a scorer to rerank, and {args.model} has none "
                        "(dallekit demo saves one; or drop --candidates)")
    output = pipe(args.prompt, **_sampling_settings(args, pipe))
    labels = [textwrap.shorten(prompt, width=ROW_LABEL_WIDTH, placeholder=" ...") for prompt in args.prompt]
    save_image_grid(output.images, args.out, num_rows=len(args.prompt), scale=args.scale, row_labels=labels)
    drawn = f", the best of {args.candidates} per prompt by the scorer" if reranking else ""
    print(f"{len(output.images)} images{drawn}: {args.out}")
    if output.scores is not None:
        for prompt, scores in zip(args.prompt, output.scores.view(len(args.prompt), -1).tolist()):
            print(f"scores for {prompt!r}: {' '.join(f'{score:.3f}' for score in scores)}")


def _read_image(path: Path, flag: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, UnidentifiedImageError) as error:
        raise UserError(f"{flag} {path}: not an image that can be read ({str(error).splitlines()[0]})") from None


def _edit(args: argparse.Namespace) -> None:
    """Edit `--image`: repaint under `--mask` (white: repaint), or resample a `--strength` share of its codes;
    write one row: the image as the model reads it, then the edits."""
    import warnings

    import torch

    from dallekit.training.images import save_image_grid
    from pipelines.editing import image_pixels

    if (args.mask is None) == (args.strength is None):
        raise UserError("give --mask MASK.png (white: the region to repaint) or --strength S (the share of the "
                        "image's codes to resample, 0 to 1), one of the two")
    _check_sampling_arguments(args, 1)
    image = _read_image(args.image, "--image")
    mask = _read_image(args.mask, "--mask") if args.mask is not None else None
    pipe = _load_pipeline(args.model, args.lora)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            output = pipe(args.prompt, image=image, mask_image=mask, strength=args.strength,
                          variation=args.variation, paste_back=args.paste_back, **_sampling_settings(args, pipe))
        except ValueError as error:
            raise UserError(str(error).splitlines()[0]) from None
        original = image_pixels(image, pipe.vqvae.config.image_size)
    for message in dict.fromkeys(str(warning.message) for warning in caught):
        print(f"dallekit edit: note: {message}", file=sys.stderr)
    label = textwrap.shorten(args.prompt or "(no prompt)", width=ROW_LABEL_WIDTH, placeholder=" ...")
    save_image_grid(torch.cat([original, output.images]), args.out, num_rows=1, scale=args.scale,
                    row_labels=[f"{label}: the image, then {len(output.images)} edits"])
    how = f"under {args.mask}" if mask is not None else f"{args.strength:.0%} of the codes ({args.variation})"
    print(f"{len(output.images)} edits of {args.image}, {how}: {args.out}")


def _evaluate(args: argparse.Namespace) -> None:
    """R-precision, CLIPScore, Fréchet distance and copy rates of a saved pipeline (adherence on labelled data) as JSON."""
    from dallekit.data import BUILTIN_DATASETS
    from dallekit.data.sources import check_source_exists
    from dallekit.evaluation import evaluate_pipeline
    from pipelines.judges import load_or_train_judge

    if args.dataset not in BUILTIN_DATASETS:
        check_source_exists(args.dataset)  # a DataError is one line (main)
    pipe = _load_pipeline(args.model)
    judge = load_or_train_judge(args.dataset, pipe.vqvae.config.image_size)
    metrics = evaluate_pipeline(pipe, dataset=args.dataset, guidance_scales=tuple(args.guidance_scales),
                                seed=args.seed, max_prompts=args.max_prompts, scorer=judge,
                                pipe_kwargs={"guidance_plausibility": args.guidance_plausibility})
    print(json.dumps({"model": args.model, **metrics}, indent=2))


def _evaluate_tokenizer(args: argparse.Namespace) -> None:
    """Print MSE, PSNR, codebook usage, perplexity (and, on digits/shapes, the reconstructions' Fréchet distance) as JSON."""
    import torch
    from torch.utils.data import DataLoader

    from dallekit.data import DataConfig, TextImageCollator, load_text_image_dataset
    from dallekit.evaluation.classifier import LABELLED_DATASETS
    from dallekit.evaluation.reconstruction import judge_reconstructions
    from stage1_dvae import DVAEModel
    from stage1_dvae.metrics import reconstruction_metrics

    _check_model_location(args.model)
    location = Path(args.model) / (args.subfolder or "")
    if Path(args.model).exists() and not location.is_dir():
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
    metrics = reconstruction_metrics(model.to(device), (batch["pixel_values"] for batch in loader))
    if args.dataset in LABELLED_DATASETS:  # an independent classifier can judge the reconstructions
        metrics |= judge_reconstructions(model, args.dataset, args.batch_size)
    print(json.dumps({"model": str(args.model), "dataset": args.dataset, **metrics}, indent=2))


def _serve(args: argparse.Namespace) -> None:
    """Serve the web page and the OpenAI-compatible endpoint of a saved pipeline until interrupted (Ctrl-C)."""
    try:
        from pipelines.server import build_server, check_port_free, serve
    except ModuleNotFoundError as error:
        if error.name != "gradio":
            raise
        raise UserError('the web page needs Gradio, which is not installed: pip install -e ".[web]" '
                        "(from the dallekit checkout)") from None
    import torch

    try:
        check_port_free(args.host, args.port)
    except OSError as error:
        raise UserError(f"cannot serve on {args.host}:{args.port} ({error.strerror or error}): choose another "
                        "--port or --host") from None
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    app = build_server(_load_pipeline(args.model, args.lora), model_name=args.model_name or args.model,
                       compile=_compile_mode(args), max_batch_images=args.max_batch_images,
                       max_wait_seconds=args.max_wait_ms / 1000, max_queue=args.max_queue, decoding=args.decoding)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per request the page makes
    print(f"dallekit serve: the page at http://{args.host}:{args.port}/, OpenAI's images API at "
          f"http://{args.host}:{args.port}/v1 (model {args.model_name or args.model!r}), health at /health", flush=True)
    serve(app, args.host, args.port)


def _to_shards(args: argparse.Namespace) -> None:
    """Write an image folder as WebDataset tar shards (img2dataset's layout) and say how to train on them."""
    from dallekit.data.shards import write_shards

    written = write_shards(args.folder, args.out, args.shard_size, args.caption_column)
    for split, shards in written.items():
        print(f"{split}: {shards.samples} samples in {len(shards.paths)} shard(s), {shards.paths[0]} ... "
              f"{shards.paths[-1].name}")
    if "train" in written:
        print(f"train on them: dallekit train --data {args.out}")


def split_stage_overrides(args: list[str]) -> dict[str, list[str]]:
    """`--stage2.training.max_steps 500` (or `=500`) -> {"stage2": ["--training.max_steps", "500"]}; {} when an
    argument is not a per-stage override."""
    overrides: dict[str, list[str]] = {}
    index = 0
    while index < len(args):
        stage, dot, key = args[index].removeprefix("--").partition(".")
        if not args[index].startswith("--") or not dot or not key:
            return {}
        values = [args[index + 1]] if "=" not in key and index + 1 < len(args) and not args[index + 1].startswith(
            "--") else []
        overrides.setdefault(stage, []).extend([f"--{key}", *values])
        index += 1 + len(values)
    return overrides


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrorParser(prog="dallekit", description="DALL·E-style text-to-image: train, sample, evaluate.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train both stages on built-in data, evaluate, save a pipeline")
    demo.add_argument("--dataset", default="digits", help="built-in dataset: digits, shapes or emoji (default: digits)")
    train = commands.add_parser("train", help="train both stages on your captioned images, evaluate, save a pipeline")
    train.add_argument("--data", required=True,
                       help="an image folder with metadata.jsonl/.csv (file_name, text), a Hub dataset id, or a built-in")
    for command, output_dir in ((demo, "outputs/demo"), (train, "outputs/train")):
        command.add_argument("--output-dir", default=output_dir, type=Path)
        command.add_argument("--image-size", type=_positive_int, default=None,
                             help="side of the training images; picks the recipe of configs (32, 64, 128 or 256; default: "
                                  "the built-in dataset's own size, else 64)")
        command.add_argument("--caption-languages", nargs="+", default=None,
                             help="emoji: CLDR name languages to draw captions from (e.g. en es fr de)")
        for stage in ("stage1", "stage2", "scorer"):
            command.add_argument(f"--{stage}-config", default=None, type=Path,
                                 help=f"{stage} YAML config (default: the recipe of the image size)")
        command.add_argument("--max-prompts", type=_positive_int, default=None,
                             help="evaluate on this many validation captions (default: all)")
        command.add_argument("--overwrite", action="store_true",
                             help="start over in an output directory that holds another run (removes it); without "
                                  "it, running again with the same settings resumes where the run stopped")
        command.add_argument("--caption-column", default="text",
                             help="the metadata column holding the captions (default: text)")
        command.add_argument("--license", default=None,
                             help="the licence of your images (an SPDX id such as cc-by-4.0), for the model card")
        command.add_argument("--init-from", default=None, metavar="DIR_OR_HUB_ID",
                             help="fine-tune this saved pipeline on the data instead of training from scratch (its "
                                  "image tokenizer is kept frozen, its caption tokenizers kept)")
        command.add_argument("--finetune-image-tokenizer", action="store_true",
                             help="with --init-from: train the image tokenizer too (the codes are encoded anew)")
        command.add_argument("--lora-rank", type=int, default=0,
                             help="with --init-from: train LoRA adapters of this rank on the prior instead of all of "
                                  "its weights (e.g. 8; default 0: full fine-tuning)")
        command.add_argument("--lora-alpha", type=_positive_float, default=16.0, help="LoRA's scaling numerator")
        command.set_defaults(run=_train)
    for command in (demo, train):
        command.epilog = ("Per-stage config overrides, validated like the YAML: --stage1.training.max_steps 200, "
                          "--stage2.model.num_hidden_layers 4, --scorer.training.batch_size 32.")

    generate = commands.add_parser("generate", help="draw images for prompts into a PNG grid")
    generate.add_argument("--model", required=True, help="directory or Hub id of a saved pipeline")
    generate.add_argument("--prompt", required=True, action="append", help="a caption; repeat for several rows")
    generate.add_argument("--num-images", type=_positive_int, default=8, help="images per prompt (default: 8)")
    generate.add_argument("--candidates", type=_positive_int, default=None,
                          help="draw this many per prompt and keep the --num-images the pipeline's scorer ranks "
                               "best (default: no reranking)")
    generate.set_defaults(run=_generate)
    edit = commands.add_parser("edit", help="repaint a region of an image (inpainting), or draw variations of it")
    edit.add_argument("--model", required=True, help="directory or Hub id of a saved pipeline")
    edit.add_argument("--image", required=True, type=Path, help="the image to edit (resized to the model's size)")
    edit.add_argument("--mask", type=Path, default=None,
                      help="an image of the same size: white where to repaint, black where to keep")
    edit.add_argument("--strength", type=float, default=None,
                      help="instead of a mask: the share of the image's codes to resample, from 0 to 1")
    edit.add_argument("--variation", choices=("rows", "random"), default="rows",
                      help="with --strength: resample the last codes (complete the top of the image) or random ones")
    edit.add_argument("--prompt", default=None, help="what the edit should show (optional)")
    edit.add_argument("--paste-back", action="store_true",
                      help="put the original pixels back outside the repainted region (with a soft edge)")
    edit.add_argument("--num-images", type=_positive_int, default=4, help="edits to draw (default: 4)")
    edit.add_argument("--candidates", type=_positive_int, default=None,
                      help="draw this many and keep the --num-images that fit best: inpainting ranks by how likely "
                           "the prior finds the kept codes after the region (and the scorer, when there is one)")
    edit.set_defaults(run=_edit)
    for command in (generate, edit):
        command.add_argument("--guidance-scale", type=_positive_float, default=3.0)
        command.add_argument("--negative-prompt", default=None,
                             help="what guidance steers away from (instead of the empty caption)")
        command.add_argument("--temperature", type=_positive_float, default=1.0)
        command.add_argument("--top-k", type=_positive_int, default=None)
        command.add_argument("--seed", type=int, default=0)
        command.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                             help="compile the prior's sampling step with torch.compile at once (pays for hundreds "
                                  "of candidates; seconds to tens of seconds first on a CPU), or never "
                                  "(--no-compile); default: once a setting has spent 10 s sampling")
        command.add_argument("--scale", type=_positive_int, default=2, help="enlarge each image this many times")
        command.add_argument("--out", required=True, type=Path, help="the grid image to write (PNG)")

    evaluate = commands.add_parser(
        "evaluate", help="R-precision, CLIPScore, adherence (labelled data), Fréchet distance, copy rates as JSON")
    evaluate.add_argument("--model", required=True, help="directory or Hub id of a saved pipeline")
    evaluate.add_argument("--dataset", default="digits",
                          help="the data it was trained on: a built-in name (digits and shapes add the classifier's "
                               "adherence), an image folder or a Hub dataset id (default: digits)")
    evaluate.add_argument("--guidance-scales", type=_positive_float, nargs="+", default=[1.0, 3.0, 5.0])
    evaluate.add_argument("--max-prompts", type=_positive_int, default=None,
                          help="evaluate on this many validation captions (default: all)")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.set_defaults(run=_evaluate)
    for command in (generate, edit, evaluate):
        # the literal is `DEFAULT_GUIDANCE_PLAUSIBILITY`, written out to keep this module's import light (tested)
        command.add_argument("--guidance-plausibility", type=_plausibility, default=0.1,
                             help="guidance reorders only the codes the prompted prior gives at least this share of "
                                  "its likeliest code's probability; 0: plain guidance (default: 0.1)")

    tokenizer = commands.add_parser("evaluate-tokenizer", help="reconstruction metrics of a saved tokenizer as JSON")
    tokenizer.add_argument("--model", required=True, help="directory or Hub id of a saved DVAEModel")
    tokenizer.add_argument("--subfolder", default=None, help="subfolder holding the tokenizer (e.g. vqvae)")
    tokenizer.add_argument("--dataset", default="digits", help="built-in name, image folder or Hub dataset id")
    tokenizer.add_argument("--batch-size", type=_positive_int, default=128)
    tokenizer.set_defaults(run=_evaluate_tokenizer)

    serve = commands.add_parser("serve", help="a web page to try a saved pipeline (Gradio: the web extra)")
    serve.add_argument("--model", required=True, help="directory or Hub id of a saved pipeline")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=_port, default=7860)
    serve.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="compile the prior's sampling step at the first request of each size and setting "
                            "(which waits for it), or never (--no-compile); default: once a size and setting "
                            "has spent 10 s sampling")
    serve.add_argument("--max-batch-images", type=_positive_int, default=64,
                       help="concurrent requests are drawn together, up to this many sampled images (candidates "
                            "included) per batch (default: 64)")
    serve.add_argument("--max-wait-ms", type=float, default=10.0,
                       help="how long an idle server waits for more requests to fill a batch (default: 10)")
    serve.add_argument("--max-queue", type=_positive_int, default=64,
                       help="requests that may wait; more are answered 'busy, retry' (default: 64)")
    serve.add_argument("--threads", type=_positive_int, default=None,
                       help="torch's CPU threads (default: torch's choice, one per core); on a machine shared "
                            "with other busy processes, fewer threads than cores hold up better")
    serve.add_argument("--decoding", choices=["auto", "sequential", "jacobi"], default="auto",
                       help="the prior's decoding: jacobi drafts and verifies several codes per forward pass "
                            "(speculative Jacobi decoding), sequential one; auto: the one measured faster")
    serve.add_argument("--model-name", default=None,
                       help="the model's name on the OpenAI endpoint (default: --model as given)")
    serve.set_defaults(run=_serve)
    for command in (generate, edit, serve):
        command.add_argument("--lora", action="append", default=None, metavar="DIR_OR_HUB_ID",
                             help="a LoRA adapter of the prior to sample with (peft's format); repeat for several")

    data = commands.add_parser("data", help="prepare training data (to-shards: an image folder as WebDataset shards)")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="to-shards")
    to_shards = data_commands.add_parser(
        "to-shards", help="write an image folder (metadata.jsonl/.csv) as WebDataset tar shards, img2dataset's layout")
    to_shards.add_argument("folder", metavar="DIR", help="the image folder: images and metadata.jsonl or .csv")
    to_shards.add_argument("out", metavar="OUT", type=Path,
                           help="the folder to write OUT/00000.tar, ... into (a validation split: OUT/validation/)")
    to_shards.add_argument("--shard-size", type=_positive_int, default=10_000,
                           help="samples per shard (default: 10000, img2dataset's)")
    to_shards.add_argument("--caption-column", default="text",
                           help="the metadata column holding the captions (default: text)")
    to_shards.set_defaults(run=_to_shards)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.stage_overrides = split_stage_overrides(extra)
    if extra and (args.command not in ("train", "demo") or not args.stage_overrides):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        args.run(args)
    except Exception as error:
        checks = sys.modules.get("dallekit.data.checks")  # imported by the commands that read data
        if not isinstance(error, UserError) and not (checks is not None and isinstance(error, checks.DataError)):
            raise
        message = (str(error).strip().splitlines() or [type(error).__name__])[0]
        print(f"dallekit {args.command}: error: {message}", file=sys.stderr)
        sys.exit(2)
    finally:
        distributed = sys.modules.get("torch.distributed")  # torch is imported by the commands that need it
        if distributed is not None and distributed.is_initialized():  # under `accelerate launch`: the trainings
            distributed.destroy_process_group()  # keep the process group until the command ends


if __name__ == "__main__":
    main()
