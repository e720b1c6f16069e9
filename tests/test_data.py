"""The Shapes spec: canvas, colours, sizes, captions, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minidiff.data import COLOURS, SHAPES, Shapes, caption_for
from minidiff.tools.evaluate import analyse, score


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


# ---- the tensor renderer against the PIL one it replaced ----------------------------------------
def ks_distance(a, b) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    return float(np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)).max())


def picture_statistics(data, count: int) -> dict:
    """What the pictures of `count` images show, object by object (read from the pixels, the scene
    only naming the object and its box): colour, fill of the box, extent and centre of the lit
    pixels, the share of lit pixels that are edges (partly covered)."""
    stats = {"caption": [], "two": [], "shape": [], "colour": [], "full_rgb": [], "fill": [], "extent": [],
             "centre_x": [], "centre_y": [], "edge_share": [], "analysed": 0}
    for index in range(count):
        objects = data.scene(index)
        image, caption = data.pil_and_caption(index)
        array = np.asarray(image).astype(float)
        stats["caption"].append(caption)
        stats["two"].append(len(objects) == 2)
        size = array.shape[0]
        for i, obj in enumerate(objects):
            left = 0 if len(objects) == 1 else i * (size // 2)
            region = array[:, left:left + (size if len(objects) == 1 else size // 2)]
            channel = int(np.argmax(obj["rgb"]))
            cover = region[..., channel] / obj["rgb"][channel]  # the share of each pixel the object covers
            x0, y0, x1, y1 = obj["box"]
            lit = cover > 0
            columns, rows = np.nonzero(lit.any(0))[0], np.nonzero(lit.any(1))[0]
            stats["shape"].append(obj["shape"])
            stats["colour"].append(obj["colour"])
            stats["full_rgb"].append(region.reshape(-1, 3)[np.argmax(cover)])  # a fully covered pixel
            stats["fill"].append(cover.sum() / (x1 - x0) ** 2)
            stats["extent"].append((columns[-1] - columns[0] + 1) / region.shape[1])
            weights = cover / cover.sum()
            stats["centre_x"].append((weights.sum(0) * np.arange(region.shape[1])).sum() / region.shape[1])
            stats["centre_y"].append((weights.sum(1) * np.arange(size)).sum() / size)
            stats["edge_share"].append(((cover > 0) & (cover < 0.97)).sum() / lit.sum())
        if index < 300:
            found = analyse(image, two_objects=len(objects) == 2)
            stats["analysed"] += score(found, [(o["colour"], o["shape"]) for o in objects])["both"]
    return {k: np.array(v) if isinstance(v, list) else v for k, v in stats.items()}


@pytest.mark.parametrize("size,two", [(16, 0.0), (32, 0.3)])
def test_tensor_renderer_draws_the_distribution_of_the_pil_renderer(size, two):
    """Shapes (torch, a hash per image) against PilShapes (PIL, random.Random per image), the
    renderer it replaced: other pictures, the same statistics."""
    from benchmarks.renderer import PilShapes

    count = 1500
    new, old = (picture_statistics(cls(size, seed=0, two_object_fraction=two), count) for cls in (Shapes, PilShapes))
    sigma = lambda p, n: 4 * (p * (1 - p) / n) ** 0.5  # noqa: E731  four standard deviations of a frequency
    for stats in (new, old):
        assert abs(stats["two"].mean() - two) <= sigma(two, count) + 1e-9
        n = len(stats["shape"])
        for shape in SHAPES:
            assert abs((stats["shape"] == shape).mean() - 1 / 3) <= sigma(1 / 3, n)
        for colour in COLOURS:
            assert abs((stats["colour"] == colour).mean() - 1 / 6) <= sigma(1 / 6, n)
        single = stats["caption"][~stats["two"]]
        assert set(single) == {caption_for([(c, s)]) for c in COLOURS for s in SHAPES}
        assert stats["analysed"] >= 0.99 * 300  # the evaluation's analyser reads them as it reads the PIL ones
    for colour, rgb in COLOURS.items():  # the colour of a fully covered pixel: the class's colour, +- jitter
        means = [s["full_rgb"][s["colour"] == colour].mean(0) for s in (new, old)]
        assert np.abs(means[0] - means[1]).max() < 4 and np.abs(means[0] - rgb).max() < 4
    for shape, area in (("circle", np.pi / 4), ("square", 1.0), ("triangle", 0.5)):  # of the box
        fills = [s["fill"][s["shape"] == shape].mean() for s in (new, old)]
        assert abs(fills[0] - fills[1]) < 0.01 and abs(fills[0] - area) < 0.02, (shape, fills)
    for name in ("extent", "centre_x", "centre_y"):  # sizes and positions: the same distributions
        assert ks_distance(new[name], old[name]) < 0.07, name
    edges = [s["edge_share"].mean() for s in (new, old)]
    assert abs(edges[0] - edges[1]) < 0.02 and edges[0] > 0.2, edges  # anti-aliased alike


def test_a_batch_is_its_images_and_an_image_does_not_depend_on_its_batch():
    data = Shapes(32, seed=3, two_object_fraction=0.5)
    images, captions = data.batch([7, 2, 9])
    again, _ = data.batch(range(12))
    assert torch.equal(images[0], again[7]) and torch.equal(images[1], again[2]) and torch.equal(images[2], again[9])
    assert captions == [data[7][1], data[2][1], data[9][1]] and torch.equal(images[1], data[2][0])


def test_render_of_the_same_objects_matches_pil_up_to_edge_points():
    """The tensor rasteriser and PIL's, given the same objects: equal but for a few of the 16
    points of an edge pixel (PIL's ellipse and polygon place their edges by their own rules)."""
    from benchmarks.renderer import pil_render
    from minidiff.data import render

    data = Shapes(32, seed=1, two_object_fraction=0.5)
    for index in range(50):
        objects = data.scene(index)
        diff = np.abs(np.asarray(render(objects, 32)).astype(int) - np.asarray(pil_render(objects, 32)).astype(int))
        assert diff.max() <= 4 * 255 / 16 and diff.mean() < 0.5
