"""The torch renderer of Shapes (`Shapes.batch`, `render_batch`) against the PIL one (`Shapes[i]`):
the same captions, and the same statistics of colour, size, position, left/right placement and
per-class appearance, measured from the pixels of a few hundred images drawn both ways from the
same scenes. The pixels themselves are not compared: edges are anti-aliased differently."""

from __future__ import annotations

import math

import pytest
import torch

from minidiff.tools import shapes
from minidiff.tools.shapes import COLOURS, SHAPES, Shapes, coverage, render_batch


class Drawn:
    """The same indices of a Shapes set drawn by both renderers, with their scenes. Per image and
    object: coverage of each pixel estimated from the pixels (brightest channel over the object's
    brightest RGB value), so that statistics need no renderer internals."""

    def __init__(self, data: Shapes, count: int):
        indices = range(count)
        self.size = data.image_size
        self.scenes = [data.scene(i) for i in indices]
        self.images, self.captions = {}, {}
        for renderer in ("pil", "torch"):
            images, captions = data.batch(indices, renderer=renderer)
            self.images[renderer] = (images.double() + 1) / 2  # [0, 1]
            self.captions[renderer] = captions

    def region(self, b: int, k: int) -> slice:
        """The columns of object k of scene b: the whole image, or its half."""
        if len(self.scenes[b]) == 1:
            return slice(0, self.size)
        half = self.size // 2
        return slice(0, half) if k == 0 else slice(half, self.size)

    def cover(self, renderer: str, b: int, k: int) -> torch.Tensor:
        """(H, W) coverage of object k of scene b, zero outside its region."""
        obj = self.scenes[b][k]
        brightness = self.images[renderer][b].amax(0) / (max(obj["rgb"]) / 255)
        out = torch.zeros_like(brightness)
        columns = self.region(b, k)
        out[:, columns] = brightness[:, columns].clamp(0, 1)
        return out

    def objects(self, count: int | None = None):
        """(b, k, obj) of every object, of the scenes with `count` objects (all when None)."""
        return [(b, k, obj) for b, scene in enumerate(self.scenes) if count in (None, len(scene))
                for k, obj in enumerate(scene)]


@pytest.fixture(scope="module")
def single():
    return Drawn(Shapes(16, seed=11), 600)


@pytest.fixture(scope="module")
def pairs():
    return Drawn(Shapes(32, seed=12, two_object_fraction=0.5), 300)


def test_same_captions_for_the_same_index(pairs):
    data = Shapes(32, seed=12, two_object_fraction=0.5)
    assert pairs.captions["torch"] == pairs.captions["pil"] == [data[i][1] for i in range(len(pairs.scenes))]
    assert any(" on the left and " in c for c in pairs.captions["torch"])


def test_images_are_in_range_with_a_black_background(single, pairs):
    for drawn in (single, pairs):
        images = drawn.images["torch"]
        assert images.shape == (len(drawn.scenes), 3, drawn.size, drawn.size)
        assert images.min() >= 0 and images.max() <= 1 + 1e-6
        assert (images.amax(1) == 0).float().mean() > 0.4  # most of a picture is background


def interior_colour(drawn: Drawn, renderer: str, b: int, k: int) -> torch.Tensor:
    """Mean RGB (0-255) of the pixels object k covers fully."""
    inside = drawn.cover(renderer, b, k) > 0.97
    return drawn.images[renderer][b][:, inside].mean(1) * 255


def test_mean_colour_per_colour_class(single, pairs):
    for drawn in (single, pairs):
        for colour, nominal in COLOURS.items():
            chosen = [(b, k) for b, k, obj in drawn.objects() if obj["colour"] == colour]
            assert len(chosen) >= 20
            means = {r: torch.stack([interior_colour(drawn, r, b, k) for b, k in chosen]).mean(0)
                     for r in ("pil", "torch")}
            assert (means["torch"] - means["pil"]).abs().max() < 1.0, (colour, means)
            assert (means["torch"] - torch.tensor(nominal, dtype=torch.double)).abs().max() < 6, (colour, means)


