"""Benchmark speculative Jacobi decoding against sequential decoding of the prior's codes.

    python bench/speculative.py [--model /work/demo/pipeline] [--batches 1 4 8] [--windows 16]
                                [--precisions no auto] [--guidance-scale 3] [--repeats 5] [--compiled]
                                [--threads N]

For a saved pipeline (`dallekit demo` writes one; `--model random` takes the demo's shapes with random weights,
whose flat distributions flatter speculative decoding), times `prior.generate` at each batch size (rows of
digit captions), with guidance, eagerly (`compile=False`) in fp32 (`no`) and in the default precision (`auto`:
bf16 on CPUs with native bf16): sequential decoding, then jacobi for each window, interleaved, medians of
`--repeats` calls (each call its own seed). With `--compiled`, also the compiled sequential step
(`compile=True`, what `compile="auto"` switches to after 10 s; it compiles in an untimed first round).
Prints one JSON object per (batch, precision) after one describing the run (CPU named): images/s of each, the
speed-up of jacobi over eager sequential, its decoder calls per call (sequential: one per code), codes per call
and accepted drafts per image, averaged over the calls. `generate(decoding="auto")` is set from these figures.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics

import torch
from demo import demo_pipeline
from timing import machine, median_seconds

from dallekit.text_tokenizer import encode_captions
from pipelines import TextToImagePipeline
from stage2_prior import PriorModel
from stage2_prior.speculative import DecodingStats

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def measure(prior: PriorModel, text_ids: torch.Tensor, precision: str, windows: list[int], guidance_scale: float,
            repeats: int, compiled: bool) -> dict:
    """Images/s of sequential and jacobi decoding of `text_ids` (and of the compiled sequential step if
    `compiled`), interleaved, and what jacobi's calls took."""
    seeds, batch = itertools.count(), len(text_ids)
    stats: dict[str, list[DecodingStats]] = {}

    def sample(name: str, decoding: str, window: int = 16, compile: bool = False) -> None:
        prior.generate(text_ids, guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(next(seeds)),
                       mixed_precision=precision, compile=compile, decoding=decoding, jacobi_window=window)
        stats.setdefault(name, []).append(prior.last_decoding_stats)

    calls = {"sequential": lambda: sample("sequential", "sequential")}
    if compiled:  # the untimed first round compiles
        calls["sequential_compiled"] = lambda: sample("sequential_compiled", "sequential", compile=True)
    calls |= {f"jacobi_{window}": lambda window=window: sample(f"jacobi_{window}", "jacobi", window)
              for window in windows}
    seconds = median_seconds(calls, repeats)
    figures: dict = {"sequential_images_per_s": round(batch / seconds["sequential"], 2),
                     "sequential_forward_passes": stats["sequential"][-1].forward_passes}
    if compiled:
        figures["sequential_compiled_images_per_s"] = round(batch / seconds["sequential_compiled"], 2)
    for name in [name for name in calls if name.startswith("jacobi")]:
        figures |= {f"{name}_images_per_s": round(batch / seconds[name], 2),
                    f"{name}_speedup": round(seconds["sequential"] / seconds[name], 2),
                    f"{name}_forward_passes": round(statistics.mean(s.forward_passes for s in stats[name]), 1),
                    f"{name}_codes_per_pass": round(statistics.mean(s.codes_per_pass for s in stats[name]), 2),
                    f"{name}_accepted_drafts_per_image": round(statistics.mean(s.accepted_drafts
                                                                               for s in stats[name]), 1)}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="/work/demo/pipeline", help="a saved pipeline, or 'random'")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--windows", type=int, nargs="+", default=[16])
    parser.add_argument("--precisions", nargs="+", default=["no", "auto"], choices=["no", "auto", "bf16"])
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compiled", action="store_true", help="also time the compiled sequential step")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = demo_pipeline(torch.device("cpu")) if args.model == "random" else TextToImagePipeline.from_pretrained(
        args.model)
    prior, config = pipe.prior.eval(), pipe.prior.config
    print(json.dumps({"machine": machine(), "model": args.model, "image_codes": config.image_seq_len,
                      "image_vocab_size": config.image_vocab_size, "layers": config.num_hidden_layers,
                      "hidden_size": config.hidden_size, "guidance_scale": args.guidance_scale,
                      "repeats": args.repeats}), flush=True)
    for batch, precision in itertools.product(args.batches, args.precisions):
        prompts = [f"a handwritten digit {DIGITS[row % 10]}" for row in range(batch)]
        text_ids = encode_captions(pipe.tokenizer, prompts, config.text_len).to(prior.device)
        figures = measure(prior, text_ids, precision, args.windows, args.guidance_scale, args.repeats,
                          args.compiled)
        print(json.dumps({"batch": batch, "precision": precision, **figures}), flush=True)


if __name__ == "__main__":
    main()
