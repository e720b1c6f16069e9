"""Training data: the built-in Shapes toy, your own image folder, or MNIST-like sets.

Every data set returns (image, caption): image a float tensor (3, H, W) in [-1, 1],
caption a string, and has `captions()` (the tokenizer's vocabulary is built from them)
and `sample_prompts()` (what the training sample grids show).

- `Shapes`: nothing is downloaded and nothing is stored: image `index` of a
  `Shapes(seed=s)` set is drawn from a random generator seeded by (s, index), so the same
  index always gives the same picture and caption.
- `ImageFolder`: your pictures, in Hugging Face's `imagefolder` layout (images plus an
  optional metadata.jsonl of {"file_name": ..., "text": ...} lines).
- `LabelledImages`: MNIST, Fashion-MNIST or CIFAR-10 through torchvision, captioned from
  the class names ("a handwritten digit 7", "a photo of a cat").

`load_dataset(name, ...)` picks one. Finite sets are wrapped in `Endless`, which reads them
epoch after epoch in a fresh order that depends only on (seed, epoch), so the data of a
training step is a function of the step alone (what exact resume and data parallelism
need, see training.batch_indices).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
from collections import Counter
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageOps

from .images import load_image, pil_to_tensor

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


# ---- other data: your folder, torchvision's MNIST-like sets ----------------------------------

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_NAME = "metadata.jsonl"
SAMPLE_PROMPTS = 10  # captions shown in the training sample grids of non-Shapes data


class DataError(ValueError):
    """A data folder or data set that cannot be used; the message says why and what to do."""


def fit_square(image: Image.Image, size: int) -> Image.Image:
    """Any size, any mode -> RGB `size` x `size`: scale the short side to `size`, then crop
    the centre (alpha is dropped, grey is repeated over the three channels)."""
    return ImageOps.fit(image.convert("RGB"), (size, size), Image.Resampling.LANCZOS)


def check_image(path: Path) -> None:
    """Refuse a file PIL cannot identify, or whose data is damaged, before training starts."""
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:  # PIL raises many kinds (OSError, SyntaxError, struct.error, ...) on bad data
        raise DataError(f"{path} is not a readable image ({error}); fix or remove it") from None


def read_metadata(folder: Path) -> tuple[list[Path], list[str]]:
    """metadata.jsonl -> (image paths, captions), with the line number of the first bad line."""
    metadata = folder / METADATA_NAME
    files, texts = [], []
    expected = 'each line must be {"file_name": "<image in the folder>", "text": "<caption>"}'
    try:
        lines = metadata.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise DataError(f"{metadata} is not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{metadata} line {number} is not valid JSON ({error.msg}); {expected}") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str) or not isinstance(entry.get("text"), str):
            raise DataError(f"{metadata} line {number} has no string \"file_name\" and \"text\"; {expected}")
        path = folder / entry["file_name"]
        if not path.is_file():
            raise DataError(f"{metadata} line {number} names {entry['file_name']}, which is not a file in {folder}")
        files.append(path)
        texts.append(entry["text"])
    return files, texts


class ImageFolder(torch.utils.data.Dataset):
    """Your own pictures, in the Hugging Face `imagefolder` convention: image files plus
    metadata.jsonl with one {"file_name": ..., "text": ...} line per image. Without a
    metadata.jsonl every image in the folder (and below) is used with the empty caption:
    the model then learns unconditionally. Every file is checked when the set is opened,
    so a bad folder fails at once, not hours into a run."""

    def __init__(self, folder, image_size: int):
        self.folder, self.image_size = Path(folder), image_size
        if not self.folder.is_dir():
            raise DataError(f"data folder {self.folder} does not exist")
        self.captioned = (self.folder / METADATA_NAME).is_file()  # False: every caption is empty
        if self.captioned:
            self.files, self.texts = read_metadata(self.folder)
        else:
            self.files = sorted(p for p in self.folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            self.texts = [""] * len(self.files)
        if not self.files:
            raise DataError(f"data folder {self.folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                            f"add some, with an optional {METADATA_NAME} of captions")
        for path in self.files:
            check_image(path)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        image = load_image(self.files[index], what="training image")
        return pil_to_tensor(fit_square(image, self.image_size)), self.texts[index]

    def captions(self) -> list[str]:
        return list(self.texts)

    def sample_prompts(self) -> list[str]:
        """The most frequent captions (all of them for a small or class-like set)."""
        return [text for text, _ in Counter(self.texts).most_common(SAMPLE_PROMPTS)]


# torchvision class name -> caption, in the order of the class labels
LABELLED_SETS = {
    "mnist": ("MNIST", [f"a handwritten digit {d}" for d in range(10)]),
    "fashion-mnist": ("FashionMNIST", [f"a photo of {thing}" for thing in (
        "a t-shirt", "a pair of trousers", "a pullover", "a dress", "a coat", "a sandal", "a shirt", "a sneaker",
        "a bag", "an ankle boot")]),
    "cifar10": ("CIFAR10", [f"a photo of {thing}" for thing in (
        "an airplane", "a car", "a bird", "a cat", "a deer", "a dog", "a frog", "a horse", "a ship", "a truck")]),
}


def default_data_root() -> Path:
    """Where torchvision data sets are downloaded: $XDG_CACHE_HOME/minidiff or ~/.cache/minidiff."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minidiff"


