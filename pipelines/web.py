"""The web page to try a text-to-image pipeline (Gradio): `dallekit serve`, and a Hub Space's `app.py`.

`build_app(pipe)` lays out one page over a pipeline loaded once: a prompt with the model's own
validation captions as examples, the sampling settings, a gallery of the results, and image
completion from the first rows of an uploaded image. Requests wait in Gradio's queue and sample
one at a time, each as one batched prior call; bad input is answered in the page. `load_app(model)`
is what a Space runs: the page for a saved pipeline, or a page saying why it cannot be loaded
(`pipelines.space.write_space` writes such a Space).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, Literal, TypeVar

import gradio as gr
import torch
from PIL import Image

from dallekit.text_tokenizer import encode_captions
from pipelines.text_to_image import TextToImagePipeline

ComponentT = TypeVar("ComponentT", bound=gr.components.Component)
TITLE = "dallekit: text to image"
MAX_IMAGES = 16
MAX_CANDIDATES = 64
MAX_SEED = 2**32 - 1
DISPLAY_SIZE = 256  # images are enlarged (nearest neighbour) to at least this many pixels in the gallery


def _answered_in_page(component: ComponentT) -> ComponentT:
    """Make a bad value of input `component` a message in the page that names it, never a server error.

    Gradio checks a number against the component's bounds, but its message does not say which one;
    an upload that is not an image fails in PIL with no message at all. The component's `preprocess`
    is wrapped, not overridden in a subclass: Gradio writes a `.pyi` beside the module of each subclass.
    """
    preprocess = component.preprocess

    def checked(payload: Any) -> Any:
        try:
            return preprocess(payload)
        except gr.Error as error:
            raise gr.Error(f"{component.label}: {error.message}") from error
        except OSError as error:  # PIL's UnidentifiedImageError, a truncated file
            name = getattr(payload, "orig_name", None) or "the upload"
            raise gr.Error(f"{component.label}: {name} is not an image that can be read; "
                           "upload a PNG, JPEG or WebP file.") from error

    component.preprocess = checked
    return component


def _enlarge(image: Image.Image) -> Image.Image:
    factor = max(1, DISPLAY_SIZE // max(image.size))
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def _prompt_cut_note(pipe: TextToImagePipeline, prompt: str) -> str | None:
    """What `encode_captions` warns about a prompt longer than the model reads, or None."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        encode_captions(pipe.tokenizer, [prompt], pipe.prior.config.text_len)
    messages = [str(warning.message) for warning in caught if issubclass(warning.category, UserWarning)]
    if not messages:
        return None
    return f"The prompt is longer than this model reads, so its end was cut: {'; '.join(messages)}."


def _describe(pipe: TextToImagePipeline) -> str:
    vqvae, prior, info = pipe.vqvae.config, pipe.prior.config, pipe.training_info
    trained_on = f", trained on `{info['dataset']}`" if info.get("dataset") else ""
    adherence = info.get("metrics", {}).get("guidance", {}).get("3.0", {}).get("adherence")
    judged = f" Prompt adherence at guidance 3: {adherence:.0%} (an independent classifier's verdict)." if (
        adherence is not None) else ""
    return (
        f"# {TITLE}\n\n{vqvae.image_size}×{vqvae.image_size} images drawn as {prior.image_grid_size}×"
        f"{prior.image_grid_size} codes by an autoregressive prior{trained_on}.{judged}"
    )


