"""One process of a multi-process pre-tokenization, for tests/test_pretokenize.py.

    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml tests/pretokenize_worker.py \
        MODEL_DIR DATASET_DIR OUT_DIR BATCH_SIZE COPIES CACHE_DIR [CACHE_DIR ...]

Pre-tokenizes the saved `DatasetDict` at DATASET_DIR with the saved stage-1 model at MODEL_DIR
into each CACHE_DIR in turn (all processes together) and writes, per process, OUT_DIR/rank-<i>.json:
for each cache directory, how many times this process ran the encoder, the returned splits as
columns and `num_skipped`.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator

from dallekit.data import AugmentationConfig
from stage1_dvae import DVAEModel
from stage2_prior.pretokenize import pretokenize


def main(model_dir: str, dataset_dir: str, out_dir: str, batch_size: str, copies: str, *cache_dirs: str) -> None:
    accelerator = Accelerator(cpu=True)
    splits = datasets.load_from_disk(dataset_dir)
    model = DVAEModel.from_pretrained(model_dir)
    calls = []
    model.encoder.register_forward_hook(lambda *_: calls.append(1))
    augmentation = AugmentationConfig(copies=int(copies), max_translation=0.2, max_scale_change=0.2, seed=5)
    report = {"num_processes": accelerator.num_processes, "device": str(accelerator.device), "runs": []}
    for cache_dir in cache_dirs:
        calls.clear()
        encoded = pretokenize(splits, model, cache_dir, augmentation, accelerator=accelerator,
                              batch_size=int(batch_size))
        report["runs"].append({
            "cache_dir": cache_dir,
            "encoder_calls": len(calls),
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
