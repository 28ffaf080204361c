"""Editing with the pipeline: negative prompts, inpainting under a mask, variations, paste-back, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dallekit.text_tokenizer import encode_captions
from pipelines.editing import cells_touched, image_pixels, kept_after_region, mask_pixels, region_fit
from pipelines.text_to_image import TextToImagePipeline
from tests.test_pipeline import tiny_pipeline

PROMPT = "a handwritten digit seven"


@pytest.fixture(scope="module")
def pipe() -> TextToImagePipeline:
    return tiny_pipeline()


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))


def own_codes(pipe: TextToImagePipeline, image: Image.Image) -> torch.Tensor:
    return pipe.vqvae.encode(torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None])


def upper_half_mask(size: int = 16) -> Image.Image:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[: size * 5 // 16] = 255  # at 16 px rows 0..4: the cells of code rows 0..2 (2x2 pixels a cell)
    return Image.fromarray(mask)


def draw(pipe: TextToImagePipeline, seed: int = 0, **kwargs) -> torch.Tensor:
    return pipe(kwargs.pop("prompt", PROMPT), generator=torch.Generator().manual_seed(seed), output_type="pt",
                progress=False, **kwargs)


def test_codes_outside_the_mask_are_the_images_own(pipe: TextToImagePipeline, picture: Image.Image) -> None:
    codes = draw(pipe, image=picture, mask_image=upper_half_mask(), num_images_per_prompt=3).codes
    image_codes = own_codes(pipe, picture)[0]
    assert torch.equal(codes[:, 3:], image_codes[3:].expand(3, -1, -1))  # every code row the mask does not touch
    assert not torch.equal(codes[:, :3], image_codes[:3].expand(3, -1, -1))  # the masked rows were drawn anew


def test_a_full_mask_is_plain_generation_and_an_empty_mask_the_image(pipe: TextToImagePipeline,
                                                                     picture: Image.Image) -> None:
    plain = draw(pipe, num_images_per_prompt=2).codes
    everything = draw(pipe, image=picture, mask_image=Image.new("L", (16, 16), 255), num_images_per_prompt=2).codes
    assert torch.equal(everything, plain)
    nothing = draw(pipe, image=picture, mask_image=Image.new("L", (16, 16), 0), num_images_per_prompt=2).codes
    assert torch.equal(nothing, own_codes(pipe, picture).expand(2, -1, -1))


def test_a_variation_resamples_a_share_of_the_grid(pipe: TextToImagePipeline, picture: Image.Image) -> None:
    image_codes = own_codes(pipe, picture)[0]
    rows = draw(pipe, image=picture, strength=5 / 8).codes[0]  # the last 5 of 8 code rows: a completion
    assert torch.equal(rows[:3], image_codes[:3]) and not torch.equal(rows[3:], image_codes[3:])
    assert torch.equal(draw(pipe, image=picture, strength=0.0).codes[0], image_codes)
    assert torch.equal(draw(pipe, image=picture, strength=1.0).codes, draw(pipe).codes)
    random = draw(pipe, image=picture, strength=0.25, variation="random", prompt=None).codes[0]  # prompt optional
    assert (random != image_codes).sum() <= 16 and (random == image_codes).sum() >= 48  # 16 of 64 cells drawn


def test_a_negative_prompt_is_guidance_against_that_caption(pipe: TextToImagePipeline) -> None:
    """The pipeline hands the negative caption to the prior's unconditional branch (whose formula test_prior checks
    against two separate forwards); candidates and reranking batches get the right one each."""
    negatives = ["the number 3", "a hand-drawn one"]
    output = draw(pipe, prompt=[PROMPT, "the number 5"], negative_prompt=negatives, num_images_per_prompt=2,
                  batch_size=3)
    text_ids = encode_captions(pipe.tokenizer, [PROMPT, "the number 5"], 8).repeat_interleave(2, dim=0)
    negative_ids = encode_captions(pipe.tokenizer, negatives, 8).repeat_interleave(2, dim=0)
    generator = torch.Generator().manual_seed(0)
    expected = torch.cat([pipe.prior.generate(text_ids[batch], guidance_scale=3.0, generator=generator,
                                              negative_text_ids=negative_ids[batch])
                          for batch in (slice(0, 3), slice(3, 4))])
    assert torch.equal(output.codes, expected)
    assert not torch.equal(output.codes, draw(pipe, prompt=[PROMPT, "the number 5"], num_images_per_prompt=2).codes)
    with pytest.warns(UserWarning, match="no effect at guidance_scale 1.0"):
        draw(pipe, negative_prompt="the number 3", guidance_scale=1.0)
    with pytest.raises(ValueError, match=r"one per prompt \(1\), got 2"):
        draw(pipe, negative_prompt=negatives)


def test_inpainting_candidates_are_ranked_by_how_the_kept_codes_follow(pipe: TextToImagePipeline,
                                                                       picture: Image.Image) -> None:
    """Without a scorer, the kept candidate is the one under which the prior finds the kept codes after the
    region likeliest."""
    mask = upper_half_mask()
    everyone = draw(pipe, image=picture, mask_image=mask, num_images_per_prompt=6).codes
    best = draw(pipe, image=picture, mask_image=mask, num_images_per_prompt=1, num_candidates=6).codes
    text_ids = encode_captions(pipe.tokenizer, [PROMPT], 8).expand(6, -1)
    kept_after = torch.zeros(8, 8, dtype=torch.bool)
    kept_after[3:] = True
    resampled = ~kept_after  # the mask touches code rows 0..2: every kept cell comes after the region
    assert torch.equal(kept_after_region(resampled), kept_after)
    fits = region_fit(pipe.prior, text_ids, everyone, kept_after)
    assert torch.equal(best[0], everyone[int(fits.argmax())])
    with pytest.raises(ValueError, match="needs a scorer"):  # a variation of the last rows: nothing after to rank by
        draw(pipe, image=picture, strength=0.5, num_candidates=4)


def test_paste_back_keeps_the_original_pixels_away_from_the_mask(pipe: TextToImagePipeline,
                                                                 picture: Image.Image) -> None:
    mask = upper_half_mask()
    pasted = draw(pipe, image=picture, mask_image=mask, paste_back=True).images[0]
    raw = draw(pipe, image=picture, mask_image=mask).images[0]
    original = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
    torch.testing.assert_close(pasted[:, 9:], original[:, 9:])  # beyond the soft edge: the upload, exactly
    torch.testing.assert_close(pasted[:, :5], raw[:, :5])  # under the mask: the drawn pixels
    assert not torch.allclose(pasted[:, 5:7], raw[:, 5:7]) and not torch.allclose(pasted[:, 5:7], original[:, 5:7])


def test_uploads_of_other_modes_and_sizes_are_converted_with_a_warning(pipe: TextToImagePipeline,
                                                                      picture: Image.Image) -> None:
    for converted in (picture.convert("L"), picture.convert("RGBA")):
        assert draw(pipe, image=converted, strength=0.5).codes.shape == (1, 8, 8)
    large = picture.resize((64, 64), Image.Resampling.NEAREST)
    with pytest.warns(UserWarning, match="image is 64x64 and the model draws 16x16: resized to 16x16"):
        codes = draw(pipe, image=large, mask_image=upper_half_mask(64)).codes
    with pytest.warns(UserWarning):
        resized = image_pixels(large, 16)
    assert torch.equal(codes[0, 3:], pipe.vqvae.encode(resized)[0, 3:])  # the mask followed the image's resize


def test_a_grey_mask_is_thresholded_with_a_warning() -> None:
    image = Image.new("RGB", (16, 16))
    grey = np.zeros((16, 16), dtype=np.uint8)
    grey[:4] = 200
    grey[4:6] = 100  # below half: kept
    with pytest.warns(UserWarning, match="not black and white: thresholded at 50%"):
        repaint = mask_pixels(Image.fromarray(grey), image, 16)
    assert repaint[:4].all() and not repaint[4:].any()
    assert cells_touched(repaint, 8)[:2].all() and not cells_touched(repaint, 8)[2:].any()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mask_image": Image.new("L", (12, 16))}, "mask_image is 12x16 but the image is 16x16: give a mask of"),
        ({"strength": 1.5}, r"strength must be in \[0, 1\]"),
        ({"strength": -0.1}, r"strength must be in \[0, 1\]"),
        ({"strength": 0.5, "mask_image": Image.new("L", (16, 16))}, "mask_image= .* or strength= .* one of the two"),
        ({}, "editing an image needs mask_image="),
        ({"strength": 0.5, "variation": "spiral"}, "variation must be 'rows' or 'random'"),
    ],
    ids=["mask of another size", "strength above 1", "strength below 0", "mask and strength", "neither",
         "unknown variation"],
)
def test_bad_edits_are_one_clear_error(pipe: TextToImagePipeline, picture: Image.Image, kwargs: dict,
                                       message: str) -> None:
    with pytest.raises(ValueError, match=message):
        draw(pipe, image=picture, **kwargs)


def test_a_mask_without_an_image_is_refused(pipe: TextToImagePipeline) -> None:
    with pytest.raises(ValueError, match="pass the image too"):
        draw(pipe, mask_image=upper_half_mask())
    with pytest.raises(ValueError, match="a prompt is optional only when editing"):
        pipe(None)
