"""Stage-1 tokenizer: quantizers learn, gradients flow, shapes hold, checkpoints round-trip."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from einops import rearrange
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from stage1_dvae import DVAEConfig, DVAEModel
from stage1_dvae.metrics import psnr_from_mse
from stage1_dvae.quantizers import FiniteScalarQuantizer, VectorQuantizer
from stage1_dvae.quantizers.base import marginal_kl_to_uniform
from stage1_dvae.quantizers.gumbel import kl_to_uniform
from stage1_dvae.train import dead_code_warning
from tests.conftest import tiny_dvae_config


def reconstruction_psnr(model: DVAEModel, pixels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        reconstruction = model.decode(model.encode(pixels))
    model.train()
    return psnr_from_mse(((reconstruction - pixels) / 2).pow(2).mean().item())


@pytest.mark.parametrize("quantizer", ["gumbel", "vq", "fsq"])
def test_quantizer_overfits_a_small_batch(quantizer: str, digit_pixels: torch.Tensor) -> None:
    pixels = digit_pixels[:8]
    model = DVAEModel(tiny_dvae_config(quantizer))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    initial_loss, initial_psnr = None, reconstruction_psnr(model, pixels)
    for step in range(80):
        output = model(pixels, temperature=max(0.97**step, 0.3))
        initial_loss = initial_loss if initial_loss is not None else output.loss.item()
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    final_psnr = reconstruction_psnr(model, pixels)
    assert output.loss.item() < 0.25 * initial_loss
    assert final_psnr > 18.0, f"{quantizer}: PSNR {final_psnr:.1f} dB after overfitting"
    assert final_psnr > initial_psnr + 8.0


@pytest.mark.parametrize(
    "quantizer, straight_through", [("gumbel", False), ("gumbel", True), ("vq", False), ("fsq", False)]
)
def test_gradients_reach_the_encoder(quantizer: str, straight_through: bool, digit_pixels: torch.Tensor) -> None:
    model = DVAEModel(tiny_dvae_config(quantizer, straight_through=straight_through))
    output = model(digit_pixels[:4], temperature=0.5)
    output.reconstruction_loss.backward()  # the reconstruction alone: no KL / commitment shortcut
    first_conv = model.encoder.layers[0].weight
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0


def test_straight_through_gumbel_uses_hard_one_hots(digit_pixels: torch.Tensor) -> None:
    model = DVAEModel(tiny_dvae_config("gumbel", straight_through=True))
    logits = model.encoder(digit_pixels[:2])
    quantized = model.quantizer(logits, temperature=0.7)
    # a hard one-hot picks exactly one code vector per position
    codebook = model.quantizer.embedding.weight
    picked = codebook[quantized.codes.flatten()]
    embeddings = quantized.embeddings.permute(0, 2, 3, 1).reshape(-1, codebook.shape[1])
    gumbel_codes_match = torch.isclose(embeddings[:, None, :], codebook[None], atol=1e-5).all(-1).any(-1)
    assert gumbel_codes_match.all()
    assert picked.shape == embeddings.shape


@pytest.mark.parametrize("quantizer", ["gumbel", "vq", "fsq"])
@pytest.mark.parametrize("image_size, factor, multipliers", [(16, 2, [1, 2]), (24, 4, [1, 1, 2]), (32, 8, [1, 1, 2, 2])])
def test_encode_decode_shapes_and_dtypes(quantizer: str, image_size: int, factor: int, multipliers: list[int]) -> None:
    config = tiny_dvae_config(
        quantizer, image_size=image_size, downsample_factor=factor, channel_multipliers=multipliers
    )
    model = DVAEModel(config).eval()
    pixels = torch.rand(3, 3, image_size, image_size) * 2 - 1
    codes = model.encode(pixels)
    assert codes.dtype == torch.int64
    assert codes.shape == (3, image_size // factor, image_size // factor)
    assert 0 <= codes.min() and codes.max() < config.codebook_size
    images = model.decode(codes)
    assert images.shape == pixels.shape and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    # evaluation-mode forward is deterministic and agrees with encode()
    assert torch.equal(model(pixels).codes, codes)


@pytest.mark.parametrize("reconstruction_loss", ["mse", "logit_laplace"])
def test_patch_size_runs_no_convolution_at_full_resolution(reconstruction_loss: str) -> None:
    """`patch_size` 2 folds 2x2 pixels into channels: every convolution sees at most half the image side, and
    the decoder unfolds its output (both output channels of logit-Laplace) back to full-size pixels."""
    config = tiny_dvae_config("vq", image_size=32, downsample_factor=8, patch_size=2, channel_multipliers=[1, 2, 2],
                              reconstruction_loss=reconstruction_loss)
    model = DVAEModel(config).eval()
    sides = []
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(lambda _, inputs, __: sides.append(inputs[0].shape[-1]))
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    codes = model.encode(pixels)
    assert codes.shape == (2, 4, 4) and max(sides) == 16
    sides.clear()
    images = model.decode(codes)
    assert images.shape == pixels.shape and max(sides) == 16
    assert model(pixels).reconstruction.shape == pixels.shape


def decoder_multiply_adds(model: DVAEModel, codes: torch.Tensor) -> int:
    """Multiply-adds of the decoder's convolutions for decoding `codes`, counted by forward hooks."""
    counts = []

    def count(module: torch.nn.Conv2d, _, output: torch.Tensor) -> None:
        counts.append(output[0].numel() * module.in_channels * module.kernel_size[0] * module.kernel_size[1])

    hooks = [module.register_forward_hook(count) for module in model.decoder.modules()
             if isinstance(module, torch.nn.Conv2d)]
    model.decode(codes)
    for hook in hooks:
        hook.remove()
    return sum(counts)


