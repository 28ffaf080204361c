"""The server of `dallekit serve`: the web page, the OpenAI-compatible images endpoint and a health endpoint on
one FastAPI app (which Gradio itself runs on), over one `RequestBatcher`.

| path | what |
| --- | --- |
| `/` | the Gradio page (`pipelines.web`), and its API (`/gradio_api/...`, Gradio's client) |
| `POST /v1/images/generations`, `GET /v1/models` | OpenAI's images API (`pipelines.openai_api`) |
| `GET /health` | `{"status": "ok", "model": ..., "queued": ..., "batches": ..., "batch_sizes": {...}, ...}` |

`serve(app, host, port)` runs it with uvicorn until interrupted.
"""

from __future__ import annotations

import socket
from contextlib import asynccontextmanager
from typing import Any, Literal

import gradio as gr
import uvicorn
from fastapi import FastAPI

from pipelines.batching import RequestBatcher
from pipelines.openai_api import images_router
from pipelines.text_to_image import TextToImagePipeline
from pipelines.web import build_app


def build_server(pipe: TextToImagePipeline, model_name: str = "dallekit", compile: bool | Literal["auto"] = "auto",
                 max_batch_images: int = 64, max_wait_seconds: float = 0.01, max_queue: int = 64,
                 decoding: Literal["sequential", "jacobi", "auto"] = "auto") -> FastAPI:
    """The app over `pipe`, served as `model_name` on the OpenAI endpoint; concurrent requests are drawn in
    batches of up to `max_batch_images` sampled sequences, waiting at most `max_wait_seconds` for a batch to fill,
    and at most `max_queue` requests wait (more get "busy, retry"); `decoding` is the prior's (`PriorModel.generate`)."""
    batcher = RequestBatcher(pipe, max_batch_images=max_batch_images, max_wait_seconds=max_wait_seconds,
                             max_queue=max_queue, compile=compile, decoding=decoding)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        batcher.close()

    app = FastAPI(title="dallekit", lifespan=lifespan)
    app.state.batcher = batcher

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, **batcher.stats()}

    app.include_router(images_router(batcher, model_name))
    return gr.mount_gradio_app(app, build_app(pipe, compile=compile, batcher=batcher), path="/")


def check_port_free(host: str, port: int) -> None:
    """Raise an OSError when `host:port` cannot be listened on (taken, or not an address of this machine)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Serve `app` with uvicorn until interrupted (Ctrl-C)."""
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