def test_foreground_area_per_shape_class_and_size(single, pairs):
    """Area / side^2: pi/4 for a circle, 1 for a square, 1/2 for a triangle, for small and large
    objects (split at the median side) of either renderer; the renderers within 2.5% of each other."""
    expected = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}
    for drawn in (single, pairs):
        objects = drawn.objects()
        sides = torch.tensor([obj["box"][2] - obj["box"][0] for _, _, obj in objects])
        median = sides.median().item()
        for shape in SHAPES:
            for small in (True, False):
                chosen = [(b, k, obj) for b, k, obj in objects
                          if obj["shape"] == shape and ((obj["box"][2] - obj["box"][0]) < median) == small]
                assert len(chosen) >= 15
                area = {r: sum(drawn.cover(r, b, k).sum().item() / (obj["box"][2] - obj["box"][0]) ** 2
                               for b, k, obj in chosen) / len(chosen) for r in ("pil", "torch")}
                assert area["torch"] == pytest.approx(area["pil"], rel=0.025), (drawn.size, shape, small, area)
                assert area["torch"] == pytest.approx(expected[shape], rel=0.03), (drawn.size, shape, small, area)


def centroids(drawn: Drawn, renderer: str, objects) -> torch.Tensor:
    """(N, 2) coverage-weighted centre (x, y) of each object, in pixels."""
    centre = torch.arange(drawn.size, dtype=torch.double) + 0.5
    out = []
    for b, k, _ in objects:
        cover = drawn.cover(renderer, b, k)
        mass = cover.sum()
        out.append(torch.stack([(cover.sum(0) * centre).sum() / mass, (cover.sum(1) * centre).sum() / mass]))
    return torch.stack(out)


def test_centroid_position_distributions(single, pairs):
    quantiles = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.double)
    for drawn in (single, pairs):
        objects = drawn.objects()
        found = {r: centroids(drawn, r, objects) for r in ("pil", "torch")}
        for axis in (0, 1):
            q = {r: torch.quantile(c[:, axis], quantiles) for r, c in found.items()}
            assert (q["torch"] - q["pil"]).abs().max() < 0.1, (drawn.size, axis, q)
        # relative to the box centre, in sides: (0, 0), and a triangle's 1/6 of a side lower (upright)
        for shape, dy in (("circle", 0.0), ("square", 0.0), ("triangle", 1 / 6)):
            chosen = [i for i, (_, _, obj) in enumerate(objects) if obj["shape"] == shape]
            boxes = torch.tensor([objects[i][2]["box"] for i in chosen], dtype=torch.double)
            centre = torch.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], 1)
            side = (boxes[:, 2] - boxes[:, 0])[:, None]
            for renderer, c in found.items():
                offset = ((c[chosen] - centre) / side).mean(0)
                assert offset[0].abs() < 0.01 and (offset[1] - dy).abs() < 0.01, (drawn.size, shape, renderer, offset)


