"""The web page (`pipelines.web`, `dallekit serve`): Gradio's client against a running server (the Generate
and Edit tabs' endpoints), headless Chromium, the command line, and the app a Hub Space runs; all over a tiny
real pipeline."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from gradio_client.utils import Status
from PIL import Image
from selenium import webdriver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from pipelines import TextToImagePipeline
from pipelines.batching import RequestBatcher
from pipelines.cli import main
from pipelines.space import write_space
from pipelines.web import DISPLAY_SIZE, build_app, load_app
from tests.test_pipeline import tiny_pipeline, tiny_scorer

ROOT = Path(__file__).resolve().parents[1]
DALLEKIT = shutil.which("dallekit")
PROMPT = "a handwritten digit seven"
EXAMPLES = [PROMPT, "the number 3"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def pipe() -> TextToImagePipeline:
    pipe = tiny_pipeline()
    pipe.training_info = {"dataset": "digits", "example_prompts": EXAMPLES}
    return pipe


@contextmanager
def serving(app: gr.Blocks) -> Iterator[str]:
    """`app` served on a free port of 127.0.0.1 from this process; yields its URL."""
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()


def connect(url: str, downloads: Path) -> Client:
    return Client(url, verbose=False, analytics_enabled=False, download_files=downloads)


@pytest.fixture(scope="module")
def url(pipe: TextToImagePipeline) -> Iterator[str]:
    with serving(build_app(pipe)) as url:
        yield url


@pytest.fixture(scope="module")
def client(url: str, tmp_path_factory: pytest.TempPathFactory) -> Client:
    return connect(url, tmp_path_factory.mktemp("downloads"))


def generate(client: Client, prompt: str = PROMPT, **settings) -> tuple[list[np.ndarray], list[str], str]:
    """The page's generate endpoint: the gallery's images and captions, and the notes under it."""
    gallery, notes = client.predict(prompt=prompt, **settings, api_name="/generate")
    return [np.asarray(Image.open(item["image"])) for item in gallery], [item["caption"] for item in gallery], notes


def edit(client: Client, image: Path | None, layers: tuple[Path, ...] = (),
         **settings) -> tuple[list[np.ndarray], list[str], str]:
    """The page's edit endpoint on `image` with the editor's `layers` (what the brush painted), as Gradio's client
    sends an image editor's value: the gallery's images and captions, and the notes under it."""
    value = {"background": handle_file(image) if image else None, "layers": [handle_file(layer) for layer in layers],
             "composite": None}
    gallery, notes = client.predict(image=value, **settings, api_name="/edit")
    return [np.asarray(Image.open(item["image"])) for item in gallery], [item["caption"] for item in gallery], notes


def drawn_by(pipe: TextToImagePipeline, num_images: int, seed: int, prompt: str | None = PROMPT,
             **kwargs) -> list[np.ndarray]:
    """What the pipeline itself draws for `prompt` with the page's default settings, enlarged as the page shows it."""
    images = pipe(prompt, num_images_per_prompt=num_images, generator=torch.Generator().manual_seed(seed),
                  output_type="np", progress=False, **kwargs).images
    factor = DISPLAY_SIZE // images.shape[1]
    return list(images.repeat(factor, axis=1).repeat(factor, axis=2))


def test_a_prompt_gives_the_requested_images_and_its_seed_repeats_them(
    pipe: TextToImagePipeline, client: Client,
) -> None:
    images, captions, notes = generate(client, num_images=3, seed=7)
    assert len(images) == 3 and captions == [f"#{index} · {PROMPT}" for index in (1, 2, 3)]
    assert notes.startswith("3 images in") and "seed 7" in notes
    np.testing.assert_array_equal(np.stack(images), np.stack(drawn_by(pipe, 3, seed=7)))
    np.testing.assert_array_equal(np.stack(generate(client, num_images=3, seed=7)[0]), np.stack(images))
    assert not np.array_equal(np.stack(generate(client, num_images=3, seed=8)[0]), np.stack(images))


