"""Create the `Accelerator` both stages train under: precision, accumulation, trackers, seeding."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import accelerate
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    GradientAccumulationPlugin,
    ProjectConfiguration,
    parse_flag_from_env,
    set_seed,
)

from dallekit.training.config import ConfigError, TrainingConfig

logger = logging.getLogger(__name__)


def cpu_supports_fast_bf16() -> bool:
    """True when the CPU advertises native bf16 matmul (AMX or AVX-512 BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def inference_dtype(device: torch.device, weights_dtype: torch.dtype, mixed_precision: str = "auto") -> torch.dtype:
    """The dtype inference computes in: `bf16`; `no`: the weights' dtype; `auto`: the caller's autocast dtype if
    one is on, else bf16 on a CPU with native bf16 (where it is faster), else the weights' dtype."""
    if mixed_precision not in ("auto", "no", "bf16"):
        raise ValueError(f"mixed_precision must be 'auto', 'no' or 'bf16', got {mixed_precision!r}")
    if mixed_precision == "auto":
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        mixed_precision = "bf16" if device.type == "cpu" and cpu_supports_fast_bf16() else "no"
    return torch.bfloat16 if mixed_precision == "bf16" else weights_dtype


def resolve_mixed_precision(setting: str, use_cpu: bool = False) -> str:
    """Map `auto` to bf16 where it is fast (CUDA with bf16, or a bf16-capable CPU), else `no`."""
    if setting != "auto":
        return setting
    if torch.cuda.is_available() and not use_cpu:
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_supports_fast_bf16() else "no"


def create_accelerator(config: TrainingConfig, project_name: str) -> Accelerator:
    """An Accelerator configured from `config`, seeded, with trackers started on the main process."""
    output_dir = Path(config.output_dir)
    # Without an accelerator, say so: several processes then form a gloo group (MULTI_CPU). A
    # single-process CPU launch (configs/accelerate/cpu.yaml, `accelerate launch --cpu`) sets
    # ACCELERATE_USE_CPU, which keeps a GPU machine on its CPU, for the precision too.
    use_cpu = not torch.accelerator.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU")
    if config.deterministic:
        # cuBLAS reads this when its first handle is made; without it deterministic matmuls raise.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # Warn, not fail, on an op with no deterministic kernel: the warning names it.
        torch.use_deterministic_algorithms(True, warn_only=True)
    accelerator = Accelerator(
        cpu=use_cpu,
        mixed_precision=resolve_mixed_precision(config.mixed_precision, use_cpu=use_cpu),
        dynamo_backend="inductor" if config.compile else "no",
        # Accumulation windows follow the step count, not epoch ends, so a resumed run syncs on the same batches.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=config.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # A seeded sampler makes the data order a function of (seed, epoch): exact resume needs it.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
    )
    set_seed(config.seed, device_specific=True)
    if accelerator.device.type == "cpu":
        # Soft one-hots at low temperature are full of subnormal floats, which are very slow on CPU.
        torch.set_flush_denormal(True)
    logger.info(
        "accelerator: %d process(es), strategy %s, device %s, mixed precision %s, effective batch %d "
        "(%d per process x %d process(es) x %d accumulation step(s))",
        accelerator.num_processes, distributed_strategy(accelerator), accelerator.device, accelerator.mixed_precision,
        config.batch_size * accelerator.num_processes * config.gradient_accumulation_steps,
        config.batch_size, accelerator.num_processes, config.gradient_accumulation_steps,
    )
    if parse_flag_from_env("ACCELERATE_USE_FSDP") and accelerator.distributed_type != DistributedType.FSDP:
        logger.warning(
            "the launch config asks for FSDP, but accelerate %s sets FSDP up on GPUs and other accelerators only, "
            "not on CPU processes: this run is %s, every process holds the whole model",
            accelerate.__version__, distributed_strategy(accelerator),
        )
    refuse_unsupported_strategy(accelerator.distributed_type)
    return accelerator


def refuse_unsupported_strategy(kind: DistributedType) -> None:
    """Fail before training under FSDP, which dallekit's training loops do not support yet."""
    if kind == DistributedType.FSDP:
        raise ConfigError(
            "FSDP is not supported yet: dallekit's training loops evaluate, draw samples and export on the main "
            "process alone, which under FSDP holds a shard of the weights only (the run would hang at its first "
            "evaluation). Launch with DDP (configs/accelerate/multi_gpu.yaml) and set "
            "training.gradient_checkpointing: true for the large priors (README: Sizes for real data)"
        )


def distributed_strategy(accelerator: Accelerator) -> str:
    """How the model is spread over the processes: "single process", "DDP", "FSDP" or "DeepSpeed".

    Named from what accelerate set up, not from what the launch config asked for: a launch
    config's FSDP that accelerate could not apply shows here as DDP.
    """
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return "FSDP"
    if kind == DistributedType.DEEPSPEED:
        return "DeepSpeed"
    return "single process" if accelerator.num_processes == 1 else "DDP"


def finish_training(accelerator: Accelerator) -> None:
    """Close the trackers, keeping the process group of a multi-process launch for what the program runs next.

    `Accelerator.end_training` would also destroy the process group, which cannot be set up again
    within the same launch (the rendezvous store keeps the first group's addresses): `dallekit train`
    trains three models in one launch. The group ends with the program (`run_from_command_line`)
    or with `continue_on_main_process_alone`.
    """
    for tracker in accelerator.trackers:
        tracker.finish()


def reset_process_state() -> None:
    """Forget accelerate's per-run state (precision, accumulation), keeping the process group, so that the
    next `Accelerator` of this process may be set up differently: several trainings in one program."""
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


# What torchrun / `accelerate launch` set to make a process one of several (accelerate reads these).
DISTRIBUTED_ENVIRONMENT = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                           "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def continue_on_main_process_alone() -> bool:
    """End a multi-process launch's distributed part: False on the other processes (they should stop), True on
    the main process, which from then on is a single process (a later `Accelerator` sees no process group).

    For work after distributed training that only the main process does and that may itself create an
    `Accelerator`, such as evaluation. A single-process run just returns True.
    """
    state = PartialState()
    if state.num_processes == 1:
        return True
    state.wait_for_everyone()
    is_main = state.is_main_process
    state.destroy_process_group()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    if is_main:
        for name in DISTRIBUTED_ENVIRONMENT:
            os.environ.pop(name, None)
    return is_main
