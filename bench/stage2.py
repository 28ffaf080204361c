"""Benchmark the stage-2 prior: training throughput against the machine's matmul peak, sampling speed.

    python bench/stage2.py [--config configs/prior/digits.yaml] [--train_steps 30] [--device cuda]
                           [--batch_size 64] [--compile config|yes|no] [--vocabularies 2048 1024]
                           [--measurements pipeline sampling train] [--pipeline_batches 8 100] [--reference]

Prints one JSON object per measurement, each naming the CPU (`lscpu`) and the machine's load:
- `pipeline`: `TextToImagePipeline` calls from prompts to decoded PIL images on the demo's shapes
  (`configs/dvae/demo.yaml`, `configs/prior/demo.yaml`, random weights: the same cost as trained
  ones), one prior call of `batch_size` sequences, unguided and at guidance 3. The default call
  (`compile="auto"`) is first repeated until the prior compiles its sampling step for the setting
  (the seconds that took, and the compiling call's); then, interleaved, medians of `--repeats`:
  images/s of the default call (now compiled), of the eager call (`compile=False`: what a setting
  draws in its first 10 s), of `vqvae.decode` alone (and its share of the call), and of the prior's
  `generate` alone by default and eager in fp32. With `--reference`, also dalle-pytorch 1.6.6's
  sampling with its KV cache at the same size, decoding included (`bench/reference.py`, which says
  how to install it), and the speedup of both pipeline figures over it. Target (issue 12): >= 3x the
  reference at batch 8 and 100.
- `sampling`: images/s with and without the KV cache and with guidance, for the config's grid
  (digits: 64 image tokens) and for a 16x16 grid (256 image tokens); targets: cache >= 5x faster
  than no cache at 256 tokens, guidance <= 2.2x the unguided time.
- `train`: tokens/s of the prior's training step (as the loop runs it: the config's dropout and
  `training.compile`, each position's logits over its own vocabulary) and its achieved FLOP/s as a share
  of the matmul peak measured in the same run (same dtype and device): the fastest of square matmuls
  (1024 to 4096 on CPU) and of the prior's own projections at the batch's positions, each reported;
  target >= 60% on CPU. Also the share a step made of nothing but its weight matmuls would reach (each
  projection's forward, input gradient and weight gradient, as autograd runs them): the bound on fusing everything
  else away. The emoji recipe's prior: `--config configs/prior/emoji_8x8.yaml --vocabularies 2048 1024`.
- peak RSS after each phase (and peak GPU memory on CUDA).

The device defaults to the accelerator when there is one; `auto` precision means bf16 there.
Sampling runs in `generate`'s default precision: bf16 autocast on CPUs with native bf16.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch._dynamo.utils import counters

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from demo import demo_pipeline, reference_sizes  # noqa: E402
from reference import reference_available, reference_sampler  # noqa: E402
from timing import machine, median_seconds, synchronize  # noqa: E402

from dallekit.data import DataConfig, load_text_image_dataset  # noqa: E402
from dallekit.text_tokenizer import encode_captions  # noqa: E402
from dallekit.training.accelerator import resolve_mixed_precision  # noqa: E402
from dallekit.training.config import TrainingConfig, load_config  # noqa: E402
from dallekit.training.optim import create_optimizer  # noqa: E402
from stage2_prior import PriorConfig, PriorModel  # noqa: E402
from stage2_prior.train import Stage2Config  # noqa: E402


def memory_figures(device: torch.device) -> dict:
    figures = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        figures["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return figures


def flop_rate(product: Callable[[], torch.Tensor], flops: float, device: torch.device, seconds: float = 1.0) -> float:
    """Measured FLOP/s of repeating `product` (`flops` each call) for about `seconds`."""
    product()
    synchronize(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        product()
        count += 1
        if count % 10 == 0:
            synchronize(device)
    synchronize(device)
    return flops * count / (time.perf_counter() - start)


def matmul_flops(shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device) -> float:
    """Measured FLOP/s of `[m, k] @ [k, n]` matmuls (`shape` = (m, k, n)) in `dtype` on `device`."""
    m, k, n = shape
    a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
    return flop_rate(lambda: a @ b, 2 * m * k * n, device)


def matmul_peak(config: PriorConfig, tokens: int, dtype: torch.dtype, device: torch.device) -> dict[str, float]:
    """FLOP/s of square matmuls and of the prior's own projections (`tokens` rows: the training batch's positions),
    by shape `"m x k x n"`. The peak is the largest: on a 2-core AMX Xeon the model's thin matmuls ran 2.6x faster
    than 1024-square ones, so a square matmul alone understates what the machine does."""
    sizes = (1024, 2048, 4096) if device.type == "cpu" else (4096, 8192)
    hidden, intermediate = config.hidden_size, config.intermediate_size
    shapes = [(size, size, size) for size in sizes] + [
        (tokens, hidden, intermediate), (tokens, intermediate, hidden), (tokens, hidden, hidden)]
    return {" x ".join(map(str, shape)): matmul_flops(shape, dtype, device) for shape in shapes}


def matmul_only_step(config: PriorConfig, batch_size: int, dtype: torch.dtype, device: torch.device) -> float:
    """FLOP/s of a training step that ran nothing but its weight matmuls: every projection and both vocabulary heads at
    the batch's rows, each as the step runs it (forward `x @ W.T`, input gradient `g @ W`, weight gradient `g.T @ x`).
    Against the peak, this bounds what fusing or removing every other kernel could give."""
    tokens = batch_size * config.max_seq_len  # the decoder runs every position, as in `matmul_peak`
    hidden, intermediate = config.hidden_size, config.intermediate_size
    layers = config.num_hidden_layers
    kv = hidden // config.num_attention_heads * (config.num_key_value_heads or config.num_attention_heads)
    projections = {  # (rows, in, out): how many the step has
        (tokens, hidden, hidden): 2 * layers, (tokens, hidden, kv): 2 * layers,
        (tokens, hidden, intermediate): 2 * layers, (tokens, intermediate, hidden): layers,
        (batch_size * config.text_len, hidden, config.text_vocab_size): 1,
        (batch_size * config.image_seq_len, hidden, config.image_vocab_size): 1,
    }
    flops = seconds = 0.0
    for (rows, fan_in, fan_out), count in projections.items():
        x, weight = (torch.randn(rows, fan_in, dtype=dtype, device=device),
                     torch.randn(fan_out, fan_in, dtype=dtype, device=device))
        grad = torch.randn(rows, fan_out, dtype=dtype, device=device)
        for product in (lambda: x @ weight.t(), lambda: grad @ weight, lambda: grad.t() @ x):
            rate = flop_rate(product, 2 * rows * fan_in * fan_out, device, seconds=0.5)
            flops += count * 2 * rows * fan_in * fan_out
            seconds += count * 2 * rows * fan_in * fan_out / rate
    return flops / seconds


def training_flops_per_token(model: PriorModel) -> float:
    """PaLM's estimate (forward + backward): 6 N per token for the decoder's weights (embeddings excluded), 12 L d T
    for attention, and the output layer at what training computes: each position's logits over its own vocabulary
    (text positions over the text ids, image positions over the codes), not the joint one."""
    config = model.config
    decoder = sum(p.numel() for name, p in model.decoder.named_parameters() if "embed" not in name)
    head_rows = (config.text_len * config.text_vocab_size + config.image_seq_len * config.image_vocab_size)
    head = 6 * config.hidden_size * head_rows / (config.max_seq_len - 1)
    return 6 * decoder + head + 12 * config.num_hidden_layers * config.hidden_size * config.max_seq_len


def bench_training(
    config: PriorConfig, batch_size: int, steps: int, precision: str, compile: bool, device: torch.device
) -> dict:
    """Tokens/s of full training steps as the loop runs them (forward with each position's own vocabulary, the
    config's dropout, backward, AdamW), predicted tokens counted as the loop does; compilation is in the warm-up."""
    torch.manual_seed(0)
    model = PriorModel(config).to(device).train()
    optimizer = create_optimizer(model, TrainingConfig(learning_rate=1e-4))
    forward = torch.compile(model) if compile else model
    input_ids = model.build_input_ids(
        torch.randint(3, config.text_vocab_size, (batch_size, config.text_len)),
        torch.randint(0, config.image_vocab_size, (batch_size, config.image_grid_size, config.image_grid_size)),
    ).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    warmup = 10  # compilation, then the allocator's first steps
    for step in range(steps + warmup):
        if step == warmup:
            synchronize(device)
            start = time.perf_counter()
        with autocast:
            loss = forward(input_ids, return_logits=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    seconds = time.perf_counter() - start
    tokens_per_second = steps * batch_size * (input_ids.shape[1] - 1) / seconds
    achieved = tokens_per_second * training_flops_per_token(model)
    by_shape = matmul_peak(config, input_ids.numel(), torch.bfloat16 if precision == "bf16" else torch.float32,
                           device)
    peak = max(by_shape.values())
    matmuls_only = matmul_only_step(config, batch_size, torch.bfloat16 if precision == "bf16" else torch.float32,
                                    device)
    return {
        "benchmark": "stage2", "measurement": "train", "device": str(device), "precision": precision,
        "compiled": compile, "dropout": [config.embedding_dropout, config.residual_dropout],
        "vocabularies": [config.text_vocab_size, config.image_vocab_size],
        "attention": config.resolved_attention(), "batch_size": batch_size,
        "sequence_length": input_ids.shape[1], "parameters": sum(p.numel() for p in model.parameters()),
        "tokens_per_second": round(tokens_per_second), "achieved_gflops": round(achieved / 1e9, 1),
        "matmul_peak_gflops": round(peak / 1e9, 1), "share_of_matmul_peak": round(achieved / peak, 3),
        "matmul_gflops_by_shape": {shape: round(flops / 1e9, 1) for shape, flops in by_shape.items()},
        "matmul_only_step_gflops": round(matmuls_only / 1e9, 1),
        "matmul_only_step_share": round(matmuls_only / peak, 3),
        **memory_figures(device),
    }


def time_sampling(model: PriorModel, batch_size: int, **kwargs) -> float:
    device = model.device
    text = torch.randint(3, model.config.text_vocab_size, (batch_size, model.config.text_len), device=device)
    synchronize(device)
    start = time.perf_counter()
    model.generate(text, generator=torch.Generator(device).manual_seed(0), **kwargs)
    synchronize(device)
    return time.perf_counter() - start


def bench_sampling(config: PriorConfig, batch_size: int, device: torch.device) -> dict:
    model = PriorModel(config).to(device).eval()
    time_sampling(model, 2)  # warm-up
    cached = time_sampling(model, batch_size, use_cache=True)
    uncached = time_sampling(model, batch_size, use_cache=False)
    guided = time_sampling(model, batch_size, use_cache=True, guidance_scale=3.0)
    return {
        "benchmark": "stage2", "measurement": "sampling", "device": str(device), "image_tokens": config.image_seq_len,
        "batch_size": batch_size, "images_per_second_cache": round(batch_size / cached, 2),
        "images_per_second_no_cache": round(batch_size / uncached, 2),
        "images_per_second_guided": round(batch_size / guided, 2),
        "tokens_per_second_cache": round(batch_size * config.image_seq_len / cached),
        "cache_speedup": round(uncached / cached, 2), "guidance_cost": round(guided / cached, 2),
        **memory_figures(device),
    }


def warm_up_auto_compile(draw: Callable[[], object]) -> dict:
    """Call `draw` (a default pipeline call, `compile="auto"`) until the prior has compiled its sampling step for
    this setting; the seconds that took, calls included, and the compiling call's own seconds."""
    graphs = counters["stats"]["unique_graphs"]
    start, calls = time.perf_counter(), 0
    while counters["stats"]["unique_graphs"] == graphs:
        call_start = time.perf_counter()
        draw()
        calls += 1
        if calls > 10_000:
            raise RuntimeError("compile='auto' never compiled: is the step failing to compile (see the warnings)?")
    return {"auto_compile_after_seconds": round(call_start - start, 1), "auto_compile_eager_calls": calls - 1,
            "compiling_call_seconds": round(time.perf_counter() - call_start, 1)}


def bench_pipeline(batch_sizes: list[int], repeats: int, reference: bool, device: torch.device) -> list[dict]:
    """Prompt-to-image throughput of the demo-shaped pipeline (default path once `compile="auto"` has compiled,
    and eager), its decoder's share, the prior alone, and (with `reference`) dalle-pytorch's cached sampling of
    the same size, timed interleaved with them."""
    pipe = demo_pipeline(device)
    captions = load_text_image_dataset(DataConfig(source="digits", image_size=32))["validation"]["text"]
    results = []
    for batch_size, guidance_scale in itertools.product(batch_sizes, (1.0, 3.0)):
        prompts = [captions[i % len(captions)] for i in range(batch_size)]
        text_ids = encode_captions(pipe.tokenizer, prompts, pipe.prior.config.text_len).to(device)
        codes = pipe.prior.generate(text_ids, compile=False)

        def draw(compile: bool | str = "auto") -> object:
            return pipe(prompts, guidance_scale=guidance_scale, batch_size=batch_size, progress=False,
                        generator=torch.Generator().manual_seed(0), compile=compile)

        result = {"benchmark": "stage2", "measurement": "pipeline", "device": str(device), **machine(),
                  "batch_size": batch_size, "guidance_scale": guidance_scale}
        result |= warm_up_auto_compile(draw)
        calls = {
            "pipeline": draw,
            "pipeline_eager": lambda: draw(compile=False),
            "decode": lambda: pipe._decode(codes),  # in the pipeline's precision
            "generate": lambda: pipe.prior.generate(text_ids, guidance_scale=guidance_scale),
            "generate_eager_fp32": lambda: pipe.prior.generate(text_ids, guidance_scale=guidance_scale,
                                                               mixed_precision="no", compile=False),
        }
        if reference:
            calls["reference"] = reference_sampler(batch_size, guidance_scale, **reference_sizes(pipe), device=device)
        seconds = median_seconds(calls, repeats, device)
        result |= {f"images_per_second_{name}": round(batch_size / value, 1) for name, value in seconds.items()}
        result["decode_share"] = round(seconds["decode"] / seconds["pipeline"], 3)
        if reference:
            result["speedup_over_reference"] = {
                name: round(seconds["reference"] / seconds[name], 2) for name in ("pipeline", "pipeline_eager")
            }
        results.append(result | memory_figures(device))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "prior" / "digits.yaml"))
    parser.add_argument("--train_steps", type=int, default=30)
    parser.add_argument("--sample_batch", type=int, default=16)
    parser.add_argument("--device", default=None, help="default: the accelerator if there is one, else cpu")
    parser.add_argument("--measurements", nargs="+", choices=["pipeline", "sampling", "train"],
                        default=["pipeline", "sampling", "train"])
    parser.add_argument("--pipeline_batches", type=int, nargs="+", default=[8, 100])
    parser.add_argument("--repeats", type=int, default=5, help="timed pipeline calls per figure (median)")
    parser.add_argument("--batch_size", type=int, default=None, help="training batch (default: the config's)")
    parser.add_argument("--compile", choices=["config", "yes", "no"], default="config",
                        help="torch.compile the training step (default: the config's training.compile)")
    parser.add_argument("--vocabularies", type=int, nargs=2, default=None, metavar=("TEXT", "IMAGE"),
                        help="text and image vocabulary sizes (default: the digits demo's BPE and codebook, 331 128; "
                             "the emoji recipe's: 2048 1024)")
    parser.add_argument("--reference", action="store_true",
                        help="also time dalle-pytorch 1.6.6's cached sampling of the same size (bench/reference.py)")
    args = parser.parse_args()
    accelerator = torch.accelerator.current_accelerator()
    device = torch.device(args.device or (accelerator.type if accelerator is not None else "cpu"))
    run = load_config(Stage2Config, ["--config", args.config])
    config = run.model
    # what the BPE reaches on the digits captions, and the digits demo's codebook (set by training, not the config)
    config.text_vocab_size, config.image_vocab_size = args.vocabularies or (331, 128)
    config.image_grid_size = 8
    precision = resolve_mixed_precision(run.training.mixed_precision, use_cpu=device.type == "cpu")
    if "pipeline" in args.measurements:
        if args.reference and (reason := reference_available()) is not None:
            sys.exit(f"--reference: {reason}")
        for result in bench_pipeline(args.pipeline_batches, args.repeats, args.reference, device):
            print(json.dumps(result), flush=True)
    if "sampling" in args.measurements:
        for grid in (8, 16):
            sampling_config = PriorConfig(**{**config.to_diff_dict(), "image_grid_size": grid})
            print(json.dumps(bench_sampling(sampling_config, args.sample_batch, device) | machine()), flush=True)
    if "train" in args.measurements:
        training = run.training
        compile = training.compile if args.compile == "config" else args.compile == "yes"
        result = bench_training(config, args.batch_size or training.batch_size, args.train_steps, precision, compile,
                                device)
        print(json.dumps(result | machine()), flush=True)


if __name__ == "__main__":
    main()
