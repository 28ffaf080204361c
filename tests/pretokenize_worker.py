"""One process of a multi-process pre-tokenization, for tests/test_pretokenize.py.

    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml tests/pretokenize_worker.py \
        MODEL_DIR DATA OUT_DIR BATCH_SIZE SHARD_SIZE COPIES CACHE_DIR [CACHE_DIR ...]

Pre-tokenizes DATA with the saved stage-1 model at MODEL_DIR into each CACHE_DIR in turn (all
processes together): DATA is a saved `DatasetDict`, or WebDataset shards, streamed (its `train`
split a stream of its tar files). Writes, per process, OUT_DIR/rank-<i>.json: for each cache
directory, how many times this process ran the encoder, the shards it encoded, the returned
splits as columns and `num_skipped`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator

from dallekit.data import AugmentationConfig, DataConfig, load_text_image_dataset
from dallekit.data.cache import source_fingerprint
from stage1_dvae import DVAEModel
from stage2_prior.pretokenize import pretokenize


def main(model_dir: str, data: str, out_dir: str, batch_size: str, shard_size: str, copies: str,
         *cache_dirs: str) -> None:
    accelerator = Accelerator(cpu=True)
    fingerprint = None
    if Path(data, "dataset_dict.json").is_file():
        splits = datasets.load_from_disk(data)
    else:
        config = DataConfig(source=data, image_size=16, streaming=True)
        splits, fingerprint = load_text_image_dataset(config), source_fingerprint(config)
    model = DVAEModel.from_pretrained(model_dir)
    calls = []
    delay = float(os.environ.get("PRETOKENIZE_WORKER_DELAY", "0"))  # seconds per encoder call: time to kill a run

    def count_and_wait(*_: object) -> None:
        calls.append(1)
        time.sleep(delay)

    model.encoder.register_forward_hook(count_and_wait)
    augmentation = AugmentationConfig(copies=int(copies), max_translation=0.2, max_scale_change=0.2, seed=5)
    report = {"num_processes": accelerator.num_processes, "device": str(accelerator.device), "runs": []}
    for cache_dir in cache_dirs:
        calls.clear()
        encoded = pretokenize(splits, model, cache_dir, augmentation, accelerator=accelerator,
                              batch_size=int(batch_size), shard_size=int(shard_size), source_fingerprint=fingerprint)
        report["runs"].append({
            "cache_dir": cache_dir,
            "encoder_calls": len(calls),
            "encoded_shards": encoded.encoded_shards,
            "splits": {name: split.to_dict() for name, split in encoded.items()},
            "num_skipped": encoded.num_skipped,
        })
    path = Path(out_dir) / f"rank-{accelerator.process_index}.json"
    path.write_text(json.dumps(report))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(1)
    main(*sys.argv[1:])