def test_pixel_shuffle_upsampling_decodes_with_fewer_operations_and_learns(digit_pixels: torch.Tensor) -> None:
    """`upsample: pixel_shuffle` computes each level's next channels at the lower resolution and unfolds them
    2x2: the same output shape as nearest-neighbour upsampling, fewer multiply-adds, and it trains."""
    codes = torch.randint(0, 64, (2, 4, 4))
    costs = {}
    for upsample in ("nearest", "pixel_shuffle"):
        model = DVAEModel(tiny_dvae_config("vq", image_size=16, downsample_factor=4, channel_multipliers=[1, 2, 2],
                                           upsample=upsample)).eval()
        assert model.decode(codes).shape == (2, 3, 16, 16)
        costs[upsample] = decoder_multiply_adds(model, codes)
    assert costs["pixel_shuffle"] < 0.8 * costs["nearest"], costs

    pixels = digit_pixels[:8]
    model = DVAEModel(tiny_dvae_config("vq", upsample="pixel_shuffle"))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    initial_psnr = reconstruction_psnr(model, pixels)
    for _ in range(80):
        model(pixels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert reconstruction_psnr(model, pixels) > initial_psnr + 8.0


def test_logit_laplace_decoder_outputs_pixels_in_range(digit_pixels: torch.Tensor) -> None:
    model = DVAEModel(tiny_dvae_config("gumbel", reconstruction_loss="logit_laplace"))
    output = model(digit_pixels[:4])
    assert model.decoder.conv_out.out_channels == 6  # location and log-scale per channel
    assert output.reconstruction.shape == digit_pixels[:4].shape
    assert output.reconstruction.min() >= -1 and output.reconstruction.max() <= 1
    assert torch.isfinite(output.loss)


def test_kl_to_uniform_matches_hand_computation() -> None:
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])
    logits = probs.log().view(1, 4, 1, 1)
    entropy = 1.75 * math.log(2)  # -sum p log p for (1/2, 1/4, 1/8, 1/8)
    assert kl_to_uniform(logits).item() == pytest.approx(math.log(4) - entropy, abs=1e-6)
    assert kl_to_uniform(torch.zeros(2, 8, 3, 3)).item() == pytest.approx(0.0, abs=1e-6)
    one_hot_logits = torch.full((1, 8, 1, 1), -1e4)
    one_hot_logits[0, 3] = 0
    assert kl_to_uniform(one_hot_logits).item() == pytest.approx(math.log(8), abs=1e-4)


def test_marginal_kl_is_zero_when_codes_are_spread_and_log_k_when_one_code_wins() -> None:
    spread = torch.full((4, 4, 1, 1), -1e4)
    spread[torch.arange(4), torch.arange(4)] = 0  # each image certain of a different code
    assert marginal_kl_to_uniform(spread).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_to_uniform(spread).item() == pytest.approx(math.log(4), abs=1e-4)  # per-position KL is maximal
    collapsed = torch.full((4, 4, 1, 1), -1e4)
    collapsed[:, 2] = 0
    assert marginal_kl_to_uniform(collapsed).item() == pytest.approx(math.log(4), abs=1e-4)


