"""Built-in `shapes` dataset: coloured shapes drawn with PIL, captioned with their attributes.

Each image holds one shape (circle, square, triangle) in one colour (red, green, blue, yellow)
at one position (left, right, top, bottom, centre) on a black background, e.g. "a red circle
on the left". Size and placement are jittered a little. `parse_shape_caption` recovers the
attributes from a caption, so generated images can be checked against their prompt.
"""

import itertools
import random
import re

import datasets
import PIL.Image
import PIL.ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 210, 30),
}
# position -> shape centre (x, y) as a fraction of the image side
POSITIONS = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "centre": (0.5, 0.5),
}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
BACKGROUND = (0, 0, 0)
SUPERSAMPLING = 4
SEED = 0
VALIDATION_FRACTION = 0.1

FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "text": datasets.Value("string"),
        "label": datasets.ClassLabel(names=list(SHAPES)),
        "colour": datasets.ClassLabel(names=list(COLOURS)),
        "position": datasets.ClassLabel(names=list(POSITIONS)),
    }
)
_CAPTION = re.compile(
    f"a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) ({'|'.join(POSITION_PHRASES.values())})"
)


def draw_shape(
    shape: str,
    colour: str,
    position: str,
    image_size: int,
    *,
    scale: float = 0.35,
    offset: tuple[float, float] = (0.0, 0.0),
) -> PIL.Image.Image:
    """An anti-aliased RGB image of one shape.

    `scale` is the shape's width as a fraction of the image side; `offset` shifts its centre
    from the nominal `POSITIONS[position]`, also in fractions of the side.
    """
    for name, value, allowed in (
        ("shape", shape, SHAPES),
        ("colour", colour, COLOURS),
        ("position", position, POSITIONS),
    ):
        if value not in allowed:
            raise ValueError(f"{name}={value!r} is not supported: choose one of {list(allowed)}.")
    side = image_size * SUPERSAMPLING
    canvas = PIL.Image.new("RGB", (side, side), BACKGROUND)
    x, y = ((centre + shift) * side for centre, shift in zip(POSITIONS[position], offset))
    r = scale * side / 2
    draw = PIL.ImageDraw.Draw(canvas)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif shape == "square":
        draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
    else:
        draw.polygon(((x, y - r), (x + r, y + r), (x - r, y + r)), fill=fill)
    return canvas.reduce(SUPERSAMPLING)


def shape_caption(attributes: dict[str, str]) -> str:
    """Caption such as "a red circle on the left" for `{"shape", "colour", "position"}`."""
    where = POSITION_PHRASES[attributes["position"]]
    return f"a {attributes['colour']} {attributes['shape']} {where}"


def parse_shape_caption(caption: str) -> dict[str, str]:
    """The `{"shape", "colour", "position"}` a caption asks for; inverse of `shape_caption`."""
    match = _CAPTION.fullmatch(caption.strip().lower())
    if match is None:
        raise ValueError(
            f"caption={caption!r} is not a shapes caption: expected 'a red circle on the left'."
        )
    colour, shape, phrase = match.groups()
    position = next(name for name, text in POSITION_PHRASES.items() if text == phrase)
    return {"shape": shape, "colour": colour, "position": position}


def make_shapes(
    num: int, image_size: int, seed: int = SEED
) -> list[tuple[PIL.Image.Image, str, dict[str, str]]]:
    """`num` (image, caption, attributes) triples cycling through every shape/colour/position.

    Attribute combinations are balanced (shuffled once, then repeated); size and placement
    jitter are drawn from `seed`.
    """
    rng = random.Random(seed)
    combinations = list(itertools.product(SHAPES, COLOURS, POSITIONS))
    rng.shuffle(combinations)
    examples = []
    for index in range(num):
        shape, colour, position = combinations[index % len(combinations)]
        attributes = {"shape": shape, "colour": colour, "position": position}
        image = draw_shape(
            shape,
            colour,
            position,
            image_size,
            scale=rng.uniform(0.3, 0.4),
            offset=(rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03)),
        )
        examples.append((image, shape_caption(attributes), attributes))
    return examples


def make_shapes_dataset(num: int, image_size: int) -> datasets.DatasetDict:
    """`num` captioned shapes split 90/10 (seed 0) into `train` and `validation`.

    `label` is the shape's index in `SHAPES`; `colour` and `position` are class labels too.
    """
    examples = make_shapes(num, image_size)
    columns = {
        "image": [image for image, _, _ in examples],
        "text": [caption for _, caption, _ in examples],
        "label": [attributes["shape"] for _, _, attributes in examples],
        "colour": [attributes["colour"] for _, _, attributes in examples],
        "position": [attributes["position"] for _, _, attributes in examples],
    }
    dataset = datasets.Dataset.from_dict(columns, features=FEATURES)
    splits = dataset.train_test_split(test_size=VALIDATION_FRACTION, seed=SEED)
    return datasets.DatasetDict({"train": splits["train"], "validation": splits["test"]})
