"""Benchmark data that does not fit in memory: streamed pre-tokenization and training from code shards.

    python bench/data.py [--sizes 10000 100000] [--image-size 64] [--shard-size 1000]
                         [--work-dir /tmp/dallekit-bench-data] [--train-steps 40]

Prints one JSON object per measurement, each naming the CPU:
- `shards`: writes each size's synthetic captioned shapes (`make_shapes`, PNG) as WebDataset shards in
  img2dataset's layout (`--shard-size` samples a shard, 10% of the shards held out whole), once.
- `pretokenize`: in a fresh process per size, streams the shards (`data.streaming: true`) through the
  stage-1 tokenizer of the 64 px recipe (`configs/dvae/emoji_vq_8x8.yaml`, random weights: the same
  cost as trained ones; bf16 autocast where the CPU has it, as stage 2 runs it) into code shards:
  images/s and the process's peak RSS. Goal (issue 26): the largest run's peak RSS within 10% of the
  smallest's.
- `training`: the 64 px prior (`configs/prior/emoji_8x8.yaml`) trained on the largest size's codes
  read from the memory-mapped code shards, against the same codes held in memory (`Dataset.from_dict`),
  through the stage-2 loader (shuffled, batches of `training.batch_size`): tokens/s of whole training
  steps (interleaved rounds, medians) and batches/s of the loader alone. Goal: code shards >= 95%
  of in-memory tokens/s.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import datasets
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import machine  # noqa: E402

from dallekit.data import DataConfig, load_text_image_dataset, make_shapes  # noqa: E402
from dallekit.data.cache import source_fingerprint  # noqa: E402
from dallekit.data.shards import add_tar_member  # noqa: E402
from dallekit.modeling_utils import cpu_supports_fast_bf16  # noqa: E402
from dallekit.text_tokenizer import encode_captions, load_or_train_text_tokenizer  # noqa: E402
from dallekit.training.config import TrainingConfig, load_config  # noqa: E402
from dallekit.training.optim import create_optimizer  # noqa: E402
from stage1_dvae import DVAEModel  # noqa: E402
from stage1_dvae.train import Stage1Config  # noqa: E402
from stage2_prior import PriorModel  # noqa: E402
from stage2_prior.pretokenize import pretokenize  # noqa: E402
from stage2_prior.train import Stage2Config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STAGE1_CONFIG = ROOT / "configs" / "dvae" / "emoji_vq_8x8.yaml"
PRIOR_CONFIG = ROOT / "configs" / "prior" / "emoji_8x8.yaml"
RENDER_CHUNK = 1000  # shapes rendered at a time, so writing the shards holds few images



def write_synthetic_shards(folder: Path, num_images: int, image_size: int, shard_size: int) -> dict:
    """`num_images` captioned shapes as shards `folder/00000.tar`, ...; the last tenth of the shards (at least one)
    in `folder/validation/`. Written once: a finished folder has `done.json`."""
    done = folder / "done.json"
    if done.is_file():
        return json.loads(done.read_text())
    start = time.perf_counter()
    num_shards = -(-num_images // shard_size)
    held_out = max(1, num_shards // 10)
    (folder / "validation").mkdir(parents=True, exist_ok=True)
    tar, shard = None, -1
    for first in range(0, num_images, RENDER_CHUNK):
        examples = make_shapes(min(RENDER_CHUNK, num_images - first), image_size=image_size, seed=first)
        for offset, (image, caption, _) in enumerate(examples):
            key = first + offset
            if key // shard_size != shard:
                if tar is not None:
                    tar.close()
                shard = key // shard_size
                where = folder / "validation" if shard >= num_shards - held_out else folder
                tar = tarfile.open(where / f"{shard:05d}.tar", "w")
            png = io.BytesIO()
            image.save(png, "PNG")
            add_tar_member(tar, f"{key:09d}.png", png.getvalue())
            add_tar_member(tar, f"{key:09d}.txt", caption.encode())
    tar.close()
    record = {"images": num_images, "shards": num_shards, "validation_shards": held_out,
              "seconds": round(time.perf_counter() - start, 1)}
    done.write_text(json.dumps(record))
    return record


def stage1_model() -> DVAEModel:
    return DVAEModel(load_config(Stage1Config, ["--config", str(STAGE1_CONFIG)]).model)


def pretokenize_shards(folder: Path, cache: Path, image_size: int) -> tuple[datasets.DatasetDict, dict]:
    """The codes of the shards at `folder`, streamed into code shards under `cache` (reused when there)."""
    config = DataConfig(source=str(folder), image_size=image_size, streaming=True)
    model = stage1_model()
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_supports_fast_bf16()):
        encoded = pretokenize(load_text_image_dataset(config), model, cache,
                              source_fingerprint=source_fingerprint(config))
    seconds = time.perf_counter() - start
    images = sum(len(split) for split in encoded.values())
    return encoded, {"images": images, "seconds": round(seconds, 1), "images_per_s": round(images / seconds, 1),
                     "code_shards": {name: len(shards) for name, shards in encoded.encoded_shards.items()}}


def child_pretokenize(folder: Path, cache: Path, image_size: int) -> None:
    """One size, in this fresh process: prints images/s and the process's peak RSS."""
    torch.manual_seed(0)
    _, figures = pretokenize_shards(folder, cache, image_size)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(figures | {"peak_rss_mib": round(peak_mib, 1)}))


