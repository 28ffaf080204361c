"""Request batching for `dallekit serve`: concurrent text-to-image requests drawn in one pipeline call.

`RequestBatcher(pipe)` owns the pipeline on one worker thread. `submit(GenerationRequest)` queues a
request and returns a `concurrent.futures.Future` of its `GenerationResult`; the worker takes the
oldest request, gathers the queued requests that share its sampling settings (images per request,
candidates, guidance, temperature, top-k) up to `max_batch_images` sampled sequences, waiting at
most `max_wait_seconds` for more to arrive, and draws them all in one `pipe(...)` call with one
generator per request. The pipeline keeps a prompt's candidates in the same prior calls whatever
prompts surround it, so each request gets the images it would get alone with its seed. `run(fn)`
queues any other work on the pipeline (the page's edits), which runs alone, in turn.

The queue is bounded: a request that finds `max_queue` requests waiting gets `ServerBusy` at once,
which the page and the OpenAI endpoint answer as "busy, retry" (HTTP 503). A request whose client
went away is cancelled while it still waits (`Future.cancel()`), and skipped.

A queue of our own, not Gradio's `batch=True`: the page and the OpenAI endpoint share its batches
(Gradio batches only its own events), it batches by sampled images rather than by requests, each
request keeps its own seed inside a batch, and a full queue is answered at once.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import unicodedata
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Literal

import torch
from PIL import Image

from pipelines.text_to_image import TextToImagePipeline
from stage2_prior.modeling_prior import DEFAULT_GUIDANCE_PLAUSIBILITY

logger = logging.getLogger(__name__)


MAX_IMAGES_PER_REQUEST = 16
MAX_CANDIDATES_PER_REQUEST = 64
MAX_PROMPT_CHARACTERS = 1000  # as OpenAI's images API for DALL·E 2; the model reads far fewer tokens anyway
MAX_SEED = 2**32 - 1


class ServerBusy(RuntimeError):
    """The request queue is full: retry in a moment."""


class RequestError(ValueError):
    """A request's setting that cannot be served; `field` names it (a `GenerationRequest` field)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def checked_text(text: str, what: str) -> str:
    """`text` with its line breaks and tabs as spaces, or a `RequestError` (`what` names the field) for text that is
    too long or holds other control characters."""
    if len(text) > MAX_PROMPT_CHARACTERS:
        raise RequestError(what, f"the {what} is {len(text):,} characters long, more than the "
                                 f"{MAX_PROMPT_CHARACTERS:,} this server reads: shorten it")
    text = " ".join(text.replace("\t", " ").splitlines())
    control = sorted({f"U+{ord(char):04X}" for char in text if unicodedata.category(char) == "Cc"})
    if control:
        raise RequestError(what, f"the {what} holds control characters ({', '.join(control[:5])}): remove them")
    return text


