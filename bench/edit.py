"""Benchmark editing: does an inpainted digit become the prompted digit, and what does ranking the candidates buy?

    python bench/edit.py --model outputs/demo/pipeline [--max-images 200] [--candidates 8]
                         [--guidance-scale 3] [--seed 0] [--device cpu] [--grids docs/]

On held-out real digits (the `digits` validation split), each prompted with its own caption and,
apart, with another digit's ("a handwritten digit three" for a zero: the edit changes the digit), masks
one half of the image: the upper half (what is kept lies *after* the region in raster order, the
hard case for a causal prior, which draws the region seeing only what lies above and left of it)
and, apart, the lower half. Draws `--candidates` inpaintings per image in one call
(`num_images_per_prompt`) and judges them with the dataset's independent classifier (adherence:
judged as the prompted digit), keeping one per image four ways: the first candidate (no ranking),
the reranking scorer's best, the best by the prior's likelihood of the kept codes after the region
(`PriorModel.code_log_likelihoods`), and both standardised and added (what `pipe(..., num_candidates=N)`
keeps). Also checks that every code outside the mask is the image's own. Prints one JSON object per
(mask, prompt, ranking), after one describing the run; the last checks the targets on the own
captions (>= 90% upper half, >= 95% lower half, with the pipeline's own ranking).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import cpu_name  # noqa: E402

from dallekit.data import DataConfig, TextImageCollator, load_text_image_dataset  # noqa: E402
from dallekit.evaluation.classifier import classify, load_or_train_classifier  # noqa: E402
from dallekit.text_tokenizer import encode_captions  # noqa: E402
from dallekit.training.images import save_image_grid  # noqa: E402
from pipelines import TextToImagePipeline  # noqa: E402
from pipelines.editing import cells_touched, kept_after_region, region_fit, standardised  # noqa: E402

TARGETS = {"upper half": 0.90, "lower half": 0.95}
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def write_grids(pipe: TextToImagePipeline, pixels: torch.Tensor, labels: torch.Tensor, directory: Path,
                seed: int) -> None:
    """One grid of each edit, for the docs: inpainting the upper half with another digit's prompt, variations,
    and a negative prompt."""
    size = pipe.vqvae.config.image_size
    rows = torch.arange(size).view(size, 1).expand(size, size)
    mask = (rows < size // 2).float()
    grid, row_labels = [], []
    for index in range(4):
        image, target = pixels[index], (int(labels[index]) + 3) % 10
        prompt = f"a handwritten digit {DIGIT_WORDS[target]}"
        output = pipe(prompt, image=image, mask_image=mask, num_images_per_prompt=4, num_candidates=16,
                      paste_back=True, output_type="pt", progress=False, generator=torch.Generator().manual_seed(seed))
        shown_mask = image.clone()
        shown_mask[:, : size // 2] = 0.5 * shown_mask[:, : size // 2] + 0.5  # the repainted half, lightened
        grid += [image.unsqueeze(0), shown_mask.unsqueeze(0), output.images]
        row_labels.append(f"a {DIGIT_WORDS[int(labels[index])]}, upper half -> '{prompt}'")
    save_image_grid(torch.cat(grid), directory / "edit_inpainting.png", num_rows=4, scale=3, row_labels=row_labels)

    grid, row_labels = [], []
    for index in range(4, 8):
        image, caption = pixels[index], f"a handwritten digit {DIGIT_WORDS[int(labels[index])]}"
        variations = [pipe(caption, image=image, strength=strength, variation=variation, num_images_per_prompt=2,
                           output_type="pt", progress=False, generator=torch.Generator().manual_seed(seed)).images
                      for strength, variation in ((0.25, "random"), (0.5, "rows"))]
        grid += [image.unsqueeze(0), *variations]
        row_labels.append(f"{caption}: 25% random cells, then the last 50%")
    save_image_grid(torch.cat(grid), directory / "edit_variations.png", num_rows=4, scale=3, row_labels=row_labels)

    prompt, negative = "a handwritten digit", "a handwritten digit one"
    plain = pipe(prompt, num_images_per_prompt=8, output_type="pt", progress=False,
                 generator=torch.Generator().manual_seed(seed)).images
    steered = pipe(prompt, negative_prompt=negative, num_images_per_prompt=8, output_type="pt", progress=False,
                   generator=torch.Generator().manual_seed(seed)).images
    save_image_grid(torch.cat([plain, steered]), directory / "edit_negative_prompt.png", num_rows=2, scale=3,
                    row_labels=[f"'{prompt}'", f"'{prompt}', negative prompt '{negative}'"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a saved digits pipeline with a scorer (dallekit demo)")
    parser.add_argument("--max-images", type=int, default=200, help="the first N held-out digits")
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: the accelerator when there is one, else cpu")
    parser.add_argument("--grids", type=Path, default=None, help="also write one example grid of each edit here")
    args = parser.parse_args()

    device = torch.device(args.device or torch.accelerator.current_accelerator() or "cpu")
    pipe = TextToImagePipeline.from_pretrained(args.model, device=device)
    size, grid = pipe.vqvae.config.image_size, pipe.prior.config.image_grid_size
    validation = load_text_image_dataset(DataConfig(source="digits", image_size=size))["validation"]
    validation = validation.select(range(min(args.max_images, len(validation))))
    batch = TextImageCollator(size)(list(validation))
    pixels, captions, labels = batch["pixel_values"], batch["text"], batch["label"]
    classifier = load_or_train_classifier("digits", size)
    print(json.dumps({"bench": "edit", "model": args.model, "cpu": cpu_name(), "device": str(device),
                      "torch_threads": torch.get_num_threads(), "images": len(captions),
                      "candidates": args.candidates, "guidance_scale": args.guidance_scale, "seed": args.seed,
                      "real_adherence": float((classify(classifier, pixels)[1]["label"] == labels).float().mean())}),
          flush=True)
    if args.grids is not None:
        write_grids(pipe, pixels, labels, args.grids, args.seed)
    rows, results = torch.arange(size).view(size, 1).expand(size, size), []
    other = (labels + 3) % 10  # another digit for each image: the edit changes what the digit is
    conditions = [(name, mask, prompting) for prompting in ("own caption", "another digit")
                  for name, mask in (("upper half", rows < size // 2), ("lower half", rows >= size // 2))]
    for name, mask, prompting in conditions:
        prompts = captions if prompting == "own caption" else [f"a handwritten digit {DIGIT_WORDS[d]}" for d in other]
        targets = labels if prompting == "own caption" else other
        mask_image = mask.float()
        kept_cells = ~cells_touched(mask_image, grid)
        kept_after = kept_after_region(~kept_cells)
        judged = {ranking: [] for ranking in ("first", "scorer", "likelihood", "both")}
        kept_unchanged, seconds = True, 0.0
        for index in range(len(captions)):
            image = pixels[index]
            start = time.perf_counter()
            output = pipe(prompts[index], image=image, mask_image=mask_image, num_images_per_prompt=args.candidates,
                          guidance_scale=args.guidance_scale, output_type="pt", progress=False,
                          generator=torch.Generator(device=pipe.device).manual_seed(args.seed + index))
            seconds += time.perf_counter() - start
            own = pipe.vqvae.encode(image.unsqueeze(0).to(device)).cpu()
            kept_unchanged &= bool((output.codes.cpu()[:, kept_cells] == own[:, kept_cells]).all())
            predicted = classify(classifier, output.images)[1]["label"]
            scores = output.scores.view(1, -1) if output.scores is not None else torch.zeros(1, args.candidates)
            text_ids = encode_captions(pipe.tokenizer, [prompts[index]], pipe.prior.config.text_len).to(device)
            fit = region_fit(pipe.prior, text_ids.expand(args.candidates, -1), output.codes, kept_after)
            fit = fit.cpu().view(1, -1)
            choice = {"first": 0, "scorer": int(scores.argmax()), "likelihood": int(fit.argmax()),
                      "both": int((standardised(fit) + standardised(scores)).argmax())}
            for ranking, chosen in choice.items():
                judged[ranking].append(bool(predicted[chosen] == targets[index]))
        for ranking, correct in judged.items():
            if (ranking == "likelihood" and not kept_after.any()) or (ranking == "scorer" and pipe.scorer is None):
                continue  # nothing kept after the region (the likelihood cannot rank), or no scorer
            row = {"mask": name, "prompt": prompting, "ranking": ranking, "adherence": sum(correct) / len(correct),
                   "kept_codes_unchanged": kept_unchanged,
                   "seconds_per_image_all_candidates": seconds / len(captions)}
            results.append(row)
            print(json.dumps(row), flush=True)
    pipeline_ranking = {row["mask"]: row["adherence"] for row in results
                        if row["ranking"] == "both" and row["prompt"] == "own caption"}
    print(json.dumps({"targets": TARGETS, "pipeline_ranking": pipeline_ranking,
                      "met": all(pipeline_ranking[name] >= target for name, target in TARGETS.items())}), flush=True)


if __name__ == "__main__":
    main()
