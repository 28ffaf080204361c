"""LoRA adapters of the prior: round trips through peft's format, diffusers' pipeline methods, bad adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from pipelines.text_to_image import TextToImagePipeline
from stage2_prior import PriorConfig, PriorModel
from stage2_prior.lora import LoraAdapterError, add_lora, lora_layers
from tests.test_pipeline import tiny_pipeline

PROMPTS = ["a handwritten digit seven", "the number 3"]


@pytest.fixture
def pipe() -> TextToImagePipeline:
    return tiny_pipeline()


def trained_adapter(pipe: TextToImagePipeline, name: str = "default", seed: int = 1) -> None:
    """An adapter whose weights are not zero: as if trained."""
    add_lora(pipe.prior, rank=4, alpha=8, adapter_name=name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(pipe.prior):
            for weights in (layer.lora_A[name].weight, layer.lora_B[name].weight):
                weights.copy_(torch.randn(weights.shape, generator=generator) * 0.3)


def codes(pipe: TextToImagePipeline, **kwargs) -> torch.Tensor:
    return pipe(PROMPTS, num_images_per_prompt=3, generator=torch.Generator().manual_seed(0), output_type="pt",
                progress=False, **kwargs).codes


def test_adapted_reloaded_and_fused_draw_the_same_codes_and_unloading_gives_the_base_back(
        pipe: TextToImagePipeline, tmp_path: Path) -> None:
    base = codes(pipe)
    trained_adapter(pipe)
    adapted = codes(pipe)
    assert not torch.equal(adapted, base)
    text_ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    uncached = pipe.prior.generate(text_ids, do_sample=False, use_cache=False, mixed_precision="no")
    cached = pipe.prior.generate(text_ids, do_sample=False, use_cache=True, mixed_precision="no")
    assert torch.equal(cached, uncached)  # the fused cached path adds the adapter's deltas as peft's layers do
    pipe.save_lora_weights(tmp_path / "digits-lora")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "digits-lora").iterdir()}
    assert json.loads((tmp_path / "digits-lora" / "adapter_config.json").read_text())["r"] == 4
    pipe.save_lora_weights(tmp_path / "carded", base_model="someone/dallekit-digits")
    card = ModelCard.load(tmp_path / "carded" / "README.md")
    assert card.data.base_model == "someone/dallekit-digits" and "lora" in card.data.tags
    assert "rank 4, alpha 8" in card.text and 'pipe.load_lora_weights("THIS_REPOSITORY"' in card.text

    reloaded = tiny_pipeline()
    assert torch.equal(codes(reloaded), base)
    assert reloaded.load_lora_weights(tmp_path / "digits-lora") == "digits-lora"
    assert torch.equal(codes(reloaded), adapted)
    reloaded.fuse_lora()
    fused = codes(reloaded, compile=False)
    assert (fused == adapted).float().mean() > 0.9  # merged weights round differently now and then
    reloaded.unfuse_lora()
    assert torch.equal(codes(reloaded), adapted)
    reloaded.disable_lora()
    assert torch.equal(codes(reloaded), base)
    reloaded.enable_lora()
    reloaded.unload_lora_weights()
    assert reloaded.get_list_adapters() == [] and torch.equal(codes(reloaded), base)
    fresh = tiny_pipeline().prior.state_dict()
    assert fresh.keys() == reloaded.prior.state_dict().keys()
    for name, tensor in fresh.items():  # merged and taken out again: float rounding, no more
        torch.testing.assert_close(reloaded.prior.state_dict()[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_set_adapters_weighs_and_combines_adapters(pipe: TextToImagePipeline) -> None:
    base = codes(pipe)
    trained_adapter(pipe, "a", seed=1)
    trained_adapter(pipe, "b", seed=2)
    pipe.set_adapters(["a"])
    only_a = codes(pipe)
    pipe.set_adapters(["a", "b"], adapter_weights=[1.0, 0.0])
    assert torch.equal(codes(pipe), only_a)
    pipe.set_adapters(["a", "b"], adapter_weights=[0.0, 0.0])
    assert torch.equal(codes(pipe), base)
    pipe.set_adapters(["a", "b"], adapter_weights=[1.0, 1.0])
    assert pipe.get_active_adapters() == ["a", "b"] and not torch.equal(codes(pipe), only_a)
    with pytest.raises(LoraAdapterError, match="no adapter named 'c'"):
        pipe.set_adapters("c")
    pipe.delete_adapters("a")
    assert pipe.get_list_adapters() == ["b"]
    pipe.unload_lora_weights()
    fresh = tiny_pipeline().prior.state_dict()
    assert fresh.keys() == pipe.prior.state_dict().keys()
    for name, tensor in fresh.items():  # never merged: every base weight as it was, bit for bit
        assert torch.equal(pipe.prior.state_dict()[name], tensor), name


def test_bad_adapters_are_one_clear_error(pipe: TextToImagePipeline, tmp_path: Path) -> None:
    trained_adapter(pipe)
    pipe.save_lora_weights(tmp_path / "mine")
    other = PriorModel(PriorConfig(text_vocab_size=pipe.prior.config.text_vocab_size, text_len=8, image_vocab_size=32,
                                   image_grid_size=4, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2))
    with pytest.raises(LoraAdapterError, match=r"trained on another prior: image_vocab_size 64 \(this prior: 32\), "
                                               r"image_grid_size 8 \(this prior: 4\)"):
        from stage2_prior.lora import load_lora
        load_lora(other, tmp_path / "mine")
    with pytest.raises(LoraAdapterError, match="is not a LoRA adapter: it has no adapter_config.json"):
        tiny_pipeline().load_lora_weights(tmp_path)
    with pytest.raises(LoraAdapterError, match="no LoRA adapter at 'someone/missing-adapter'"):
        tiny_pipeline().load_lora_weights("someone/missing-adapter")
    with pytest.raises(LoraAdapterError, match="already has an adapter named 'default'"):
        pipe.load_lora_weights(tmp_path / "mine", adapter_name="default")


def test_a_pipeline_saved_with_adapters_loads_them_active_over_its_base_prior(pipe: TextToImagePipeline,
                                                                              tmp_path: Path) -> None:
    base = codes(pipe)
    trained_adapter(pipe, "digits")
    adapted = codes(pipe)
    pipe.save_pretrained(tmp_path / "pipeline")
    assert (tmp_path / "pipeline" / "lora" / "digits" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "pipeline" / "model_index.json").read_text())["lora"] == {
        "adapters": ["digits"], "active": ["digits"]}
    assert torch.equal(codes(pipe), adapted)  # saving left the pipeline's adapter in place
    loaded = TextToImagePipeline.from_pretrained(tmp_path / "pipeline")
    assert loaded.get_active_adapters() == ["digits"] and torch.equal(codes(loaded), adapted)
    base_prior = PriorModel.from_pretrained(tmp_path / "pipeline" / "prior")  # the prior/ folder: the base weights
    assert torch.equal(codes(TextToImagePipeline(pipe.vqvae, base_prior, pipe.tokenizer)), base)


def test_push_lora_to_hub_uploads_the_adapter_alone_with_its_card(pipe: TextToImagePipeline, hub: dict) -> None:
    trained_adapter(pipe, "mine")
    assert pipe.push_lora_to_hub("someone/tiny-lora", adapter_name="mine", base_model="someone/tiny-dallekit",
                                 private=True) == "commit-model"
    assert hub["create_repo"] == [{"repo_id": "someone/tiny-lora", "private": True, "exist_ok": True,
                                   "repo_type": "model"}]
    [upload] = hub["upload_folder"]
    folder = upload["folder"]
    assert upload["repo_id"] == "someone/tiny-lora" and upload["commit_message"].startswith("Upload LoRA adapter mine")
    assert {path.name for path in folder.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "README.md",
                                                       "dallekit_prior.json"}  # the sizes it fits
    assert ModelCard.load(folder / "README.md").data.base_model == "someone/tiny-dallekit"
    adapted = codes(pipe)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(folder, adapter_name="mine")  # what was uploaded is the adapter, whole
    torch.testing.assert_close(codes(pipe), adapted, rtol=0, atol=0)

