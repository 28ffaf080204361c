"""Configuration of the captioned-image data both stages train on."""

from dataclasses import dataclass, field

import emoji

CAPTION_LANGUAGES: tuple[str, ...] = tuple(emoji.LANGUAGES)  # the languages of the emoji package's CLDR names


@dataclass
class DataConfig:
    """Where the captioned images come from and how they are split.

    `source` is a built-in dataset name (`"digits"`, `"shapes"`, `"emoji"`), a local folder (the
    `datasets` imagefolder convention: images plus `metadata.jsonl`/`metadata.csv` with
    `file_name` and caption columns), WebDataset tar shards (`shards/{00000..00099}.tar`, a folder
    of `.tar` files, one `.tar`, or a Hub dataset of them; captions from each sample's `.txt`, else
    the `caption_json_field` of its `.json`) or anything else `datasets.load_dataset` accepts (a Hub
    dataset id, a local directory of parquet/csv/json files).

    Built-in datasets always use their own fixed split (seed 0), so `validation_fraction`
    and `seed` only apply to other sources that lack `validation_split`.
    """

    source: str = "digits"
    image_size: int = 32  # side of the square training images; built-ins are drawn at it
    image_column: str = "image"  # source column names, renamed to `image` and `text`
    text_column: str = "text"
    # a column of several captions per image (list of strings), kept as `captions` when the source has it
    captions_column: str | None = "captions"
    train_split: str = "train"
    validation_split: str = "validation"
    validation_fraction: float = 0.1  # share of train held out when validation_split is absent
    seed: int = 0  # seed of that held-out split
    # WebDataset shards: the JSON field holding the caption of samples without a .txt member
    caption_json_field: str = "caption"
    # WebDataset shards: the held-out shards (a pattern, folder or .tar); default: whole shards of `source`
    validation_source: str | None = None
    # fine-tuning: another source (a folder, shards, a built-in name...) whose training examples are mixed into
    # this one's training split, `replay_fraction` of it, so that the model keeps seeing what it learnt before (0.5:
    # a LoRA adapter for hand emoji kept 94% of the base's R-precision on other emoji, 81% at 0.25, learning as much)
    replay_source: str | None = None
    replay_fraction: float = 0.5
    streaming: bool = False  # stream the train split (an IterableDataset); validation is read once, memory-mapped
    shuffle_buffer_size: int = 1000  # a streamed train split is shuffled through a buffer of this many examples
    num_shapes: int = 2000  # size of the built-in `shapes` dataset
    # built-in `emoji`: the CLDR name languages; the first gives `text`, all of them `captions`
    caption_languages: list[str] = field(default_factory=lambda: ["en"])
    max_examples: int | None = None  # cap on the train split, for quick runs

    def __post_init__(self) -> None:
        for name in ("source", "image_column", "text_column", "train_split", "validation_split", "caption_json_field"):
            value = getattr(self, name)
            _require(isinstance(value, str) and value != "", name, value, "a non-empty string")
        other_columns = ("", self.image_column, self.text_column)
        _require(
            self.captions_column is None
            or (isinstance(self.captions_column, str) and self.captions_column not in other_columns),
            "captions_column",
            self.captions_column,
            "None (one caption per image) or the name of a column of caption lists other than the image and "
            "text columns, e.g. 'captions'",
        )
        _require(
            self.validation_source is None
            or (isinstance(self.validation_source, str) and self.validation_source not in ("", self.source)),
            "validation_source",
            self.validation_source,
            "None (hold out shards of source) or WebDataset shards other than source, e.g. 'shards/validation'",
        )
        _require(
            self.image_column != self.text_column,
            "text_column",
            self.text_column,
            "a column other than image_column",
        )
        _require(
            self.train_split != self.validation_split,
            "validation_split",
            self.validation_split,
            "a split other than train_split",
        )
        _require(
            _is_int(self.image_size) and self.image_size > 0,
            "image_size",
            self.image_size,
            "a positive integer, e.g. 32",
        )
        _require(
            _is_number(self.validation_fraction) and 0 < self.validation_fraction < 1,
            "validation_fraction",
            self.validation_fraction,
            "a number strictly between 0 and 1, e.g. 0.1",
        )
        _require(_is_int(self.seed) and self.seed >= 0, "seed", self.seed, "a non-negative integer")
        _require(
            self.replay_source is None
            or (isinstance(self.replay_source, str) and self.replay_source not in ("", self.source)),
            "replay_source",
            self.replay_source,
            "None (no replay) or a data source other than source, e.g. the folder a base pipeline was trained on",
        )
        _require(
            _is_number(self.replay_fraction) and 0 < self.replay_fraction < 1,
            "replay_fraction",
            self.replay_fraction,
            "the share of training examples drawn from replay_source, strictly between 0 and 1, e.g. 0.2",
        )
        _require(isinstance(self.streaming, bool), "streaming", self.streaming, "True or False")
        _require(
            _is_int(self.shuffle_buffer_size) and self.shuffle_buffer_size > 0,
            "shuffle_buffer_size",
            self.shuffle_buffer_size,
            "a positive number of examples (held undecoded in memory by each data-loading worker; 1 shuffles only "
            "the order of the shards), e.g. 1000",
        )
        _require(
            _is_int(self.num_shapes) and self.num_shapes >= 10,
            "num_shapes",
            self.num_shapes,
            "an integer >= 10, so that the 10% validation split is not empty",
        )
        if (error := caption_languages_error(self.caption_languages)) is not None:
            raise ValueError(f"DataConfig.{error}")
        _require(
            self.max_examples is None or (_is_int(self.max_examples) and self.max_examples > 0),
            "max_examples",
            self.max_examples,
            "None (no cap) or a positive integer",
        )