def test_a_compiled_page_draws_every_code_while_inductor_compiles(
    pipe: TextToImagePipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`serve --compile`: the first request compiles the sampling step from a cold inductor cache, whose
    compilation opens progress bars of its own under Gradio's tqdm tracking, and still draws every code
    (a loop that iterated its bar stopped after three codes): the page shows what the compiled pipeline draws."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    try:
        with serving(build_app(pipe, compile=True)) as url:
            client = connect(url, tmp_path / "downloads")
            first, _, notes = generate(client, num_images=2, seed=5)
            again, _, _ = generate(client, num_images=2, seed=5)
        expected = drawn_by(pipe, 2, seed=5, compile=True)
    finally:
        torch._dynamo.reset()
    assert notes.startswith("2 images in")
    np.testing.assert_array_equal(np.stack(first), np.stack(expected))
    np.testing.assert_array_equal(np.stack(again), np.stack(expected))


def test_a_negative_prompt_steers_the_images_as_the_pipeline_does(pipe: TextToImagePipeline, client: Client) -> None:
    images, _, notes = generate(client, negative_prompt="  the number 3 ", num_images=2, seed=6)
    assert notes.startswith("2 images in")
    np.testing.assert_array_equal(np.stack(images), np.stack(drawn_by(pipe, 2, seed=6, negative_prompt="the number 3")))
    assert not np.array_equal(np.stack(images), np.stack(drawn_by(pipe, 2, seed=6)))
    assert "negative_prompt has no effect at guidance_scale 1.0" in generate(
        client, negative_prompt="the number 3", guidance_scale=1, num_images=1)[2]


def random_image(path: Path, size: int, mode: str = "RGB", seed: int = 0) -> Path:
    """A noise image of `size` x `size` pixels in `mode`, saved as PNG at `path`."""
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, channels), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if mode == "L" else pixels, mode=mode).save(path)
    return path


def painted_layer(path: Path, size: int, rows: slice, columns: slice, alpha: int = 255) -> Path:
    """An editor layer of `size` x `size`, transparent but for a red stroke over `rows` x `columns` of opacity
    `alpha`; saved as PNG at `path`."""
    layer = np.zeros((size, size, 4), dtype=np.uint8)
    layer[rows, columns] = (204, 50, 50, alpha)
    Image.fromarray(layer).save(path)
    return path


def test_with_nothing_painted_the_edit_tab_redraws_a_share_of_the_image_by_strength(
    pipe: TextToImagePipeline, client: Client, tmp_path: Path,
) -> None:
    upload = random_image(tmp_path / "start.png", 16)
    blank = painted_layer(tmp_path / "blank.png", 16, slice(0), slice(0))
    images, captions, notes = edit(client, upload, (blank,), strength=0.25, num_images=2, seed=3)
    assert captions == ["#1", "#2"] and notes.startswith("2 images in")
    assert "seed 3, 25% of the code grid redrawn (its last rows)" in notes and "candidates" not in notes
    expected = drawn_by(pipe, 2, seed=3, prompt=None, image=Image.open(upload), strength=0.25)
    np.testing.assert_array_equal(np.stack(images), np.stack(expected))
    random_cells, _, notes = edit(client, upload, prompt=PROMPT, strength=0.25, variation="random", num_images=2,
                                  num_candidates=2, seed=3)
    assert "25% of the code grid redrawn (at random)" in notes
    np.testing.assert_array_equal(np.stack(random_cells), np.stack(drawn_by(
        pipe, 2, seed=3, image=Image.open(upload), strength=0.25, variation="random")))


