"""An OpenAI-compatible images endpoint for `dallekit serve`: `POST /v1/images/generations` (FastAPI).

Clients of OpenAI's images API (its `openai` Python client, `client.images.generate(...)`) talk to a
dallekit server as they would to OpenAI's:
- the body: `prompt`, `model` (the served model's name, or left out), `n` (1 to 10), `size` (the
  model's own, e.g. "64x64", or left out), `response_format` (`b64_json`, the default: this server
  keeps no files, so `url` is refused), `user` (accepted, unused); and dallekit's own extras:
  `seed`, `guidance_scale`, `guidance_plausibility`, `negative_prompt`, `num_candidates`, `temperature`,
  `top_k`;
- the answer: `{"created": unix time, "data": [{"b64_json": PNG in base64}, ...]}`;
- an error: `{"error": {"message", "type", "param", "code"}}` with status 400 (a bad body or
  setting), 404 (another model), 415 (not JSON), 503 (the queue is full: retry; OpenAI's client
  retries it by itself) or 500.

Requests go through the server's `RequestBatcher`, with the page's: concurrent requests share a
pipeline call. A request whose client hangs up while it waits is cancelled. `GET /v1/models` lists
the served model.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import secrets
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import ClientDisconnect

from pipelines.batching import (
    MAX_CANDIDATES_PER_REQUEST,
    MAX_SEED,
    GenerationRequest,
    RequestBatcher,
    RequestError,
    ServerBusy,
)
from stage2_prior.modeling_prior import DEFAULT_GUIDANCE_PLAUSIBILITY

logger = logging.getLogger(__name__)
MAX_N = 10  # as OpenAI's API
DISCONNECT_POLL_SECONDS = 0.25
API_NAMES = {"num_images": "n"}  # a GenerationRequest field -> the body's parameter


class ImageGenerationBody(BaseModel):
    """The body of `POST /v1/images/generations`: OpenAI's parameters, then dallekit's."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    size: str | None = None
    response_format: str = "b64_json"
    user: str | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="default: a random seed")
    guidance_scale: float = Field(3.0, ge=0, allow_inf_nan=False)
    negative_prompt: str | None = None
    guidance_plausibility: float = Field(DEFAULT_GUIDANCE_PLAUSIBILITY, ge=0, lt=1, allow_inf_nan=False)
    num_candidates: int | None = Field(None, ge=1, le=MAX_CANDIDATES_PER_REQUEST)
    temperature: float = Field(1.0, gt=0, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=1)


class APIError(Exception):
    """An error answered in OpenAI's format."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def response(self) -> JSONResponse:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status, headers=self.headers)


async def _json_body(request: Request) -> dict[str, Any]:
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise APIError(415, f"the body must be JSON, sent with Content-Type: application/json (got "
                            f"{content_type or 'no Content-Type'!r})", code="unsupported_media_type")
    try:
        raw = await request.body()
    except ClientDisconnect:
        raise APIError(499, "the client closed the connection before its body arrived", code="client_closed") from None
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise APIError(400, f"the body is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the body must be a JSON object, got a {type(body).__name__}", code="invalid_json")
    return body


def _validated(body: dict[str, Any]) -> ImageGenerationBody:
    try:
        return ImageGenerationBody.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        message = ("unrecognized request argument supplied: " + str(param) if first["type"] == "extra_forbidden"
                   else f"{param}: {first['msg']}")
        raise APIError(400, message, param=param, code="invalid_value") from None


def _png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def images_router(batcher: RequestBatcher, model_name: str) -> APIRouter:
    """The OpenAI-compatible routes over `batcher`'s pipeline, served under the name `model_name`."""
    router = APIRouter()
    size = batcher.pipe.vqvae.config.image_size
    model_size = f"{size}x{size}"

    @router.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "dallekit"}]}

    @router.post("/v1/images/generations")
    async def generations(request: Request) -> JSONResponse:
        try:
            body = _validated(await _json_body(request))
            if body.model not in (None, model_name):
                raise APIError(404, f"the model {body.model!r} is not served here: this server serves "
                                    f"{model_name!r} (or leave model out)", param="model", code="model_not_found")
            if body.size not in (None, "auto", model_size):
                raise APIError(400, f"size {body.size!r} is not this model's: it draws {model_size} images only",
                               param="size", code="invalid_size")
            if body.response_format != "b64_json":
                raise APIError(400, f"response_format {body.response_format!r} is not supported: this server keeps "
                                    "no files to link to, so images come as response_format 'b64_json'",
                               param="response_format", code="invalid_value")
            try:
                wanted = GenerationRequest(
                    prompt=body.prompt, num_images=body.n, seed=body.seed if body.seed is not None else
                    secrets.randbelow(MAX_SEED + 1), guidance_scale=body.guidance_scale,
                    negative_prompt=body.negative_prompt, guidance_plausibility=body.guidance_plausibility,
                    temperature=body.temperature, top_k=body.top_k,
                    num_candidates=body.num_candidates,
                )
            except RequestError as error:
                raise APIError(400, str(error), param=API_NAMES.get(error.field, error.field),
                               code="invalid_value") from None
            if (wanted.num_candidates or 0) > wanted.num_images and batcher.pipe.scorer is None:
                raise APIError(400, "num_candidates > n needs a scorer to rank the candidates, and this model has "
                                    "none: leave num_candidates out", param="num_candidates", code="invalid_value")
            result = await _result(request, batcher, wanted)
        except APIError as error:
            return error.response()
        data = [{"b64_json": _png_base64(image)} for image in result.images]
        return JSONResponse({"created": int(time.time()), "data": data})

    return router


async def _result(request: Request, batcher: RequestBatcher, wanted: GenerationRequest):
    """`wanted` drawn by the batcher; cancelled if the client hangs up while it waits."""
    try:
        future = batcher.submit(wanted)
    except ServerBusy as error:
        raise APIError(503, str(error), code="server_busy", type="server_error", headers={"Retry-After": "2"}) from None
    waiting = asyncio.wrap_future(future)
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_SECONDS)
        if done:
            break
        if await request.is_disconnected():
            future.cancel()  # a request still queued is skipped; one being drawn finishes for its batch
            logger.info("a client hung up while its request waited: %s", "cancelled" if future.cancelled() else
                        "already being drawn")
            raise APIError(499, "the client closed the connection", code="client_closed")
    try:
        return waiting.result()
    except ValueError as error:  # the pipeline's own check of a value
        raise APIError(400, str(error), code="invalid_value") from None
    except Exception as error:
        logger.exception("a request failed")
        raise APIError(500, f"the server failed to draw the images: {type(error).__name__}: {error}",
                       type="server_error", code="internal_error") from None
