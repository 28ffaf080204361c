"""The reference sampler for bench/stage2.py: dalle-pytorch 1.6.6 (lucidrains) at the demo prior's size.

    pip install --no-deps dalle-pytorch==1.6.6 axial-positional-embedding==0.3.12 rotary-embedding-torch==0.9.1
    python bench/reference.py [--batches 8 100] [--guidance 1 3] [--repeats 5]

`reference_sampler` builds the reference's `DiscreteVAE` and `DALLE` (random weights: the same cost as
trained ones) and returns a call that draws images from fixed caption ids through its documented
`generate_images(text, use_cache=True, cond_scale=...)`, decoding included. Run as a script, it
prints the reference's images/s (median of `--repeats` calls after one warm-up) with its KV cache,
as shipped, without the cache, and its decoder alone.

Only those three packages are installed, without their dependencies: the rest of 1.6.6's imports
serve its pretrained VAEs (`requests`, `omegaconf`, `taming` and through it `pytorch_lightning`) and
a version lookup (`pkg_resources`, gone from setuptools >= 81), none of which this sampler touches;
`import_reference` puts stand-ins for the missing ones in `sys.modules` for the import alone.

Bugs of 1.6.6's `DALLE.forward_with_cond_scale`, fixed by default (`fix_cache=True`) by replacing that
method on the instance (the patched call draws the same random numbers and, with guidance, does the
same work):
- at `cond_scale == 1` it drops the cache: `use_cache=True` recomputes the whole sequence at every
  step, exactly as `use_cache=False` does (same cost, same samples);
- with guidance and the cache, the unconditional pass starts each step from a shallow copy of the
  conditional cache and throws its own away: from the second image token on it attends to the
  captioned keys and values, so guidance has almost no effect; and as the copy shares the token-shift
  queues (deques), that pass also shifts the conditional pass's queues a second time per step (the
  only difference left between the two passes' logits), altering the conditional samples too;
- with guidance, the unconditional pass zeroes the caption in place inside the sequence being
  sampled (`text *= ...` on a view of it): without the cache both passes then see no caption from
  the second image token on (unconditional images).
With the fix, cached and uncached sampling draw the same codes from the same seed, guided or not.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import os
import sys
import types
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from demo import demo_pipeline, reference_sizes  # noqa: E402
from timing import cpu_name, median_seconds  # noqa: E402

VERSION = "1.6.6"
INSTALL = ("pip install --no-deps dalle-pytorch==1.6.6 axial-positional-embedding==0.3.12 "
           "rotary-embedding-torch==0.9.1")
# The reference's VAE at its cheapest for the demo's shapes: no residual blocks, and the demo VQ-VAE's
# code width (64) and first hidden width (16); its depth is fixed by image_size / grid (2 layers at 32px, 8x8).
VAE_CODEBOOK_DIM, VAE_HIDDEN_DIM = 64, 16


class _Unavailable:
    """Stands in for a class of a package left out: fails if ever built."""

    def __init__(self, *args, **kwargs):
        raise ImportError(f"{type(self).__name__} needs a package left out of {INSTALL!r}")


def _stand_ins() -> dict[str, types.ModuleType]:
    """Modules that dalle_pytorch imports but this sampler never uses (pretrained VAEs, version lookups)."""
    def unavailable(name: str) -> type:
        return type(name, (_Unavailable,), {})

    def get_distribution(name: str) -> object:
        raise ImportError(f"pkg_resources is not installed (setuptools >= 81); cannot look up {name}")

    taming, models, vqgan = (types.ModuleType(name) for name in ("taming", "taming.models", "taming.models.vqgan"))
    taming.__path__, models.__path__ = [], []
    taming.models, models.vqgan = models, vqgan
    vqgan.VQModel, vqgan.GumbelVQ = unavailable("VQModel"), unavailable("GumbelVQ")
    omegaconf = types.ModuleType("omegaconf")
    omegaconf.OmegaConf = unavailable("OmegaConf")
    pkg_resources = types.ModuleType("pkg_resources")
    pkg_resources.get_distribution = get_distribution
    modules = [types.ModuleType("requests"), omegaconf, taming, models, vqgan, pkg_resources]
    return {module.__name__: module for module in modules}


def import_reference() -> types.ModuleType:
    """`import dalle_pytorch`, with stand-ins for the modules it imports that are not installed (removed again after)."""
    if "dalle_pytorch" in sys.modules:
        return sys.modules["dalle_pytorch"]
    added = {}
    for name, module in _stand_ins().items():
        root = name.split(".")[0]
        if root in added or (root not in sys.modules and importlib.util.find_spec(root) is None):
            added[name] = sys.modules[name] = module
    try:
        return importlib.import_module("dalle_pytorch")
    finally:
        for name in added:
            sys.modules.pop(name, None)


def reference_available() -> str | None:
    """None when dalle-pytorch 1.6.6 imports, else why not and how to install it, in one line."""
    try:
        from importlib.metadata import version
        installed = version("dalle-pytorch")
        if installed != VERSION:
            return f"dalle-pytorch {installed} is installed, the reference is {VERSION}: {INSTALL}"
        import_reference()
    except Exception as error:  # noqa: BLE001 - any failure to import means "not available", with its reason
        return f"dalle-pytorch {VERSION} does not import ({type(error).__name__}: {error}); install it with: {INSTALL}"
    return None


def _forward_with_cond_scale(self, text: torch.Tensor, image: torch.Tensor, *, cond_scale: float = 1.0,
                             cache: dict | None = None) -> torch.Tensor:
    """1.6.6's `DALLE.forward_with_cond_scale` with the cache kept at scale 1, and the unconditional pass given
    its own cache, kept across steps, and a copy of the caption (1.6.6 zeroes the one being sampled)."""
    if cond_scale == 1:
        return self(text, image, cache=cache)
    null_cache = None if cache is None else cache.setdefault("null_cond_cache", {})  # a key no layer reads
    logits = self(text, image, cache=cache)
    null_cond_logits = self(text.clone(), image, null_cond_prob=1.0, cache=null_cache)
    return null_cond_logits + (logits - null_cond_logits) * cond_scale


def reference_models(*, text_vocab_size: int, text_len: int, image_vocab_size: int, grid: int, image_size: int,
                     depth: int, dim: int, heads: int, dim_head: int, fix_cache: bool = True,
                     seed: int = 0) -> torch.nn.Module:
    """The reference's `DALLE` (dense causal attention, its default rotary embeddings and token shift) around
    its `DiscreteVAE`, seeded random weights, in eval mode, on the CPU."""
    dalle_pytorch = import_reference()
    num_layers = round(math.log2(image_size // grid))
    if image_size != grid * 2**num_layers:
        raise ValueError(f"DiscreteVAE halves the image {num_layers} times: {image_size}px cannot give a {grid}x{grid} grid")
    torch.manual_seed(seed)
    vae = dalle_pytorch.DiscreteVAE(image_size=image_size, num_tokens=image_vocab_size, codebook_dim=VAE_CODEBOOK_DIM,
                                    num_layers=num_layers, num_resnet_blocks=0, hidden_dim=VAE_HIDDEN_DIM)
    dalle = dalle_pytorch.DALLE(dim=dim, vae=vae, num_text_tokens=text_vocab_size, text_seq_len=text_len, depth=depth,
                                heads=heads, dim_head=dim_head, attn_types=("full",))
    if fix_cache:
        dalle.forward_with_cond_scale = types.MethodType(_forward_with_cond_scale, dalle)
    return dalle.eval()


def reference_sampler(batch_size: int, guidance_scale: float, *, text_vocab_size: int, text_len: int,
                      image_vocab_size: int, grid: int, image_size: int, depth: int, dim: int, heads: int,
                      dim_head: int, use_cache: bool = True, fix_cache: bool = True,
                      device: str | torch.device = "cpu") -> Callable[[], torch.Tensor]:
    """A call drawing `batch_size` images (decoded, `batch_size x 3 x image_size x image_size`) for fixed random
    caption ids through the reference's `generate_images(text, use_cache=..., cond_scale=guidance_scale)` (top-k
    filter_thres 0.5, temperature 1: its defaults). Each call draws the same images; the caller's RNG is untouched."""
    dalle = reference_models(text_vocab_size=text_vocab_size, text_len=text_len, image_vocab_size=image_vocab_size,
                             grid=grid, image_size=image_size, depth=depth, dim=dim, heads=heads, dim_head=dim_head,
                             fix_cache=fix_cache).to(device)
    text = torch.randint(1, text_vocab_size, (batch_size, text_len), generator=torch.Generator().manual_seed(0))
    text, device = text.to(device), torch.device(device)
    rng_devices = [] if device.type == "cpu" else [device.index or 0]

    def draw() -> torch.Tensor:
        with torch.random.fork_rng(rng_devices, device_type=device.type), torch.inference_mode():
            torch.manual_seed(0)
            return dalle.generate_images(text, use_cache=use_cache, cond_scale=guidance_scale)

    return draw