def loader(split: datasets.Dataset, batch_size: int) -> DataLoader:
    """What the stage-2 recipe trains from: shuffled batches of caption ids and codes."""
    return DataLoader(split.with_format("torch", columns=["text_ids", "codes"]), batch_size=batch_size,
                      shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0))


def bench_training(codes: datasets.Dataset, steps: int, rounds: int = 3) -> dict:
    """Tokens/s of training steps on batches from the code shards (memory-mapped) and from the same rows in memory."""
    run = load_config(Stage2Config, ["--config", str(PRIOR_CONFIG)])
    config = run.model
    tokenizer = load_or_train_text_tokenizer(None, codes["text"], config.text_vocab_size, config.text_len)
    tokenizer_config = stage1_model().config
    config.text_vocab_size, config.image_vocab_size = len(tokenizer), tokenizer_config.codebook_size
    config.image_grid_size = tokenizer_config.latent_size
    config.pad_token_id, config.bos_token_id = tokenizer.pad_token_id, tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id

    def add_text_ids(batch: dict[str, list]) -> dict[str, list]:
        return {"text_ids": encode_captions(tokenizer, batch["text"], config.text_len).tolist()}

    memory_mapped = codes.map(add_text_ids, batched=True).select_columns(["text_ids", "codes"])
    in_memory = datasets.Dataset.from_dict(memory_mapped.to_dict(), features=memory_mapped.features)
    sources = {"code_shards": memory_mapped, "in_memory": in_memory}
    batch_size = run.training.batch_size
    model = PriorModel(config).train()
    optimizer = create_optimizer(model, TrainingConfig(learning_rate=1e-4))
    grid = config.image_grid_size
    tokens_per_s: dict[str, list[float]] = {name: [] for name in sources}
    loader_batches_per_s: dict[str, list[float]] = {name: [] for name in sources}
    iterators = {name: iter(loader(split, batch_size)) for name, split in sources.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_supports_fast_bf16()):
        for round_index in range(rounds + 1):  # round 0 warms up
            for name in sources:
                start = time.perf_counter()
                for _ in range(steps):
                    batch = next(iterators[name])
                    input_ids = model.build_input_ids(batch["text_ids"], batch["codes"].view(-1, grid, grid))
                    model(input_ids, return_logits=False).loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                seconds = time.perf_counter() - start
                if round_index:
                    tokens_per_s[name].append(steps * batch_size * (input_ids.shape[1] - 1) / seconds)
                start = time.perf_counter()
                for _ in range(steps):
                    next(iterators[name])
                if round_index:
                    loader_batches_per_s[name].append(steps / (time.perf_counter() - start))
    figures = {name: {"tokens_per_s": round(statistics.median(tokens_per_s[name])),
                      "loader_batches_per_s": round(statistics.median(loader_batches_per_s[name]), 1)}
               for name in sources}
    ratio = figures["code_shards"]["tokens_per_s"] / figures["in_memory"]["tokens_per_s"]
    return {"rows": len(codes), "batch_size": batch_size, "steps_per_round": steps, "rounds": rounds, **figures,
            "code_shards_over_in_memory": round(ratio, 3), "goal_met": ratio >= 0.95}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/dallekit-bench-data"))
    parser.add_argument("--train-steps", type=int, default=40, help="training steps per source and round")
    parser.add_argument("--child", nargs=2, metavar=("FOLDER", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    datasets.disable_progress_bars()
    if args.child:
        child_pretokenize(Path(args.child[0]), Path(args.child[1]), args.image_size)
        return
    print(json.dumps({"machine": machine()}), flush=True)
    results = {}
    for size in args.sizes:
        folder = args.work_dir / f"shapes-{size}"
        written = write_synthetic_shards(folder, size, args.image_size, args.shard_size)
        print(json.dumps({"measurement": "shards", "size": size, **written}), flush=True)
        cache = args.work_dir / f"codes-{size}"
        child = subprocess.run([sys.executable, __file__, "--image-size", str(args.image_size), "--child",
                                str(folder), str(cache)], capture_output=True, text=True, check=False)
        if child.returncode:
            sys.exit(f"pre-tokenizing {size} images failed:\n{child.stderr[-3000:]}")
        results[size] = json.loads(child.stdout.strip().splitlines()[-1])
        print(json.dumps({"measurement": "pretokenize", "size": size, **results[size]}), flush=True)
    smallest, largest = min(results), max(results)
    growth = results[largest]["peak_rss_mib"] / results[smallest]["peak_rss_mib"]
    print(json.dumps({"measurement": "pretokenize_memory", "sizes": [smallest, largest],
                      "peak_rss_ratio": round(growth, 3), "goal_met": growth <= 1.10}), flush=True)
    encoded, _ = pretokenize_shards(args.work_dir / f"shapes-{largest}", args.work_dir / f"codes-{largest}",
                                    args.image_size)
    print(json.dumps({"measurement": "training", **bench_training(encoded["train"], args.train_steps),
                      "machine": machine()}), flush=True)


if __name__ == "__main__":
    main()
