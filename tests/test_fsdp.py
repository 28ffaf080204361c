"""The training loop under FSDP2, on two real CPU processes (gloo): sharding, exact resume, gathered weights.

accelerate sets FSDP up on accelerators only, so tests/fsdp_worker.py switches a two-process CPU launch
to FSDP2 by hand (class-based wrapping: the tokenizer's `ResidualBlock`s, the prior's `LlamaDecoderLayer`s;
sharded state dicts) and trains with the recipe's own `train(config, accelerator)`. One launch per model
trains it three times, 6 steps each: under DDP, under FSDP2, and under FSDP2 resumed from the FSDP2 run's
step-3 checkpoint. For each model:

- every process held only a shard (DTensor parameters whose local shards add up to the full tensors),
  and the loop and its validation saw `DistributedType.FSDP`;
- the checkpoints are sharded (`pytorch_model_fsdp_0/`, `optimizer_0/`, torch.distributed.checkpoint);
- a run resumed from the middle checkpoint ends where the uninterrupted one does;
- `best/` and the export hold the full weights, equal to those the sharded checkpoints merge into,
  and load with `from_pretrained`;
- the FSDP2 run trains what the DDP run trains: FSDP changes where the weights live, not the result.
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from accelerate.utils import merge_fsdp_weights
from safetensors.torch import load_file

from dallekit.training.checkpointing import list_checkpoints
from stage1_dvae import DVAEModel
from stage2_prior import PriorModel
from tests.conftest import cpu_processes_env

ROOT = Path(__file__).resolve().parents[1]
TWO_PROCESSES = str(ROOT / "configs" / "accelerate" / "cpu_2proc.yaml")
CONFIGS = {"stage1": str(ROOT / "configs" / "dvae" / "tiny.yaml"),
           "stage2": str(ROOT / "configs" / "prior" / "tiny.yaml")}
# 6 steps, validated and checkpointed at 3 and 6 (both checkpoints kept); the resumed run starts at step 3.
STEPS = ["--max_steps", "6", "--checkpointing_steps", "3", "--eval_every", "3", "--image_every", "3",
         "--checkpoints_total_limit", "5", "--report_to", "none", "--progress", "false"]
# Without clipping the tokenizer's FSDP run equals its DDP run bit for bit. Clipping sums the gradient norm in
# another order under FSDP (each shard's, then all-reduced) than DDP (each whole tensor's): a last-bit difference
# in the clip factor that the conv biases before a GroupNorm (their gradients are rounding noise) and the VQ code
# assignments grow to ~1e-4 in 3 steps. The prior's runs clip (training's default), within 1e-7 of DDP.
STAGE1 = ["--quantizer", "vq", "--max_grad_norm", "null"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(stage: str, root: Path, *overrides: str) -> Path:
    """In one two-process launch, train `stage` under DDP (`root/ddp`), under FSDP2 (`root/run`) and under FSDP2
    again from the FSDP2 run's step-3 checkpoint (`root/resumed`); returns the directory of the evidence files."""
    evidence = root / "evidence"
    resume = ["--resume_from_checkpoint", str(root / "run" / "checkpoints" / "step_3")]
    runs = []
    for strategy, name, extra in [("ddp", "ddp", []), ("fsdp2", "run", []), ("fsdp2", "resumed", resume)]:
        runs += ["--run", strategy, "--config", CONFIGS[stage], "--output_dir", str(root / name), *STEPS,
                 *overrides, *extra]
    result = subprocess.run(
        ["accelerate", "launch", "--config_file", TWO_PROCESSES, "--main_process_port", str(free_port()),
         "-m", "tests.fsdp_worker", stage, str(evidence), *runs],
        capture_output=True, text=True, cwd=ROOT, env=cpu_processes_env(), timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return evidence


def merged(checkpoint: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """The full weights a sharded checkpoint holds (its DCP shards merged, as `accelerate merge-weights` does)."""
    target = scratch / f"{checkpoint.parent.parent.name}-{checkpoint.name}"
    scratch.mkdir(exist_ok=True)
    merge_fsdp_weights(str(checkpoint / "pytorch_model_fsdp_0"), str(target))
    return load_file(target / "model.safetensors")


def assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float = 0.0,
                        what: str = "") -> None:
    assert actual.keys() == expected.keys(), what
    for key, value in expected.items():
        if atol == 0.0:
            assert torch.equal(actual[key], value), f"{what}: {key}"
        else:
            torch.testing.assert_close(actual[key], value, rtol=0, atol=atol, msg=f"{what}: {key}")


def check_sharded(evidence: Path) -> None:
    """Each process held a shard of every parameter, the shards add up to the full tensors, the loop saw FSDP;
    the DDP run's processes each held the whole model."""
    for rank in range(2):
        report = json.loads((evidence / f"ddp-rank-{rank}.json").read_text())
        assert report["distributed_type"] == "MULTI_CPU" and not report["is_fsdp2"]
        assert not any(param["dtensor"] for param in report["parameters"].values())
    reports = [json.loads((evidence / f"run-rank-{rank}.json").read_text()) for rank in range(2)]
    for rank, report in enumerate(reports):
        assert (report["process_index"], report["num_processes"]) == (rank, 2)
        assert report["distributed_type"] == "FSDP" and report["is_fsdp2"], report["distributed_type"]
        assert report["model_class"].startswith("FSDP"), report["model_class"]  # fully_shard swaps the class in place
        assert all(param["dtensor"] for param in report["parameters"].values())
        held = sum(param["local_numel"] for param in report["parameters"].values())
        full = sum(param["full_numel"] for param in report["parameters"].values())
        assert held < 0.6 * full, f"process {rank} holds {held} of {full} parameter elements"
        assert [v["distributed_type"] for v in report["validations"]] == ["FSDP", "FSDP"]  # steps 3 and 6
    for name, param in reports[0]["parameters"].items():
        assert sum(report["parameters"][name]["local_numel"] for report in reports) == param["full_numel"], name
    assert reports[0]["validations"] == reports[1]["validations"]  # gathered: the same metrics on every process
    for rank in range(2):
        report = json.loads((evidence / f"resumed-rank-{rank}.json").read_text())
        assert report["is_fsdp2"] and all(param["dtensor"] for param in report["parameters"].values())
        assert [v["distributed_type"] for v in report["validations"]] == ["FSDP"]  # step 6


def check_run(root: Path, export: str, model_cls: type, ddp_atol: float) -> None:
    """Sharded checkpoints, `best/` and the export equal to the merged shards, exact resume, equal to DDP."""
    run, resumed, ddp, scratch = root / "run", root / "resumed", root / "ddp", root / "merged"
    checkpoints = list_checkpoints(run / "checkpoints")
    assert [p.name for p in checkpoints] == ["step_3", "step_6"]
    for checkpoint in checkpoints:
        assert (checkpoint / "pytorch_model_fsdp_0" / ".metadata").is_file()
        assert (checkpoint / "optimizer_0" / ".metadata").is_file()
        assert not (checkpoint / "model.safetensors").exists()  # no full copy: each process wrote its shard
        assert sorted(p.name for p in checkpoint.glob("random_states_*")) == ["random_states_0.pkl",
                                                                             "random_states_1.pkl"]
    at_step = {int(p.name.removeprefix("step_")): merged(p, scratch) for p in checkpoints}

    # best/ at step 3 (the first validation is the best so far) holds the gathered weights of step 3
    assert_same_weights(load_file(run / "checkpoints" / "step_3" / "best" / "model.safetensors"), at_step[3],
                        what="best/ of step 3")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 6 and metrics["export_step"] == metrics["best_step"] in (3, 6)
    best = load_file(run / "best" / "model.safetensors")
    exported = load_file(run / export / "model.safetensors")
    assert_same_weights(best, at_step[metrics["best_step"]], what="best/")
    assert_same_weights(exported, best, what="export")
    loaded = model_cls.from_pretrained(run / export)
    assert_same_weights({k: v.detach() for k, v in loaded.state_dict().items()}, exported, what="from_pretrained")

    # the run resumed from step 3 ends where the uninterrupted one does
    resumed_metrics = json.loads((resumed / "metrics.json").read_text())
    assert resumed_metrics["step"] == 6 and resumed_metrics["best_step"] == metrics["best_step"]
    assert_same_weights(merged(resumed / "checkpoints" / "step_6", scratch), at_step[6], atol=1e-6, what="resumed")
    assert_same_weights(load_file(resumed / export / "model.safetensors"), exported, atol=1e-6, what="resumed export")

    # FSDP trains what DDP trains
    ddp_final = load_file(ddp / "checkpoints" / "step_6" / "model.safetensors")
    assert_same_weights(at_step[6], ddp_final, atol=ddp_atol, what="FSDP vs DDP")


@pytest.fixture(scope="module")
def stage1_runs(tmp_path_factory) -> Path:
    """The tokenizer trained under DDP, FSDP2 and FSDP2 resumed (the FSDP2 run's export also serves the prior)."""
    root = tmp_path_factory.mktemp("fsdp-stage1")
    launch("stage1", root, *STAGE1)
    return root


def test_image_tokenizer_trains_sharded_and_resumes_exactly(stage1_runs: Path) -> None:
    """The stage-1 tokenizer (VQ; its EMA codebook is all-reduced inside the sharded forward) under FSDP2.

    The adversarial discriminator is left out: under FSDP the recipe refuses it (see `Stage1Task.setup`).
    """
    check_sharded(stage1_runs / "evidence")
    check_run(stage1_runs, "model", DVAEModel, ddp_atol=0.0)
    assert sorted(p.name for p in (stage1_runs / "run" / "images").iterdir()) == [
        "reconstructions_step_3.png", "reconstructions_step_6.png"]


def test_prior_trains_sharded_and_resumes_exactly(stage1_runs: Path, tmp_path: Path) -> None:
    """The stage-2 prior under FSDP2, over the codes of the tokenizer trained above; 2 accumulation steps."""
    launch("stage2", tmp_path, "--stage1_model", str(stage1_runs / "run" / "model"),
           "--gradient_accumulation_steps", "2")
    check_sharded(tmp_path / "evidence")
    check_run(tmp_path, "prior", PriorModel, ddp_atol=1e-5)
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").is_file()
    assert (tmp_path / "run" / "images" / "samples_step_6.png").is_file()
