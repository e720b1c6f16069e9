"""The Shapes spec: canvas, colours, sizes, captions, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minidiff.tools.shapes import COLOURS, SHAPES, Shapes, caption_for


def test_same_seed_same_images_other_seed_other_images():
    a, b, c = Shapes(16, seed=3), Shapes(16, seed=3), Shapes(16, seed=4)
    assert torch.equal(a[5][0], b[5][0]) and a[5][1] == b[5][1]
    assert any(not torch.equal(a[i][0], c[i][0]) for i in range(5))


@pytest.mark.parametrize("size", [16, 23, 32, 64])
def test_images_follow_the_spec(size):
    data = Shapes(size, seed=0, two_object_fraction=0.5 if size >= 32 else 0.0)
    partial_pixels = 0
    for index in range(40):
        objects = data.scene(index)
        image, caption = data.pil_and_caption(index)
        array = np.asarray(image)
        assert image.size == (size, size) and image.mode == "RGB"
        assert array[0, 0].tolist() == [0, 0, 0] or len(objects) == 1  # black background
        assert caption == caption_for([(o["colour"], o["shape"]) for o in objects])
        region = size if len(objects) == 1 else size / 2
        for i, obj in enumerate(objects):
            x0, y0, x1, y1 = obj["box"]
            side = x1 - x0
            assert 0.40 * region - 0.25 <= side <= 0.75 * region + 0.25
            assert y1 - y0 == pytest.approx(side)
            assert obj["shape"] in SHAPES
            assert all(abs(v - r) <= 20 for v, r in zip(obj["rgb"], COLOURS[obj["colour"]]))
            left = 0 if len(objects) == 1 else i * size / 2
            assert left <= x0 and x1 <= left + region and 0 <= y0 and y1 <= size
        brightness = array.max(axis=2)
        partial_pixels += int(((brightness > 10) & (brightness < 150)).sum())
    assert partial_pixels > 40  # anti-aliased: edge pixels are neither background nor full colour


def test_triangle_is_upright():
    data = Shapes(64, seed=0)
    index = next(i for i in range(100) if data.scene(i)[0]["shape"] == "triangle")
    box = data.scene(index)[0]["box"]
    mask = np.asarray(data.pil_and_caption(index)[0]).max(axis=2) > 100
    rows = mask.sum(axis=1)
    top, bottom = int(np.ceil(box[1])) + 1, int(box[3]) - 2
    assert rows[top] < rows[bottom]  # narrow apex on top, wide base at the bottom


def test_captions_and_tensor_range():
    data = Shapes(32, seed=1, two_object_fraction=1.0)
    image, caption = data[0]
    assert image.shape == (3, 32, 32) and image.min() >= -1 and image.max() <= 1
    assert " on the left and a " in caption and caption.endswith(" on the right")


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="between 16 and 64"):
        Shapes(8)
    with pytest.raises(ValueError, match="two-object"):
        Shapes(16, two_object_fraction=0.5)