def test_two_objects_are_placed_left_and_right_as_captioned(pairs):
    """In a two-object picture the caption's first object is in the left half and its second in the
    right: per half, the colour and shape found there are the caption's, the same for both renderers."""
    two = [b for b, scene in enumerate(pairs.scenes) if len(scene) == 2]
    assert len(two) >= 100
    half = pairs.size // 2
    filled = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}  # area / side^2
    for b in two[:60]:
        words = pairs.captions["torch"][b].split()  # a red circle on the left and a blue square on the right
        left, right = (words[1], words[2]), (words[-5], words[-4])
        for renderer in ("pil", "torch"):
            image = pairs.images[renderer][b] * 255
            for k, ((colour, shape), columns) in enumerate(((left, slice(0, half)), (right, slice(half, None)))):
                part = image[:, :, columns]
                brightness = part.amax(0)
                rgb = part[:, brightness > brightness.max() * 0.97].mean(1)
                nearest = min(COLOURS, key=lambda c: (torch.tensor(COLOURS[c], dtype=torch.double) - rgb).norm())
                area = (brightness / brightness.max()).sum().item()
                box = pairs.scenes[b][k]["box"]
                nearest_shape = min(filled, key=lambda s: abs(filled[s] - area / (box[2] - box[0]) ** 2))
                assert (nearest, nearest_shape) == (colour, shape), (renderer, b, pairs.captions[renderer][b], rgb, area)
    # the left objects' centroids spread over the left half the same way in both renderers
    for k in (0, 1):
        objects = [(b, k, pairs.scenes[b][k]) for b in two]
        x = {r: centroids(pairs, r, objects)[:, 0] for r in ("pil", "torch")}
        assert ((x["torch"] < half) == (k == 0)).all() and ((x["pil"] < half) == (k == 0)).all()
        q = torch.tensor([0.1, 0.5, 0.9], dtype=torch.double)
        assert (torch.quantile(x["torch"], q) - torch.quantile(x["pil"], q)).abs().max() < 0.1


def appearance(drawn: Drawn, renderer: str, shape: str, bins: int = 12) -> torch.Tensor:
    """The mean coverage of the single objects of `shape`, over a grid in box coordinates
    ([-1/4, 5/4] of a side each way, `bins` x `bins`): what a shape looks like, wherever it is."""
    centre = torch.arange(drawn.size, dtype=torch.double) + 0.5
    total, count = torch.zeros(bins * bins, dtype=torch.double), torch.zeros(bins * bins, dtype=torch.double)
    for b, k, obj in drawn.objects(count=1):
        if obj["shape"] != shape:
            continue
        x0, y0, x1, _ = obj["box"]
        side = x1 - x0
        u, v = (centre - x0) / side, (centre - y0) / side  # box coordinates of the pixel centres
        iu, iv = ((u + 0.25) / 1.5 * bins).floor().long(), ((v + 0.25) / 1.5 * bins).floor().long()
        keep = (iv[:, None] >= 0) & (iv[:, None] < bins) & (iu[None, :] >= 0) & (iu[None, :] < bins)
        index = (iv[:, None] * bins + iu[None, :])[keep]
        total.index_add_(0, index, drawn.cover(renderer, b, k)[keep])
        count.index_add_(0, index, torch.ones_like(index, dtype=torch.double))
    return (total / count.clamp(min=1)).view(bins, bins)


def test_each_shape_class_looks_the_same_in_both_renderers(single):
    """The box-aligned mean picture of each class correlates > 0.99 between the renderers, and less
    than that with every other class (so the comparison tells the classes apart)."""
    looks = {(r, s): appearance(single, r, s).flatten() for r in ("pil", "torch") for s in SHAPES}
    correlation = lambda a, b: torch.corrcoef(torch.stack([a, b]))[0, 1].item()  # noqa: E731
    for shape in SHAPES:
        same = correlation(looks["torch", shape], looks["pil", shape])
        assert same > 0.99, (shape, same)
        for other in SHAPES:
            if other != shape:
                assert correlation(looks["torch", shape], looks["pil", other]) < 0.95
        assert (looks["torch", shape] - looks["pil", shape]).abs().max() < 0.1
    # upright triangle: the top row of its box is narrower than the bottom row
    triangle = appearance(single, "torch", "triangle")
    assert triangle[3].sum() < triangle[-4].sum()


