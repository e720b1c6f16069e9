"""Shapes, the toy data: coloured circles, squares and triangles on black, with their captions.

Nothing is downloaded and nothing is stored: image `index` of a `Shapes(seed=s)` set is drawn
from a random generator seeded by (s, index), so the same index always gives the same picture
and caption, and the data of a training step is a function of the step alone (what exact
resume needs). A data set returns (image, caption): image a float tensor (3, H, W) in [-1, 1],
caption a string, and has `captions()` (the tokenizer's vocabulary is built from them) and
`sample_prompts()` (what the training sample grids show). Your own pictures and MNIST-like
sets: `minidiff.tools.datasets`.

What is in a picture and how it is drawn are separate steps: `Shapes.scene(index)` picks the
objects (shape, colour name, jittered RGB, box), `caption_for` writes their caption, and a
renderer draws them. Two renderers draw the same scenes:

- `render` (PIL, one picture at a time, supersampled): what `Shapes[index]` returns, and so the
  training data of `python train.py`.
- `render_batch` (torch, a whole batch in a few tensor operations, on any device, analytic
  edge coverage): what `Shapes.batch(indices)` returns by default. Its pictures are not PIL's
  pixel for pixel (edge pixels differ by up to about a sixth of full brightness, PIL's triangles
  come out about 1% larger, and its values are not rounded to 8-bit levels), but they show the
  same objects in the same boxes with the same colours and captions, and the statistics of the
  two agree (tests/test_shapes_renderer.py).
"""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from .pictures import pil_to_tensor

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


def scene_caption(objects: list[dict]) -> str:
    """The caption of a scene of `Shapes.scene`."""
    return caption_for([(obj["colour"], obj["shape"]) for obj in objects])


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


# ---- the torch renderer: a batch at once ---------------------------------------------------
# Every object's coverage of the pixel in row i, column j (pixels one unit wide, centre
# (i + 1/2, j + 1/2)) is
#     clamp(U(i) + V(j), 0, 1) * R(i) * C(j)
# U + V is 1/2 minus the signed distance (in pixels) from the pixel centre to the shape's edge,
# split into a row term and a column term, so that clamp(U + V, 0, 1) is the share of the pixel
# on the inside of an edge crossing it (analytic anti-aliasing, one evaluation per pixel). R and
# C are the share of the pixel's row or column within a half extent of the box centre: the exact
# coverage of a box side. With dy, dx the offsets of the pixel centre from the box centre and r
# the half side of the box:
#   circle    U = 1/2 + r/2 - dy^2/2r, V = -dx^2/2r, R = C = 1. U + V = 1/2 + (r^2 - |d|^2)/2r
#             is 1/2 + r - |d| to within 0.04 where the edge crosses the pixel (|d| within 1/2 of
#             r), even for the smallest circle (r = 3.2 px at 16 px): the circle inscribed in the
#             box, as PIL's ellipse.
#   triangle  U = 1/2 + (dy + r)/sqrt5, V = -2|dx|/sqrt5: the two slanted edges, from the apex at
#             the middle of the box's top side to its bottom corners (PIL's polygon); R = the
#             box's rows (the base, and nothing above the apex), C = 1.
#   square    U = 1, V = 0; R, C = the box's rows and columns: exact.
# So U and V are polynomials in (1, d, |d|, d^2) whose coefficients are a + b r + c / r, with
# (a, b, c) fixed per shape (EDGE_TERMS); the extents of R and C are r or unbounded.
ROOT5 = math.sqrt(5)
NONE = (0, 0, 0)
EDGE_TERMS = {  # shape: U's and V's coefficients on (1, d, |d|, d^2), each as (a, b, c)
    "circle": (((0.5, 0.5, 0), NONE, NONE, (0, 0, -0.5)), (NONE, NONE, NONE, (0, 0, -0.5))),
    "square": (((1, 0, 0), NONE, NONE, NONE), (NONE, NONE, NONE, NONE)),
    "triangle": (((0.5, 1 / ROOT5, 0), (1 / ROOT5, 0, 0), NONE, NONE), (NONE, NONE, (-2 / ROOT5, 0, 0), NONE)),
}
EXTENTS = {"circle": (math.inf, math.inf), "square": (1, 1), "triangle": (1, math.inf)}  # R's and C's, in r
EDGE_TABLE = np.array([EDGE_TERMS[shape] for shape in SHAPES], dtype=np.float32).reshape(len(SHAPES), 8, 3)
EXTENT_TABLE = np.array([EXTENTS[shape] for shape in SHAPES], dtype=np.float32)
SHAPE_INDEX = {shape: i for i, shape in enumerate(SHAPES)}


