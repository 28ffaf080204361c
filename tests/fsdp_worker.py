"""One process of FSDP2 training runs on CPU processes (gloo), for tests/test_fsdp.py. A test helper, not a feature.

    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml -m tests.fsdp_worker {stage1,stage2} \
        EVIDENCE_DIR --run {ddp,fsdp2} --config configs/<dvae|prior>/tiny.yaml --output_dir DIR [--key value ...] \
        [--run {ddp,fsdp2} ...]

accelerate sets FSDP up only on GPUs and other accelerators, never on CPU processes, but its FSDP2
path runs on CPU. For each `--run fsdp2` this worker creates the run's accelerator as training does
(`create_accelerator(config.training)`), then switches the process state to FSDP2 by hand: the
distributed type `FSDP` on `AcceleratorState` and `PartialState`, and an FSDP2 plugin with a
class-based auto wrap (the prior's `LlamaDecoderLayer`s, the tokenizer's `ResidualBlock`s, each its own
unit; the rest in the root unit) and sharded state dicts (`save_state` writes `pytorch_model_fsdp_0/`
and `optimizer_0/` with torch.distributed.checkpoint). Then it trains with the recipe's own
`train(config, accelerator)`. A `--run ddp` trains as accelerate set the launch up (two CPU processes:
DDP), the reference an FSDP2 run is compared with; it must come before the FSDP2 runs, since the
process stays FSDP once switched. Several runs share one launch, as `dallekit train` trains several
models in one, to save the processes' start (most of a tiny run's time).

For each run, each process writes EVIDENCE_DIR/<output_dir name>-rank-<i>.json: what the loop saw
once the model was prepared (the distributed type, whether FSDP2, the number of processes) and, per
parameter, whether it is a DTensor, the numel of this process's shard (`to_local()`) and of the full
tensor; and the distributed type and metrics of each validation.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

from dallekit.training.accelerator import create_accelerator
from dallekit.training.config import load_config
from dallekit.training.loop import TrainingTask

# The modules each stage shards as units of their own (FSDP2 `fully_shard` per module of these classes).
UNITS = {"stage1": "ResidualBlock", "stage2": "LlamaDecoderLayer"}
STRATEGIES = ("ddp", "fsdp2")


def enable_fsdp2(accelerator: Accelerator, unit_class: str) -> None:
    """Switch this process's (CPU, gloo) accelerate state to FSDP2, wrapping every `unit_class` module as a unit."""
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",  # class-based: wraps the modules of the classes named here
        transformer_cls_names_to_wrap=[unit_class],
        state_dict_type="SHARDED_STATE_DICT",
        reshard_after_forward=True,
        cpu_ram_efficient_loading=True,  # as configs/accelerate/fsdp.yaml: the main process's weights, broadcast
    )
    AcceleratorState().distributed_type = DistributedType.FSDP
    PartialState().distributed_type = DistributedType.FSDP
    AcceleratorState().fsdp_plugin = plugin
    assert accelerator.distributed_type == DistributedType.FSDP and accelerator.is_fsdp2


def parameter_evidence(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """Per parameter: is it a DTensor, how many elements this process holds, how many the full tensor has."""
    evidence = {}
    for name, param in model.named_parameters():
        is_dtensor = isinstance(param, DTensor)
        evidence[name] = {
            "dtensor": is_dtensor,
            "local_numel": param.to_local().numel() if is_dtensor else param.numel(),
            "full_numel": param.numel(),
        }
    return evidence


class EvidenceRecorder:
    """Wraps a task class's `prepare` and `validate` to write what the loop shows them to the current run's file."""

    def __init__(self, task_cls: type[TrainingTask]) -> None:
        self.path: Path | None = None
        self.evidence: dict[str, Any] = {}
        prepare, validate = task_cls.prepare, task_cls.validate
        recorder = self

        def recording_prepare(task: TrainingTask, accelerator: Accelerator, model: torch.nn.Module) -> None:
            recorder.evidence.update(
                process_index=accelerator.process_index,
                num_processes=accelerator.num_processes,
                distributed_type=str(accelerator.distributed_type.value),
                is_fsdp2=accelerator.is_fsdp2,
                model_class=type(model).__name__,
                parameters=parameter_evidence(model),
            )
            recorder.write()
            prepare(task, accelerator, model)

        def recording_validate(task: TrainingTask, model: torch.nn.Module, loader: DataLoader,
                               accelerator: Accelerator) -> dict[str, float]:
            metrics = validate(task, model, loader, accelerator)
            recorder.evidence["validations"].append(
                {"distributed_type": str(accelerator.distributed_type.value), "metrics": metrics})
            recorder.write()
            return metrics

        task_cls.prepare, task_cls.validate = recording_prepare, recording_validate

    def start(self, path: Path) -> None:
        self.path, self.evidence = path, {"validations": []}

    def write(self) -> None:
        self.path.write_text(json.dumps(self.evidence, indent=1))


def split_runs(args: list[str]) -> list[tuple[str, list[str]]]:
    """`--run STRATEGY args... --run STRATEGY args...` -> [(strategy, args), ...], DDP runs first."""
    if not args or args[0] != "--run":
        raise SystemExit("the runs start with --run {ddp,fsdp2}")
    runs: list[tuple[str, list[str]]] = []
    for token in args:
        if token == "--run":
            runs.append(("", []))
        elif not runs[-1][0]:
            if token not in STRATEGIES:
                raise SystemExit(f"--run takes one of {STRATEGIES}, got {token!r}")
            runs[-1] = (token, [])
        else:
            runs[-1][1].append(token)
    strategies = [strategy for strategy, _ in runs]
    if strategies != sorted(strategies):  # "ddp" < "fsdp2"
        raise SystemExit("the DDP runs come first: once switched to FSDP2 the process stays FSDP2")
    return runs


def main(stage: str, evidence_dir: str, *args: str) -> None:
    if stage == "stage1":
        from stage1_dvae.train import Stage1Config as config_cls
        from stage1_dvae.train import Stage1Task as task_cls
        from stage1_dvae.train import train
    elif stage == "stage2":
        from stage2_prior.train import Stage2Config as config_cls
        from stage2_prior.train import Stage2Task as task_cls
        from stage2_prior.train import train
    else:
        raise SystemExit(f"usage: fsdp_worker {{stage1,stage2}} EVIDENCE_DIR --run {{ddp,fsdp2}} ..., got {stage!r}")
    recorder = EvidenceRecorder(task_cls)
    Path(evidence_dir).mkdir(parents=True, exist_ok=True)
    for strategy, run_args in split_runs(list(args)):
        config = load_config(config_cls, run_args)
        accelerator = create_accelerator(config.training)
        if strategy == "fsdp2":
            enable_fsdp2(accelerator, UNITS[stage])
        name = Path(config.training.output_dir).name
        recorder.start(Path(evidence_dir) / f"{name}-rank-{accelerator.process_index}.json")
        train(config, accelerator)
        accelerator.wait_for_everyone()
    PartialState().destroy_process_group()


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    torch.set_num_threads(1)
    main(*sys.argv[1:])