def fsq_pre_images(quantizer: FiniteScalarQuantizer) -> torch.Tensor:
    """For every code, a latent [K, d] that `bound` maps exactly onto that code's grid point."""
    grid = quantizer.codes_to_grid(torch.arange(quantizer.codebook_size))
    levels = torch.tensor(quantizer.level_counts, dtype=torch.float64)
    half_range = (levels - 1) * (1 + 1e-3) / 2
    offset = (levels % 2 == 0).double() * 0.5
    bounded = grid.double() * (levels // 2)  # the integer level, in (-half_range - offset, half_range - offset)
    return (torch.atanh((bounded + offset) / half_range) - torch.atanh(offset / half_range)).float()


def test_fsq_codes_round_trip_and_every_code_is_reachable() -> None:
    quantizer = FiniteScalarQuantizer([8, 5, 5, 5], embedding_dim=16)
    assert quantizer.codebook_size == 1000
    codes = torch.arange(1000)
    grid = quantizer.codes_to_grid(codes)
    assert grid.shape == (1000, 4) and grid.min() >= -1 and grid.max() <= 1
    assert torch.equal(quantizer.grid_to_codes(grid), codes)  # indices -> values -> indices
    assert len({tuple(row) for row in grid.tolist()}) == 1000  # distinct grid points
    # every code is the quantisation of some latent
    assert torch.equal(quantizer.grid_to_codes(quantizer.quantize(fsq_pre_images(quantizer))), codes)


def test_fsq_quantisation_is_idempotent_and_matches_decoding_from_codes() -> None:
    quantizer = FiniteScalarQuantizer([8, 5, 5, 5], embedding_dim=16).eval()
    z = torch.randn(512, 4) * 3
    grid = quantizer.quantize(z)
    # a quantised value is a grid point: mapping it to a code and back changes nothing
    assert torch.equal(quantizer.codes_to_grid(quantizer.grid_to_codes(grid)), grid)
    # and the grid points are a fixed set: quantising their own latents again gives them back
    codes = quantizer.grid_to_codes(grid)
    assert torch.equal(quantizer.quantize(fsq_pre_images(quantizer)[codes]), grid)
    latents = torch.randn(2, 16, 3, 3)
    output = quantizer(latents)
    torch.testing.assert_close(quantizer.embed_codes(output.codes), output.embeddings)
    assert torch.equal(quantizer.codes(latents), output.codes)
    assert output.loss.item() == 0.0


def test_fsq_straight_through_gradient_is_the_gradient_of_the_bound() -> None:
    quantizer = FiniteScalarQuantizer([8, 5, 5], embedding_dim=16)
    z = torch.randn(64, 3, requires_grad=True)
    quantizer.quantize(z).sum().backward()
    expected = torch.func.grad(lambda v: (quantizer.bound(v) / torch.tensor([4.0, 2.0, 2.0])).sum())(z.detach())
    torch.testing.assert_close(z.grad, expected)
    assert (z.grad > 0).all()  # tanh is increasing: no dead zones, unlike a rounded value


def test_fsq_soft_posterior_is_the_product_of_the_channels_in_code_order() -> None:
    quantizer = FiniteScalarQuantizer([4, 3, 2], embedding_dim=8)
    pre_images = fsq_pre_images(quantizer)
    for code in (0, 5, 23):  # a batch all on one grid point: the average posterior peaks on that code
        mean_posterior = quantizer.mean_code_posterior(quantizer.bound(pre_images[code].expand(7, 3)))
        assert mean_posterior.shape == (24,) and mean_posterior.argmax().item() == code
    bounded = quantizer.bound(torch.randn(50, 3) * 2)
    per_channel = [torch.softmax(-(bounded[:, i, None] - (torch.arange(n) - n // 2)).square(), dim=-1)
                   for i, n in enumerate((4, 3, 2))]
    by_hand = torch.einsum("na,nb,nc->ncba", *per_channel).reshape(50, 24).mean(dim=0)  # digit 0 least significant
    torch.testing.assert_close(quantizer.mean_code_posterior(bounded), by_hand)


def test_fsq_marginal_kl_spreads_collapsed_codes_and_is_weighted_into_the_loss() -> None:
    torch.manual_seed(0)
    quantizer = FiniteScalarQuantizer([5, 5, 5], embedding_dim=8).train()
    latents = (torch.randn(256, 8) * 0.01).requires_grad_()  # every position on the centre code
    optimizer = torch.optim.Adam([latents, *quantizer.parameters()], lr=0.05)
    distinct_before = quantizer.codes(latents.detach()[:, :, None, None]).unique().numel()
    for _ in range(100):
        optimizer.zero_grad()
        quantizer(latents[:, :, None, None]).marginal_kl.backward()
        optimizer.step()
    distinct_after = quantizer.codes(latents.detach()[:, :, None, None]).unique().numel()
    assert distinct_before <= 2 and distinct_after >= 60, (distinct_before, distinct_after)  # of 125 codes
    assert quantizer.eval()(latents[:, :, None, None]).marginal_kl is None  # training only

    model = DVAEModel(tiny_dvae_config("fsq", marginal_kl_weight=0.5)).train()
    torch.manual_seed(0)
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    output = model(pixels)
    latents = model.encoder(pixels)
    marginal_kl = model.quantizer(latents).marginal_kl
    torch.testing.assert_close(output.loss, output.reconstruction_loss + 0.5 * marginal_kl)


def test_fsq_config_takes_its_codebook_size_from_the_levels() -> None:
    config = DVAEConfig(quantizer="fsq", fsq_levels=[8, 6, 5], codebook_size=512)
    assert config.codebook_size == 240
    with pytest.raises(Exception, match="fsq_levels"):
        DVAEConfig(quantizer="fsq", fsq_levels=[8, 1])


def test_vq_codebook_initialises_with_kmeans_and_restarts_dead_codes() -> None:
    model = DVAEModel(tiny_dvae_config("vq", codebook_size=16, dead_code_threshold=0.5, ema_decay=0.5))
    quantizer = model.quantizer
    assert not bool(quantizer.initialized)
    latents = torch.randn(4, 16, 4, 4) + 5.0  # far from the random initial codebook
    quantizer.train()
    quantizer(latents)
    assert bool(quantizer.initialized)
    vectors = latents.permute(0, 2, 3, 1).reshape(-1, 16)
    # k-means centroids lie among the data, not at the N(0, 1) initialisation
    assert quantizer.codebook.mean().item() == pytest.approx(5.0, abs=0.5)
    # a code nobody uses decays below the threshold and is restarted from an encoder output
    quantizer.codebook[0] = -100.0
    quantizer.ema_embedding_sum[0] = -100.0
    assert torch.cdist(quantizer.codebook[:1], vectors).min() > 100
    for _ in range(4):
        quantizer(latents)
    assert torch.cdist(quantizer.codebook[:1], vectors).min() < 0.5


def test_vq_ema_moves_codes_toward_their_vectors() -> None:
    model = DVAEModel(tiny_dvae_config("vq", codebook_size=4, kmeans_init=False, dead_code_threshold=0.0, ema_decay=0.5))
    quantizer = model.quantizer.train()
    target = torch.full((1, 16, 2, 2), 3.0)
    before = torch.cdist(quantizer.codebook, target[0, :, 0, 0][None]).min().item()
    for _ in range(20):
        quantizer(target)
    after = torch.cdist(quantizer.codebook, target[0, :, 0, 0][None]).min().item()
    assert after < 0.1 * before


@pytest.mark.parametrize("quantizer", ["gumbel", "vq", "fsq"])
def test_save_and_load_give_identical_outputs(quantizer: str, tmp_path, digit_pixels: torch.Tensor) -> None:
    model = DVAEModel(tiny_dvae_config(quantizer))
    model(digit_pixels)  # a training-mode pass: the VQ codebook gets its k-means init and EMA update
    model.eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, DVAEModel)
    codes = model.encode(digit_pixels)
    assert torch.equal(loaded.encode(digit_pixels), codes)
    assert torch.equal(loaded.decode(codes), model.decode(codes))


def test_loading_incomplete_or_mismatched_directories_fails_clearly(tmp_path, digit_pixels) -> None:
    model = DVAEModel(tiny_dvae_config("vq"))
    good = tmp_path / "good"
    model.save_pretrained(good)

    missing_weights = tmp_path / "missing_weights"
    shutil.copytree(good, missing_weights)
    (missing_weights / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        DVAEModel.from_pretrained(missing_weights)

    missing_config = tmp_path / "missing_config"
    shutil.copytree(good, missing_config)
    (missing_config / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        DVAEModel.from_pretrained(missing_config)

    mismatched = tmp_path / "mismatched"
    shutil.copytree(good, mismatched)
    config = json.loads((mismatched / "config.json").read_text())
    config["hidden_channels"] = 32
    (mismatched / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not match the shapes"):
        DVAEModel.from_pretrained(mismatched)

    missing_codebook = tmp_path / "missing_codebook"
    shutil.copytree(good, missing_codebook)
    weights = load_file(missing_codebook / "model.safetensors")
    del weights["quantizer.codebook"]
    save_file(weights, missing_codebook / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="does not match DVAEModel: missing_keys.*quantizer.codebook"):
        DVAEModel.from_pretrained(missing_codebook)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"downsample_factor": 3}, "power of two"),
        ({"image_size": 18, "downsample_factor": 4}, "multiple of downsample_factor"),
        ({"downsample_factor": 8}, "channel_multipliers needs"),
        ({"patch_size": 3}, "patch_size must be a power of two"),
        ({"downsample_factor": 4, "patch_size": 8}, "no larger than downsample_factor 4"),
        ({"downsample_factor": 8, "patch_size": 2, "channel_multipliers": [1, 2, 2, 4]}, r"log2\(downsample_factor / patch"),
        ({"quantizer": "kmeans"}, "gumbel"),
        ({"codebook_size": "many"}, "codebook_size"),
    ],
)
def test_config_rejects_bad_values(overrides: dict, message: str) -> None:
    with pytest.raises(Exception, match=message):
        DVAEConfig(**overrides)


def test_decode_rejects_out_of_range_codes() -> None:
    model = DVAEModel(tiny_dvae_config("gumbel")).eval()
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 64\)"):
        model.decode(torch.full((1, 8, 8), 64))
    with pytest.raises(ValueError, match="pixel_values must have shape"):
        model.encode(torch.zeros(1, 3, 32, 32))


def test_vq_with_a_low_dimensional_lookup_trains_under_bf16_autocast() -> None:
    """The 256px recipe's quantizer (a projected, l2-normalised lookup) updates its EMA codebook in float32 under
    bf16 autocast, which `mixed_precision: auto` picks on CPUs with bf16 matmul and on GPUs."""
    model = DVAEModel(tiny_dvae_config("vq", codebook_dim=8, use_l2_norm=True)).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(torch.rand(4, 3, 16, 16) * 2 - 1)
    output.loss.backward()
    assert model.quantizer.codebook.dtype == torch.float32 and torch.isfinite(model.quantizer.codebook).all()


@pytest.mark.parametrize("dead_code_threshold", [1.0, 0.25])
def test_a_dead_code_threshold_above_half_the_uses_per_step_restarts_codes_in_use(dead_code_threshold: float) -> None:
    """The 64 px recipe's numbers: 8 images x 64 positions per step for 1,024 codes (half a use per code and step).
    Every code sits on one of 1,024 equally frequent clusters; at threshold 1.0 the restarts pile codes onto the
    clusters of the current batch (the warning says so), at 0.25 (the recipe's) every cluster keeps its code."""
    config = DVAEConfig(quantizer="vq", image_size=64, downsample_factor=8, patch_size=4, channel_multipliers=[1, 2],
                        codebook_size=1024, embedding_dim=8, dead_code_threshold=dead_code_threshold)
    warning = dead_code_warning(config, images_per_step=8)
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(1024, 8, generator=generator) * 10
    quantizer = VectorQuantizer(1024, 8, dead_code_threshold=dead_code_threshold, kmeans_init=False).train()
    quantizer.codebook.copy_(centres)
    quantizer.ema_embedding_sum.copy_(centres)
    for _ in range(100):
        vectors = centres[torch.randint(0, 1024, (512,), generator=generator)]
        quantizer(rearrange(vectors, "(b h w) d -> b d h w", b=8, h=8, w=8))
    clusters_kept = int((torch.cdist(centres, quantizer.codebook).min(dim=1).values < 0.5).sum())  # clusters 40 apart
    if dead_code_threshold == 1.0:
        assert clusters_kept < 700
        assert warning and "model.dead_code_threshold 1" in warning and "set it to 0.125" in warning
    else:
        assert clusters_kept == 1024
        assert warning is None
