"""The evaluation judge: a contrastive scorer trained apart from the reranking one, cached on disk.

`dallekit train`, `dallekit demo` and `dallekit evaluate` need it; evaluation (`dallekit.evaluation`)
is handed it and trains nothing. It trains with `EVALUATION_SEED` on the real training pairs only,
with the scorer's own recipe and loop, and is cached under `$DALLEKIT_CACHE/scorers` (default
`~/.cache/dallekit/scorers`), keyed by the data's fingerprints and the settings.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import random
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import datasets
import numpy as np
import torch
from accelerate.state import AcceleratorState, PartialState, is_initialized
from accelerate.utils import broadcast_object_list

from dallekit.data import DataConfig, load_text_image_dataset
from dallekit.data.cache import dallekit_cache_dir, source_fingerprint, split_fingerprint
from dallekit.evaluation import EVALUATION_SEED
from dallekit.scorer import ScorerConfig, TextImageScorer
from dallekit.scorer.train import ScorerTrainConfig, train
from dallekit.training.accelerator import launched_on_cpu, resolve_mixed_precision
from dallekit.training.checkpointing import write_directory
from dallekit.training.config import load_config, recipe_exists, recipe_path, to_dict
from dallekit.training.data import count_examples, fitted_batch_size

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2  # part of the cache key: bump when the scorer's architecture or training loop changes


@contextmanager
def _random_state_kept() -> Iterator[None]:
    """Leave the global random generators (Python, NumPy, torch) as found."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng():
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def levels_for_image_size(model: ScorerConfig, image_size: int) -> ScorerConfig:
    """`model` with as many image-encoder levels as `image_size` allows: a recipe made for larger
    images (the emoji's four levels at 64px) drops its last levels where they would shrink the feature
    map below `image_pool_size` (three at 16px)."""
    levels = 1 + int(math.log2(max(image_size // model.image_pool_size, 1)))
    fitted = copy.deepcopy(model)
    fitted.image_channels = list(model.image_channels[:levels])
    return fitted


def load_or_train_judge(
    dataset: str | DataConfig,
    image_size: int,
    seed: int = EVALUATION_SEED,
    config: ScorerTrainConfig | None = None,
    cache_dir: str | Path | None = None,
) -> TextImageScorer:
    """The evaluation scorer of `dataset` at `image_size`: from the cache, or trained on its real training pairs.

    Trained by the scorer's recipe on the one loop (`dallekit.scorer.train`; under `accelerate launch`
    every process takes part) with `config` (default: `configs/scorer/<dataset>.yaml` of a built-in
    where there is one, else `ScorerTrainConfig()`, the digits recipe) on `dataset` (a built-in name,
    folder or Hub id, or a whole `DataConfig`), `image_size` and `training.seed = seed`, all of its
    `max_steps` whatever the recipe's time budget (a judge is the same model on every machine), under the
    precision of the process's accelerator where one exists, without touching the global random state.
    The cache holds `{dataset}-{image_size}px-seed{seed}-{key}/` (model, tokenizer, `info.json` with
    the settings and the validation retrieval); `key` hashes the splits' fingerprints and the settings.
    """
    data = dataset if isinstance(dataset, DataConfig) else DataConfig(source=dataset)
    dataset = data.source
    if config is None:
        recipe = f"scorer/{dataset}.yaml"
        config = load_config(ScorerTrainConfig, ["--config", str(recipe_path(recipe))]) if recipe_exists(recipe) \
            else ScorerTrainConfig()
    config = copy.deepcopy(config)
    run = config.training
    # The precision it trains in, resolved (`auto` is bf16 where that is fast): part of the cache key, so that
    # `dallekit evaluate` finds the judge a `dallekit train` process trained under its accelerator.
    mixed_precision = AcceleratorState().mixed_precision if is_initialized() else resolve_mixed_precision(
        run.mixed_precision, use_cpu=launched_on_cpu())
    config = dataclasses.replace(  # validated again, the model's image size following the data's
        config,
        data=dataclasses.replace(data, image_size=image_size),
        model=levels_for_image_size(config.model, image_size),
        training=dataclasses.replace(
            run, seed=seed, max_train_seconds=None, mixed_precision=mixed_precision, output_dir="", report_to="none",
            progress=False, push_to_hub=False, resume_from_checkpoint=None, checkpointing_steps=run.max_steps,
            checkpoints_total_limit=1,
        ),
    )
    splits = load_text_image_dataset(config.data)
    streamed = isinstance(splits["train"], datasets.IterableDataset)  # `data.streaming`: no fingerprint
    wanted = config.training.batch_size * PartialState().num_processes
    if (available := count_examples(splits["train"], enough=wanted)) < wanted:  # a small dataset
        config.training.batch_size = fitted_batch_size(available, PartialState().num_processes)
    key = {
        "format": CACHE_FORMAT,
        "fingerprints": [source_fingerprint(config.data) if streamed else split_fingerprint(splits["train"]),
                         split_fingerprint(splits["validation"])],
        "config": to_dict(config),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", dataset).strip("_")
    directory = Path(cache_dir or dallekit_cache_dir("scorers")) / f"{name}-{image_size}px-seed{seed}-{digest}"
    if (directory / "info.json").is_file():  # written last: a complete entry
        logger.info("Loaded the %s evaluation scorer from %s", dataset, directory)
        return TextImageScorer.from_pretrained(directory)

    processes = PartialState()
    scratch = tempfile.mkdtemp(prefix="dallekit-judge-") if processes.is_main_process else None
    if processes.num_processes > 1:  # one run directory for every process
        scratch = broadcast_object_list([scratch])[0]
    scratch = Path(scratch)
    with _random_state_kept(), torch.enable_grad():  # also when called under no_grad
        config.training.output_dir = str(scratch)
        metrics = train(config)
    if processes.is_main_process:
        def write(target: Path) -> None:
            shutil.copytree(scratch / "scorer", target)
            (target / "info.json").write_text(json.dumps({"metrics": metrics} | key, indent=2) + "\n")

        directory.parent.mkdir(parents=True, exist_ok=True)
        write_directory(directory, write)
        shutil.rmtree(scratch, ignore_errors=True)
    processes.wait_for_everyone()
    logger.info("Trained the %s evaluation scorer in %.1f s: validation %s", dataset, metrics["train_seconds"],
                {k: round(v, 3) for k, v in metrics.items() if "_top" in k})
    return TextImageScorer.from_pretrained(directory)