def object_params(objects: list[dict]) -> np.ndarray:
    """What `coverage` and the painting need of each object, (N, 15) float32, worked out with
    numpy on the CPU: the box centre (row, column); U's and V's coefficients on (1, d, |d|, d^2)
    (EDGE_TERMS at this r: 8); the half extents of R and C (2, inf where unbounded); and
    colour + 1, the RGB / 127.5 that full cover adds to the black -1 (3)."""
    rows = np.array([[SHAPE_INDEX[obj["shape"]], *obj["rgb"], *obj["box"]] for obj in objects], dtype=np.float32)
    shape_ids, x0, y0, x1, y1 = rows[:, 0].astype(np.int64), *rows[:, 4:8].T
    half = (x1 - x0) / 2
    powers = np.stack([np.ones_like(half), half, 1 / half], 1)  # (N, 3): 1, r, 1/r
    coefficients = np.einsum("nkp,np->nk", EDGE_TABLE[shape_ids], powers)
    return np.concatenate([np.stack([(y0 + y1) / 2, (x0 + x1) / 2], 1), coefficients,
                           EXTENT_TABLE[shape_ids] * half[:, None], rows[:, 1:4] / 127.5], 1)


def coverage(params: Tensor, image_size: int) -> Tensor:
    """The share of each pixel that each object covers: (N, H, W) in [0, 1]. `params`: the first
    12 columns of `object_params`, on the device to draw on."""
    centre, c, extents = params[:, 0:2, None], params[:, 2:10].view(-1, 2, 4, 1), params[:, 10:12, None]
    pixel = torch.arange(image_size, device=params.device, dtype=params.dtype) + 0.5
    d = pixel - centre  # (N, 2, H): offsets of the pixel centres from the box centre, rows then columns
    distance = d.abs()
    profile = torch.addcmul(c[:, :, 0], c[:, :, 1], d).addcmul_(c[:, :, 2], distance).addcmul_(c[:, :, 3], d * d)
    # R, then C: the part of [d - 1/2, d + 1/2] within [-extent, extent] (extents are over 1/2)
    inside = (extents + 0.5 - distance).clamp_(0, 1)
    edges = (profile[:, 0, :, None] + profile[:, 1, None, :]).clamp_(0, 1)  # U + V
    return edges.mul_(inside[:, 0, :, None]).mul_(inside[:, 1, None, :])


def render_batch(scenes: list[list[dict]], image_size: int, device=None) -> Tensor:
    """Draw many scenes (each a list of {"shape", "rgb", "box"}, as `Shapes.scene` gives) at once:
    float tensor (B, 3, H, W) in [-1, 1] on `device` (default: the CPU). A pixel is the black
    background (-1) plus, for each object, its coverage times (colour + 1): objects must not
    overlap, and in Shapes they do not (one object per region). The per-object numbers are worked
    out on the CPU (`object_params`) and moved to `device` as one tensor; the pixels are drawn
    there, in about twenty tensor operations whatever the batch size.

    Anti-aliasing is analytic (the comment above `ROOT5`): each pixel's coverage comes from the
    signed distance of its centre to the edge, clamped, instead of drawing 4 x 4 times larger and
    averaging as `render` does. One evaluation per pixel, and a separable one: most of the
    arithmetic is on (objects, H) rows and columns, and only four passes go over (objects, H, W)."""
    if not all(scenes):
        raise ValueError("every scene needs at least one object")
    if not scenes:
        return torch.full((0, 3, image_size, image_size), -1.0, device=device)
    # the first object of every scene, in scene order, then the others with the index of their scene
    drawn = [objects[0] for objects in scenes] + [obj for objects in scenes for obj in objects[1:]]
    owners = [b for b, objects in enumerate(scenes) for _ in objects[1:]]
    params = torch.from_numpy(object_params(drawn)).to(device)
    cover = coverage(params, image_size).view(len(drawn), 1, -1)  # (N, 1, H*W)
    paint = params[:, 12:15, None]  # (N, 3, 1)
    n = len(scenes)
    images = torch.baddbmm(torch.tensor(-1.0, device=params.device), paint[:n], cover[:n])
    if owners:
        images.index_add_(0, torch.tensor(owners, device=params.device), paint[n:] * cover[n:])
    return images.view(n, 3, image_size, image_size)


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
        return render(objects, self.image_size), scene_caption(objects)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        image, caption = self.pil_and_caption(index)
        return pil_to_tensor(image), caption

    def batch(self, indices, device=None, renderer: str = "torch") -> tuple[Tensor, list[str]]:
        """The images (B, 3, H, W) in [-1, 1], on `device`, and the captions of `indices`.
        renderer "torch": drawn all at once by `render_batch`, on `device` (a GPU draws them
        there); "pil": `self[i]` for each index (what `__getitem__` returns), stacked, then moved
        to `device`. The captions are the same either way."""
        if renderer == "pil":
            items = [self[i] for i in indices]
            return torch.stack([image for image, _ in items]).to(device), [caption for _, caption in items]
        if renderer != "torch":
            raise ValueError(f"unknown renderer {renderer!r}; expected 'torch' or 'pil'")
        scenes = [self.scene(i) for i in indices]
        return render_batch(scenes, self.image_size, device), [scene_caption(objects) for objects in scenes]

    def captions(self) -> list[str]:
        """Every caption this set can produce (the tokenizer's vocabulary comes from these)."""
        pairs = list(itertools.product(COLOURS, SHAPES))
        texts = [caption_for([p]) for p in pairs]
        if self.two_object_fraction > 0:
            texts.append(caption_for([pairs[0], pairs[1]]))  # adds "on the left and ... right"
        return texts

    def sample_prompts(self) -> list[str]:
        return single_object_prompts()