def reference_decoder(batch_size: int, *, image_vocab_size: int, grid: int, image_size: int,
                      device: str | torch.device = "cpu", **sizes) -> Callable[[], torch.Tensor]:
    """A call decoding `batch_size` fixed random `grid x grid` code maps with the reference sampler's `DiscreteVAE`."""
    vae = reference_models(image_vocab_size=image_vocab_size, grid=grid, image_size=image_size, **sizes).vae.to(device)
    codes = torch.randint(0, image_vocab_size, (batch_size, grid * grid), generator=torch.Generator().manual_seed(0))
    codes = codes.to(device)

    def decode() -> torch.Tensor:
        with torch.inference_mode():
            return vae.decode(codes)

    return decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 100])
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no_cache_repeats", type=int, default=None,
                        help="timed calls of the no-cache computation, without a warm-up (default: --repeats)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    reason = reference_available()
    if reason is not None:
        sys.exit(reason)
    torch.set_num_threads(args.threads)
    sizes = reference_sizes(demo_pipeline(torch.device("cpu")))
    print(f"dalle-pytorch {VERSION}, fp32, CPU {cpu_name()!r}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"sizes: {sizes}, DiscreteVAE codebook_dim {VAE_CODEBOOK_DIM}, hidden_dim {VAE_HIDDEN_DIM}")
    print(f"{'batch':>5} {'guidance':>8} | images/s: {'cache':>8} {'as shipped':>10} {'no cache':>8} {'decode':>8}"
          f" | decode share")
    for batch_size in args.batches:
        decode = median_seconds({"decode": reference_decoder(batch_size, **sizes)}, args.repeats)["decode"]
        for guidance in args.guidance:
            cached = reference_sampler(batch_size, guidance, **sizes)
            shipped = reference_sampler(batch_size, guidance, **sizes, fix_cache=False)
            no_cache = reference_sampler(batch_size, guidance, **sizes, use_cache=False)
            # As shipped, guidance 1 drops the cache: the no-cache computation, timed with it.
            fast = {"cache": cached} | ({"shipped": shipped} if guidance != 1 else {})
            slow = {"no_cache": no_cache} | ({"shipped": shipped} if guidance == 1 else {})
            seconds = median_seconds(fast, args.repeats)
            seconds |= median_seconds(slow, args.no_cache_repeats or args.repeats, warmup=False)
            rates = {name: batch_size / value for name, value in seconds.items()}
            print(f"{batch_size:>5} {guidance:>8g} | {'':>9} {rates['cache']:>8.1f} {rates['shipped']:>10.1f} "
                  f"{rates['no_cache']:>8.1f} {batch_size / decode:>8.0f} | {decode / seconds['cache']:.3f}", flush=True)


if __name__ == "__main__":
    main()
