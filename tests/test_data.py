"""Tests for dallekit.data: built-in datasets, folder and parquet sources, transforms, collator."""

import dataclasses
import io
import json
import logging
import pickle
import re
import subprocess
import sys

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

from dallekit.data import (
    AugmentationConfig,
    DataConfig,
    DataError,
    ImageTransform,
    TextImageCollator,
    background_colour,
    decode_image,
    draw_shape,
    load_text_image_dataset,
    make_shapes,
    parse_shape_caption,
    random_shift_and_scale,
    shift_and_scale,
    to_rgb,
)
from dallekit.data.cache import split_fingerprint
from dallekit.data.digits import DIGIT_NAMES
from dallekit.data.replay import MAX_REPLAY_ROWS, replay_passes
from dallekit.data.shapes import COLOURS, POSITIONS, SHAPES

WHITE, BLACK, RED, GREEN, BLUE = (255, 255, 255), (0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255)
GREY = (128, 128, 128)
GREY_16_BIT = 128 * 257  # 16-bit value of 8-bit 128


def png_bytes(image: PIL.Image.Image, **save_options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save_options)
    return buffer.getvalue()


def random_image(rng: np.random.Generator, height: int, width: int) -> PIL.Image.Image:
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def rgb_pixel(pixel_values: torch.Tensor, x: int, y: int) -> list[int]:
    """Pixel (x, y) of a [3, H, W] tensor in [-1, 1] as 0..255 ints."""
    return ((pixel_values[:, y, x] + 1) * 127.5).round().int().tolist()


# ----------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits() -> datasets.DatasetDict:
    return load_text_image_dataset(DataConfig())


def test_digits_splits_and_columns(digits):
    assert (len(digits["train"]), len(digits["validation"])) == (1400, 397)
    for split in digits.values():
        assert split.column_names == ["image", "text", "label"]
        assert split.features["image"] == datasets.Image(decode=False)
    assert set(digits["validation"]["label"]) == set(range(10))


def test_digits_images_are_rgb_at_image_size(digits):
    for example in digits["train"].select(range(5)):
        image = decode_image(example["image"])
        assert image.mode == "RGB" and image.size == (32, 32)
    small = load_text_image_dataset(DataConfig(image_size=16))
    assert decode_image(small["validation"][0]["image"]).size == (16, 16)


def test_digits_captions_name_their_label(digits):
    phrasings = set()
    for split in digits.values():
        for caption, label in zip(split["text"], split["label"]):
            words = set(re.findall(r"[a-z]+|\d", caption))
            named = {d for d, name in enumerate(DIGIT_NAMES) if name in words or str(d) in words}
            assert named == {label}, caption
            phrasings.add(caption.replace(DIGIT_NAMES[label], "#").replace(str(label), "#"))
    assert len(phrasings) >= 3


def test_digits_are_deterministic_and_ignore_seed(digits):
    again = load_text_image_dataset(DataConfig(seed=5, validation_fraction=0.5))
    for name in ("train", "validation"):
        assert again[name]["text"] == digits[name]["text"]
        assert again[name]["label"] == digits[name]["label"]
        assert again[name]["image"] == digits[name]["image"]


def test_max_examples_caps_train_only():
    splits = load_text_image_dataset(DataConfig(max_examples=50))
    assert (len(splits["train"]), len(splits["validation"])) == (50, 397)


def test_builtin_streaming_streams_train_and_keeps_validation_map_style():
    splits = load_text_image_dataset(DataConfig(source="shapes", num_shapes=20, streaming=True))
    assert isinstance(splits, datasets.IterableDatasetDict)
    assert isinstance(splits["train"], datasets.IterableDataset) and isinstance(splits["validation"], datasets.Dataset)
    assert sum(1 for _ in splits["train"]) + len(splits["validation"]) == 20


# ----------------------------------------------------------------------------- shapes


