"""Training data beyond Shapes: an image folder, torchvision's MNIST-like sets, the endless reading order."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from minidiff.tools.datasets import Endless, ImageFolder, LabelledImages, load_dataset
from minidiff.tools.trainer import Trainer

from conftest import tiny_train_config

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def bands(size: tuple[int, int], colours, vertical: bool = True) -> Image.Image:
    """Three equal bands of colour, side by side (vertical) or stacked."""
    image = Image.new("RGB", size)
    w, h = size
    for i, colour in enumerate(colours):
        box = (i * w // 3, 0, (i + 1) * w // 3, h) if vertical else (0, i * h // 3, w, (i + 1) * h // 3)
        image.paste(colour, box)
    return image


def write_folder(folder, entries: dict[str, tuple[Image.Image, str]], metadata: bool = True):
    folder.mkdir(parents=True, exist_ok=True)
    for name, (image, _) in entries.items():
        image.save(folder / name)
    if metadata:
        lines = [json.dumps({"file_name": name, "text": text}) for name, (_, text) in entries.items()]
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_image_folder_fits_any_size_and_mode_and_reads_captions(tmp_path):
    entries = {
        "wide.png": (bands((60, 20), [RED, GREEN, BLUE]), "a wide picture"),  # centre crop keeps the green third
        "tall.png": (bands((20, 60), [BLUE, RED, GREEN], vertical=False), "a tall picture"),  # keeps red
        "grey.png": (Image.new("L", (30, 30), 200), "a grey square"),
        "alpha.png": (Image.new("RGBA", (16, 16), (10, 20, 30, 128)), "a see through square"),
        "palette.gif": (Image.new("RGB", (24, 24), BLUE).convert("P"), "a wide picture"),
    }
    data = ImageFolder(write_folder(tmp_path / "pics", entries), image_size=16)
    assert len(data) == 5
    assert data.captions() == [text for _, text in entries.values()]
    assert data.sample_prompts()[0] == "a wide picture"  # the most frequent caption first
    images = {name: data[i] for i, name in enumerate(entries)}
    for name, (image, caption) in images.items():
        assert image.shape == (3, 16, 16) and image.dtype == torch.float32, name
        assert -1 <= image.min() and image.max() <= 1
        assert caption == entries[name][1]
    to_rgb = lambda t: ((t[:, 4:12, 4:12] + 1) * 127.5).round().flatten(1).mean(1).tolist()  # noqa: E731
    assert to_rgb(images["wide.png"][0]) == pytest.approx(GREEN, abs=1)
    assert to_rgb(images["tall.png"][0]) == pytest.approx(RED, abs=1)
    assert to_rgb(images["grey.png"][0]) == pytest.approx((200, 200, 200), abs=1)  # grey on all three channels
    assert to_rgb(images["alpha.png"][0]) == pytest.approx((10, 20, 30), abs=1)
    assert to_rgb(images["palette.gif"][0]) == pytest.approx(BLUE, abs=1)


def test_folder_without_metadata_trains_unconditionally(tmp_path):
    entries = {f"{i}.png": (Image.new("RGB", (20, 20), (i * 40, 0, 0)), "") for i in range(3)}
    folder = write_folder(tmp_path / "pics", entries, metadata=False)
    (folder / "sub").mkdir()
    Image.new("RGB", (20, 20)).save(folder / "sub" / "deeper.jpg")
    (folder / "notes.txt").write_text("not an image, not read")
    data = ImageFolder(folder, image_size=16)
    assert len(data) == 4 and data.captions() == [""] * 4 and data.sample_prompts() == [""]


def write_fake_mnist(root, folder: str, images: np.ndarray, labels: np.ndarray) -> None:
    """torchvision's on-disk MNIST layout: big-endian idx files (LeCun's format) under <folder>/raw."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    n, h, w = images.shape
    for split in ("train", "t10k"):
        (raw / f"{split}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, h, w) + images.tobytes())
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())


@pytest.mark.parametrize("name, folder, caption_of_3", [
    ("mnist", "MNIST", "a handwritten digit 3"),
    ("fashion-mnist", "FashionMNIST", "a photo of a dress"),
])
def test_mnist_like_sets_from_torchvision_files(tmp_path, name, folder, caption_of_3):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(12, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8], dtype=np.uint8)
    write_fake_mnist(tmp_path, folder, images, labels)
    data = LabelledImages(name, image_size=16, root=tmp_path)  # files present: nothing is downloaded
    assert len(data) == 12 and len(data.captions()) == 10
    image, caption = data[0]
    assert caption == caption_of_3
    reference = np.asarray(Image.fromarray(images[0]).resize((16, 16), Image.Resampling.LANCZOS), dtype=np.float32)
    expected = torch.from_numpy(reference / 127.5 - 1).expand(3, 16, 16)  # grey, repeated on R, G and B
    torch.testing.assert_close(image, expected)
    assert isinstance(load_dataset(name, 16, root=tmp_path), Endless)


class Numbered(torch.utils.data.Dataset):
    def __len__(self):
        return 7

    def __getitem__(self, index):
        return torch.zeros(3, 2, 2), str(index)


def test_endless_reads_every_item_once_per_epoch_in_an_order_fixed_by_seed_and_epoch():
    data = Endless(Numbered(), seed=0)
    epochs = [[int(data[e * 7 + i][1]) for i in range(7)] for e in range(3)]
    assert all(sorted(epoch) == list(range(7)) for epoch in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    fresh = Endless(Numbered(), seed=0)  # a resumed run reads index 17 without reading 0..16 first
    assert fresh[17][1] == data[17][1]
    assert [Endless(Numbered(), seed=1)[i][1] for i in range(7)] != [str(i) for i in epochs[0]]


@pytest.mark.slow
def test_training_on_a_folder_writes_a_row_of_samples_per_caption(tmp_path):
    entries = {f"{i}.png": (bands((24, 16), [RED, GREEN, BLUE] if i % 2 else [BLUE, BLUE, RED]),
                            "stripes" if i % 2 else "a blue thing") for i in range(4)}
    folder = write_folder(tmp_path / "pics", entries)
    trainer = Trainer(tiny_train_config(tmp_path / "run", data=str(folder), steps=2))
    assert {"stripes", "blue", "thing"} <= set(trainer.model.tokenizer.vocab)
    trainer.train()
    grid = Image.open(tmp_path / "run" / "samples" / "final.png")
    tile, label = 16 * 4, 12
    assert grid.size[1] == 2 * (tile + label)  # two captions: two rows of six
    assert grid.size[0] >= 6 * tile