@dataclass
class AugmentationConfig:
    """Randomly shifted and scaled copies of each training image (`shift_and_scale`); validation is never augmented.

    Stage 2 encodes `copies` variants of every training image besides the original, once, into
    extra code sequences with the same caption. Variant k of example i depends only on `seed`
    and i, so the codes do not depend on batching, and changing any setting re-encodes.
    """

    copies: int = 0  # augmented variants per training image; 0: off
    max_translation: float = 0.1  # largest shift along each axis, as a fraction of the image side
    max_scale_change: float = 0.1  # zoom about the centre by a factor drawn from [1 - c, 1 + c]
    seed: int = 0

    def __post_init__(self) -> None:
        owner = "AugmentationConfig"
        _require(_is_int(self.copies) and self.copies >= 0, "copies", self.copies,
                 "a non-negative integer (0 turns augmentation off)", owner)
        _require(_is_number(self.max_translation) and 0 <= self.max_translation < 0.5, "max_translation",
                 self.max_translation, "a fraction of the image side in [0, 0.5), e.g. 0.1", owner)
        _require(_is_number(self.max_scale_change) and 0 <= self.max_scale_change < 1, "max_scale_change",
                 self.max_scale_change, "a number in [0, 1), e.g. 0.1 for zooms between 0.9 and 1.1", owner)
        _require(self.copies == 0 or self.max_translation > 0 or self.max_scale_change > 0, "copies", self.copies,
                 "0, or raise max_translation or max_scale_change so that the copies differ from the originals",
                 owner)
        _require(_is_int(self.seed) and self.seed >= 0, "seed", self.seed, "a non-negative integer", owner)


def caption_languages_error(languages: object) -> str | None:
    """Why `languages` is not a usable `caption_languages` value, or None when it is."""
    if (
        isinstance(languages, (list, tuple))
        and languages
        and all(isinstance(code, str) and code in CAPTION_LANGUAGES for code in languages)
        and len(set(languages)) == len(languages)
    ):
        return None
    return (
        f"caption_languages={languages!r} is invalid: set it to a non-empty list of distinct language "
        f"codes of the emoji package's CLDR names, from {', '.join(CAPTION_LANGUAGES)}; e.g. ['en', 'es']."
    )


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(condition: bool, name: str, value: object, allowed: str, owner: str = "DataConfig") -> None:
    if not condition:
        raise ValueError(f"{owner}.{name}={value!r} is invalid: set it to {allowed}.")
