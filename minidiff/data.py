"""Shapes, the toy data: coloured circles, squares and triangles on black, with their captions.

Nothing is downloaded and nothing is stored: image `index` of a `Shapes(seed=s)` set is a
function of (s, index) alone, so the same index always gives the same picture and caption, and
the data of a training step is a function of the step alone (what exact resume needs). A data
set returns (image, caption): image a float tensor (3, H, W) in [-1, 1], caption a string, and
has `batch(indices)` (a training batch at once), `captions()` (the tokenizer's vocabulary is
built from them) and `sample_prompts()` (what the training sample grids show). Your own
pictures and MNIST-like sets: `minidiff.tools.datasets`.

A batch is drawn at once, with no loop over its images:
1. `uniforms`: draw k of image i is a hash of (seed, i, k), so no image depends on its batch;
2. `scene_arrays`: shape, colour (+- `COLOUR_JITTER` per channel), side and position of each
   object, on a grid of points SUPERSAMPLE times finer than the pixels;
3. `spans`: every row of points crosses a circle, square or triangle in one span [left, right);
4. `coverage`: a pixel's share of the SUPERSAMPLE^2 points it holds that lie in the span of
   their row (anti-aliased edges), then `paint` colours it; both run on the training device.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from PIL import Image

from .images import tensor_to_pil

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
SUPERSAMPLE = 4  # points per pixel side: anti-aliased edges, sizes and positions on a 1/4 pixel grid
MIN_SIZE, MIN_SIZE_TWO_OBJECTS, MAX_SIZE = 16, 32, 64
DRAWS = 1 + 2 * 8  # uniforms per image: one or two objects? then 8 per object (colour, shape, 3 jitters, side, x, y)


def caption_for(objects: list[tuple[str, str]]) -> str:
    """`a red circle`, or `a red circle on the left and a blue square on the right`."""
    if len(objects) == 1:
        colour, shape = objects[0]
        return f"a {colour} {shape}"
    (c1, s1), (c2, s2) = objects
    return f"a {c1} {s1} on the left and a {c2} {s2} on the right"


PAIRS = list(itertools.product(COLOURS, SHAPES))  # (colour, shape) number n = colour * 3 + shape
CAPTIONS = [caption_for([p]) for p in PAIRS] + [caption_for([a, b]) for b in PAIRS for a in PAIRS]


def single_object_prompts() -> list[str]:
    return CAPTIONS[:len(PAIRS)]


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (Steele et al. 2014) on uint64 arrays (numpy wraps mod 2^64)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniforms(seed: int, indices, n: int) -> np.ndarray:
    """(B, n) uniforms in [0, 1): draw k of image i is a hash of (seed, i, k) alone, a counter-based
    generator (Salmon et al. 2011) with one stream per image, so no image depends on its batch."""
    golden = np.uint64(0x9E3779B97F4A7C15)
    key = splitmix64(splitmix64(np.array([seed % 2**64], np.uint64) * golden) + np.asarray(indices, np.uint64))  # (B,)
    draws = splitmix64(key[:, None] + np.arange(1, n + 1, dtype=np.uint64) * golden)  # (B, n)
    return (draws >> np.uint64(11)) * 2.0**-53  # the top 53 bits: a float64 in [0, 1), as random.random()


def scene_arrays(seed: int, indices, image_size: int, two_object_fraction: float) -> dict[str, np.ndarray]:
    """The objects of images `indices`, (B, K) each, K = 2 slots when two-object images can occur:
    `present`, `colour` and `shape` (indices into COLOURS and SHAPES), `rgb` (B, K, 3), and the
    box as x0, y0 and side in points, 1/SUPERSAMPLE of a pixel (integers, `box`, (B, K, 3))."""
    u = uniforms(seed, indices, DRAWS)
    two = u[:, 0] < two_object_fraction  # (B,)
    k = 2 if two_object_fraction > 0 else 1
    u = u[:, 1:1 + 8 * k].reshape(-1, k, 8)  # (B, K, 8)
    s, g = image_size, SUPERSAMPLE
    # the regions, in pixels: the whole picture, or the left and right halves
    left = np.where(two[:, None], np.array([0, s // 2])[:k], 0)  # (B, K)
    width = np.where(two[:, None], np.array([s // 2, s - s // 2])[:k], s)
    colour = (u[..., 0] * len(COLOURS)).astype(np.int64)
    shape = (u[..., 1] * len(SHAPES)).astype(np.int64)
    jitter = (u[..., 2:5] * (2 * COLOUR_JITTER + 1)).astype(np.int64) - COLOUR_JITTER
    rgb = np.clip(np.array(list(COLOURS.values()))[colour] + jitter, 0, 255)
    side = np.floor((SIZE_RANGE[0] + (SIZE_RANGE[1] - SIZE_RANGE[0]) * u[..., 5]) * width * g)
    x0 = left * g + np.floor(u[..., 6] * (width * g - side))
    y0 = np.floor(u[..., 7] * (s * g - side))
    present = np.ones_like(left, dtype=bool)
    present[:, 1:] = two[:, None]
    box = np.stack([x0, y0, side], -1).astype(np.int64)
    return dict(present=present, colour=colour, shape=shape, rgb=rgb, box=box)


def spans(shape: np.ndarray, box: np.ndarray, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Where objects (N,) lie on the grid of points, SUPERSAMPLE x SUPERSAMPLE per pixel: point
    (u, v) sits at (u + 1/2, v + 1/2), and object n holds the points left <= u < right of row v.
    -> (left, right), (N, 4H) each (both 0 in the rows it does not reach)."""
    x0, y0, side = (box[:, i, None] for i in range(3))  # (N, 1) each, in points
    v = np.arange(image_size * SUPERSAMPLE) + 0.5  # the rows' centres, (4H,)
    half = side / 2
    half_width = np.select([shape[:, None] == SHAPES.index("circle"), shape[:, None] == SHAPES.index("square")],
                           [np.sqrt(np.maximum(half**2 - (v - y0 - half) ** 2, 0)), half],
                           (v - y0) / 2)  # triangle: the apex on top, the base at the bottom
    inside = (v > y0) & (v < y0 + side)
    left = np.where(inside, np.ceil(x0 + half - half_width - 0.5), 0)
    right = np.where(inside, np.floor(x0 + half + half_width - 0.5) + 1, 0)
    return left, right


