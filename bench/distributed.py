"""Benchmark the one training loop's strategies on the stage-2 prior: 1 process, 2-process DDP, 2-process FSDP2.

    python bench/distributed.py [--config configs/prior/demo.yaml] [--steps 30] [--batch 64]

Each run trains the prior of `--config` for `--steps` steps on the same total batch (`--batch` on one
process, half of it on each of two), from the codes of a random-weight tokenizer of
`configs/dvae/demo.yaml` (the same cost as a trained one), through `accelerate launch` as users run
it. Prints one JSON object per run: training tokens/s over training time only (`metrics.json`), and
for FSDP the bytes each rank holds of the weights and of the optimiser state, read from its shard of
the sharded checkpoint (`pytorch_model_fsdp_0/__<rank>_0.distcp`, `optimizer_0/__<rank>_0.distcp`),
beside the unsharded sizes (`model.safetensors`, `optimizer.bin` of the 1-process run).

On CPU processes accelerate runs FSDP only through the test helper `tests/fsdp_worker.py`, which
switches its FSDP2 path on by hand (accelerate sets FSDP up on GPUs only); on GPUs pass
`--fsdp-config configs/accelerate/fsdp.yaml` to launch FSDP as users do. Both processes share the
machine's cores (`OMP_NUM_THREADS` is set to cores / processes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from timing import cpu_name  # noqa: E402

from dallekit.training.config import load_config, recipe_path  # noqa: E402
from stage1_dvae import DVAEModel  # noqa: E402
from stage1_dvae.train import Stage1Config  # noqa: E402


def launch(processes: int, module_args: list[str], env: dict[str, str], config_file: str | None = None) -> None:
    """`accelerate launch` the module on `processes` CPU processes (gloo), failing loudly."""
    if processes == 1:
        launcher = ["accelerate", "launch", "--num_processes", "1", "--cpu"]
    else:
        config_file = config_file or str(recipe_path("accelerate/cpu_2proc.yaml"))
        launcher = ["accelerate", "launch", "--config_file", config_file]
    result = subprocess.run([*launcher, *module_args], capture_output=True, text=True, cwd=ROOT, env=env)
    if result.returncode:
        raise SystemExit(result.stderr[-4000:])


def shard_bytes(checkpoint: Path, folder: str) -> dict[int, int]:
    """Bytes of each rank's file in a torch.distributed.checkpoint folder of the checkpoint."""
    files = sorted((checkpoint / folder).glob("__*_0.distcp"))
    return {int(path.name.split("_")[2]): path.stat().st_size for path in files}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/prior/demo.yaml")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64, help="the total batch of an optimiser step")
    parser.add_argument("--max-examples", type=int, default=2048, help="training images encoded for the run")
    parser.add_argument("--fsdp-config", default=None, help="GPUs: an accelerate config that sets FSDP up")
    parser.add_argument("--output-dir", type=Path, default=None)
    args = parser.parse_args()
    root = args.output_dir or Path(tempfile.mkdtemp(prefix="dallekit-bench-distributed-"))
    stage1 = load_config(Stage1Config, ["--config", str(recipe_path("dvae/demo.yaml"))])
    DVAEModel(stage1.model).save_pretrained(root / "stage1")
    cores = os.cpu_count() or 1
    context = {"bench": "distributed", "cpu": cpu_name(), "cores": cores, "config": args.config, "steps": args.steps,
               "total_batch": args.batch}
    print(json.dumps(context), flush=True)
    common = ["--config", args.config, "--stage1_model", str(root / "stage1"), "--data.max_examples",
              str(args.max_examples), "--max_steps", str(args.steps), "--eval_every", str(args.steps),
              "--image_every", str(args.steps), "--checkpointing_steps", str(args.steps), "--log_every",
              str(args.steps), "--progress", "false", "--report_to", "none", "--early_stopping_patience", "null"]
    runs = [("single process", 1, ["-m", "stage2_prior.train"]), ("DDP", 2, ["-m", "stage2_prior.train"]),
            ("FSDP", 2, ["-m", "tests.fsdp_worker", "stage2", str(root / "fsdp-evidence"), "--run", "fsdp2"]
             if args.fsdp_config is None else ["-m", "stage2_prior.train"])]
    for name, processes, module in runs:
        output_dir = root / name.replace(" ", "_")
        env = os.environ | {"OMP_NUM_THREADS": str(max(1, cores // processes)), "TQDM_DISABLE": "1"}
        config_file = args.fsdp_config if name == "FSDP" else None
        launch(processes, [*module, *common, "--batch_size", str(args.batch // processes), "--output_dir",
                           str(output_dir)], env, config_file)
        metrics = json.loads((output_dir / "metrics.json").read_text())
        row = {"strategy": name, "processes": processes, "batch_per_process": args.batch // processes,
               "train_tokens_per_second": round(metrics["train_tokens_per_second"], 1),
               "train_seconds": round(metrics["train_seconds"], 2), "validation_loss": metrics["loss"]}
        checkpoint = output_dir / "checkpoints" / f"step_{args.steps}"
        if name == "single process":
            row |= {"weight_bytes": (checkpoint / "model.safetensors").stat().st_size,
                    "optimizer_bytes": (checkpoint / "optimizer.bin").stat().st_size}
        if name == "FSDP":
            row |= {"weight_bytes_per_rank": shard_bytes(checkpoint, "pytorch_model_fsdp_0"),
                    "optimizer_bytes_per_rank": shard_bytes(checkpoint, "optimizer_0")}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
