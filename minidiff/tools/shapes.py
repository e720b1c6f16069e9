"""Shapes, the toy data: coloured circles, squares and triangles on black, with their captions.

Nothing is downloaded and nothing is stored: image `index` of a `Shapes(seed=s)` set is drawn
from a random generator seeded by (s, index), so the same index always gives the same picture
and caption, and the data of a training step is a function of the step alone (what exact
resume needs). A data set returns (image, caption): image a float tensor (3, H, W) in [-1, 1],
caption a string, and has `captions()` (the tokenizer's vocabulary is built from them) and
`sample_prompts()` (what the training sample grids show). Your own pictures and MNIST-like
sets: `minidiff.tools.datasets`.
"""

from __future__ import annotations

import itertools
import math
import random

import torch
from PIL import Image, ImageDraw

from ..images import pil_to_tensor

COLOURS = {
    "red": (230, 40, 40),
    "orange": (240, 140, 20),
    "yellow": (235, 215, 30),
    "green": (40, 180, 60),
    "blue": (40, 90, 230),
    "purple": (150, 60, 210),
}
SHAPES = ("circle", "square", "triangle")
COLOUR_JITTER = 20  # per channel, +-
SIZE_RANGE = (0.40, 0.75)  # bounding-box side as a fraction of the region's side
SUPERSAMPLE = 4  # draw this much larger, then downsample: anti-aliased edges
MIN_SIZE, MIN_SIZE_TWO_OBJECTS, MAX_SIZE = 16, 32, 64


def caption_for(objects: list[tuple[str, str]]) -> str:
    """`a red circle`, or `a red circle on the left and a blue square on the right`."""
    if len(objects) == 1:
        colour, shape = objects[0]
        return f"a {colour} {shape}"
    (c1, s1), (c2, s2) = objects
    return f"a {c1} {s1} on the left and a {c2} {s2} on the right"


def single_object_prompts() -> list[str]:
    return [caption_for([(c, s)]) for c, s in itertools.product(COLOURS, SHAPES)]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill) -> None:
    """Draw `shape` filling the square bounding box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":  # upright: apex on top, flat base at the bottom
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(objects: list[dict], image_size: int) -> Image.Image:
    """Render objects, each {"shape", "rgb", "box"} with the box in pixels of the final image."""
    s = SUPERSAMPLE
    canvas = Image.new("RGB", (image_size * s, image_size * s), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        # PIL's box is inclusive of its last pixel: subtract one so the side is exactly size * s
        x0, y0, x1, y1 = (v * s for v in obj["box"])
        draw_shape(draw, obj["shape"], (x0, y0, x1 - 1, y1 - 1), tuple(obj["rgb"]))
    return canvas.resize((image_size, image_size), Image.Resampling.BOX)


def random_scene(rng: random.Random, image_size: int, two_objects: bool) -> list[dict]:
    """Pick shapes, colours, sizes and positions following the Shapes spec."""
    regions = [(0, image_size)] if not two_objects else [(0, image_size // 2), (image_size // 2, image_size)]
    objects = []
    for left, right in regions:
        region_w = right - left
        colour = rng.choice(list(COLOURS))
        shape = rng.choice(SHAPES)
        rgb = [min(255, max(0, v + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for v in COLOURS[colour]]
        # positions and side on the supersampled grid, so sizes are not limited to whole pixels
        grid = lambda v: math.floor(v * SUPERSAMPLE) / SUPERSAMPLE  # noqa: E731
        side = grid(rng.uniform(*SIZE_RANGE) * region_w)
        x = left + grid(rng.uniform(0, region_w - side))
        y = grid(rng.uniform(0, image_size - side))
        box = (x, y, x + side, y + side)
        objects.append({"colour": colour, "shape": shape, "rgb": rgb, "box": box})
    return objects


class Shapes(torch.utils.data.Dataset):
    """An endless-looking set of `length` captioned shape images, deterministic in (seed, index).

    Returns (image, caption): image a float tensor (3, H, W) in [-1, 1], caption a string.
    `two_object_fraction` of the images hold two objects (only allowed from 32 px up).
    """

    def __init__(self, image_size: int = 16, seed: int = 0, length: int = 10**9, two_object_fraction: float = 0.0):
        if not MIN_SIZE <= image_size <= MAX_SIZE:
            raise ValueError(f"Shapes image_size must be between {MIN_SIZE} and {MAX_SIZE}, got {image_size}")
        if two_object_fraction > 0 and image_size < MIN_SIZE_TWO_OBJECTS:
            raise ValueError(f"two-object images need image_size >= {MIN_SIZE_TWO_OBJECTS}, got {image_size}")
        self.image_size, self.seed, self.length = image_size, seed, length
        self.two_object_fraction = two_object_fraction

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> list[dict]:
        rng = random.Random(f"shapes-{self.seed}-{index}")
        two = rng.random() < self.two_object_fraction
        return random_scene(rng, self.image_size, two)

    def pil_and_caption(self, index: int) -> tuple[Image.Image, str]:
        objects = self.scene(index)
        return render(objects, self.image_size), caption_for([(o["colour"], o["shape"]) for o in objects])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        image, caption = self.pil_and_caption(index)
        return pil_to_tensor(image), caption

    def captions(self) -> list[str]:
        """Every caption this set can produce (the tokenizer's vocabulary comes from these)."""
        pairs = list(itertools.product(COLOURS, SHAPES))
        texts = [caption_for([p]) for p in pairs]
        if self.two_object_fraction > 0:
            texts.append(caption_for([pairs[0], pairs[1]]))  # adds "on the left and ... right"
        return texts

    def sample_prompts(self) -> list[str]:
        return single_object_prompts()