def coverage(left: torch.Tensor, right: torch.Tensor, image_size: int) -> torch.Tensor:
    """Spans (N, 4H) -> the fraction of each pixel the objects cover, (N, H, W), on their device:
    the points of row v in pixel column i are u = g i ... g i + g - 1, g = SUPERSAMPLE, so each
    row's span is clamped to them, and a pixel counts the g^2 points of its g rows."""
    g = SUPERSAMPLE
    columns = torch.arange(image_size, device=left.device, dtype=left.dtype) * g  # (W,)
    cover = torch.zeros(len(left), image_size, image_size, device=left.device)
    for k in range(g):  # point row k of every pixel row: (N, H, 1) spans against (W,) pixel columns
        start, end = left[:, k::g, None], right[:, k::g, None]
        cover += torch.minimum(end, columns + g).sub_(torch.maximum(start, columns)).clamp_(min=0)
    return cover.div_(g**2)  # (N, H, W)


def paint(cover: torch.Tensor, rgb: torch.Tensor, image_of: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Coverages (N, H, W) of objects of colour `rgb` (N, 3) in images `image_of` (N,) -> images
    (B, 3, H, W) in [-1, 1] on black, rounded to uint8 levels as PIL's box filter (objects never overlap)."""
    image = torch.zeros(batch_size, 3, *cover.shape[1:], device=cover.device)
    image.index_add_(0, image_of.to(cover.device), cover[:, None] * rgb.to(cover)[:, :, None, None])
    return (image + 0.5).floor_().div_(127.5).sub_(1)


def draw(shape: np.ndarray, box: np.ndarray, rgb: np.ndarray, image_of: np.ndarray, batch_size: int,
         image_size: int, device=None) -> torch.Tensor:
    """Objects (N,) in images `image_of` (N,) -> images (B, 3, H, W) in [-1, 1] on `device`: the
    spans on the CPU (N x 4H numbers), the pixels on `device`."""
    left, right = (torch.from_numpy(a).float().to(device) for a in spans(shape, box, image_size))
    return paint(coverage(left, right, image_size), torch.from_numpy(rgb), torch.from_numpy(image_of), batch_size)


def render(objects: list[dict], image_size: int) -> Image.Image:
    """Render objects, each {"shape", "rgb", "box"} with the box (x0, y0, x1, y1) in pixels of the
    final image on the grid of 1/SUPERSAMPLE pixel, square (x1 - x0 = y1 - y0)."""
    box = np.array([[round(o["box"][0] * SUPERSAMPLE), round(o["box"][1] * SUPERSAMPLE),
                     round((o["box"][2] - o["box"][0]) * SUPERSAMPLE)] for o in objects])
    shape = np.array([SHAPES.index(o["shape"]) for o in objects])
    rgb = np.array([list(o["rgb"]) for o in objects])
    return tensor_to_pil(draw(shape, box, rgb, np.zeros(len(objects), np.int64), 1, image_size))[0]


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

    def batch(self, indices, device: torch.device | str | None = None) -> tuple[torch.Tensor, list[str]]:
        """Images `indices` at once: (images (B, 3, H, W) on `device`, captions)."""
        scene = scene_arrays(self.seed, indices, self.image_size, self.two_object_fraction)
        present = scene["present"]  # (B, K)
        image_of = np.nonzero(present)[0]  # (N,): the image of each object
        images = draw(scene["shape"][present], scene["box"][present], scene["rgb"][present], image_of,
                      len(present), self.image_size, device)
        # the caption's place in CAPTIONS: n = colour * 3 + shape for one object; n_left + 18 (1 + n_right) for two
        number = scene["colour"] * len(SHAPES) + scene["shape"]  # (B, K)
        if number.shape[1] == 2:
            number = np.where(present[:, 1], number[:, 0] + len(PAIRS) * (1 + number[:, 1]), number[:, 0])
        return images, [CAPTIONS[i] for i in number.reshape(-1).tolist()]

    def scene(self, index: int) -> list[dict]:
        """Image `index`'s objects: {"colour", "shape", "rgb", "box"}, the box (x0, y0, x1, y1) in pixels."""
        scene = {k: v[0].tolist() for k, v in scene_arrays(self.seed, [index], self.image_size,
                                                           self.two_object_fraction).items()}
        objects = []
        for present, colour, shape, rgb, (x0, y0, side) in zip(*(scene[k] for k in
                                                                 ("present", "colour", "shape", "rgb", "box"))):
            if present:
                box = tuple(v / SUPERSAMPLE for v in (x0, y0, x0 + side, y0 + side))
                objects.append({"colour": list(COLOURS)[colour], "shape": SHAPES[shape], "rgb": rgb, "box": box})
        return objects

    def pil_and_caption(self, index: int) -> tuple[Image.Image, str]:
        images, captions = self.batch([index])
        return tensor_to_pil(images)[0], captions[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        images, captions = self.batch([index])
        return images[0], captions[0]

    def captions(self) -> list[str]:
        """Every caption this set can produce (the tokenizer's vocabulary comes from these)."""
        texts = CAPTIONS[:len(PAIRS)]
        if self.two_object_fraction > 0:
            texts = texts + [caption_for(PAIRS[:2])]  # adds "on the left and ... right"
        return texts

    def sample_prompts(self) -> list[str]:
        return single_object_prompts()
