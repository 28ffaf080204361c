"""One process of a two-process streamed run, for tests/test_streaming.py. A test helper, not a feature.

    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml -m tests.streaming_worker OUT_DIR \
        --config configs/dvae/tiny.yaml --data.source SHARDS --data.streaming true [--key value ...]

In one launch: reads two passes of the streamed training split as stage 1 does (`training_loader`,
prepared by the run's accelerator, `iterate_batches`), recording the captions of each pass and the
unreadable images skipped; then trains stage 1 to step 6 (OUT_DIR/full, checkpoints at 3 and 6), and
again from that run's step-3 checkpoint (OUT_DIR/resumed).
Each process writes OUT_DIR/rank-<i>.json: its passes and the metrics of both runs.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from dallekit.data import TextImageCollator, load_text_image_dataset
from dallekit.training.accelerator import create_accelerator
from dallekit.training.config import load_config
from dallekit.training.data import DataPosition, iterate_batches, training_loader
from stage1_dvae.train import Stage1Config, train

STEPS = ["--max_steps", "6", "--checkpointing_steps", "3", "--eval_every", "3", "--image_every", "3",
         "--checkpoints_total_limit", "5", "--report_to", "none", "--progress", "false"]


def read_passes(accelerator: Accelerator, config: Stage1Config, passes: int) -> list[dict[str, Any]]:
    """The captions of this process's batches, and the unreadable images skipped, in each of the first passes."""
    train_split = load_text_image_dataset(config.data)["train"]
    loader = accelerator.prepare(training_loader(train_split, config.training, config.data.shuffle_buffer_size,
                                                 TextImageCollator(config.data.image_size)))
    seen = [{"texts": [], "skipped": 0} for _ in range(passes)]
    position = DataPosition()
    for batch in iterate_batches(accelerator, loader, position):
        if position.epoch == passes:
            return seen
        seen[position.epoch]["texts"] += batch["text"]
        seen[position.epoch]["skipped"] += batch["num_skipped"]
    raise AssertionError("iterate_batches ended")


def main(out_dir: str, *args: str) -> None:
    logging.basicConfig(level=logging.INFO)
    output = Path(out_dir)
    config = load_config(Stage1Config, [*args, *STEPS, "--output_dir", str(output / "full")])
    accelerator = create_accelerator(config.training)
    report: dict[str, Any] = {"num_processes": accelerator.num_processes,
                              "passes": read_passes(accelerator, config, passes=2)}
    report["full"] = train(config)  # each run with an accelerator of its own, holding its own model and loaders
    resumed = load_config(Stage1Config, [*args, *STEPS, "--output_dir", str(output / "resumed"),
                                         "--resume_from_checkpoint", str(output / "full" / "checkpoints" / "step_3")])
    report["resumed"] = train(resumed)
    (output / f"rank-{accelerator.process_index}.json").write_text(json.dumps(report))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:])
