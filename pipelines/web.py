"""The web page to try a text-to-image pipeline (Gradio): `dallekit serve`, and a Hub Space's `app.py`.

`build_app(pipe)` lays out one page over a pipeline loaded once, in two tabs. "Generate": a prompt
with the model's own validation captions as examples, a negative prompt, the sampling settings and
a gallery of the results. "Edit": an uploaded image in Gradio's image editor, repainted where the
brush paints over it (inpainting), or, with nothing painted, partly redrawn by a strength (a
variation); an optional prompt and negative prompt steer it. Requests go through a `RequestBatcher`
(`pipelines.batching`): concurrent Generate requests, the page's and the OpenAI endpoint's, are
drawn in one batch, edits in turn; bad input is answered in the page, and what
the pipeline repairs (an image resized to the model's size, a prompt cut) is said in the notes under
the gallery. `load_app(model)` is what a Space runs: the page for a saved pipeline, or a page saying
why it cannot be loaded (`pipelines.space.write_space` writes such a Space).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Literal, TypeVar

import gradio as gr
import numpy as np
import torch
from PIL import Image

from dallekit.text_tokenizer import encode_captions
from pipelines.batching import (
    MAX_CANDIDATES_PER_REQUEST,
    MAX_IMAGES_PER_REQUEST,
    MAX_SEED,
    GenerationRequest,
    GenerationResult,
    RequestBatcher,
    RequestError,
    ServerBusy,
)
from pipelines.text_to_image import TextToImageOutput, TextToImagePipeline
from stage2_prior.modeling_prior import DEFAULT_GUIDANCE_PLAUSIBILITY

ComponentT = TypeVar("ComponentT", bound=gr.components.Component)
Gallery = list[tuple[Image.Image, str]]
TITLE = "dallekit: text to image"
MAX_IMAGES = MAX_IMAGES_PER_REQUEST
MAX_CANDIDATES = MAX_CANDIDATES_PER_REQUEST
DISPLAY_SIZE = 256  # images are enlarged (nearest neighbour) to at least this many pixels in the gallery
BRUSH_COLOUR = "rgb(204, 50, 50)"  # the mask's colour over the image; any painted pixel is repainted


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


def _prompt_cut_note(pipe: TextToImagePipeline, prompt: str, what: str = "prompt") -> str | None:
    """What `encode_captions` warns about a prompt (`what`: which one) longer than the model reads, or None."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        encode_captions(pipe.tokenizer, [prompt], pipe.prior.config.text_len)
    messages = [str(warning.message) for warning in caught if issubclass(warning.category, UserWarning)]
    if not messages:
        return None
    return f"The {what} is longer than this model reads, so its end was cut: {'; '.join(messages)}."


def _typed(text: str | None) -> str | None:
    """What was typed in a text field, stripped; None when nothing was."""
    return (text or "").strip() or None


def _seed(seed: int | None) -> int:
    """The seed field's number; an empty seed field is an error in the page."""
    if seed is None:
        raise gr.Error(f"The seed is empty: give a whole number from 0 to {MAX_SEED}.")
    return int(seed)


def _cut_notes(pipe: TextToImagePipeline, prompt: str | None, negative_prompt: str | None) -> list[str]:
    """The notes on a prompt or negative prompt cut (`_prompt_cut_note`)."""
    cut = [_prompt_cut_note(pipe, text, what) for text, what in ((prompt, "prompt"),
                                                                 (negative_prompt, "negative prompt")) if text]
    return [note for note in cut if note]


def _waited(submit: Callable[[Any], Future], job: Any) -> Any:
    """`submit(job)`'s result; a full queue is a message in the page."""
    try:
        future = submit(job)
    except ServerBusy as error:
        raise gr.Error(f"{str(error)[0].upper()}{str(error)[1:]}.") from error
    return future.result()


