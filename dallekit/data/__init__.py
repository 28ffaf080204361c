"""Captioned-image data shared by both stages: built-in datasets, local/Hub loading, transforms.

The `emoji` dataset and its licence constants live in `dallekit.data.emoji` (imported on use).
"""

from .checks import DataError, DataSourceNotFoundError
from .config import AugmentationConfig, DataConfig
from .digits import make_digits_dataset
from .shapes import draw_shape, make_shapes, make_shapes_dataset, parse_shape_caption, shape_caption
from .sources import BUILTIN_DATASETS, load_text_image_dataset, training_captions
from .transforms import (
    DecodedPairs,
    ImageTransform,
    TextImageCollator,
    background_colour,
    decode_image,
    decode_pairs,
    random_shift_and_scale,
    shift_and_scale,
    to_rgb,
)

__all__ = [
    "DecodedPairs",
    "decode_pairs",
    "BUILTIN_DATASETS",
    "AugmentationConfig",
    "DataConfig",
    "DataError",
    "DataSourceNotFoundError",
    "ImageTransform",
    "TextImageCollator",
    "background_colour",
    "decode_image",
    "draw_shape",
    "load_text_image_dataset",
    "make_digits_dataset",
    "make_shapes",
    "make_shapes_dataset",
    "parse_shape_caption",
    "random_shift_and_scale",
    "shape_caption",
    "shift_and_scale",
    "to_rgb",
    "training_captions",
]