def test_replay_mixes_a_share_of_another_source_into_train_only():
    shapes = load_text_image_dataset(DataConfig(source="shapes", num_shapes=100))
    mixed = load_text_image_dataset(DataConfig(source="shapes", num_shapes=100, replay_source="digits",
                                               replay_fraction=0.25))
    assert mixed["train"].column_names == ["image", "text"]
    digits = load_text_image_dataset(DataConfig(source="digits"))["train"]
    texts = list(mixed["train"]["text"])
    passes = (len(texts) - len(digits)) // 90
    assert passes > 1 and texts[:90 * passes] == list(shapes["train"]["text"]) * passes, "the new data, pass after pass"
    assert sorted(texts[90 * passes:]) == sorted(digits["text"]), "then every digit once: the whole source replayed"
    assert 0.23 < len(digits) / len(texts) < 0.27, "a quarter of the split is replay"
    again = load_text_image_dataset(DataConfig(source="shapes", num_shapes=100, replay_source="digits",
                                               replay_fraction=0.25))
    assert list(again["train"]["text"]) == texts, "seeded: the same mix again"
    passes = replay_passes(500, 1_000_000, 0.25)  # a huge replay source: a sample, within the row cap
    assert passes > 1 and passes * 500 * 4 / 3 <= MAX_REPLAY_ROWS
    assert replay_passes(100, 10, 0.25) == 1, "a small source: one pass (and all of it replayed)"
    assert mixed["validation"]["text"] == shapes["validation"]["text"], "validation is the source's own"

    streamed = load_text_image_dataset(DataConfig(source="shapes", num_shapes=1000, replay_source="digits",
                                                  replay_fraction=0.25, streaming=True))
    texts = [example["text"] for example in streamed["train"]]
    digit_texts = set(digits["text"])
    replayed = sum(text in digit_texts for text in texts) / len(texts)
    assert 0.15 < replayed < 0.35, f"about a quarter replayed in a stream, got {replayed:.2f}"

    with pytest.raises(ValueError, match="replay_source='shapes' is invalid"):
        DataConfig(source="shapes", replay_source="shapes")
    with pytest.raises(ValueError, match="replay_fraction=1 is invalid"):
        DataConfig(source="shapes", replay_source="digits", replay_fraction=1)


def test_shapes_attributes_match_captions_and_cover_every_combination():
    examples = make_shapes(60, 64)
    seen = set()
    for image, caption, attributes in examples:
        assert parse_shape_caption(caption) == attributes
        assert image.size == (64, 64) and image.mode == "RGB"
        seen.add((attributes["shape"], attributes["colour"], attributes["position"]))
    assert len(seen) == len(SHAPES) * len(COLOURS) * len(POSITIONS) == 60


def test_shapes_are_drawn_in_their_colour_at_their_position():
    for image, _, attributes in make_shapes(60, 64):
        x, y = (int(fraction * 64) for fraction in POSITIONS[attributes["position"]])
        assert np.abs(np.subtract(image.getpixel((x, y)), COLOURS[attributes["colour"]])).max() <= 8
        assert image.getpixel((0, 0)) == (0, 0, 0)
    centres = {draw_shape("square", colour, "centre", 32).getpixel((16, 16)) for colour in COLOURS}
    assert len(centres) == len(COLOURS)


def test_shapes_are_anti_aliased():
    image = np.asarray(draw_shape("circle", "red", "centre", 32))
    red = image[..., 0]
    assert ((red > 0) & (red < COLOURS["red"][0])).any()  # partial-coverage edge pixels


def test_shapes_dataset_labels_match_captions():
    splits = load_text_image_dataset(DataConfig(source="shapes", num_shapes=100))
    assert (len(splits["train"]), len(splits["validation"])) == (90, 10)
    train = splits["train"]
    assert train.column_names == ["image", "text", "label", "colour", "position"]
    for example in train:
        attributes = parse_shape_caption(example["text"])
        assert train.features["label"].int2str(example["label"]) == attributes["shape"]
        assert train.features["colour"].int2str(example["colour"]) == attributes["colour"]
        assert train.features["position"].int2str(example["position"]) == attributes["position"]


def test_shapes_reject_unknown_attributes():
    with pytest.raises(ValueError, match=r"colour='purple'.*'red'"):
        draw_shape("circle", "purple", "left", 32)
    with pytest.raises(ValueError, match="not a shapes caption"):
        parse_shape_caption("a purple circle on the left")


# ----------------------------------------------------------------------------- local folder

GOOD_FILES = ("photo.jpg", "rgba.png", "grey.png", "palette.png", "deep.png")
BAD_FILES = ("truncated.jpg", "junk.png")


