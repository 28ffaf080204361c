"""`dallekit train` and `dallekit demo`: a whole text-to-image pipeline trained on one captioned dataset.

Trains the image tokenizer, the prior on its codes and the reranking scorer with the configs of a
recipe chosen for the image size (or given), evaluates what the data allows (the evaluation
scorer's R-precision, CLIPScore and Fréchet distance everywhere; the classifier's adherence on
data with class labels; exact and near copies), draws samples for held-out and for training
captions, and saves the pipeline with its model card:

    output_dir/stage1/      the image tokenizer's run (checkpoints, logs, reconstruction grids, model/)
    output_dir/stage2/      the prior's run (checkpoints, logs, sample grids, prior/, tokenizer/)
    output_dir/scorer/      the reranking scorer's run (checkpoints, logs, scorer/)
    output_dir/pipeline/    the saved TextToImagePipeline (with its scorer) and its model card
    output_dir/lora/        with --init-from and --lora-rank: the prior's adapter alone, with its card
    output_dir/samples.png  one row per prompt, the prompt written beside it
    output_dir/metrics.json stage-1, stage-2 and scorer validation metrics, the evaluation, the time taken

`dallekit demo` is this on a built-in dataset. The reranking scorer trains with its config's seed,
never the evaluation scorer's (`evaluation.EVALUATION_SEED`): the judge is not the scorer that reranks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import get_int_from_env
from transformers import PreTrainedTokenizerFast

from dallekit.data import BUILTIN_DATASETS, DataConfig, DataError, load_text_image_dataset
from dallekit.data.sources import check_source_exists
from dallekit.evaluation import EVALUATION_SEED, evaluate_pipeline
from dallekit.evaluation.classifier import LABELLED_DATASETS
from dallekit.evaluation.reconstruction import judge_reconstructions
from dallekit.scorer import ScorerConfig, TextImageScorer
from dallekit.scorer.train import ScorerTrainConfig
from dallekit.scorer.train import train as train_scorer
from dallekit.training.accelerator import create_accelerator, resolve_mixed_precision
from dallekit.training.checkpointing import list_checkpoints
from dallekit.training.config import ConfigError, load_config, recipe_exists, recipe_path, to_dict
from dallekit.training.data import MIN_BATCH_SIZE, count_examples, fitted_batch_size
from dallekit.training.images import save_image_grid
from pipelines.judges import load_or_train_judge
from pipelines.text_to_image import TextToImagePipeline, pipeline_directory
from stage1_dvae import DVAEConfig, DVAEModel
from stage1_dvae.train import Stage1Config
from stage1_dvae.train import train as train_stage1
from stage2_prior import PriorConfig, PriorModel
from stage2_prior.train import Stage2Config
from stage2_prior.train import train as train_stage2

logger = logging.getLogger(__name__)

STEPS = 5
STAGES = ("stage1", "stage2", "scorer")


@dataclass(frozen=True)
class Recipe:
    """The three training configs for one image size."""

    stage1: Path
    stage2: Path
    scorer: Path


RECIPES = {
    32: Recipe(Path("dvae/demo.yaml"), Path("prior/demo.yaml"), Path("scorer/digits.yaml")),
    64: Recipe(Path("dvae/emoji_vq_8x8.yaml"), Path("prior/emoji_8x8.yaml"), Path("scorer/emoji.yaml")),
    128: Recipe(Path("dvae/fsq_128px.yaml"), Path("prior/small.yaml"), Path("scorer/128px.yaml")),  # GPU-sized
    256: Recipe(Path("dvae/vq_256px.yaml"), Path("prior/base.yaml"), Path("scorer/256px.yaml")),  # GPU-sized
}
GPU_SIZED = 128  # recipes from this image size on are sized for a GPU: on a CPU, a warning with the time they take
# Training seconds per image of each stage of the GPU-sized recipes at their own model sizes, measured with
# `dallekit train` (3 steps a stage) on 2 cores of a virtual "Intel(R) Xeon(R) Processor" (family 6, model 207:
# Emerald Rapids) shared with other jobs (docs/training.md)
CPU_SECONDS_PER_IMAGE = {
    128: {"stage1": 0.709, "stage2": 0.345, "scorer": 0.0148},
    256: {"stage1": 2.108, "stage2": 0.593, "scorer": 0.0629},
}
NATIVE_IMAGE_SIZE = {"digits": 32, "shapes": 32, "emoji": 64}  # built-ins; any other source defaults to 64


def default_image_size(data: str) -> int:
    return NATIVE_IMAGE_SIZE.get(data, 64)


def recipe_for(data: str, image_size: int) -> Recipe:
    """The recipe for `image_size`, with the data's own scorer config (`configs/scorer/<name>.yaml`) where one exists."""
    if image_size not in RECIPES:
        raise ConfigError(
            f"there is no training recipe for {image_size}px images (recipes: {', '.join(f'{s}px' for s in RECIPES)}): "
            "pass --image-size with one of them, or --stage1-config, --stage2-config and --scorer-config"
        )
    recipe = RECIPES[image_size]
    own_scorer = Path("scorer") / f"{data}.yaml"
    shipped = [recipe_path(recipe.stage1), recipe_path(recipe.stage2),
               recipe_path(own_scorer if recipe_exists(own_scorer) else recipe.scorer)]
    return Recipe(*(Path(str(path)) for path in shipped))


