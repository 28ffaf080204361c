"""Judging generated images without class labels, with a contrastive text–image scorer (`scorer`).

- **R-precision** (Xu et al. 2018, AttnGAN; used by DALL·E-era text-to-image papers): each image's
  prompt is ranked against 99 other held-out captions, drawn without replacement by a seeded
  generator among those whose normalised text differs from the prompt; the score is the share of
  images whose prompt ranks first. Ties count fractionally (`scorer.top_k_hits`), so a scorer that
  cannot tell captions apart scores 1/100, not 1. Paraphrases in the pool (digits: five phrasings of
  each digit) cap it below 1 even for real images, hence the real-image ceiling beside it.
- **CLIPScore-style similarity** (Hessel et al. 2021): the mean of `2.5 · max(cos, 0)` of each image
  with its prompt.
- **Fréchet distance** in the scorer's image-feature space (`evaluation.metrics.frechet_distance`).

The scorer that judges must not be the one that reranks: `load_or_train_scorer` trains the
evaluation scorer with `EVALUATION_SEED` on the real training pairs only, and caches it under
`$DALLEKIT_CACHE/scorers` (default `~/.cache/dallekit/scorers`).
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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from accelerate.state import AcceleratorState, GradientState, is_initialized

from dallekit.evaluation.classifier import default_cache_dir
from dallekit.scorer import ScorerConfig, TextImageScorer, top_k_hits, unique_captions
from dallekit.scorer.train import ScorerTrainConfig, train
from dallekit.data import DataConfig, load_text_image_dataset
from dallekit.training.checkpointing import write_directory
from dallekit.training.config import load_config, recipe_exists, recipe_path, to_dict

logger = logging.getLogger(__name__)

EVALUATION_SEED = 1234  # the evaluation scorer's seed; a reranking scorer trains with its config's (0 by default)
NUM_DISTRACTORS = 99  # R-precision ranks the prompt among itself and 99 other captions
CLIP_SCORE_WEIGHT = 2.5
CACHE_FORMAT = 1  # part of the cache key: bump when the scorer's architecture or training loop changes


def r_precision(
    similarity: torch.Tensor,
    prompt_index: torch.Tensor,
    pool_index: torch.Tensor,
    num_distractors: int = NUM_DISTRACTORS,
    generator: torch.Generator | None = None,
) -> float:
    """Share of images whose prompt scores highest among itself and `num_distractors` other held-out captions.

    `similarity` [N, T] scores image i against T distinct captions; `prompt_index` [N] is each
    image's prompt among them; `pool_index` [P] the held-out captions to draw from (repeats allowed:
    a frequent caption is drawn more often). Image i's distractors are drawn without replacement
    from the pool entries other than its prompt; ties with the prompt count fractionally.
    """
    others = pool_index.unsqueeze(0) != prompt_index.unsqueeze(1)  # [N, P]
    fewest = int(others.sum(dim=1).min()) if len(others) else 0
    if num_distractors < 1 or fewest < num_distractors:
        raise ValueError(
            f"R-precision draws num_distractors={num_distractors} captions other than each prompt, but the pool "
            f"holds only {fewest} for some prompt: pass 1 <= num_distractors <= {fewest} or a larger caption pool"
        )
    keys = torch.rand(others.shape, generator=generator).masked_fill(~others, 2.0)  # others first, in random order
    distractors = pool_index[keys.topk(num_distractors, dim=1, largest=False).indices]  # [N, K] caption indices
    true_scores = similarity.gather(1, prompt_index.unsqueeze(1)).squeeze(1)
    return top_k_hits(true_scores, similarity.gather(1, distractors), k=1).mean().item()


def clip_score(cosines: torch.Tensor) -> float:
    """CLIPScore-style mean `2.5 · max(cos, 0)` of image–prompt cosine similarities [N]."""
    if cosines.numel() == 0:
        raise ValueError("clip_score needs at least one image–prompt similarity")
    return CLIP_SCORE_WEIGHT * cosines.clamp(min=0).mean().item()


def judge_images(
    scorer: TextImageScorer,
    pixel_values: torch.Tensor,
    prompts: Sequence[str],
    reference_captions: Sequence[str],
    seed: int = 0,
) -> tuple[dict[str, float], torch.Tensor]:
    """`r_precision` and `clip_score` of images [N, 3, S, S] against their prompts, and their scorer features [N, D].

    R-precision draws its distractors from `reference_captions` (the held-out captions) with a
    generator seeded by `seed`, so equal prompts and seeds draw the same distractors; a held-out
    split with fewer than 100 distinct captions gives fewer distractors (`r_precision_distractors`,
    chance is 1 / (distractors + 1)).
    """
    if len(prompts) != len(pixel_values):
        raise ValueError(
            f"judge_images needs one prompt per image, got {len(prompts)} prompts and {len(pixel_values)} images"
        )
    captions, index = unique_captions([*reference_captions, *prompts], scorer.tokenizer)
    pool_index, prompt_index = index[: len(reference_captions)], index[len(reference_captions):]
    features = scorer.image_features(pixel_values)
    similarity = features @ scorer.text_features(captions).T
    generator = torch.Generator().manual_seed(seed)
    others = (pool_index.unsqueeze(0) != prompt_index.unsqueeze(1)).sum(dim=1)
    distractors = min(NUM_DISTRACTORS, int(others.min()))
    if distractors < NUM_DISTRACTORS:
        logger.warning("only %d held-out captions differ from some prompt: R-precision ranks among %d captions, "
                       "not %d", distractors, distractors + 1, NUM_DISTRACTORS + 1)
    metrics = {
        "r_precision": r_precision(similarity, prompt_index, pool_index, distractors, generator=generator),
        "r_precision_distractors": distractors,
        "clip_score": clip_score(similarity.gather(1, prompt_index.unsqueeze(1)).squeeze(1)),
    }
    return metrics, features


@contextmanager
def _process_state_kept() -> Iterator[None]:
    """Leave the global random generators, and accelerate's process state when there was none, as found."""
    had_accelerator = is_initialized()
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng():
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
            if not had_accelerator:  # a later Accelerator may then choose its own precision
                AcceleratorState._reset_state(reset_partial_state=True)
                GradientState._reset_state()