class LabelledImages(torch.utils.data.Dataset):
    """MNIST, Fashion-MNIST or CIFAR-10 (training split) through torchvision, downloaded to
    `root` on first use, each image captioned from its class name."""

    def __init__(self, name: str, image_size: int, root=None):
        from torchvision import datasets  # imported here: only these sets need it

        class_name, self.class_captions = LABELLED_SETS[name]
        self.name, self.image_size = name, image_size
        self.root = Path(root) if root is not None else default_data_root()
        try:
            self.base = getattr(datasets, class_name)(str(self.root), train=True, download=True)
        except (RuntimeError, OSError) as error:  # torchvision reports a failed download as RuntimeError
            reason = " ".join(str(error).split())  # one line
            raise DataError(f"could not load {name} into {self.root} ({reason}); check the network, "
                            f"or copy the files there by hand, or pass another --data-root") from None

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        image, label = self.base[index]  # a PIL image ("L" for the MNISTs, "RGB" for CIFAR) and an int
        return pil_to_tensor(fit_square(image, self.image_size)), self.class_captions[label]

    def captions(self) -> list[str]:
        return list(self.class_captions)

    def sample_prompts(self) -> list[str]:
        return list(self.class_captions)


class Endless(torch.utils.data.Dataset):
    """A finite set read as an endless stream: index i is item perm_e[i mod n] of epoch
    e = i // n, perm_e a shuffle seeded by (seed, e). The same index always gives the same
    item, whatever was read before, so a resumed run reads exactly what it would have."""

    def __init__(self, dataset, seed: int = 0):
        self.dataset, self.seed = dataset, seed
        self.orders: dict[int, list[int]] = {}  # the last two epochs' orders (a batch may straddle two)

    def order(self, epoch: int) -> list[int]:
        if epoch not in self.orders:
            order = list(range(len(self.dataset)))
            random.Random(f"epoch-{self.seed}-{epoch}").shuffle(order)
            self.orders = {e: o for e, o in self.orders.items() if e == epoch - 1}
            self.orders[epoch] = order
        return self.orders[epoch]

    def __len__(self) -> int:
        return 10**9  # like Shapes: indices run on for as long as training does

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        epoch, position = divmod(index, len(self.dataset))
        return self.dataset[self.order(epoch)[position]]

    def captions(self) -> list[str]:
        return self.dataset.captions()

    def sample_prompts(self) -> list[str]:
        return self.dataset.sample_prompts()


DATA_NAMES = ("shapes", *LABELLED_SETS)


def load_dataset(name: str = "shapes", image_size: int = 16, seed: int = 0, root=None,
                 two_object_fraction: float = 0.0):
    """"shapes" (the default), "mnist", "fashion-mnist", "cifar10", or the path of an image
    folder. `root` is where torchvision sets are cached; `two_object_fraction` is for Shapes."""
    if name == "shapes":
        return Shapes(image_size, seed=seed, two_object_fraction=two_object_fraction)
    if name in LABELLED_SETS:
        return Endless(LabelledImages(name, image_size, root), seed)
    if Path(name).is_dir():
        return Endless(ImageFolder(name, image_size), seed)
    raise DataError(f"data {name!r} is neither a folder nor one of {', '.join(DATA_NAMES)}")
