"""Create the `Accelerator` every model trains under: device, precision, accumulation, trackers."""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from pathlib import Path

import accelerate
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, is_initialized
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    GradientAccumulationPlugin,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    parse_flag_from_env,
)

from dallekit.modeling_utils import cpu_supports_fast_bf16
from dallekit.training.config import ConfigError, TrainingConfig

logger = logging.getLogger(__name__)


def resolve_mixed_precision(setting: str, use_cpu: bool = False) -> str:
    """Map `auto` to bf16 where it is fast (CUDA with bf16, or a bf16-capable CPU), else `no`."""
    if setting != "auto":
        return setting
    if torch.cuda.is_available() and not use_cpu:
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_supports_fast_bf16() else "no"


def launched_on_cpu() -> bool:
    """Whether this process trains on its CPU: no accelerator, or a CPU launch (`accelerate launch --cpu`,
    `configs/accelerate/cpu.yaml`, which set ACCELERATE_USE_CPU and keep a GPU machine on its CPU)."""
    return not torch.accelerator.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU")


def create_accelerator(config: TrainingConfig) -> Accelerator:
    """An Accelerator configured from `config`, logging where it runs.

    A process may create several (`dallekit train` trains three models in one process): they share
    accelerate's process state, so they must agree on the mixed precision; a config that asks for
    another precision than the process's fails here, before training. `torch.compile` is applied by
    the loop, not through accelerate's dynamo plugin, which only the process's first accelerator sets.
    """
    output_dir = Path(config.output_dir)
    # Without an accelerator, say so: several processes then form a gloo group (MULTI_CPU); a CPU
    # launch keeps a GPU machine on its CPU, for the precision too.
    use_cpu = launched_on_cpu()
    mixed_precision = resolve_mixed_precision(config.mixed_precision, use_cpu=use_cpu)
    if is_initialized() and AcceleratorState().mixed_precision != mixed_precision:
        raise ConfigError(
            f"training.mixed_precision resolves to {mixed_precision!r}, but this process already trains in "
            f"{AcceleratorState().mixed_precision!r}: models trained in one process share one precision; set "
            f"training.mixed_precision: {AcceleratorState().mixed_precision} (or auto in every config)"
        )
    if config.deterministic:
        # cuBLAS reads this when its first handle is made; without it deterministic matmuls raise.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # Warn, not fail, on an op with no deterministic kernel: the warning names it.
        torch.use_deterministic_algorithms(True, warn_only=True)
    accelerator = Accelerator(
        cpu=use_cpu,
        mixed_precision=mixed_precision,
        # Accumulation windows follow the step count, not epoch ends, so a resumed run syncs on the same batches.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=config.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # A seedable sampler makes the data order a function of (the loader generator's seed, epoch): exact resume.
        # A stream is not read by the main process alone and dispatched: each process reads its own shards.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, dispatch_batches=False),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=config.process_group_timeout))],
    )
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
    asked = processes_asked_of_launch()
    if asked is not None and asked > accelerator.num_processes:
        logger.warning(
            "accelerate launch was asked for %d processes but started %d: on CPU, add --multi_cpu (or use "
            "--config_file configs/accelerate/cpu_2proc.yaml)", asked, accelerator.num_processes,
        )
    if parse_flag_from_env("ACCELERATE_USE_FSDP") and accelerator.distributed_type != DistributedType.FSDP:
        logger.warning(
            "the launch config asks for FSDP, but accelerate %s sets FSDP up on GPUs and other accelerators only, "
            "not on CPU processes: this run is %s, every process holds the whole model",
            accelerate.__version__, distributed_strategy(accelerator),
        )
    return accelerator


def processes_asked_of_launch() -> int | None:
    """`--num_processes N` of the `accelerate launch` command that started this process (its parent), or None.

    accelerate starts one process for `--num_processes 2` on a CPU without `--multi_cpu` and tells the
    program nothing; the parent's command line (Linux `/proc`) is the one place the request is seen.
    """
    try:
        argv = [arg.decode() for arg in Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0") if arg]
    except OSError:
        return None
    if "launch" not in argv or not any(Path(arg).name == "accelerate" for arg in argv[:2]):
        return None
    for index, arg in enumerate(argv):
        value = arg.removeprefix("--num_processes=") if arg.startswith("--num_processes=") else (
            argv[index + 1] if arg == "--num_processes" and index + 1 < len(argv) else None)
        if value is not None and value.isdigit():
            return int(value)
    return None


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
    """Close the trackers, keeping the process group for what the program runs next.

    `Accelerator.end_training` would also destroy the process group, which cannot be set up again
    within the same launch: `dallekit train` trains three models in one launch. The group ends with
    the program (`run_from_command_line`, the `dallekit` command).
    """
    for tracker in accelerator.trackers:
        tracker.finish()
