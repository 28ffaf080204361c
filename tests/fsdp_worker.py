"""One process of an FSDP2 training run on CPU processes (gloo), for tests/test_fsdp.py. A test helper, not a feature.

    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml -m tests.fsdp_worker \
        {stage1,stage2} EVIDENCE_DIR --config configs/<dvae|prior>/tiny.yaml [--key value ...]

accelerate sets FSDP up only on GPUs and other accelerators, never on CPU processes, but its FSDP2
path runs on CPU. This worker creates the run's accelerator as training does
(`create_accelerator(config.training)`), then switches the process state to FSDP2 by hand: the
distributed type `FSDP` on `AcceleratorState` and `PartialState`, and an FSDP2 plugin with a
class-based auto wrap (the prior's `LlamaDecoderLayer`s, the tokenizer's `ResidualBlock`s, each its own
unit; the rest in the root unit) and sharded state dicts (`save_state` writes `pytorch_model_fsdp_0/`
and `optimizer_0/` with torch.distributed.checkpoint). Then it trains with the recipe's own
`train(config, accelerator)`.

Each process writes EVIDENCE_DIR/rank-<i>.json: what the loop saw once the model was prepared
(the distributed type, whether FSDP2, the number of processes) and, per parameter, whether it is a
DTensor, the numel of this process's shard (`to_local()`) and of the full tensor; and what validation saw.
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

from dallekit.training.accelerator import create_accelerator
from dallekit.training.config import load_config
from dallekit.training.loop import TrainingTask

# The modules each stage shards as units of their own (FSDP2 `fully_shard` per module of these classes).
UNITS = {"stage1": "ResidualBlock", "stage2": "LlamaDecoderLayer"}


def enable_fsdp2(accelerator: Accelerator, unit_class: str) -> None:
    """Switch this process's (CPU, gloo) accelerate state to FSDP2, wrapping every `unit_class` module as a unit."""
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",  # class-based: wraps the modules of the classes named here
        transformer_cls_names_to_wrap=[unit_class],
        state_dict_type="SHARDED_STATE_DICT",
        reshard_after_forward=True,
        cpu_ram_efficient_loading=False,
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
            "full_shape": list(param.shape),
        }
    return evidence


def record_evidence(task_cls: type[TrainingTask], path: Path) -> None:
    """Make `task_cls` write what the loop shows it (prepared model, accelerator, validation) to `path`."""
    evidence: dict[str, Any] = {"validations": []}
    prepare, validate = task_cls.prepare, task_cls.validate

    def write() -> None:
        path.write_text(json.dumps(evidence, indent=1))

    def recording_prepare(self: TrainingTask, accelerator: Accelerator, model: torch.nn.Module) -> None:
        evidence.update(
            process_index=accelerator.process_index,
            num_processes=accelerator.num_processes,
            distributed_type=str(accelerator.distributed_type.value),
            is_fsdp2=accelerator.is_fsdp2,
            model_class=type(model).__name__,
            parameters=parameter_evidence(model),
        )
        write()
        prepare(self, accelerator, model)

    def recording_validate(self: TrainingTask, model: torch.nn.Module, loader, accelerator: Accelerator):
        metrics = validate(self, model, loader, accelerator)
        evidence["validations"].append({"distributed_type": str(accelerator.distributed_type.value),
                                        "metrics": metrics})
        write()
        return metrics

    task_cls.prepare, task_cls.validate = recording_prepare, recording_validate


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
        raise SystemExit(f"usage: fsdp_worker {{stage1,stage2}} EVIDENCE_DIR [--key value ...], got {stage!r}")
    config = load_config(config_cls, list(args))
    accelerator = create_accelerator(config.training)
    enable_fsdp2(accelerator, UNITS[stage])
    Path(evidence_dir).mkdir(parents=True, exist_ok=True)
    record_evidence(task_cls, Path(evidence_dir) / f"rank-{accelerator.process_index}.json")
    train(config, accelerator)
    accelerator.wait_for_everyone()
    PartialState().destroy_process_group()


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    torch.set_num_threads(1)
    main(*sys.argv[1:])