@pytest.mark.parametrize(("mode", "size"), [("L", 32), ("RGBA", 16)])
def test_the_edit_tab_repaints_the_region_painted_over_the_image(
    pipe: TextToImagePipeline, client: Client, tmp_path: Path, mode: str, size: int,
) -> None:
    """A grey image larger than the model draws (resized, and the notes say so) or an RGBA one; the brush's faint
    edge counts: every pixel of a layer that is not wholly transparent is repainted. A painted mask leaves the
    strength unused (0 is no error then)."""
    upload = random_image(tmp_path / "start.png", size, mode)
    rows, columns = slice(size // 4, size // 2), slice(size // 8, size - size // 8)
    stroke = painted_layer(tmp_path / "stroke.png", size, rows, columns, alpha=100)
    edge = painted_layer(tmp_path / "edge.png", size, slice(size // 2, size // 2 + 1), columns, alpha=1)
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[rows.start:rows.stop + 1, columns] = 255
    images, captions, notes = edit(client, upload, (stroke, edge), prompt=PROMPT, num_images=2, num_candidates=2,
                                   seed=4, strength=0)
    assert captions == [f"#1 · {PROMPT}", f"#2 · {PROMPT}"]
    assert "seed 4, the painted region repainted)" in notes
    assert ("Note: image is 32x32 and the model draws 16x16: resized to 16x16." in notes) == (size == 32)
    expected = drawn_by(pipe, 2, seed=4, image=Image.open(upload), mask_image=Image.fromarray(mask))
    np.testing.assert_array_equal(np.stack(images), np.stack(expected))
    ranked, _, notes = edit(client, upload, (stroke, edge), prompt=PROMPT, num_images=2, num_candidates=6,
                            paste_back=True, seed=4)
    assert "the best of 6 candidates by their fit to the kept image, the original pasted back outside it" in notes
    np.testing.assert_array_equal(np.stack(ranked), np.stack(drawn_by(
        pipe, 2, seed=4, image=Image.open(upload), mask_image=Image.fromarray(mask), num_candidates=6,
        paste_back=True)))


@pytest.mark.parametrize(
    ("layer_size", "settings", "message"),
    [
        (8, {}, "mask_image is 8x8 but the image is 16x16: give a mask of the image's size"),
        (None, {"strength": 0}, "Nothing to redraw: paint over the region to repaint with the brush, or raise"),
        (None, {"strength": 1.5}, "Strength: Value 1.5 is greater than maximum value 1"),
        (None, {"variation": "columns"}, "Strength redraws: Value: 'columns'"),
        (None, {"seed": None}, "The seed is empty"),
        (None, {"image": None}, "Upload an image to edit first"),
        (None, {"image": ROOT / "pyproject.toml"}, "Image to edit: the upload is not an image that can be read"),
    ],
)
def test_bad_input_to_the_edit_tab_gets_a_message_and_the_server_carries_on(
    client: Client, tmp_path: Path, layer_size: int | None, settings: dict, message: str,
) -> None:
    upload = random_image(tmp_path / "start.png", 16)
    layers = (painted_layer(tmp_path / "stroke.png", layer_size, slice(2, 4), slice(2, 4)),) if layer_size else ()
    with pytest.raises(AppError, match=re.escape(message)):
        edit(client, **{"image": upload, "layers": layers} | settings)
    assert len(edit(client, upload, num_images=1)[0]) == 1


def test_a_prompt_longer_than_the_model_reads_is_cut_and_the_page_says_so(client: Client) -> None:
    images, _, notes = generate(client, prompt=f"{PROMPT} drawn with a thick pen on a sheet of paper", num_images=1)
    assert len(images) == 1
    assert re.search(r"longer than this model reads, so its end was cut: .* is \d+ tokens, \d+ dropped", notes)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"prompt": "   "}, "Type a prompt first"),
        ({"num_images": 99}, "Number of images: Value 99 is greater than maximum value 16"),
        ({"guidance_scale": -1}, "Guidance scale: Value -1 is less than minimum value 0"),
        ({"guidance_plausibility": 0.9}, "Guidance plausibility: Value 0.9 is greater than maximum value 0.5"),
        ({"top_k": 1000}, "Top-k: Value 1000 is greater than maximum value 64"),
        ({"temperature": 0}, "Temperature: Value 0 is less than minimum value 0.1"),
        ({"seed": -1}, "Seed: Value -1 is less than minimum value 0"),
        ({"seed": None}, "The seed is empty"),
    ],
)
def test_bad_input_gets_a_message_and_the_server_carries_on(client: Client, settings: dict, message: str) -> None:
    with pytest.raises(AppError, match=re.escape(message)):
        generate(client, **settings)
    assert len(generate(client, num_images=1)[0]) == 1


class HeldPipeline(TextToImagePipeline):
    """A pipeline that samples only once `release` is set: a slow request, on demand."""

    def __init__(self, pipe: TextToImagePipeline) -> None:
        super().__init__(pipe.vqvae, pipe.prior, pipe.tokenizer, pipe.training_info)
        self.release = threading.Event()

    def __call__(self, *args, **kwargs):
        assert self.release.wait(timeout=60)
        return super().__call__(*args, **kwargs)


