"""Benchmark starting from a trained pipeline: LoRA, full fine-tuning and training from scratch, at equal time.

    python bench/finetune.py [--held-out 9] [--budget-seconds 90] [--output-dir outputs/bench_finetune]

On the built-in digits at 32 px (real scans, an independent classifier to judge them): a base
pipeline is trained (`dallekit train`, the 32 px recipe) on every digit but one, held out entirely.
Then it is adapted to the held-out digit three ways, the prior of each given the same training-time
budget (`--stage2.training.max_train_seconds`): LoRA (`--init-from BASE --lora-rank 8`), full
fine-tuning (`--init-from BASE`), and a new pipeline trained from scratch on that digit alone (which
also trains its own image tokenizer, outside the budget: an advantage it gets). Each run is its own
`dallekit train` process. Judged by the digits classifier on 64 images per prompt: adherence to the
new digit (its validation captions), and to the base digits (does the adapted model still draw
them?). Also: trainable prior parameters, the process's peak RSS, the adapter's size. Prints one
JSON object per run, after one describing the machine; the last checks the goals (LoRA >= 80% of
full fine-tuning's adherence on the new digit with <= 5% of its trainable parameters, both above
from scratch, and the base digits losing <= 10% of their adherence under LoRA).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import cpu_name  # noqa: E402

from dallekit.data import DataConfig, load_text_image_dataset  # noqa: E402
from dallekit.evaluation.classifier import classify, load_or_train_classifier  # noqa: E402
from pipelines import TextToImagePipeline  # noqa: E402

IMAGE_SIZE = 32
DALLEKIT = shutil.which("dallekit") or "dallekit"


def write_folder(root: Path, digits: set[int]) -> Path:
    """The digits of `digits` from the built-in splits, as an image folder with train/ and validation/."""
    splits = load_text_image_dataset(DataConfig(source="digits", image_size=IMAGE_SIZE))
    for name, split in splits.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for index, example in enumerate(split):
            if example["label"] in digits:
                Image.open(io.BytesIO(example["image"]["bytes"])).save(folder / f"{index:05d}.png")
                rows.append({"file_name": f"{index:05d}.png", "text": example["text"], "label": example["label"]})
        (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def run(args: list[str], log: Path) -> dict:
    """`dallekit train ARGS` in its own process: its metrics, peak RSS and trainable parameters from its log."""
    with log.open("w") as output:
        process = subprocess.Popen([DALLEKIT, "train", *args], stdout=output, stderr=subprocess.STDOUT,
                                   env=os.environ | {"TQDM_DISABLE": "1"})
        _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"dallekit train {' '.join(args)} failed: see {log}")
    text = log.read_text()
    lora = re.search(r"LoRA rank \d+ on .*?: ([\d,]+) trainable parameters of ([\d,]+)", text)
    return {"peak_rss_gb": round(usage.ru_maxrss / 2**20, 2),
            "trainable_prior_parameters": int(lora.group(1).replace(",", "")) if lora else None}


def adherence(pipe: TextToImagePipeline, prompts: list[str], labels: list[int], classifier, per_prompt: int) -> float:
    """The share of images the classifier judges as the prompted digit."""
    correct = total = 0
    for prompt, label in zip(prompts, labels):
        images = pipe(prompt, num_images_per_prompt=per_prompt, output_type="pt", progress=False,
                      generator=torch.Generator().manual_seed(0)).images
        predicted = classify(classifier, images)[1]["label"]
        correct, total = correct + int((predicted == label).sum()), total + len(predicted)
    return correct / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--held-out", type=int, default=9, help="the digit the base never sees")
    parser.add_argument("--budget-seconds", type=float, default=90.0, help="the prior's training time, each run")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/bench_finetune"))
    parser.add_argument("--images-per-prompt", type=int, default=64)
    args = parser.parse_args()

    root = args.output_dir
    others = set(range(10)) - {args.held_out}
    base_data = write_folder(root / "data_base", others)
    group_data = write_folder(root / "data_group", {args.held_out})
    print(json.dumps({"bench": "finetune", "cpu": cpu_name(), "torch_threads": torch.get_num_threads(),
                      "held_out_digit": args.held_out, "budget_seconds": args.budget_seconds}), flush=True)
    base = run(["--data", str(base_data), "--image-size", str(IMAGE_SIZE), "--output-dir", str(root / "base"),
                "--max-prompts", "20"], root / "base.log")
    budget = ["--stage2.training.max_train_seconds", str(args.budget_seconds), "--stage2.training.max_steps", "100000",
              "--stage2.training.eval_every", "100", "--scorer.training.max_steps", "50", "--max-prompts", "5"]
    variants = {
        "lora": ["--init-from", str(root / "base" / "pipeline"), "--lora-rank", "8"],
        "full fine-tuning": ["--init-from", str(root / "base" / "pipeline")],
        "from scratch": ["--image-size", str(IMAGE_SIZE)],
    }
    classifier = load_or_train_classifier("digits", IMAGE_SIZE)
    validation = load_text_image_dataset(DataConfig(source="digits", image_size=IMAGE_SIZE))["validation"]
    new_prompts = list(dict.fromkeys(row["text"] for row in validation if row["label"] == args.held_out))
    base_prompts = {}
    for row in validation:
        if row["label"] != args.held_out:
            base_prompts.setdefault(row["label"], row["text"])
    base_pipe = TextToImagePipeline.from_pretrained(root / "base" / "pipeline")
    base_adherence = adherence(base_pipe, list(base_prompts.values()), list(base_prompts), classifier,
                               args.images_per_prompt)
    print(json.dumps({"run": "base", "new_digit_adherence": adherence(
        base_pipe, new_prompts, [args.held_out] * len(new_prompts), classifier, args.images_per_prompt),
        "base_digits_adherence": base_adherence, **base,
        "trainable_prior_parameters": base_pipe.prior.num_parameters()}), flush=True)
    rows = {}
    for name, extra in variants.items():
        output_dir = root / name.replace(" ", "_")
        shutil.rmtree(output_dir, ignore_errors=True)
        measured = run(["--data", str(group_data), "--output-dir", str(output_dir), *extra, *budget],
                       root / f"{output_dir.name}.log")
        pipe = TextToImagePipeline.from_pretrained(output_dir / "pipeline")
        metrics = json.loads((output_dir / "metrics.json").read_text())["stage2"]
        row = {"run": name, "prior_steps": metrics["step"], "prior_train_seconds": round(metrics["train_seconds"], 1),
               "new_digit_adherence": adherence(pipe, new_prompts, [args.held_out] * len(new_prompts), classifier,
                                                args.images_per_prompt),
               **measured}
        if measured["trainable_prior_parameters"] is None:
            row["trainable_prior_parameters"] = pipe.prior.num_parameters()
        if name != "from scratch":
            row["base_digits_adherence"] = adherence(pipe, list(base_prompts.values()), list(base_prompts),
                                                     classifier, args.images_per_prompt)
        adapter = output_dir / "stage2" / "lora" / "adapter_model.safetensors"
        if adapter.is_file():
            row["adapter_megabytes"] = round(adapter.stat().st_size / 2**20, 2)
        rows[name] = row
        print(json.dumps(row), flush=True)
    lora, full, scratch = rows["lora"], rows["full fine-tuning"], rows["from scratch"]
    print(json.dumps({
        "goals": "LoRA >= 80% of full fine-tuning's new-digit adherence with <= 5% of its trainable parameters; both "
                 "above from scratch; base digits lose <= 10% of their adherence under LoRA",
        "lora_share_of_full": lora["new_digit_adherence"] / max(full["new_digit_adherence"], 1e-9),
        "lora_parameter_share": lora["trainable_prior_parameters"] / full["trainable_prior_parameters"],
        "base_digits_kept_under_lora": lora["base_digits_adherence"] / max(base_adherence, 1e-9),
        "met": (lora["new_digit_adherence"] >= 0.8 * full["new_digit_adherence"]
                and lora["trainable_prior_parameters"] <= 0.05 * full["trainable_prior_parameters"]
                and min(lora["new_digit_adherence"], full["new_digit_adherence"]) > scratch["new_digit_adherence"]
                and lora["base_digits_adherence"] >= 0.9 * base_adherence),
    }), flush=True)


if __name__ == "__main__":
    main()