def _draw(pipe: TextToImagePipeline, prompt: str | None, negative_prompt: str | None,
          **settings: Any) -> tuple[TextToImageOutput, list[str]]:
    """`pipe(prompt, ...)` and the notes on what it repaired: a prompt or negative prompt cut (`_prompt_cut_note`),
    then the pipeline's other warnings (an image resized, ...). Its ValueError is a message in the page."""
    notes = _cut_notes(pipe, prompt, negative_prompt)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            output = pipe(prompt, negative_prompt=negative_prompt, **settings)
    except ValueError as error:  # the pipeline's own check of a value
        raise gr.Error(str(error)) from error
    for warning in caught:  # the cut prompts' warnings are in `notes` already
        message = str(warning.message)
        if issubclass(warning.category, UserWarning) and not any(message in note for note in notes):
            notes.append(f"Note: {message}.")
    return output, notes


def _gallery(images: list[Image.Image], scores: torch.Tensor | list[float] | None, prompt: str | None) -> Gallery:
    """The images enlarged, each captioned with what tells it apart first (a caption is cut to its thumbnail's
    width): its rank, its score when there is a scorer (`scores`, else None), then the prompt."""

    def caption(index: int) -> str:
        score = [f"score {float(scores[index]):.3f}"] if scores is not None else []
        return " · ".join([f"#{index + 1}", *score, *([prompt] if prompt else [])])

    return [(_enlarge(image), caption(index)) for index, image in enumerate(images)]


def _summary(gallery: Gallery, start: float, seed: int, details: list[str], notes: list[str]) -> str:
    """The notes under a gallery: how many images in how long, from which seed and how, then `notes`."""
    summary = f"{len(gallery)} images in {time.perf_counter() - start:.1f} s ({', '.join([f'seed {seed}', *details])})."
    return "\n\n".join([summary, *notes])


def _painted_mask(layers: list[Image.Image]) -> Image.Image | None:
    """The mask painted in the editor's layers: white where any layer has a pixel that is not wholly transparent
    (alpha > 0), black elsewhere; None when nothing is painted."""
    sizes = {layer.size for layer in layers}
    if len(sizes) > 1:
        raise gr.Error(f"The editor's layers are of different sizes ({', '.join(f'{w}x{h}' for w, h in sizes)}): "
                       "paint every layer over the image itself.")
    painted = [np.asarray(layer.convert("RGBA").getchannel("A")) > 0 for layer in layers]
    if not any(layer.any() for layer in painted):
        return None
    return Image.fromarray(np.logical_or.reduce(painted).astype(np.uint8) * 255, mode="L")


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