def wait_for(condition, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_slow_request_shows_progress_and_blocks_neither_the_page_nor_the_queue(
    pipe: TextToImagePipeline, tmp_path: Path,
) -> None:
    held = HeldPipeline(pipe)
    batcher = RequestBatcher(held)
    with serving(build_app(held, batcher=batcher)) as url:
        client = connect(url, tmp_path)
        first = client.submit(prompt=PROMPT, num_images=1, api_name="/generate")
        try:
            wait_for(lambda: first.status().code == Status.PROGRESS, "the first request to show its progress")
            assert first.status().progress_data[0].desc == "sampling image codes"
            second = client.submit(prompt=PROMPT, num_images=2, api_name="/generate")
            start = time.monotonic()
            with urllib.request.urlopen(url, timeout=10) as response:
                assert response.status == 200 and "dallekit: text to image" in response.read().decode()
            assert time.monotonic() - start < 5
            wait_for(lambda: batcher.queued == 1, "the second request to wait in the batcher's queue")
            assert not first.done()
        finally:
            held.release.set()
        assert len(first.result(timeout=60)[0]) == 1 and len(second.result(timeout=60)[0]) == 2


def test_with_a_scorer_the_page_reranks_candidates_and_shows_their_scores(
    pipe: TextToImagePipeline, tmp_path: Path,
) -> None:
    def parameters(app: gr.Blocks, endpoint: str = "/generate") -> list[str]:
        return [parameter["parameter_name"] for parameter in app.get_api_info()["named_endpoints"][endpoint]["parameters"]]

    plain = build_app(pipe)
    assert "num_candidates" not in parameters(plain) and parameters(plain, "/edit")[-1] == "num_candidates"
    scoring = TextToImagePipeline(pipe.vqvae, pipe.prior, pipe.tokenizer, pipe.training_info,
                                  scorer=tiny_scorer(pipe.tokenizer))
    app = build_app(scoring)
    assert parameters(app)[-1] == "num_candidates"
    with serving(app) as url:
        client = connect(url, tmp_path)
        images, captions, notes = generate(client, num_images=2, seed=3, num_candidates=6)
        with pytest.raises(AppError, match=re.escape("candidates must be from the number of images (2) to 64, got 1")):
            generate(client, num_images=2, num_candidates=1)
    expected = scoring(PROMPT, num_images_per_prompt=2, num_candidates=6, generator=torch.Generator().manual_seed(3),
                       progress=False)
    np.testing.assert_array_equal(np.stack(images), np.stack(drawn_by(scoring, 2, seed=3, num_candidates=6)))
    assert captions == [f"#{index + 1} · score {score:.3f} · {PROMPT}" for index, score in enumerate(expected.scores)]
    assert "the best of 6 candidates by the scorer" in notes


def test_a_model_that_cannot_be_loaded_is_explained_in_the_page(pipe: TextToImagePipeline, tmp_path: Path) -> None:
    pipe.save_pretrained(tmp_path)
    (tmp_path / "model_index.json").write_text("{oops")
    with serving(load_app(tmp_path)) as url, urllib.request.urlopen(f"{url}config", timeout=10) as response:
        page = json.dumps(json.load(response))
    assert f"{tmp_path / 'model_index.json'}: not a valid JSON file" in page


# ---- in a browser -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.skip("headless Chromium is not installed: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=chromedriver))
    yield driver
    driver.quit()


def shown_images(page: webdriver.Chrome, gallery: str) -> list:
    """The images of the gallery `gallery` (its elem_id) loaded at the size the page shows them."""
    images = page.find_elements(By.CSS_SELECTOR, f"#{gallery} img")
    return [image for image in images if image.get_property("naturalWidth") == DISPLAY_SIZE]


def test_in_a_browser_a_typed_prompt_fills_the_gallery(browser: webdriver.Chrome, url: str) -> None:
    browser.get(url)
    wait = WebDriverWait(browser, 30)
    prompt = wait.until(lambda page: page.find_element(By.CSS_SELECTOR, "#prompt textarea"))
    assert all(example in browser.find_element(By.TAG_NAME, "body").text for example in EXAMPLES)
    prompt.send_keys(PROMPT)
    browser.find_element(By.ID, "generate").click()

    wait.until(lambda page: len(shown_images(page, "gallery")) == 4)
    assert browser.find_element(By.ID, "notes").text.startswith("4 images in")


def test_in_a_browser_a_region_painted_over_an_upload_is_repainted(
    browser: webdriver.Chrome, url: str, tmp_path: Path,
) -> None:
    """The Edit tab: upload an image larger than the model draws, paint a stroke over it with the brush (a drag
    over the editor's canvas), press Edit: the gallery shows the repainted images, the notes what was done."""
    browser.get(url)
    wait = WebDriverWait(browser, 30)
    tab = wait.until(lambda page: next((button for button in page.find_elements(By.CSS_SELECTOR, "button[role=tab]")
                                        if button.text == "Edit"), None))
    tab.click()
    editor = browser.find_element(By.ID, "editor")
    editor.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(random_image(tmp_path / "start.png", 128)))
    wait.until(lambda page: editor.find_elements(By.CSS_SELECTOR, "button[title=Color]"))  # the upload is shown,
    canvas = editor.find_elements(By.CSS_SELECTOR, "canvas")[-1]  # the brush taken up; the image centred in it
    ActionChains(browser).move_to_element_with_offset(canvas, -60, -40).click_and_hold().move_by_offset(120, 0) \
        .release().perform()
    browser.find_element(By.ID, "edit").click()
    wait.until(lambda page: len(shown_images(page, "edit-gallery")) == 4)
    notes = browser.find_element(By.ID, "edit-notes").text
    assert notes.startswith("4 images in") and "the painted region repainted" in notes, notes
    assert "image is 128x128 and the model draws 16x16: resized to 16x16" in notes