def build_app(pipe: TextToImagePipeline, compile: bool | Literal["auto"] = "auto") -> gr.Blocks:
    """The page over `pipe`, queued (one request samples at a time); call `.launch()` to serve it.

    A "candidates to rerank" control appears when the pipeline has a scorer (`pipe.scorer`), and is
    passed to it as `num_candidates`. `compile` goes to the pipeline: `auto` compiles the prior's
    sampling step for a size and setting once its requests have spent 10 s sampling, `True` at the
    first request of each (which waits for it), `False` never.
    """
    grid = pipe.prior.config.image_grid_size
    has_scorer = pipe.scorer is not None
    info = pipe.training_info
    examples = info.get("example_prompts") or ([info["example_prompt"]] if info.get("example_prompt") else [])

    def generate(
        prompt: str, num_images: int, guidance_scale: float, top_k: int, temperature: float, seed: int | None,
        init_image: Image.Image | None, init_rows: int, num_candidates: int | None = None,
        progress: gr.Progress = gr.Progress(track_tqdm=True),
    ) -> tuple[list[tuple[Image.Image, str]], str]:
        prompt = (prompt or "").strip()
        if not prompt:
            raise gr.Error("Type a prompt first, or pick one of the examples.")
        if seed is None:
            raise gr.Error(f"The seed is empty: give a whole number from 0 to {MAX_SEED}.")
        cut = _prompt_cut_note(pipe, prompt)
        completion = {"init_image": init_image, "init_rows": int(init_rows)} if init_image is not None else {}
        reranking = {"num_candidates": int(num_candidates)} if num_candidates is not None else {}
        progress(0, desc="sampling image codes")
        start = time.perf_counter()
        try:
            output = pipe(
                prompt, num_images_per_prompt=int(num_images), guidance_scale=float(guidance_scale),
                temperature=float(temperature), top_k=int(top_k) or None,
                generator=torch.Generator(device=pipe.device).manual_seed(int(seed)), **completion, **reranking,
                compile=compile,
            )
        except ValueError as error:  # the pipeline's own check of a value
            raise gr.Error(str(error)) from error
        scores = output.scores  # None without a scorer
        gallery = [  # what tells the images apart first: a caption is cut to the width of its thumbnail
            (_enlarge(image), f"#{index + 1}" + (f" · score {float(scores[index]):.3f}" if scores is not None else "")
             + f" · {prompt}")
            for index, image in enumerate(output.images)
        ]
        completed = f", the first {int(init_rows)} of {grid} code rows kept from the upload" if completion else ""
        reranked = f", the best of {int(num_candidates)} candidates by the scorer" if (
            num_candidates is not None and num_candidates > num_images) else ""
        summary = (f"{len(gallery)} images in {time.perf_counter() - start:.1f} s "
                   f"(seed {int(seed)}{completed}{reranked}).")
        return gallery, "\n\n".join([summary, *([cut] if cut else [])])

    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(_describe(pipe))
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", placeholder=examples[0] if examples else "a caption", lines=1,
                                    max_lines=3, elem_id="prompt")
                run = gr.Button("Generate", variant="primary", elem_id="generate")
                if examples:
                    gr.Examples(examples, inputs=[prompt], label="Examples: the model's validation captions")
                with gr.Accordion("Sampling", open=True):
                    num_images = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="Number of images")
                    guidance = gr.Slider(0, 10, value=3, step=0.5, label="Guidance scale",
                                         info="1: no guidance; higher follows the prompt more closely")
                    top_k = gr.Slider(0, pipe.prior.config.image_vocab_size, value=0, step=1, label="Top-k",
                                      info="sample among the k likeliest codes; 0: all")
                    temperature = gr.Slider(0.1, 2, value=1, step=0.05, label="Temperature")
                    seed = gr.Number(0, label="Seed", precision=0, minimum=0, maximum=MAX_SEED)
                    candidates = [gr.Slider(
                        1, MAX_CANDIDATES, value=16, step=1, label="Candidates to rerank",
                        info="images drawn per prompt; the scorer keeps the best",
                    )] if has_scorer else []
                with gr.Accordion("Complete an image", open=False):
                    init_image = gr.Image(type="pil", sources=["upload", "clipboard"], height=160,
                                          label="Image to complete (optional)")
                    init_rows = gr.Slider(1, grid - 1, value=grid // 2, step=1,
                                          label=f"Code rows kept from it (of {grid})")
            with gr.Column(scale=3):
                gallery = gr.Gallery(label="Images", columns=4, object_fit="contain", format="png",
                                     elem_id="gallery")
                notes = gr.Markdown(elem_id="notes")
        inputs = [prompt, num_images, guidance, top_k, temperature, seed, init_image, init_rows, *candidates]
        gr.on([run.click, prompt.submit], generate, inputs=[_answered_in_page(component) for component in inputs],
              outputs=[gallery, notes], api_name="generate")
    return app.queue(default_concurrency_limit=1, max_size=64)


def _error_app(message: str) -> gr.Blocks:
    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        gr.Markdown(f"# {TITLE}\n\n**The model cannot be loaded.**\n\n`{message}`", elem_id="load-error")
    return app


def load_app(model: str | Path, revision: str | None = None) -> gr.Blocks:
    """The page for the pipeline at `model` (a directory or Hub id), or a page saying why it cannot be loaded."""
    try:
        pipe = TextToImagePipeline.from_pretrained(model, revision=revision,
                                                   device=torch.accelerator.current_accelerator())
    except (OSError, ValueError) as error:
        return _error_app(f"cannot load a pipeline from {str(model)!r}: {error}")
    return build_app(pipe)
