"""Built-in `digits` dataset: scikit-learn's 1,797 real handwritten 8x8 digit scans, captioned.

Digits are white on a black background (the scans' own convention, as in MNIST), upscaled
with a bicubic filter to the requested size. The split is fixed: 1,400 train / 397 validation,
stratified by digit, seed 0.
"""

import datasets
import numpy as np
import PIL.Image
import sklearn.datasets

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_TEMPLATES = (
    "a handwritten digit {name}",
    "the number {digit}",
    "the digit {name}",
    "digit {digit} written by hand",
    "a hand-drawn {name}",
)
NUM_VALIDATION = 397
SEED = 0

FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "text": datasets.Value("string"),
        "label": datasets.ClassLabel(names=list(DIGIT_NAMES)),
    }
)


def digit_caption(digit: int, template: int) -> str:
    """Caption for `digit` in phrasing number `template` of `CAPTION_TEMPLATES`."""
    return CAPTION_TEMPLATES[template].format(name=DIGIT_NAMES[digit], digit=digit)


def make_digits_dataset(image_size: int) -> datasets.DatasetDict:
    """The captioned digits as RGB images of `image_size`, split into `train` and `validation`."""
    scans = sklearn.datasets.load_digits()
    grey = np.rint(scans.images * (255 / 16)).astype(np.uint8)  # (n, 8, 8): 0..16 -> 0..255
    size = (image_size, image_size)
    images = [
        PIL.Image.fromarray(scan).resize(size, PIL.Image.Resampling.BICUBIC).convert("RGB")
        for scan in grey
    ]
    templates = np.random.default_rng(SEED).integers(len(CAPTION_TEMPLATES), size=len(images))
    labels = scans.target.tolist()
    captions = [digit_caption(digit, template) for digit, template in zip(labels, templates)]
    columns = {"image": images, "text": captions, "label": labels}
    dataset = datasets.Dataset.from_dict(columns, features=FEATURES)
    splits = dataset.train_test_split(
        test_size=NUM_VALIDATION, seed=SEED, stratify_by_column="label"
    )
    return datasets.DatasetDict({"train": splits["train"], "validation": splits["test"]})