def cpu_time_estimate(image_size: int, configs: dict[str, Any], stages: set[str]) -> float:
    """Seconds that training `stages` of the `image_size` recipe (their `training.max_steps` x `batch_size` images)
    takes on a CPU like the one measured (`CPU_SECONDS_PER_IMAGE`)."""
    per_image = CPU_SECONDS_PER_IMAGE[image_size]
    return sum(per_image[name] * configs[name].training.max_steps * configs[name].training.batch_size
               for name in stages)


def _duration(seconds: float) -> str:
    for unit, length in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * length:
            return f"{seconds / length:.0f} {unit}"
    return f"{seconds:.0f} seconds"


def warn_if_gpu_sized(image_size: int, configs: dict[str, Any], recipe_stages: set[str]) -> None:
    """On a machine without an accelerator, warn that a recipe from `GPU_SIZED` px on is sized for a GPU, with the
    time its stages (those in `recipe_stages`: the recipe's, not configs of one's own) would take on a CPU like
    the one measured; training goes on."""
    if image_size < GPU_SIZED or torch.accelerator.is_available() or not recipe_stages:
        return
    stages = [name for name in STAGES if name in recipe_stages]
    steps = ", ".join(f"{name} {configs[name].training.max_steps} steps x {configs[name].training.batch_size}"
                      for name in stages)
    logger.warning(
        "the %dpx recipe is sized for a GPU, and this machine has none: training goes on, and %s (%s) would take "
        "about %s on 2 CPU cores like the ones measured (docs/training.md: recipes for 128 and 256 px, with the "
        "time on one GPU); fewer steps (--stage1.training.max_steps N) try it here", image_size,
        " and ".join(stages), steps, _duration(cpu_time_estimate(image_size, configs, recipe_stages)))


