"""Benchmark reranking: what drawing N candidates per prompt and keeping the scorer's best buys, and what it costs.

    python bench/rerank.py --model outputs/demo/pipeline [--dataset digits] [--candidates 1 4 16 32]
                           [--guidance-scales 1 3] [--max-prompts N] [--device cpu]

For a saved pipeline with a reranking scorer (`dallekit demo` saves one), and each number of
candidates N, runs `evaluation.evaluate_pipeline` with `num_candidates=N` (one kept image per
validation prompt, per guidance scale) and prints one JSON object per (N, guidance scale):
adherence and Fréchet distance by the dataset's classifier (digits, shapes), R-precision,
CLIPScore-style similarity and Fréchet distance by the *evaluation* scorer (`EVALUATION_SEED`,
trained apart from the reranking scorer), and seconds per kept image (sampling N candidates,
decoding and scoring them). The first object describes the run (machine, threads, device, the
real-image ceilings and floors); the last checks the digits target: guidance 1 with 16 candidates
reaches >= 97% adherence at a lower Fréchet distance than guidance 3 without reranking.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import cpu_name  # noqa: E402

from dallekit.evaluation import evaluate_pipeline  # noqa: E402
from pipelines import TextToImagePipeline  # noqa: E402
from pipelines.judges import load_or_train_judge  # noqa: E402

TARGET_ADHERENCE = 0.97
JUDGED = ("adherence", "frechet_distance", "r_precision", "clip_score", "scorer_frechet_distance", "exact_copy_rate")
REAL = ("classifier_validation_accuracy", "real_frechet_distance", "real_r_precision", "real_clip_score",
        "real_scorer_frechet_distance")


def target_check(rows: list[dict]) -> dict:
    """Does guidance 1 with 16 candidates reach the target adherence below the FD of guidance 3 without reranking?"""
    by_setting = {(row["num_candidates"], row["guidance_scale"]): row for row in rows}
    reranked, guided = by_setting.get((16, 1.0)), by_setting.get((1, 3.0))
    if reranked is None or guided is None or "adherence" not in reranked:
        return {"target": "needs N=16 at guidance 1 and N=1 at guidance 3 on a dataset with a classifier"}
    return {
        "target": f"guidance 1, 16 candidates: adherence >= {TARGET_ADHERENCE} at a lower Fréchet distance than "
                  "guidance 3 without reranking",
        "guidance_1_candidates_16": {key: reranked[key] for key in ("adherence", "frechet_distance")},
        "guidance_3_candidates_1": {key: guided[key] for key in ("adherence", "frechet_distance")},
        "met": reranked["adherence"] >= TARGET_ADHERENCE and reranked["frechet_distance"] < guided["frechet_distance"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a saved pipeline with a scorer (directory or Hub id)")
    parser.add_argument("--dataset", default="digits", help="its dataset: prompts, classifier, evaluation scorer")
    parser.add_argument("--candidates", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--guidance-scales", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--max-prompts", type=int, default=None, help="the first N validation captions (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: the accelerator when there is one, else cpu")
    args = parser.parse_args()

    device = torch.device(args.device or torch.accelerator.current_accelerator() or "cpu")
    pipe = TextToImagePipeline.from_pretrained(args.model, device=device)
    if pipe.scorer is None:
        parser.error(f"{args.model} has no reranking scorer: save one with the pipeline (dallekit demo does)")
    context = {"bench": "rerank", "model": args.model, "dataset": args.dataset, "cpu": cpu_name(),
               "torch_threads": torch.get_num_threads(), "device": str(device), "seed": args.seed}
    if device.type == "cuda":
        context["gpu"] = torch.cuda.get_device_name(device)
    judge = load_or_train_judge(args.dataset, pipe.vqvae.config.image_size)
    rows = []
    for num_candidates in args.candidates:
        metrics = evaluate_pipeline(pipe, scorer=judge, dataset=args.dataset, guidance_scales=tuple(args.guidance_scales),
                                    seed=args.seed, max_prompts=args.max_prompts, num_candidates=num_candidates,
                                    progress=False)
        if not rows:
            context |= {"num_prompts": metrics["num_prompts"]} | {key: metrics[key] for key in REAL if key in metrics}
            print(json.dumps(context), flush=True)
        for scale, judged in metrics["guidance"].items():
            row = {"num_candidates": num_candidates, "guidance_scale": float(scale)}
            row |= {key: judged[key] for key in JUDGED if key in judged}
            row["seconds_per_image"] = metrics["sampling_seconds"][scale] / metrics["num_prompts"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(json.dumps(target_check(rows)), flush=True)


if __name__ == "__main__":
    main()
