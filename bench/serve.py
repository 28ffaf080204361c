"""Serving under load: `dallekit serve` against 1, 4 and 16 concurrent clients, batched and unbatched (JSON).

    python bench/serve.py --model outputs/demo/pipeline [--clients 1 4 16] [--seconds 30] [--threads 1]

Each configuration starts its own `dallekit serve` process on a free port; this process is the load
generator (asyncio + httpx, as real clients are: another process), whose clients each send
requests of `--images` images (OpenAI's endpoint, a random seed each) back to back for `--seconds`.
"Unbatched" is the same server with `--max-batch-images` equal to one request's images, so each
request is drawn alone; "batched" gathers up to `--max-batch-images` (64). Reported per
configuration: p50/p95 latency, images/s, errors, and the server's batch sizes (`/health`).
The sampling step runs eagerly (`--no-compile`) unless `--compile`: a compiled server traces a graph
per batch size, which a short run would count in its latencies.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import httpx
from huggingface_hub import ModelCard

from pipelines.model_card import read_training_info

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import machine  # noqa: E402 (bench/ is not a package)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def server(model: str, max_batch_images: int, threads: int | None, compile: bool, extra: list[str]):
    """A `dallekit serve` process; yields its URL once /health answers."""
    port = free_port()
    command = [shutil.which("dallekit") or "dallekit", "serve", "--model", model, "--port", str(port),
               "--max-batch-images", str(max_batch_images), "--max-queue", "256",
               "--compile" if compile else "--no-compile", *(["--threads", str(threads)] if threads else []), *extra]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env=os.environ | {"HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited: {process.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start within 180 s")
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2).close()
                break
            except OSError:
                time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


async def load(url: str, clients: int, seconds: float, images: int, prompts: list[str]) -> dict:
    """`clients` clients sending requests back to back for `seconds`: latencies, images/s and errors."""
    latencies: list[float] = []
    errors: list[str] = []
    stop = time.monotonic() + seconds

    async def client(session: httpx.AsyncClient) -> None:
        while time.monotonic() < stop:
            body = {"prompt": random.choice(prompts), "n": images, "seed": random.randrange(2**32)}
            start = time.perf_counter()
            try:
                response = await session.post(f"{url}/v1/images/generations", json=body, timeout=600)
                ok = response.status_code == 200 and len(response.json()["data"]) == images
                (latencies if ok else errors).append(time.perf_counter() - start if ok else response.text[:200])
            except httpx.HTTPError as error:
                errors.append(f"{type(error).__name__}: {error}")

    started = time.perf_counter()
    async with httpx.AsyncClient() as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    wall = time.perf_counter() - started
    latencies.sort()
    return {
        "clients": clients, "requests": len(latencies), "errors": len(errors), "first_errors": errors[:3],
        "images_per_s": round(len(latencies) * images / wall, 2),
        "p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "p95_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 3) if latencies else None,
    }


def health(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
        return json.loads(response.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="outputs/demo/pipeline")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=30.0, help="load per configuration, after a warm-up")
    parser.add_argument("--images", type=int, default=4, help="images per request")
    parser.add_argument("--threads", type=int, default=None, help="the server's torch threads (default: torch's)")
    parser.add_argument("--compile", action="store_true", help="let the server compile its sampling step")
    parser.add_argument("--modes", nargs="+", default=["unbatched", "batched"],
                        choices=["unbatched", "batched"])
    parser.add_argument("--server-args", nargs=argparse.REMAINDER, default=[],
                        help="more `dallekit serve` arguments (last)")
    args = parser.parse_args()
    card = Path(args.model) / "README.md"
    info = read_training_info(ModelCard.load(card)) if card.is_file() else {}
    prompts = info.get("example_prompts") or ["a handwritten digit seven", "the number 3"]
    results = {"machine": machine() | {"server_threads": args.threads}, "model": args.model, "images": args.images,
               "seconds": args.seconds, "compile": args.compile, "server_args": args.server_args, "runs": []}
    for mode in args.modes:
        max_batch = args.images if mode == "unbatched" else 64
        with server(args.model, max_batch, args.threads, args.compile, args.server_args) as url:
            asyncio.run(load(url, 2, 5.0, args.images, prompts))  # warm-up: first calls, caches
            for clients in args.clients:
                before = health(url)["batch_sizes"]
                run = asyncio.run(load(url, clients, args.seconds, args.images, prompts))
                after = health(url)["batch_sizes"]
                sizes = {size: count - before.get(size, 0) for size, count in after.items() if count > before.get(size, 0)}
                results["runs"].append({"mode": mode, **run, "batch_sizes": sizes})
                print(json.dumps(results["runs"][-1]), file=sys.stderr, flush=True)
    by = {(run["mode"], run["clients"]): run for run in results["runs"]}
    if ("batched", 16) in by and ("unbatched", 16) in by and ("batched", 1) in by:
        lone = by[("batched", 1)]["p50_s"]
        results["goals"] = {
            "throughput_16_vs_unbatched": round(by[("batched", 16)]["images_per_s"]
                                                / by[("unbatched", 16)]["images_per_s"], 2),
            "p95_16_over_lone_p50": round(by[("batched", 16)]["p95_s"] / lone, 2) if lone else None,
            "errors_16": by[("batched", 16)]["errors"],
        }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