def evaluate_languages(
    pipe: TextToImagePipeline, judge: TextImageScorer, data: DataConfig, guidance_scales: tuple[float, ...], seed: int,
    max_prompts: int | None,
) -> dict[str, dict[str, Any]]:
    """The evaluation at the middle guidance scale once per caption language: the same held-out images,
    prompted in that language (`data.caption_languages` reordered to put it first) and judged by one
    evaluation scorer, the one of `data`, which trained on the captions of every language."""
    scale = sorted(guidance_scales)[len(guidance_scales) // 2]
    by_language = {}
    for language in data.caption_languages:
        others = [other for other in data.caption_languages if other != language]
        judged = evaluate_pipeline(pipe, dataset=dataclasses.replace(data, caption_languages=[language, *others]),
                                   guidance_scales=(scale,), seed=seed, max_prompts=max_prompts, scorer=judge)
        by_language[language] = {"guidance_scale": scale, **judged["guidance"][str(float(scale))],
                                 **{name: value for name, value in judged.items() if name.startswith("real_")}}
    return by_language


def sample_prompts(data: DataConfig, num_rows: int = 10) -> list[tuple[str, str]]:
    """(caption, "held out" | "trained on") rows for the sample grid.

    With class labels: one held-out caption per class (sorted by class), then other held-out
    captions. Without: held-out captions for the first rows and training captions for the last
    four, so memorisation and composition can be told apart side by side.
    """
    splits = load_text_image_dataset(data)
    validation = splits["validation"]
    by_class: dict[int, str] = {}
    if "label" in validation.column_names:
        for caption, label in zip(validation["text"], validation["label"]):
            by_class.setdefault(label, caption)
    held_out = list(dict.fromkeys([by_class[label] for label in sorted(by_class)] + list(validation["text"])))
    trained: list[str] = []  # the first distinct training captions, read no further (a stream is not read whole)
    for caption in ([] if by_class else splits["train"].select_columns(["text"])["text"]):
        if len(trained) == num_rows // 2 - 1:
            break
        if caption not in trained:
            trained.append(caption)
    rows = [(caption, "held out") for caption in held_out[: num_rows - len(trained)]]
    return rows + [(caption, "trained on") for caption in trained]


def scorer_validation(metrics: dict[str, float]) -> dict[str, float]:
    """The retrieval figures of a scorer run's metrics (image->text and text->image top-1/top-5 on held-out pairs)."""
    return {name: value for name, value in metrics.items() if "_to_" in name}


def data_licence(data: DataConfig) -> dict[str, str]:
    """The licence and attribution a dataset's info carries (the built-in emoji: OpenMoji's CC BY-SA 4.0)."""
    info = load_text_image_dataset(data)["train"].info
    if not info.license:
        return {}
    return {"license": info.license, "license_id": info.license.lower().replace(" ", "-"),
            "attribution": (info.description or "").strip()}


RUN_RECORD = "run.yaml"  # what a `dallekit train` output directory was trained with: data, size, the three configs


def _first_difference(old: Any, new: Any, path: str = "") -> str | None:
    """The dotted key where two config trees first differ, with both values, or None."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            found = _first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else key)
            if found:
                return found
        return None
    return None if old == new else f"{path}: {old!r} there, {new!r} now"


def start_or_resume_run(output_dir: Path, record: dict[str, Any], overwrite: bool, accelerator: Accelerator) -> None:
    """Record this run's configuration in `output_dir/run.yaml`; refuse another run's directory unless `overwrite`
    (which removes what that run trained)."""
    path = output_dir / RUN_RECORD
    earlier = yaml.safe_load(path.read_text()) if path.is_file() else None
    trained = [name for name in STAGES if (output_dir / name).is_dir()]
    if not overwrite:
        if earlier is not None and (difference := _first_difference(earlier, record)):
            raise ConfigError(f"{output_dir} holds a run with another configuration ({difference}): pass "
                              "--overwrite to start over, or another --output-dir")
        if earlier is None and trained:
            raise ConfigError(f"{output_dir} holds runs ({', '.join(trained)}) of an unknown configuration: pass "
                              "--overwrite to start over, or another --output-dir")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if overwrite:
            for name in (*STAGES, "pipeline"):
                shutil.rmtree(output_dir / name, ignore_errors=True)
        output_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(record, sort_keys=False))
    accelerator.wait_for_everyone()


def finished_metrics(config: Any, export: str) -> dict[str, Any] | None:
    """A stage an earlier `dallekit train` finished (its export and `metrics.json` written): its metrics."""
    output_dir = Path(config.training.output_dir)
    if (output_dir / export).is_dir() and (output_dir / "metrics.json").is_file():
        logger.info("kept %s: finished by an earlier run (export %s)", output_dir.name, output_dir / export)
        return json.loads((output_dir / "metrics.json").read_text())
    return None


def resumable(config: Any) -> Any:
    """`config`, resuming from its last checkpoint where an interrupted earlier run left one."""
    checkpoints = list_checkpoints(Path(config.training.output_dir) / "checkpoints")
    if checkpoints:
        logger.info("resuming %s from its checkpoint %s", Path(config.training.output_dir).name, checkpoints[-1])
        config.training.resume_from_checkpoint = "latest"
    return config


def launched_processes() -> int:
    """How many processes the launcher started, read from its environment as accelerate reads it, before any
    accelerate state exists: the first one made fixes the process state for the whole run."""
    return get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1)


def training_split_size(data: DataConfig, enough: int) -> int:
    """How many examples the training split of `data` holds, a stream's counted no further than `enough`
    (`count_examples`), loaded without the loader's info lines: stage 1 logs them when it loads the split,
    and a check that fails stays one line."""
    data_logger = logging.getLogger("dallekit.data")
    level = data_logger.level
    data_logger.setLevel(logging.WARNING)
    try:
        train = load_text_image_dataset(data)["train"]
    finally:
        data_logger.setLevel(level)
    return count_examples(train, enough)


def fit_batches_to_data(configs: dict[str, Any], train_images: int, num_processes: int, chosen: set[str]) -> None:
    """Check every stage's per-process batch against the training split before stage 1 trains.

    A stage whose batch was chosen by the user (its config given, or `training.batch_size` overridden)
    and does not fit fails here in one line; a recipe's batch is lowered to `fitted_batch_size` (with
    a warning), so that a small folder trains rather than fails after hours of earlier stages.
    """
    if train_images < MIN_BATCH_SIZE * num_processes:
        raise DataError(
            f"the training split has {train_images} image(s), too few for {num_processes} process(es): dallekit "
            f"train needs at least {MIN_BATCH_SIZE * num_processes} ({MIN_BATCH_SIZE} per process); add images, "
            "or train on fewer processes"
        )
    for name, config in configs.items():
        batch = config.training.batch_size
        if batch * num_processes <= train_images:
            continue
        fitted = fitted_batch_size(train_images, num_processes)
        if name in chosen:
            raise ConfigError(
                f"{name}: training.batch_size {batch} x {num_processes} process(es) needs {batch * num_processes} "
                f"training images, and the training split has {train_images}: pass --{name}.training.batch_size "
                f"{fitted} (or add images)"
            )
        logger.warning("%s: the training split has %d images (%d per process), fewer than the recipe's batch %d: "
                       "training with batch %d (choose with --%s.training.batch_size)", name, train_images,
                       train_images // num_processes, batch, fitted, name)
        config.training.batch_size = fitted


def start_from_pipeline(base: Path, stage1: Stage1Config, stage2: Stage2Config, scorer: ScorerTrainConfig,
                        finetune_image_tokenizer: bool, lora_rank: int, lora_alpha: float) -> None:
    """Point the three configs at a saved pipeline's components: their architectures, initial weights and
    caption tokenizers (fine-tuning), and the prior's LoRA settings."""
    if finetune_image_tokenizer:
        stage1.model = DVAEConfig.from_pretrained(base / "vqvae")
        stage1.training.init_from = str(base / "vqvae")
    stage2.model = PriorConfig.from_pretrained(base / "prior")
    stage2.training.init_from, stage2.tokenizer_path = str(base / "prior"), str(base / "tokenizer")
    stage2.lora.rank, stage2.lora.alpha = lora_rank, lora_alpha
    if (base / "scorer").is_dir():
        scorer.model = ScorerConfig.from_pretrained(base / "scorer")
        scorer.training.init_from = scorer.tokenizer_path = str(base / "scorer")