# ---- the command line and the Space ---------------------------------------------------------------

def serve_error(capsys: pytest.CaptureFixture, *args: str) -> str:
    """The error `dallekit serve ARGS` stops with (run in this process): exit status 2, one line, no traceback."""
    with pytest.raises(SystemExit) as stopped:
        main(["serve", *args])
    stderr = capsys.readouterr().err
    assert stopped.value.code == 2 and "Traceback" not in stderr, stderr
    return stderr.splitlines()[-1]


def test_serve_names_the_broken_file_of_a_model_it_cannot_load(
    pipe: TextToImagePipeline, tmp_path: Path, capsys: pytest.CaptureFixture,
) -> None:
    model = pipe.save_pretrained(tmp_path / "model")
    (model / "prior" / "config.json").write_text('{"hidden_size": 32,')
    error = serve_error(capsys, "--model", str(model), "--port", str(free_port()))
    assert error.startswith(f"dallekit serve: error: cannot load a pipeline from '{model}': ")
    assert f"{model / 'prior' / 'config.json'}: not a valid JSON file" in error


def test_serve_on_a_port_in_use_says_so(
    pipe: TextToImagePipeline, tmp_path: Path, capsys: pytest.CaptureFixture,
) -> None:
    model = pipe.save_pretrained(tmp_path / "model")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        error = serve_error(capsys, "--model", str(model), "--port", str(port))
    assert f"cannot serve on 127.0.0.1:{port} (" in error and error.endswith("choose another --port or --host")


def test_serve_without_gradio_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
) -> None:
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` fails, as without the web extra
    for module in ("pipelines.web", "pipelines.server"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    error = serve_error(capsys, "--model", "./anything")
    assert error == ('dallekit serve: error: the web page needs Gradio, which is not installed: '
                     'pip install -e ".[web]" (from the dallekit checkout)')


@contextmanager
def server_process(command: list[str], port: int, **popen) -> Iterator[str]:
    """A server started by `command`; yields its URL once it answers, and stops it."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, f"the server exited: {process.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "the server did not answer within 120 s"
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)


@pytest.mark.skipif(DALLEKIT is None, reason="the dallekit entry point is not installed (pip install -e .)")
def test_dallekit_serve_serves_the_page_of_a_saved_model(pipe: TextToImagePipeline, tmp_path: Path) -> None:
    model = pipe.save_pretrained(tmp_path / "model")
    port = free_port()
    command = [DALLEKIT, "serve", "--model", str(model), "--port", str(port)]
    with server_process(command, port, env=os.environ | {"HF_HUB_OFFLINE": "1"}) as url:
        images, captions, _ = generate(connect(url, tmp_path), num_images=2, seed=4)
    assert len(images) == 2 and captions[0] == f"#1 · {PROMPT}"


def test_the_space_app_serves_the_model_from_the_hub(pipe: TextToImagePipeline, tmp_path: Path) -> None:
    """`write_space`'s app.py, run as a Space runs it, loads the model by its id (from an offline Hub cache)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-dallekit"
    pipe.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    space = write_space(tmp_path / "space", "someone/tiny-dallekit")
    port = free_port()
    env = os.environ | {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "GRADIO_SERVER_PORT": str(port),
                        "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_ANALYTICS_ENABLED": "False"}
    with server_process([sys.executable, "app.py"], port, cwd=space, env=env) as url:
        images = generate(connect(url, tmp_path), num_images=2, seed=5)[0]
    np.testing.assert_array_equal(np.stack(images), np.stack(drawn_by(pipe, 2, seed=5)))
