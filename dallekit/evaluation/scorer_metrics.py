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

The scorer that judges must not be the one that reranks: the evaluation scorer is trained with
`EVALUATION_SEED` on the real training pairs only, by the command that needs it
(`pipelines.judges.load_or_train_judge`), and handed in: evaluation trains nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from dallekit.scorer import TextImageScorer, top_k_hits, unique_captions

logger = logging.getLogger(__name__)

EVALUATION_SEED = 1234  # the evaluation scorer's seed; a reranking scorer trains with its config's (0 by default)
NUM_DISTRACTORS = 99  # R-precision ranks the prompt among itself and 99 other captions
CLIP_SCORE_WEIGHT = 2.5


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
