"""Starting from a trained prior: full fine-tuning (`training.init_from`) and LoRA adapters trained by the loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerFast

from dallekit.training.config import ConfigError
from dallekit.training.loop import load_initial_weights
from pipelines.text_to_image import TextToImagePipeline
from stage1_dvae import DVAEModel
from stage2_prior import PriorModel
from stage2_prior.train import Stage2Task, train
from tests.test_stage2_training import stage1_dir, tiny_config  # noqa: F401 (the session fixture)

PROMPTS = ["a handwritten digit seven", "the number 3"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory, stage1_dir: Path) -> Path:  # noqa: F811
    """A prior trained from scratch for a few steps: what fine-tuning starts from."""
    output_dir = tmp_path_factory.mktemp("base")
    train(tiny_config(output_dir, stage1_dir, "--max_steps", "6", "--data.max_examples", "128"))
    return output_dir


def fine_tuning(output_dir: Path, stage1_dir: Path, base_run: Path, *overrides: str):  # noqa: F811
    return tiny_config(output_dir, stage1_dir, "--data.max_examples", "128", "--max_steps", "4",
                       "--training.init_from", str(base_run / "prior"),
                       "--tokenizer_path", str(base_run / "tokenizer"), *overrides)


def test_init_from_starts_at_the_saved_priors_own_validation_loss(tmp_path: Path, stage1_dir: Path,  # noqa: F811
                                                                   base_run: Path) -> None:
    task = Stage2Task(fine_tuning(tmp_path, stage1_dir, base_run))
    accelerator = Accelerator(cpu=True)
    task.setup(accelerator)
    model = task.build_model()
    load_initial_weights(model, str(base_run / "prior"))
    saved = PriorModel.from_pretrained(base_run / "prior")
    task.prepare(accelerator, model)
    started = task.validate(model, task.validation_loader(), accelerator)
    task.prepare(accelerator, saved)
    assert started == task.validate(saved, task.validation_loader(), accelerator)
    bigger = fine_tuning(tmp_path / "other", stage1_dir, base_run, "--model.hidden_size", "32")
    other = Stage2Task(bigger)
    other.setup(accelerator)
    with pytest.raises(ConfigError, match=r"holds a PriorModel of other sizes \(hidden_size 64 there, 32 here"):
        load_initial_weights(other.build_model(), str(base_run / "prior"))


def test_lora_training_changes_only_the_adapter_and_the_pipeline_samples_with_it(
        tmp_path: Path, stage1_dir: Path, base_run: Path, caplog) -> None:  # noqa: F811
    with caplog.at_level("INFO", logger="stage2_prior.train"):
        metrics = train(fine_tuning(tmp_path, stage1_dir, base_run, "--lora.rank", "4", "--learning_rate", "0.01"))
    assert metrics["step"] == 4
    assert "LoRA rank 4 on q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj:" in caplog.text
    base, exported = (load_file(path / "prior" / "model.safetensors") for path in (base_run, tmp_path))
    assert base.keys() == exported.keys()
    for name, tensor in base.items():  # LoRA trains beside the base weights, never in them
        assert torch.equal(exported[name], tensor), name
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()

    pipe = TextToImagePipeline(DVAEModel.from_pretrained(stage1_dir), PriorModel.from_pretrained(base_run / "prior"),
                               PreTrainedTokenizerFast.from_pretrained(base_run / "tokenizer"))
    draw = lambda: pipe(PROMPTS, num_images_per_prompt=2, output_type="pt", progress=False,  # noqa: E731
                        generator=torch.Generator().manual_seed(0)).codes
    before = draw()
    pipe.load_lora_weights(tmp_path / "lora", adapter_name="finetuned")
    assert not torch.equal(draw(), before)
    pipe.unload_lora_weights()
    assert torch.equal(draw(), before)


def test_lora_needs_a_prior_to_adapt(tmp_path: Path, stage1_dir: Path) -> None:  # noqa: F811
    with pytest.raises(ConfigError, match="lora.rank > 0 adapts a trained prior: name it in training.init_from"):
        tiny_config(tmp_path, stage1_dir, "--lora.rank", "4")