def test_device_argument(monkeypatch):
    data = Shapes(16, seed=0)
    for device in ("cpu", torch.device("cpu")):
        images, captions = data.batch(range(3), device=device)
        assert images.device.type == "cpu" and images.dtype == torch.float32 and len(captions) == 3
        assert data.batch(range(3), device=device, renderer="pil")[0].device.type == "cpu"
    # the pixels are computed on the device asked for, not on the CPU and moved there
    drawn_on = []

    def spy(params, image_size):
        drawn_on.append(params.device.type)
        return coverage(params, image_size)

    monkeypatch.setattr(shapes, "coverage", spy)
    images, _ = data.batch(range(3), device="meta")
    assert images.device.type == "meta" and images.shape == (3, 3, 16, 16) and drawn_on == ["meta"]
    pil, _ = data.batch([5, 1], renderer="pil")
    assert torch.equal(pil, torch.stack([data[5][0], data[1][0]]))  # exactly what Shapes[i] gives
    with pytest.raises(ValueError, match="renderer"):
        data.batch(range(2), renderer="cairo")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_draws_the_cpu_pictures():
    data = Shapes(32, seed=3, two_object_fraction=0.5)
    on_gpu, captions = data.batch(range(64), device="cuda")
    assert on_gpu.device.type == "cuda" and captions == data.batch(range(64))[1]
    torch.testing.assert_close(on_gpu.cpu(), data.batch(range(64))[0], atol=1e-5, rtol=0)


def test_render_batch_takes_any_mix_of_one_and_two_object_scenes():
    data = Shapes(32, seed=4, two_object_fraction=0.5)
    scenes = [data.scene(i) for i in range(10)]
    assert {len(s) for s in scenes} == {1, 2}
    together = render_batch(scenes, 32)
    apart = torch.cat([render_batch([s], 32) for s in scenes])
    torch.testing.assert_close(together, apart)
    assert render_batch([], 32).shape == (0, 3, 32, 32)
    with pytest.raises(ValueError, match="at least one object"):
        render_batch([[]], 32)


def test_benchmark_writes_to_scratch_unless_published(tmp_path, monkeypatch):
    from benchmarks import common, renderer

    for name, path in (("RESULTS", "results"), ("SCRATCH", "scratch"), ("BENCHMARKS_MD", "BENCHMARKS.md")):
        monkeypatch.setattr(common, name, tmp_path / path)
    (tmp_path / "BENCHMARKS.md").write_text("# Benchmarks\n")
    threads = torch.get_num_threads()
    try:
        argv = ["--sizes", "16", "--batch-sizes", "4", "--repeats", "1", "--min-images", "4", "--threads", "1"]
        assert renderer.main(argv) == 0
        assert (tmp_path / "scratch" / "renderer.md").exists() and not (tmp_path / "results").exists()
        assert renderer.main([*argv, "--publish"]) == 0
        text = (tmp_path / "BENCHMARKS.md").read_text()
        assert "<!-- begin renderer -->\n### " in text and "| 16 | 4 |" in text
    finally:
        torch.set_num_threads(threads)


def test_the_trainer_draws_shapes_with_the_renderer_its_config_names(tmp_path, monkeypatch):
    """renderer="torch" (both presets'): every training batch comes from Shapes.batch in torch;
    "pil": none does (pictures one by one, as Shapes[i] draws them)."""
    from conftest import TINY_TRAINING, tiny_train_config
    from minidiff.tools.trainer import PRESETS, Trainer
    from minidiff.training import TrainConfig

    calls = []
    real = Shapes.batch
    monkeypatch.setattr(Shapes, "batch", lambda self, indices, **kw: calls.append((list(indices), kw))
                        or real(self, indices, **kw))
    Trainer(tiny_train_config(tmp_path / "torch", renderer="torch")).train()
    size = TINY_TRAINING["batch_size"]
    assert calls == [(list(range(k * size, (k + 1) * size)), {"renderer": "torch"}) for k in range(TINY_TRAINING["steps"])]
    calls.clear()
    Trainer(tiny_train_config(tmp_path / "pil", renderer="pil")).train()
    assert calls == []
    assert TrainConfig().renderer == "torch" and all("renderer" not in preset for preset in PRESETS.values())