def build_app(pipe: TextToImagePipeline, compile: bool | Literal["auto"] = "auto",
              batcher: RequestBatcher | None = None) -> gr.Blocks:
    """The page over `pipe`; call `.launch()` to serve it, or mount it on a FastAPI app (`pipelines.server`).

    Its requests go through `batcher` (default: a `RequestBatcher` of its own), so concurrent Generate requests
    are drawn in one batch, and edits run in turn. Its endpoints are `/generate` and `/edit`. A "candidates to rerank" control appears in the
    Generate tab when the pipeline has a scorer (`pipe.scorer`), and is passed to it as
    `num_candidates`; the Edit tab always has one, since an inpainting's candidates are ranked by how
    well they fit the rest of the image too. `compile` goes to the pipeline: `auto` compiles the
    prior's sampling step for a size and setting once its requests have spent 10 s sampling, `True`
    at the first request of each (which waits for it), `False` never.
    """
    batcher = batcher if batcher is not None else RequestBatcher(pipe, compile=compile)
    has_scorer = pipe.scorer is not None
    size = pipe.vqvae.config.image_size
    info = pipe.training_info
    examples = info.get("example_prompts") or ([info["example_prompt"]] if info.get("example_prompt") else [])

    def generate(
        prompt: str, negative_prompt: str, num_images: int, guidance_scale: float, guidance_plausibility: float,
        top_k: int, temperature: float, seed: int | None, num_candidates: int | None = None,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple[Gallery, str]:
        prompt = _typed(prompt)
        if prompt is None:
            raise gr.Error("Type a prompt first, or pick one of the examples.")
        negative_prompt = _typed(negative_prompt)
        try:
            request = GenerationRequest(
                prompt, num_images=int(num_images), seed=_seed(seed), guidance_scale=float(guidance_scale),
                negative_prompt=negative_prompt, guidance_plausibility=float(guidance_plausibility),
                temperature=float(temperature), top_k=int(top_k) or None,
                num_candidates=int(num_candidates) if num_candidates is not None else None,
            )
        except RequestError as error:
            raise gr.Error(f"{str(error)[0].upper()}{str(error)[1:]}.") from error
        notes = _cut_notes(pipe, prompt, negative_prompt)
        if negative_prompt and request.guidance_scale == 1.0:
            notes.append("Note: negative_prompt has no effect at guidance_scale 1.0 (no guidance): use e.g. 3.0.")
        progress(0, desc="sampling image codes")
        start = time.perf_counter()
        result: GenerationResult = _waited(batcher.submit, request)
        gallery = _gallery(result.images, result.scores, prompt)
        details = [f"the best of {int(num_candidates)} candidates by the scorer"] if (
            num_candidates is not None and num_candidates > num_images) else []
        if result.batch_requests > 1:
            details.append(f"drawn in one batch with {result.batch_requests - 1} other request(s)")
        return gallery, _summary(gallery, start, request.seed, details, notes)

    def edit(
        image: dict | None, prompt: str, negative_prompt: str, strength: float, variation: str, paste_back: bool,
        num_images: int, guidance_scale: float, seed: int | None, num_candidates: int,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple[Gallery, str]:
        if image is None or image["background"] is None:
            raise gr.Error("Upload an image to edit first.")
        mask = _painted_mask(image["layers"])
        if mask is None and not strength:
            raise gr.Error("Nothing to redraw: paint over the region to repaint with the brush, or raise the "
                           "strength above 0 to redraw a share of the image.")
        generator = torch.Generator(device=pipe.device).manual_seed(_seed(seed))
        region = {"mask_image": mask} if mask is not None else {"strength": float(strength)}
        fits = mask is not None or variation == "random"  # candidates ranked by how well they fit the kept codes
        reranked = num_candidates > num_images and (fits or has_scorer)
        prompt = _typed(prompt)
        progress(0, desc="sampling image codes")
        start = time.perf_counter()
        output, notes = _waited(batcher.run, lambda: _draw(
            pipe, prompt, _typed(negative_prompt), image=image["background"],
            variation=variation, paste_back=paste_back, num_images_per_prompt=int(num_images),
            guidance_scale=float(guidance_scale), generator=generator, compile=compile,
            num_candidates=int(num_candidates) if reranked else None, **region,
        ))
        gallery = _gallery(output.images, output.scores, prompt)
        redrawn = "the painted region repainted" if mask is not None else (
            f"{float(strength):.0%} of the code grid redrawn ({'its last rows' if variation == 'rows' else 'at random'})")
        ranked_by = " and ".join([*(["their fit to the kept image"] if fits else []),
                                  *(["the scorer"] if has_scorer else [])])
        details = [redrawn, *([f"the best of {int(num_candidates)} candidates by {ranked_by}"] if reranked else []),
                   *(["the original pasted back outside it"] if paste_back else [])]
        return gallery, _summary(gallery, start, int(seed), details, notes)

    def number_of_images() -> gr.Slider:
        return gr.Slider(1, MAX_IMAGES, value=4, step=1, label="Number of images")

    def guidance() -> gr.Slider:
        return gr.Slider(0, 10, value=3, step=0.5, label="Guidance scale",
                         info="1: no guidance; higher follows the prompt (and shuns the negative prompt) more closely")

    def seed_field() -> gr.Number:
        return gr.Number(0, label="Seed", precision=0, minimum=0, maximum=MAX_SEED)

    def negative_prompt_field(elem_id: str) -> gr.Textbox:
        return gr.Textbox("", label="Negative prompt", placeholder="optional: what to steer away from", lines=1,
                          max_lines=3, elem_id=elem_id)

    def results(prefix: str) -> tuple[gr.Gallery, gr.Markdown]:
        with gr.Column(scale=3):
            return (gr.Gallery(label="Images", columns=4, object_fit="contain", format="png", elem_id=f"{prefix}gallery"),
                    gr.Markdown(elem_id=f"{prefix}notes"))

    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(_describe(pipe))
        with gr.Tab("Generate", elem_id="generate-tab"), gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", placeholder=examples[0] if examples else "a caption", lines=1,
                                    max_lines=3, elem_id="prompt")
                negative_prompt = negative_prompt_field("negative-prompt")
                run = gr.Button("Generate", variant="primary", elem_id="generate")
                if examples:
                    gr.Examples(examples, inputs=[prompt], label="Examples: the model's validation captions")
                with gr.Accordion("Sampling", open=True):
                    num_images = number_of_images()
                    guidance_scale = guidance()
                    guidance_plausibility = gr.Slider(
                        0, 0.5, value=DEFAULT_GUIDANCE_PLAUSIBILITY, step=0.01, label="Guidance plausibility",
                        info="guidance picks only among codes at least this share as likely as the likeliest; 0: plain")
                    top_k = gr.Slider(0, pipe.prior.config.image_vocab_size, value=0, step=1, label="Top-k",
                                      info="sample among the k likeliest codes; 0: all")
                    temperature = gr.Slider(0.1, 2, value=1, step=0.05, label="Temperature")
                    seed = seed_field()
                    candidates = [gr.Slider(
                        1, MAX_CANDIDATES, value=16, step=1, label="Candidates to rerank",
                        info="images drawn per prompt; the scorer keeps the best",
                    )] if has_scorer else []
            gallery, notes = results("")
        inputs = [prompt, negative_prompt, num_images, guidance_scale, guidance_plausibility, top_k, temperature, seed,
                  *candidates]
        gr.on([run.click, prompt.submit], generate, inputs=[_answered_in_page(component) for component in inputs],
              outputs=[gallery, notes], api_name="generate", concurrency_limit=batcher.max_queue)

        with gr.Tab("Edit", elem_id="edit-tab"), gr.Row():
            with gr.Column(scale=2):
                gr.Markdown("Upload an image and paint over the region to repaint with the brush; with nothing "
                            "painted, the strength below redraws a share of the image.")
                editor = gr.ImageEditor(
                    type="pil", image_mode="RGBA", sources=["upload", "clipboard"], transforms=(), layers=False,
                    brush=gr.Brush(colors=[BRUSH_COLOUR], color_mode="fixed"), format="png", height=360,
                    label="Image to edit", elem_id="editor",
                )
                edit_prompt = gr.Textbox("", label="Prompt (optional)", placeholder="what the repainted region shows",
                                         lines=1, max_lines=3, elem_id="edit-prompt")
                edit_negative_prompt = negative_prompt_field("edit-negative-prompt")
                run_edit = gr.Button("Edit", variant="primary", elem_id="edit")
                with gr.Accordion("Editing", open=True):
                    strength = gr.Slider(0, 1, value=0.5, step=0.05, label="Strength",
                                         info="used when no mask is painted: the share of the image's codes redrawn")
                    variation = gr.Radio(["rows", "random"], value="rows", label="Strength redraws",
                                         info="rows: the last codes, completing the image's top; random: any cells")
                    paste_back = gr.Checkbox(label="Paste the original back outside the mask",
                                             info=f"the image at {size}×{size}, across a soft edge")
                    edit_num_images = number_of_images()
                    edit_candidates = gr.Slider(
                        1, MAX_CANDIDATES, value=16 if has_scorer else 8, step=1, label="Candidates to rank",
                        info="images drawn; the best are kept, by how well they fit the kept image (a painted mask or "
                             f"random cells){' and by the scorer' if has_scorer else ''}",
                    )
                    edit_guidance_scale = guidance()
                    edit_seed = seed_field()
            edit_gallery, edit_notes = results("edit-")
        edit_inputs = [editor, edit_prompt, edit_negative_prompt, strength, variation, paste_back, edit_num_images,
                       edit_guidance_scale, edit_seed, edit_candidates]
        gr.on([run_edit.click, edit_prompt.submit], edit,
              inputs=[_answered_in_page(component) for component in edit_inputs],
              outputs=[edit_gallery, edit_notes], api_name="edit", concurrency_limit=batcher.max_queue)
    return app.queue(max_size=batcher.max_queue)


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