def keep_image_tokenizer(base: Path, stage1: Stage1Config, accelerator: Accelerator) -> dict[str, Any]:
    """Stage 1 of a fine-tuning run: the pipeline's image tokenizer, copied as the stage's export."""
    output_dir = Path(stage1.training.output_dir)
    metrics = {"kept_from": str(base)}
    if accelerator.is_main_process:
        shutil.rmtree(output_dir / "model", ignore_errors=True)
        shutil.copytree(base / "vqvae", output_dir / "model")
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return metrics


def adapter_name(data: str) -> str:
    """The name a LoRA adapter trained on `data` gets in the pipeline: the dataset's or folder's name."""
    return Path(data.rstrip("/")).name or "default"


def check_one_precision(configs: dict[str, Any]) -> None:
    """Fail before training when the stages ask for different mixed precisions: the models of one
    process train under one accelerate process state, hence one precision."""
    use_cpu = not torch.accelerator.is_available()
    resolved = {name: resolve_mixed_precision(config.training.mixed_precision, use_cpu=use_cpu)
                for name, config in configs.items()}
    if len(set(resolved.values())) > 1:
        raise ConfigError(
            "the stages ask for different mixed precisions ("
            + ", ".join(f"{name}: {precision}" for name, precision in resolved.items())
            + "): dallekit train trains them in one process, under one precision; set training.mixed_precision "
            "to the same value (or auto) in every config"
        )


