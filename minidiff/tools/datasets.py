"""Training data beyond Shapes: your own image folder, or MNIST-like sets.

- `ImageFolder`: your pictures, in Hugging Face's `imagefolder` layout (images plus an
  optional metadata.jsonl of {"file_name": ..., "text": ...} lines).
- `LabelledImages`: MNIST, Fashion-MNIST or CIFAR-10 through torchvision, captioned from
  the class names ("a handwritten digit 7", "a photo of a cat").

`load_dataset(name, ...)` picks one (or Shapes). Finite sets are wrapped in `Endless`, which
reads them epoch after epoch in a fresh order that depends only on (seed, epoch), so the data
of a training step is a function of the step alone (what exact resume and data parallelism
need, see training.batch_indices).
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path

import torch
from PIL import Image, ImageOps

from .shapes import Shapes
from .pictures import load_image, pil_to_tensor

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