def levels_for_image_size(model: ScorerConfig, image_size: int) -> ScorerConfig:
    """`model` with as many image-encoder levels as `image_size` allows: a recipe made for larger
    images (the emoji's four levels at 64px) drops its last levels where they would shrink the feature
    map below `image_pool_size` (three at 16px)."""
    levels = 1 + int(math.log2(max(image_size // model.image_pool_size, 1)))
    fitted = copy.deepcopy(model)
    fitted.image_channels = list(model.image_channels[:levels])
    return fitted


def load_or_train_scorer(
    dataset: str | DataConfig,
    image_size: int,
    seed: int = EVALUATION_SEED,
    config: ScorerTrainConfig | None = None,
    cache_dir: str | Path | None = None,
) -> TextImageScorer:
    """The evaluation scorer of `dataset` at `image_size`: from the cache, or trained on its real training pairs.

    Trained by `scorer.train` with `config` (default: `configs/scorer/<dataset>.yaml` of a built-in
    where there is one, else `ScorerTrainConfig()`, the digits recipe) on `dataset` (a built-in name,
    folder or Hub id, or a whole `DataConfig`), `image_size` and `training.seed = seed`, under the
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
    mixed_precision = AcceleratorState().mixed_precision if is_initialized() else run.mixed_precision
    config = dataclasses.replace(  # validated again, the model's image size following the data's
        config,
        data=dataclasses.replace(data, image_size=image_size),
        model=levels_for_image_size(config.model, image_size),
        training=dataclasses.replace(
            run, seed=seed, mixed_precision=mixed_precision, output_dir="", report_to="none", progress=False,
            push_to_hub=False, resume_from_checkpoint=None, checkpointing_steps=run.max_steps,
            checkpoints_total_limit=1,
        ),
    )
    splits = load_text_image_dataset(config.data)
    if config.training.batch_size > len(splits["train"]) // 2:  # a small dataset of one's own: smaller batches
        config.training.batch_size = max(2, len(splits["train"]) // 2)
    key = {
        "format": CACHE_FORMAT,
        "fingerprints": [splits["train"]._fingerprint, splits["validation"]._fingerprint],
        "config": to_dict(config),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", dataset).strip("_")
    directory = Path(cache_dir or default_cache_dir("scorers")) / f"{name}-{image_size}px-seed{seed}-{digest}"
    if (directory / "info.json").is_file():  # written last: a complete entry
        logger.info("Loaded the %s evaluation scorer from %s", dataset, directory)
        return TextImageScorer.from_pretrained(directory)

    # enable_grad: also when called under no_grad, as in evaluate_pipeline
    with tempfile.TemporaryDirectory() as scratch, _process_state_kept(), torch.enable_grad():
        config.training.output_dir = scratch
        metrics = train(config)

        def write(target: Path) -> None:
            shutil.copytree(Path(scratch) / "scorer", target)
            (target / "info.json").write_text(json.dumps({"metrics": metrics} | key, indent=2) + "\n")

        directory.parent.mkdir(parents=True, exist_ok=True)
        write_directory(directory, write)
    logger.info("Trained the %s evaluation scorer in %.1f s: validation %s", dataset, metrics["train_seconds"],
                {k: round(v, 3) for k, v in metrics.items() if "_top" in k})
    return TextImageScorer.from_pretrained(directory)