def _banner(step: int, text: str) -> None:
    print(f"\n[{step}/{STEPS}] {text}", flush=True)


def train_pipeline(
    data: str = "digits",
    output_dir: str | Path = "outputs/train",
    image_size: int | None = None,
    stage1_config: str | Path | None = None,
    stage2_config: str | Path | None = None,
    scorer_config: str | Path | None = None,
    data_overrides: list[str] | tuple[str, ...] = (),
    stage_overrides: dict[str, list[str]] | None = None,
    overwrite: bool = False,
    data_license: str | None = None,
    caption_column: str = "text",
    init_from: str | None = None,
    finetune_image_tokenizer: bool = False,
    lora_rank: int = 0,
    lora_alpha: float = 16.0,
    guidance_scales: tuple[float, ...] = (1.0, 3.0, 5.0),
    max_prompts: int | None = None,
    images_per_prompt: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """Train, evaluate and save; returns what `metrics.json` holds (on the main process; {} on the others
    of an `accelerate launch`, which take part in the trainings only). Configs are validated before any training.

    `data` is any `data.source` (a built-in name, an image folder with `metadata.jsonl`, WebDataset shards, a Hub id);
    `image_size` defaults to the built-in's own size, else 64 (or, when `stage1_config` is given, to
    that config's); configs default to `recipe_for(...)`;
    `data_overrides` (e.g. `["--data.caption_languages", "[en, es]"]`) apply to every stage,
    `stage_overrides` (`{"stage2": ["--training.max_steps", "500"]}`) to one.

    `init_from` (a saved pipeline's directory or Hub id) fine-tunes that pipeline on `data` instead of training
    from scratch: its image tokenizer is kept frozen (copied, so the codes stay compatible; trained on too with
    `finetune_image_tokenizer`, and the prior's codes are then encoded anew), its caption tokenizers are kept,
    the prior and the scorer continue from their weights (their architectures are the pipeline's), and with
    `lora_rank` > 0 only LoRA adapters of the prior train, saved with the pipeline in `lora/`.

    Run again with the same `output_dir`, it resumes: finished stages are kept with their exports, the
    stage it was in continues from its last checkpoint. Another configuration in the same directory is
    refused, naming the difference, unless `overwrite` starts the run over.
    """
    stage_overrides = dict(stage_overrides or {})
    # `--data.validation_source DIR` (split as a stage named "data"): a data setting of every stage
    data_overrides = [*data_overrides, *(f"--data.{arg[2:]}" if arg.startswith("--") else arg
                                         for arg in stage_overrides.pop("data", []))]
    unknown = set(stage_overrides) - set(STAGES)
    if unknown:
        raise ConfigError(f"no stage named {sorted(unknown)[0]!r}: per-stage overrides look like "
                          f"--stage1.training.max_steps 100 (stages: {', '.join(STAGES)}; --data.* for every one)")
    output_dir = Path(output_dir)
    if data not in BUILTIN_DATASETS:
        # before any config is read: a mistyped folder, or a malformed metadata file, is the likeliest mistake
        check_source_exists(data, text_column=caption_column)
    base = None
    if init_from is not None:
        try:  # a complete pipeline, or one line saying why not
            base = pipeline_directory(init_from)
            base_size = TextToImagePipeline.from_pretrained(base).vqvae.config.image_size
        except (OSError, ValueError) as error:
            raise ConfigError(f"--init-from {init_from}: cannot load a pipeline from it "
                              f"({str(error).splitlines()[0]})") from error
        if image_size not in (None, base_size):
            raise ConfigError(f"--image-size {image_size}, but the pipeline at {init_from} draws {base_size}px images: "
                              f"fine-tuning keeps its image tokenizer; pass --image-size {base_size} (or none)")
        image_size = base_size
    elif lora_rank:
        raise ConfigError("--lora-rank adapts a trained pipeline: give it with --init-from DIR_OR_HUB_ID")
    if image_size is None and stage1_config is None:
        image_size = default_image_size(data)
    given = {name: path is not None for name, path in zip(STAGES, (stage1_config, stage2_config, scorer_config))}
    missing = None in (stage1_config, stage2_config, scorer_config)
    recipe = recipe_for(data, image_size or default_image_size(data)) if missing else None
    stage1_config = Path(stage1_config or recipe.stage1)
    stage2_config = Path(stage2_config or recipe.stage2)
    scorer_config = Path(scorer_config or recipe.scorer)
    size = ["--data.image_size", str(image_size), "--model.image_size", str(image_size)] if image_size else []
    data_overrides = [*data_overrides, "--data.text_column", caption_column]
    stage1 = load_config(Stage1Config, ["--config", str(stage1_config), "--data.source", data, *data_overrides,
                                         *size, *stage_overrides.get("stage1", []),
                                         "--output_dir", str(output_dir / "stage1")])
    image_size = stage1.model.image_size  # the given stage-1 config's own, when no size was asked for
    common = ["--data.source", data, "--data.image_size", str(image_size), *data_overrides]
    stage2 = load_config(Stage2Config, ["--config", str(stage2_config), *common,
                                         "--stage1_model", str(output_dir / "stage1" / "model"),
                                         *stage_overrides.get("stage2", []), "--output_dir", str(output_dir / "stage2")])
    scorer = load_config(ScorerTrainConfig, ["--config", str(scorer_config), *common,
                                              *stage_overrides.get("scorer", []),
                                              "--output_dir", str(output_dir / "scorer")])
    if base is not None:
        start_from_pipeline(base, stage1, stage2, scorer, finetune_image_tokenizer, lora_rank, lora_alpha)
    if scorer.training.seed == EVALUATION_SEED:
        raise ConfigError(
            f"the reranking scorer's training.seed is {EVALUATION_SEED}, the evaluation scorer's "
            "(evaluation.EVALUATION_SEED): choose another seed, so that the scorer that reranks is not the judge"
        )
    configs = {"stage1": stage1, "stage2": stage2, "scorer": scorer}
    check_one_precision(configs)
    largest_batch = max(config.training.batch_size for config in configs.values()) * launched_processes()
    train_images = training_split_size(stage1.data, enough=max(largest_batch, MIN_BATCH_SIZE * launched_processes()))
    chosen = {name for name in STAGES if given[name] or any(
        arg.split("=")[0] == "--training.batch_size" for arg in stage_overrides.get(name, []))}
    fit_batches_to_data(configs, train_images, launched_processes(), chosen)
    trained = set(STAGES) - ({"stage1"} if base is not None and not finetune_image_tokenizer else set())
    warn_if_gpu_sized(image_size, configs, {name for name in trained if not given[name]})
    accelerator = create_accelerator(stage1.training)  # the first training's; the others share its process state
    record = {"data": data, "image_size": image_size} | {name: to_dict(config) for name, config in configs.items()}
    start_or_resume_run(output_dir, record, overwrite, accelerator)
    seconds: dict[str, float] = {}
    start = time.perf_counter()

    if base is not None and not finetune_image_tokenizer:
        _banner(1, f"keeping the image tokenizer of {init_from} (frozen: the codes stay compatible)")
        stage1_metrics = finished_metrics(stage1, "model") or keep_image_tokenizer(base, stage1, accelerator)
    else:
        _banner(1, f"training the image tokenizer on {data} at {image_size}px ({stage1_config.name})")
        stage1_metrics = finished_metrics(stage1, "model") or train_stage1(resumable(stage1), accelerator)
    seconds["stage1"] = time.perf_counter() - start

    _banner(2, f"training the prior on captions and image codes ({stage2_config.name})")
    stage2_metrics = finished_metrics(stage2, "prior") or train_stage2(resumable(stage2))
    seconds["stage2"] = time.perf_counter() - start - sum(seconds.values())

    _banner(3, f"training the reranking scorer ({scorer_config.name}, seed {scorer.training.seed})")
    scorer_metrics = finished_metrics(scorer, "scorer") or train_scorer(resumable(scorer))
    seconds["scorer"] = time.perf_counter() - start - sum(seconds.values())

    # The evaluation judge trains on every process too (cached); evaluation and samples then run on the main one.
    judge = load_or_train_judge(stage1.data, image_size)
    if not PartialState().is_main_process:
        return {}
    pipe = TextToImagePipeline(
        vqvae=DVAEModel.from_pretrained(output_dir / "stage1" / "model"),
        prior=PriorModel.from_pretrained(output_dir / "stage2" / "prior"),
        tokenizer=PreTrainedTokenizerFast.from_pretrained(output_dir / "stage2" / "tokenizer"),
        scorer=TextImageScorer.from_pretrained(output_dir / "scorer" / "scorer"),
    )
    if lora_rank:  # the base prior, and the adapter trained on this data (saved with the pipeline, active)
        pipe.load_lora_weights(output_dir / "stage2" / "lora", adapter_name=adapter_name(data))
    _banner(4, f"evaluating the tokenizer, and the samples at guidance {guidance_scales}")
    if data in LABELLED_DATASETS:
        stage1_metrics |= judge_reconstructions(pipe.vqvae, data)
    evaluation = evaluate_pipeline(pipe, dataset=stage1.data, guidance_scales=guidance_scales, seed=seed,
                                   max_prompts=max_prompts, scorer=judge)
    if len(stage1.data.caption_languages) > 1:
        evaluation["by_language"] = evaluate_languages(pipe, judge, stage1.data, guidance_scales, seed, max_prompts)
    seconds["evaluation"] = time.perf_counter() - start - sum(seconds.values())

    _banner(5, "drawing samples and saving the pipeline")
    rows = sample_prompts(stage1.data)
    prompts = [caption for caption, _ in rows]
    output = pipe(prompts, num_images_per_prompt=images_per_prompt, generator=torch.Generator().manual_seed(seed),
                  output_type="pt")
    labels = [textwrap.shorten(caption, width=60, placeholder=" ...") for caption in prompts]  # a readable grid
    if not all(kind == "held out" for _, kind in rows):
        labels = [f"{label} ({kind})" for label, (_, kind) in zip(labels, rows)]
    save_image_grid(output.images, output_dir / "samples.png", num_rows=len(prompts), scale=2, row_labels=labels)
    described = f"dallekit's built-in `{data}` dataset" if data in BUILTIN_DATASETS else f"`{data}`"
    pipe.training_info = {
        "dataset": data,
        "data_description": f"{described} (train split) at {image_size}x{image_size}, trained with `dallekit train`.",
        "example_prompt": prompts[0],
        "example_prompts": [caption for caption, kind in rows if kind == "held out"],
        "metrics": evaluation,
        "scorer_metrics": scorer_validation(scorer_metrics),
        **data_licence(stage1.data),
        **({"license": data_license} if data_license else {}),
        **({"base_model": str(init_from)} if init_from else {}),
    }
    pipe.save_pretrained(output_dir / "pipeline")
    if lora_rank:  # the adapter alone too, with its own card: what one shares to go with the base pipeline
        pipe.save_lora_weights(output_dir / "lora", adapter_name(data), base_model=str(init_from))
    seconds["total"] = time.perf_counter() - start
    metrics = {"dataset": data, "image_size": image_size, "stage1": stage1_metrics, "stage2": stage2_metrics,
               "scorer": scorer_metrics, "evaluation": evaluation, "seconds": seconds}
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