def write_image_folder(folder, metadata_format: str) -> None:
    """A folder of good and corrupt images plus metadata captioning each with its file name."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    random_image(rng, 24, 40).save(folder / "photo.jpg")
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)  # transparent black everywhere...
    rgba[4:12, 4:12] = (255, 0, 0, 255)  # ...except an opaque red centre
    PIL.Image.fromarray(rgba).save(folder / "rgba.png")
    PIL.Image.new("L", (16, 16), 128).save(folder / "grey.png")
    palette = PIL.Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 0, 0, 0, 255])  # index 0 black (made transparent), index 1 blue
    palette.paste(1, (4, 4, 12, 12))
    palette.save(folder / "palette.png", transparency=0)
    PIL.Image.fromarray(np.full((16, 16), GREY_16_BIT, dtype=np.uint16)).save(folder / "deep.png")
    jpeg = io.BytesIO()
    random_image(rng, 32, 32).save(jpeg, format="JPEG")
    (folder / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (folder / "junk.png").write_bytes(rng.bytes(200))
    rows = [{"file_name": name, "text": f"caption of {name}"} for name in GOOD_FILES + BAD_FILES]
    if metadata_format == "jsonl":
        (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        lines = ["file_name,text"] + [f"{row['file_name']},{row['text']}" for row in rows]
        (folder / "metadata.csv").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("metadata_format", ["jsonl", "csv"])
def test_image_folder_loads_and_collates_skipping_corrupt_files(tmp_path, metadata_format, caplog):
    folder = tmp_path / "images"
    write_image_folder(folder, metadata_format)
    splits = load_text_image_dataset(DataConfig(source=str(folder), image_size=8))
    assert (len(splits["train"]), len(splits["validation"])) == (6, 1)
    assert splits["train"].column_names == ["image", "text"]
    examples = list(splits["train"]) + list(splits["validation"])

    with caplog.at_level(logging.WARNING, logger="dallekit.data"):
        batch = TextImageCollator(image_size=8)(examples)
    assert batch["num_skipped"] == len(BAD_FILES)
    assert sorted(batch["text"]) == sorted(f"caption of {name}" for name in GOOD_FILES)
    assert batch["pixel_values"].shape == (len(GOOD_FILES), 3, 8, 8)
    assert batch["pixel_values"].dtype == torch.float32
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
    assert all(name in caplog.text for name in BAD_FILES)

    pixels = dict(zip(batch["text"], batch["pixel_values"]))
    assert rgb_pixel(pixels["caption of rgba.png"], 0, 0) == list(WHITE)  # transparent -> white
    assert rgb_pixel(pixels["caption of rgba.png"], 4, 4) == list(RED)
    assert rgb_pixel(pixels["caption of palette.png"], 0, 0) == list(WHITE)
    assert rgb_pixel(pixels["caption of palette.png"], 4, 4) == list(BLUE)
    assert rgb_pixel(pixels["caption of grey.png"], 4, 4) == list(GREY)
    assert rgb_pixel(pixels["caption of deep.png"], 4, 4) == list(GREY)  # rescaled, not clipped


def test_a_folder_is_resolved_once_per_process_until_a_file_changes(tmp_path, monkeypatch):
    """Every consumer of a run loads its data; `datasets.load_dataset` runs again only when a file has changed."""
    folder = tmp_path / "images"
    write_image_folder(folder, "jsonl")
    calls = []
    load_dataset = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: calls.append(args) or load_dataset(
        *args, **kwargs))
    config = DataConfig(source=str(folder), image_size=8)
    first = load_text_image_dataset(config)
    again = load_text_image_dataset(dataclasses.replace(config, image_size=16))
    assert len(calls) == 1 and again["train"]["text"] == first["train"]["text"]
    PIL.Image.new("RGB", (16, 16), "red").save(folder / "new.png")
    with (folder / "metadata.jsonl").open("a") as metadata:
        metadata.write(json.dumps({"file_name": "new.png", "text": "a red square"}) + "\n")
    changed = load_text_image_dataset(config)
    assert len(calls) == 2 and len(changed["train"]) + len(changed["validation"]) == 8


def test_streamed_image_folder_leaves_corrupt_files_to_the_collator(tmp_path):
    folder = tmp_path / "images"
    write_image_folder(folder, "jsonl")
    with pytest.raises(DataError, match="streamed validation split is empty .* raise data.validation_fraction"):
        load_text_image_dataset(DataConfig(source=str(folder), image_size=8, streaming=True, validation_fraction=0.01))
    splits = load_text_image_dataset(DataConfig(source=str(folder), image_size=8, streaming=True,
                                                validation_fraction=0.5))
    examples = list(splits["train"]) + list(splits["validation"])
    assert len(examples) == len(GOOD_FILES + BAD_FILES)
    batch = TextImageCollator(image_size=8)(examples)
    assert batch["num_skipped"] == len(BAD_FILES)
    assert batch["pixel_values"].shape == (len(GOOD_FILES), 3, 8, 8)

    # the held-out files are the same wherever the folder is stored (a file's name is hashed, not its path)
    moved = tmp_path / "elsewhere" / "copy"
    moved.parent.mkdir()
    write_image_folder(moved, "jsonl")
    moved_splits = load_text_image_dataset(DataConfig(source=str(moved), image_size=8, streaming=True,
                                                      validation_fraction=0.5))
    held_out = sorted(example["text"] for example in splits["validation"])
    assert 0 < len(held_out) < len(examples)
    assert sorted(example["text"] for example in moved_splits["validation"]) == held_out


def test_missing_local_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a built-in dataset"):
        load_text_image_dataset(DataConfig(source=str(tmp_path / "no_such_folder")))


# ----------------------------------------------------------------------------- parquet (Hub layout)


PICTURES = tuple(f"picture {i}" for i in range(20))


@pytest.fixture
def parquet_dir(tmp_path):
    """A Hub-style directory of two parquet shards, train split only, columns `img`/`caption`."""
    rng = np.random.default_rng(0)
    features = datasets.Features(
        {
            "img": datasets.Image(),
            "caption": datasets.Value("string"),
            "extra": datasets.Value("int64"),
        }
    )
    columns = {
        "img": [random_image(rng, 12, 12) for _ in PICTURES],
        "caption": list(PICTURES),
        "extra": list(range(len(PICTURES))),
    }
    table = datasets.Dataset.from_dict(columns, features=features)
    (tmp_path / "data").mkdir()
    for shard in range(2):
        path = tmp_path / "data" / f"train-0000{shard}-of-00002.parquet"
        table.shard(2, shard, contiguous=True).to_parquet(path)
    return tmp_path


def parquet_config(parquet_dir, **overrides) -> DataConfig:
    return DataConfig(
        source=str(parquet_dir), image_column="img", text_column="caption", **overrides
    )


def test_parquet_source_with_custom_columns_carves_validation(parquet_dir):
    config = parquet_config(parquet_dir)
    splits = load_text_image_dataset(config)
    assert (len(splits["train"]), len(splits["validation"])) == (18, 2)
    assert splits["train"].column_names == ["image", "text"]
    assert splits["train"].features["image"] == datasets.Image(decode=False)
    assert sorted([*splits["train"]["text"], *splits["validation"]["text"]]) == sorted(PICTURES)
    assert load_text_image_dataset(config)["validation"]["text"] == splits["validation"]["text"]

    batch = TextImageCollator(image_size=8)(list(splits["validation"]))
    assert batch["pixel_values"].shape == (2, 3, 8, 8) and batch["num_skipped"] == 0


def test_parquet_source_streaming_carves_disjoint_validation(parquet_dir):
    config = parquet_config(parquet_dir, streaming=True, validation_fraction=0.3)
    splits = load_text_image_dataset(config)
    assert isinstance(splits, datasets.IterableDatasetDict)
    train = [example["text"] for example in splits["train"]]
    validation = [example["text"] for example in splits["validation"]]
    assert sorted(train + validation) == sorted(PICTURES) and validation
    again = load_text_image_dataset(config)["validation"]
    assert [example["text"] for example in again] == validation
    assert next(iter(splits["train"])).keys() == {"image", "text"}


def test_wrong_column_name_lists_available_columns(parquet_dir):
    with pytest.raises(ValueError, match=r"\['image'\].*'img', 'caption', 'extra'.*image_column"):
        load_text_image_dataset(DataConfig(source=str(parquet_dir), text_column="caption"))


def test_missing_train_split_lists_splits(parquet_dir):
    config = parquet_config(parquet_dir, train_split="training")
    with pytest.raises(ValueError, match=r"'training'.*\['train'\]"):
        load_text_image_dataset(config)


# ----------------------------------------------------------------------------- DataConfig


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("image_size", 0),
        ("image_size", -32),
        ("image_size", 32.0),
        ("image_size", True),
        ("validation_fraction", 0.0),
        ("validation_fraction", 1.0),
        ("validation_fraction", 1.5),
        ("seed", -1),
        ("num_shapes", 5),
        ("max_examples", 0),
        ("source", ""),
        ("image_column", ""),
        ("text_column", "image"),
        ("validation_split", "train"),
        ("streaming", "yes"),
        ("shuffle_buffer_size", 0),
        ("shuffle_buffer_size", 1.5),
    ],
)
def test_data_config_rejects_bad_values(field, value):
    expected = rf"DataConfig\.{field}={re.escape(repr(value))} is invalid: set it to"
    with pytest.raises(ValueError, match=expected):
        DataConfig(**{field: value})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("copies", -1),
        ("copies", 1.5),
        ("max_translation", 0.5),
        ("max_translation", -0.1),
        ("max_scale_change", 1.0),
        ("seed", -1),
    ],
)
def test_augmentation_config_rejects_bad_values(field, value):
    expected = rf"AugmentationConfig\.{field}={re.escape(repr(value))} is invalid: set it to"
    with pytest.raises(ValueError, match=expected):
        AugmentationConfig(**({"copies": 1} | {field: value}))


def test_augmentation_copies_must_differ_from_the_originals():
    with pytest.raises(ValueError, match="raise max_translation or max_scale_change"):
        AugmentationConfig(copies=2, max_translation=0.0, max_scale_change=0.0)
    AugmentationConfig(copies=0, max_translation=0.0, max_scale_change=0.0)  # off: nothing to check


# ----------------------------------------------------------------------------- transforms


def test_image_transform_resizes_and_centre_crops():
    stripes = PIL.Image.new("RGB", (80, 20), RED)  # red 20 px | green 40 px | blue 20 px
    stripes.paste(GREEN, (20, 0, 60, 20))
    stripes.paste(BLUE, (60, 0, 80, 20))
    pixel_values = ImageTransform(16)(stripes)
    assert pixel_values.shape == (3, 16, 16) and pixel_values.dtype == torch.float32
    green = torch.tensor([-1.0, 1.0, -1.0])[:, None, None]
    assert torch.equal(pixel_values, green.expand(3, 16, 16))  # the centre only, not squashed

    tall = ImageTransform(16)(PIL.Image.new("L", (10, 50), 255))
    assert tall.shape == (3, 16, 16) and torch.all(tall == 1)


def test_shift_and_scale_moves_the_content_and_fills_with_the_background():
    pixels = np.zeros((8, 8, 3), np.uint8)
    pixels[2:5, 3:6] = RED
    image = PIL.Image.fromarray(pixels)
    assert np.array_equal(np.asarray(shift_and_scale(image, (0.0, 0.0), 1.0)), pixels)
    shifted = np.asarray(shift_and_scale(image, (1 / 8, -2 / 8), 1.0))  # one pixel right, two up
    assert np.array_equal(shifted, np.roll(pixels, (-2, 1), axis=(0, 1)))
    zoomed_out = np.asarray(shift_and_scale(image, (0.0, 0.0), 0.5))
    assert 0 < (zoomed_out.sum(-1) > 0).sum() < (pixels.sum(-1) > 0).sum()  # smaller, still there

    white = PIL.Image.new("L", (8, 8), 255)  # a grey-scale image on white: converted, filled with white
    white.paste(0, (3, 3, 5, 5))
    moved = shift_and_scale(white, (0.25, 0.25), 1.0)
    assert moved.mode == "RGB" and moved.getpixel((0, 0)) == WHITE and moved.getpixel((5, 5)) == BLACK


def test_builtin_datasets_have_black_backgrounds(digits):
    assert background_colour(decode_image(digits["train"][0]["image"])) == BLACK
    shape, _, _ = make_shapes(1, 32)[0]
    assert background_colour(shape) == BLACK


def test_random_shift_and_scale_is_reproducible(digits):
    image = decode_image(digits["train"][0]["image"])

    def augment(seed):
        return np.asarray(random_shift_and_scale(image, np.random.default_rng(seed), 0.2, 0.2))

    assert np.array_equal(augment(0), augment(0))
    assert not np.array_equal(augment(0), augment(1))
    assert not np.array_equal(augment(0), np.asarray(image))


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (PIL.Image.new("L", (4, 4), 0), BLACK),
        (PIL.Image.new("1", (4, 4), 1), WHITE),
        (PIL.Image.new("LA", (4, 4), (0, 0)), WHITE),
        (PIL.Image.new("RGBA", (4, 4), (0, 0, 255, 255)), BLUE),
        (PIL.Image.new("CMYK", (4, 4), (0, 255, 255, 0)), RED),
        (PIL.Image.new("I;16", (4, 4), GREY_16_BIT), GREY),
        (PIL.Image.new("I", (4, 4), GREY_16_BIT), GREY),
    ],
    ids=lambda value: getattr(value, "mode", None),
)
def test_to_rgb_handles_every_mode(image, expected):
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == expected


def test_decode_image_accepts_every_form(tmp_path):
    image = PIL.Image.new("RGB", (5, 3), RED)
    path = tmp_path / "red.png"
    image.save(path)
    as_path = {"path": str(path), "bytes": None}
    as_bytes = {"path": None, "bytes": png_bytes(image)}
    for value in (image, path, str(path), as_path, as_bytes):
        decoded = decode_image(value)
        assert decoded.size == (5, 3) and decoded.convert("RGB").getpixel((0, 0)) == RED


def test_decode_image_returns_none_for_unreadable_input(tmp_path, caplog):
    truncated = tmp_path / "truncated.png"
    full = png_bytes(random_image(np.random.default_rng(0), 64, 64))
    truncated.write_bytes(full[: len(full) // 2])  # header intact, pixel data cut
    with caplog.at_level(logging.WARNING, logger="dallekit.data"):
        assert decode_image(truncated) is None
        assert decode_image(PIL.Image.open(truncated)) is None  # lazily opened: load() must fail
        assert decode_image(tmp_path / "missing.png") is None
        assert decode_image({"path": None, "bytes": b"not an image"}) is None
    assert "truncated.png" in caplog.text and "missing.png" in caplog.text


def test_collator_on_all_bad_batch_returns_empty_tensors():
    bad = {"image": {"path": None, "bytes": b"junk"}, "text": "broken", "label": 3}
    batch = TextImageCollator(image_size=8)([bad, bad])
    assert batch["pixel_values"].shape == (0, 3, 8, 8)
    assert batch["text"] == [] and batch["num_skipped"] == 2
    assert batch["label"].dtype == torch.long and batch["label"].shape == (0,)


def test_collator_in_a_data_loader_passes_labels(digits):
    collator = pickle.loads(pickle.dumps(TextImageCollator(image_size=32)))  # workers need pickling
    loader = torch.utils.data.DataLoader(digits["validation"], batch_size=8, collate_fn=collator)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (8, 3, 32, 32)
    assert batch["label"].tolist() == digits["validation"]["label"][:8]
    assert batch["text"] == digits["validation"]["text"][:8]
    assert batch["num_skipped"] == 0


def test_split_fingerprint_is_the_same_in_another_process_and_tells_selections_apart() -> None:
    """The key of cached codes and judges: another process loading the same split gets the same one (else every run
    would encode and train them again), and another selection of rows gets another."""
    splits = load_text_image_dataset(DataConfig(source="digits", image_size=16))
    train = splits["train"]
    elsewhere = subprocess.run(
        [sys.executable, "-c", "from dallekit.data import DataConfig, load_text_image_dataset\n"
         "from dallekit.data.cache import split_fingerprint\n"
         "print(split_fingerprint(load_text_image_dataset(DataConfig(source='digits', image_size=16))['train']))"],
        capture_output=True, text=True, check=True).stdout.split()[-1]
    assert split_fingerprint(train) == elsewhere
    shuffled = train.shuffle(seed=0)
    others = (splits["validation"], shuffled, shuffled.select(range(10)), train.shuffle(seed=1).select(range(10)),
              datasets.concatenate_datasets([train, train]))
    keys = {split_fingerprint(split) for split in (train, *others)}
    assert len(keys) == 6
