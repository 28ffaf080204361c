"""The server of `dallekit serve` (`pipelines.server`): request batching, the OpenAI-compatible images endpoint
(official `openai` client and raw HTTP), the health endpoint and bad input, against a real uvicorn server on a
free port over a tiny real pipeline."""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from email.message import Message
from pathlib import Path

import numpy as np
import pytest
import torch
import uvicorn
from fastapi import FastAPI
from openai import OpenAI
from PIL import Image

from pipelines import TextToImagePipeline
from pipelines.batching import RequestBatcher
from pipelines.server import build_server
from tests.test_pipeline import tiny_pipeline
from tests.test_serve import connect, free_port, generate, wait_for

PROMPTS = ["a handwritten digit seven", "the number 3", "a digit one", "the number nine"]


@pytest.fixture(scope="module")
def pipe() -> TextToImagePipeline:
    return tiny_pipeline()


@contextmanager
def running(app: FastAPI) -> Iterator[str]:
    """`app` served by uvicorn on a free port of 127.0.0.1, in a thread of this process; yields its URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def app(pipe: TextToImagePipeline) -> FastAPI:
    return build_server(pipe, model_name="tiny", max_queue=8)


@pytest.fixture(scope="module")
def url(app: FastAPI) -> Iterator[str]:
    with running(app) as url:
        yield url


def post(url: str, body: dict | bytes, content_type: str = "application/json") -> tuple[int, dict, Message]:
    """POST `body` to the images endpoint: the status, the JSON answer and the headers."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/v1/images/generations", data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), error.headers


def decoded(answer: dict) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))) for item in answer["data"]])