@dataclass(frozen=True)
class GenerationRequest:
    """One user's text-to-image request, with the page's and the OpenAI endpoint's settings."""

    prompt: str
    num_images: int = 1
    seed: int = 0
    guidance_scale: float = 3.0
    negative_prompt: str | None = None
    guidance_plausibility: float = DEFAULT_GUIDANCE_PLAUSIBILITY
    temperature: float = 1.0
    top_k: int | None = None
    num_candidates: int | None = None

    def __post_init__(self) -> None:
        """Check every setting against the server's limits: a `RequestError` naming the first that is off."""
        object.__setattr__(self, "prompt", checked_text(self.prompt, "prompt").strip())
        if not self.prompt:
            raise RequestError("prompt", "the prompt is empty: say what to draw")
        if self.negative_prompt is not None:
            object.__setattr__(self, "negative_prompt", checked_text(self.negative_prompt, "negative prompt").strip())
        if not 1 <= self.num_images <= MAX_IMAGES_PER_REQUEST:
            raise RequestError("num_images", f"the number of images must be from 1 to {MAX_IMAGES_PER_REQUEST} per "
                                             f"request, got {self.num_images}")
        if self.num_candidates is not None and not self.num_images <= self.num_candidates <= MAX_CANDIDATES_PER_REQUEST:
            raise RequestError("num_candidates", f"the number of candidates must be from the number of images "
                                                 f"({self.num_images}) to {MAX_CANDIDATES_PER_REQUEST}, got "
                                                 f"{self.num_candidates}")
        if not 0 <= self.seed <= MAX_SEED:
            raise RequestError("seed", f"the seed must be a whole number from 0 to {MAX_SEED}, got {self.seed}")
        if not (math.isfinite(self.guidance_scale) and self.guidance_scale >= 0):
            raise RequestError("guidance_scale", f"the guidance scale must be a number >= 0 (1: no guidance, 3: the "
                                                 f"usual), got {self.guidance_scale}")
        if not 0 <= self.guidance_plausibility < 1:
            raise RequestError("guidance_plausibility", "the guidance plausibility must be a number in [0, 1) (0: "
                                                        "plain guidance, 0.1: the usual), got "
                                                        f"{self.guidance_plausibility}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise RequestError("temperature", f"the temperature must be a number > 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise RequestError("top_k", f"top-k must be at least 1 (or left out: all codes), got {self.top_k}")

    @property
    def sequences(self) -> int:
        """How many image-code sequences the prior samples for it."""
        return self.num_candidates or self.num_images

    def batch_key(self) -> tuple:
        """The settings that requests drawn in one pipeline call share."""
        return (self.num_images, self.sequences, self.guidance_scale, self.guidance_plausibility, self.temperature,
                self.top_k)


@dataclass
class GenerationResult:
    """A request's images (best first when reranked), their scores (None without a scorer), and its batch."""

    images: list[Image.Image]
    scores: list[float] | None
    batch_requests: int  # requests drawn in the same pipeline call, this one included
    seconds: float  # the pipeline call's time


@dataclass
class _Job:
    future: Future
    request: GenerationRequest | None = None  # a generation to batch
    work: Callable[[], Any] | None = None  # or work that runs alone

    @property
    def sequences(self) -> int:
        return self.request.sequences if self.request is not None else 0


class RequestBatcher:
    """A bounded queue in front of a pipeline, drawing concurrent requests in batches (see the module docstring)."""

    def __init__(self, pipe: TextToImagePipeline, max_batch_images: int = 64, max_wait_seconds: float = 0.01,
                 max_queue: int = 64, compile: bool | Literal["auto"] = "auto",
                 decoding: Literal["sequential", "jacobi", "auto"] = "auto") -> None:
        if max_batch_images < 1 or max_queue < 1 or max_wait_seconds < 0:
            raise ValueError(f"need max_batch_images >= 1, max_queue >= 1 and max_wait_seconds >= 0, got "
                             f"{max_batch_images}, {max_queue} and {max_wait_seconds}")
        self.pipe, self.compile, self.decoding = pipe, compile, decoding
        self.max_batch_images, self.max_wait_seconds, self.max_queue = max_batch_images, max_wait_seconds, max_queue
        self._pending: deque[_Job] = deque()
        self._changed = threading.Condition()
        self._closed = False
        self.batch_sizes: Counter[int] = Counter()  # requests per pipeline call -> calls
        self.busy_answers = self.cancelled = self.failed = 0
        self._worker = threading.Thread(target=self._serve, name="dallekit-batcher", daemon=True)
        self._worker.start()

    def submit(self, request: GenerationRequest) -> Future:
        """Queue `request`; a Future of its `GenerationResult`. Raises `ServerBusy` when the queue is full."""
        return self._queue(_Job(Future(), request=request))

    def run(self, work: Callable[[], Any]) -> Future:
        """Queue `work` (a call that uses the pipeline), run alone in turn; a Future of its result."""
        return self._queue(_Job(Future(), work=work))

    def _queue(self, job: _Job) -> Future:
        with self._changed:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            if len(self._pending) >= self.max_queue:
                self.busy_answers += 1
                raise ServerBusy(f"the server is busy: {len(self._pending)} requests are waiting, the most it "
                                 "queues; retry in a few seconds")
            self._pending.append(job)
            self._changed.notify_all()
        return job.future

    @property
    def queued(self) -> int:
        """Requests waiting, not counting those cancelled meanwhile."""
        return sum(not job.future.cancelled() for job in list(self._pending))

    def stats(self) -> dict[str, Any]:
        """What the health endpoint reports: the queue, and how requests were batched so far."""
        batches = sum(self.batch_sizes.values())
        return {
            "queued": self.queued, "max_queue": self.max_queue, "max_batch_images": self.max_batch_images,
            "batches": batches, "requests": sum(size * count for size, count in self.batch_sizes.items()),
            "largest_batch": max(self.batch_sizes, default=0),
            "batch_sizes": {str(size): count for size, count in sorted(self.batch_sizes.items())},
            "busy_answers": self.busy_answers, "cancelled": self.cancelled, "failed": self.failed,
        }

    def close(self) -> None:
        """Stop the worker once the job in hand is done; the jobs still queued are cancelled."""
        with self._changed:
            self._closed = True
            for job in self._pending:
                job.future.cancel()
            self._pending.clear()
            self._changed.notify_all()
        self._worker.join(timeout=60)

    # ---- the worker ---------------------------------------------------------------------------

    def _next_jobs(self) -> list[_Job] | None:
        """The next batch: the oldest job, plus the queued requests that can share its pipeline call (waiting up
        to `max_wait_seconds` for them); None once closed."""
        with self._changed:
            while not self._pending and not self._closed:
                self._changed.wait()
            if self._closed:
                return None
            first = self._pending.popleft()
            if first.request is None:
                return [first]
            batch, sequences = [first], first.sequences
            deadline = time.monotonic() + self.max_wait_seconds
            while True:
                for job in list(self._pending):
                    fits = sequences + job.sequences <= self.max_batch_images
                    if job.request is not None and job.request.batch_key() == first.request.batch_key() and fits:
                        self._pending.remove(job)
                        batch.append(job)
                        sequences += job.sequences
                left = deadline - time.monotonic()
                if sequences >= self.max_batch_images or left <= 0:
                    return batch
                self._changed.wait(left)

    def _serve(self) -> None:
        while (jobs := self._next_jobs()) is not None:
            started = [job for job in jobs if job.future.set_running_or_notify_cancel()]
            self.cancelled += len(jobs) - len(started)
            if not started:
                continue
            try:
                if started[0].work is not None:
                    started[0].future.set_result(started[0].work())
                else:
                    self._draw(started)
            except Exception as error:  # noqa: BLE001 (the request's caller reports it; the worker carries on)
                self.failed += len(started)
                for job in started:
                    if not job.future.done():
                        job.future.set_exception(error)

    def _draw(self, jobs: list[_Job]) -> None:
        """One pipeline call for `jobs`' requests (same settings), each with its own seeded generator."""
        requests = [job.request for job in jobs]
        first = requests[0]
        negatives = [request.negative_prompt or "" for request in requests]
        start = time.perf_counter()
        output = self.pipe(
            [request.prompt for request in requests], num_images_per_prompt=first.num_images,
            guidance_scale=first.guidance_scale, negative_prompt=negatives if any(negatives) else None,
            guidance_plausibility=first.guidance_plausibility, temperature=first.temperature, top_k=first.top_k,
            num_candidates=first.num_candidates,
            generator=[torch.Generator(device=self.pipe.device).manual_seed(request.seed) for request in requests],
            progress=False, compile=self.compile, decoding=self.decoding,
        )
        seconds = time.perf_counter() - start
        self.batch_sizes[len(jobs)] += 1
        logger.info("drew a batch of %d request(s), %d images, in %.2f s", len(jobs),
                    len(jobs) * first.num_images, seconds)
        for index, job in enumerate(jobs):
            images = slice(index * first.num_images, (index + 1) * first.num_images)
            scores = output.scores[images].tolist() if output.scores is not None else None
            job.future.set_result(GenerationResult(output.images[images], scores, len(jobs), seconds))