def health(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
        return json.loads(response.read())


@contextmanager
def held(batcher: RequestBatcher) -> Iterator[threading.Event]:
    """The batcher's worker kept busy until the yielded event is set (on leaving at the latest), so that requests
    sent meanwhile wait in its queue together."""
    release, started = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        release.wait(timeout=60)

    batcher.run(hold)
    assert started.wait(timeout=30), "the worker did not take the holding job"  # it no longer counts as queued
    try:
        yield release
    finally:
        release.set()


def test_concurrent_requests_are_drawn_in_one_batch_and_each_gets_its_own_images(
    pipe: TextToImagePipeline, app: FastAPI, url: str,
) -> None:
    batcher: RequestBatcher = app.state.batcher
    before = health(url)
    answers: dict[int, tuple] = {}
    clients = [threading.Thread(target=lambda i=i: answers.__setitem__(
        i, post(url, {"prompt": PROMPTS[i], "n": 3, "seed": 10 + i}))) for i in range(len(PROMPTS))]
    with held(batcher):
        for client in clients:
            client.start()
        wait_for(lambda: batcher.queued == len(PROMPTS), "the requests to queue up")
    for client in clients:
        client.join(timeout=60)
    after = health(url)
    assert after["batches"] == before["batches"] + 1 and after["requests"] == before["requests"] + len(PROMPTS)
    assert after["batch_sizes"][str(len(PROMPTS))] == before["batch_sizes"].get(str(len(PROMPTS)), 0) + 1
    for index, prompt in enumerate(PROMPTS):
        status, answer, _ = answers[index]
        assert status == 200 and isinstance(answer["created"], int)
        alone = pipe(prompt, num_images_per_prompt=3, generator=torch.Generator().manual_seed(10 + index),
                     output_type="np", progress=False).images
        np.testing.assert_array_equal(decoded(answer), alone)  # the request's own images, as drawn alone
    assert len({decoded(answers[index][1]).tobytes() for index in answers}) == len(PROMPTS)


def test_requests_with_other_settings_wait_for_a_batch_of_their_own(app: FastAPI, url: str) -> None:
    batcher: RequestBatcher = app.state.batcher
    before = health(url)
    bodies = [{"prompt": PROMPTS[0], "n": 1}, {"prompt": PROMPTS[1], "n": 2}, {"prompt": PROMPTS[2], "n": 1}]
    answers: dict[int, tuple] = {}
    clients = [threading.Thread(target=lambda i=i: answers.__setitem__(i, post(url, bodies[i]))) for i in range(3)]
    with held(batcher):
        for client in clients:
            client.start()
        wait_for(lambda: batcher.queued == 3, "the requests to queue up")
    for client in clients:
        client.join(timeout=60)
    after = health(url)
    assert [len(answers[index][1]["data"]) for index in range(3)] == [1, 2, 1]
    assert after["batches"] == before["batches"] + 2  # the two single images together, the pair alone
    assert after["batch_sizes"]["2"] == before["batch_sizes"].get("2", 0) + 1


def test_the_openai_client_gets_n_decodable_pngs(url: str) -> None:
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    assert [model.id for model in client.models.list()] == ["tiny"]
    response = client.images.generate(prompt=PROMPTS[0], n=3, model="tiny", size="16x16", response_format="b64_json")
    images = [Image.open(io.BytesIO(base64.b64decode(item.b64_json))) for item in response.data]
    assert len(images) == 3 and {(image.format, image.size, image.mode) for image in images} == {("PNG", (16, 16), "RGB")}
    again = client.images.generate(prompt=PROMPTS[0], n=3, extra_body={"seed": 5, "guidance_scale": 1.0})
    same = client.images.generate(prompt=PROMPTS[0], n=3, extra_body={"seed": 5, "guidance_scale": 1.0})
    assert [item.b64_json for item in again.data] == [item.b64_json for item in same.data]


BAD_BODIES = [
    ({"prompt": ""}, 400, "prompt", "the prompt is empty"),
    ({"prompt": " \n "}, 400, "prompt", "the prompt is empty"),
    ({"prompt": "7" * 10_000}, 400, "prompt", "10,000 characters long, more than the 1,000 this server reads"),
    ({"prompt": "seven\x00\x1b"}, 400, "prompt", "control characters (U+0000, U+001B)"),
    ({}, 400, "prompt", "prompt: Field required"),
    ({"prompt": 7}, 400, "prompt", "prompt: Input should be a valid string"),
    ({"prompt": "seven", "n": 0}, 400, "n", "n: Input should be greater than or equal to 1"),
    ({"prompt": "seven", "n": -1}, 400, "n", "n: Input should be greater than or equal to 1"),
    ({"prompt": "seven", "n": 10**6}, 400, "n", "n: Input should be less than or equal to 10"),
    ({"prompt": "seven", "guidance_scale": -1}, 400, "guidance_scale", "greater than or equal to 0"),
    ({"prompt": "seven", "guidance_plausibility": 1}, 400, "guidance_plausibility", "less than 1"),
    ({"prompt": "seven", "num_candidates": 8}, 400, "num_candidates", "needs a scorer"),
    ({"prompt": "seven", "n": 4, "num_candidates": 2}, 400, "num_candidates", "from the number of images (4) to 64"),
    ({"prompt": "seven", "size": "1024x1024"}, 400, "size", "it draws 16x16 images only"),
    ({"prompt": "seven", "response_format": "url"}, 400, "response_format", "images come as response_format 'b64_json'"),
    ({"prompt": "seven", "model": "dall-e-3"}, 404, "model", "this server serves 'tiny'"),
    ({"prompt": "seven", "style": "vivid"}, 400, "style", "unrecognized request argument supplied: style"),
]


@pytest.mark.parametrize(("body", "status", "param", "message"), BAD_BODIES)
def test_a_bad_request_gets_an_openai_error_and_the_server_carries_on(
    url: str, body: dict, status: int, param: str, message: str,
) -> None:
    answered, answer, _ = post(url, body)
    assert answered == status and set(answer) == {"error"}, answer
    assert answer["error"]["param"] == param and message in answer["error"]["message"], answer
    assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["code"]
    assert post(url, {"prompt": PROMPTS[0]})[0] == 200


@pytest.mark.parametrize(
    ("body", "content_type", "status", "message"),
    [
        (b'{"prompt": "seven", "guidance_scale": NaN}', "application/json", 400, "guidance_scale: Input should be a finite"),
        (b'{"prompt": "seven", "guidance_scale": Infinity}', "application/json", 400, "finite number"),
        (b'{"prompt": "sev', "application/json", 400, "the body is not valid JSON"),
        (b'["seven"]', "application/json", 400, "the body must be a JSON object, got a list"),
        (b"\xff\xfe", "application/json", 400, "the body is not valid JSON"),
        (b"prompt=seven", "application/x-www-form-urlencoded", 415, "sent with Content-Type: application/json"),
        (b'{"prompt": "seven"}', "text/plain", 415, "(got 'text/plain')"),
    ],
)
def test_a_body_that_is_not_json_gets_a_clear_error(
    url: str, body: bytes, content_type: str, status: int, message: str,
) -> None:
    answered, answer, _ = post(url, body, content_type)
    assert answered == status and message in answer["error"]["message"], answer
    assert post(url, {"prompt": PROMPTS[0]})[0] == 200


def test_emoji_in_a_prompt_are_drawn(url: str) -> None:
    status, answer, _ = post(url, {"prompt": "🎅🏽 seven ✨", "n": 2})
    assert status == 200 and decoded(answer).shape == (2, 16, 16, 3)


def test_a_client_that_hangs_up_is_cancelled_and_the_server_carries_on(app: FastAPI, url: str) -> None:
    batcher: RequestBatcher = app.state.batcher
    port = int(url.rsplit(":", 1)[1])
    body = json.dumps({"prompt": PROMPTS[0], "n": 2}).encode()
    head = (f"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port)) as half:  # hangs up half-way through its body
        half.sendall(head + body[: len(body) // 2])
    cancelled = batcher.cancelled
    with held(batcher):
        with socket.create_connection(("127.0.0.1", port)) as waiting:  # hangs up while its request is queued
            waiting.sendall(head + body)
            wait_for(lambda: batcher.queued == 1, "the request to queue up")
        wait_for(lambda: batcher.queued == 0, "the server to cancel the request", timeout=10)
    wait_for(lambda: batcher.cancelled == cancelled + 1, "the hung-up request to be skipped")
    assert post(url, {"prompt": PROMPTS[0], "n": 2})[0] == 200


def test_a_full_queue_answers_busy_retry_and_serves_the_queued(pipe: TextToImagePipeline, tmp_path: Path) -> None:
    app = build_server(pipe, model_name="tiny", max_queue=1)
    batcher: RequestBatcher = app.state.batcher
    with running(app) as url:
        queued: dict[str, tuple] = {}
        with held(batcher):
            client = threading.Thread(target=lambda: queued.setdefault("answer", post(url, {"prompt": PROMPTS[1]})))
            client.start()
            wait_for(lambda: batcher.queued == 1, "the first request to queue up")
            status, answer, headers = post(url, {"prompt": PROMPTS[0]})
            assert status == 503 and headers["Retry-After"] == "2"
            assert answer["error"]["type"] == "server_error" and answer["error"]["code"] == "server_busy"
            assert "the server is busy: 1 requests are waiting" in answer["error"]["message"]
            with pytest.raises(Exception, match="busy"):  # the page says so too
                generate(connect(url + "/", tmp_path), num_images=1)
        client.join(timeout=60)
        assert queued["answer"][0] == 200 and health(url)["busy_answers"] == 2
        assert post(url, {"prompt": PROMPTS[0]})[0] == 200


def test_the_page_and_the_health_endpoint_are_served_beside_the_api(url: str, tmp_path: Path) -> None:
    assert health(url)["status"] == "ok" and health(url)["model"] == "tiny"
    images, _, notes = generate(connect(url + "/", tmp_path), num_images=2, seed=3)
    assert len(images) == 2 and notes.startswith("2 images in")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"prompt": "7" * 10_000}, "The prompt is 10,000 characters long"),
        ({"prompt": "seven\x07"}, "The prompt holds control characters (U+0007)"),
        ({"negative_prompt": "x\x00"}, "The negative prompt holds control characters (U+0000)"),
    ],
)
def test_the_page_answers_the_same_bad_input(url: str, tmp_path: Path, settings: dict, message: str) -> None:
    client = connect(url + "/", tmp_path)
    with pytest.raises(Exception, match=re.escape(message)):
        generate(client, **settings)
    assert len(generate(client, num_images=1)[0]) == 1
