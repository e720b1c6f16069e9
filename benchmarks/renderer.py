"""Shapes drawn as tensors against Shapes drawn with PIL: images per second of each renderer.

    python -m benchmarks.renderer                        # 16 px (CPU preset) and 32 px (GPU preset)
    python -m benchmarks.renderer --sizes 16 --repeats 5 --rounds-of 2   # quick check

`minidiff.data.Shapes.batch` draws a whole batch at once in torch (the scene from a counter-based
hash of (seed, index), the pixels from each object's span in every row of a 4x finer grid).
`PilShapes` below is the renderer it replaced, kept here as the reference: a `random.Random`
seeded by (seed, index) picks the scene, PIL draws each picture 4x larger and box-filters it
down; tests/test_data.py checks that the two draw the same distribution of pictures.

Each size uses its preset's batch (16 px: the CPU preset, 64 images of one object; 32 px: the
GPU preset, 128 images, 30% of them with two objects). Both renderers draw the same batches of
indices (new ones every round), `--rounds-of` batches a round, timed in alternating rounds
(the order flipped every round, so a drift of the machine's load hits both alike); the speed-up
is the median over rounds of (PIL time) / (torch time), in CPU time and in wall-clock time.
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import statistics
import sys
import time

import torch
from PIL import Image, ImageDraw

from minidiff.data import COLOURS, SHAPES, Shapes, caption_for
from minidiff.images import pil_to_tensor
from minidiff.training import PRESETS

from .common import Report, add_publish_flag, alternating_times, markdown_table, median_ratio, set_threads

SUPERSAMPLE, COLOUR_JITTER, SIZE_RANGE = 4, 20, (0.40, 0.75)


# ---- the PIL renderer minidiff.data used before (the reference) ---------------------------
def pil_draw_shape(draw: ImageDraw.ImageDraw, shape: str, box, fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:  # upright triangle: apex on top, flat base at the bottom
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def pil_render(objects: list[dict], image_size: int) -> Image.Image:
    """Objects {"shape", "rgb", "box"} drawn SUPERSAMPLE times larger, then box-filtered down."""
    s = SUPERSAMPLE
    canvas = Image.new("RGB", (image_size * s, image_size * s), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        x0, y0, x1, y1 = (v * s for v in obj["box"])  # PIL's box includes its last pixel
        pil_draw_shape(draw, obj["shape"], (x0, y0, x1 - 1, y1 - 1), tuple(obj["rgb"]))
    return canvas.resize((image_size, image_size), Image.Resampling.BOX)


def pil_random_scene(rng: random.Random, image_size: int, two_objects: bool) -> list[dict]:
    regions = [(0, image_size)] if not two_objects else [(0, image_size // 2), (image_size // 2, image_size)]
    objects = []
    for left, right in regions:
        region_w = right - left
        colour = rng.choice(list(COLOURS))
        shape = rng.choice(SHAPES)
        rgb = [min(255, max(0, v + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for v in COLOURS[colour]]
        grid = lambda v: math.floor(v * SUPERSAMPLE) / SUPERSAMPLE  # noqa: E731
        side = grid(rng.uniform(*SIZE_RANGE) * region_w)
        x = left + grid(rng.uniform(0, region_w - side))
        y = grid(rng.uniform(0, image_size - side))
        objects.append({"colour": colour, "shape": shape, "rgb": rgb, "box": (x, y, x + side, y + side)})
    return objects


class PilShapes(Shapes):
    """Shapes as minidiff drew it with PIL, one picture at a time (same spec, other pictures)."""

    def scene(self, index: int) -> list[dict]:
        rng = random.Random(f"shapes-{self.seed}-{index}")
        two = rng.random() < self.two_object_fraction
        return pil_random_scene(rng, self.image_size, two)

    def pil_and_caption(self, index: int) -> tuple[Image.Image, str]:
        objects = self.scene(index)
        return pil_render(objects, self.image_size), caption_for([(o["colour"], o["shape"]) for o in objects])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        image, caption = self.pil_and_caption(index)
        return pil_to_tensor(image), caption

    def batch(self, indices, device=None) -> tuple[torch.Tensor, list[str]]:
        items = [self[i] for i in indices]
        return torch.stack([image for image, _ in items]).to(device), [caption for _, caption in items]


# ---- the benchmark -------------------------------------------------------------------------
PRESET_OF_SIZE = {16: "cpu", 32: "gpu"}


def measure(image_size: int, batch_size: int, two_object_fraction: float, repeats: int, rounds_of: int) -> dict:
    renderers = {"PIL": PilShapes(image_size, two_object_fraction=two_object_fraction),
                 "torch": Shapes(image_size, two_object_fraction=two_object_fraction)}
    start = {name: itertools.count(0, batch_size) for name in renderers}  # new indices every call
    cpu = {name: [] for name in renderers}  # CPU seconds of each timed round

    def run(name):
        def draw():
            began = time.process_time()
            for _ in range(rounds_of):
                first = next(start[name])
                renderers[name].batch(range(first, first + batch_size))
            cpu[name].append(time.process_time() - began)
        return draw

    times = alternating_times({name: run(name) for name in renderers}, repeats)
    cpu = {name: seconds[-repeats:] for name, seconds in cpu.items()}  # the warm-up call is not timed
    images = batch_size * rounds_of
    return {"image_size": image_size, "batch_size": batch_size, "two_object_fraction": two_object_fraction,
            "images_per_second": {name: statistics.median(images / t for t in times[name]) for name in renderers},
            "cpu_images_per_second": {name: statistics.median(images / t for t in cpu[name]) for name in renderers},
            "speed_up": median_ratio(times["PIL"], times["torch"]),
            "cpu_speed_up": median_ratio(cpu["PIL"], cpu["torch"]), "times": times, "cpu_times": cpu}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 32], help="image sizes (default 16 32)")
    p.add_argument("--batch-sizes", type=int, nargs="+",
                   help="images per batch, each measured (default: the size's preset, 64 or 128)")
    p.add_argument("--repeats", type=int, default=15, help="alternating rounds (default 15)")
    p.add_argument("--rounds-of", type=int, default=5, help="batches per round (default 5)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    add_publish_flag(p)
    args = p.parse_args(argv)
    if min(args.repeats, args.rounds_of, *(args.batch_sizes or [1])) < 1:
        p.error("counts must be at least 1")
    threads = set_threads(args.threads)
    report = Report("renderer", "Shapes drawn as tensors against PIL", threads)
    results = []
    for size in args.sizes:
        preset = PRESETS[PRESET_OF_SIZE.get(size, "gpu")]
        for batch in args.batch_sizes or [preset.get("batch_size", 64)]:
            results.append(measure(size, batch, preset.get("two_object_fraction", 0.0), args.repeats, args.rounds_of))
    rows = [[f"{r['image_size']} px", r["batch_size"], f"{r['two_object_fraction']:.0%}",
             f"{r['cpu_images_per_second']['PIL']:,.0f}", f"{r['cpu_images_per_second']['torch']:,.0f}",
             f"{r['cpu_speed_up']:.1f}x", f"{r['speed_up']:.1f}x"] for r in results]
    table = markdown_table(["size", "batch", "two objects", "PIL img per CPU s", "torch img per CPU s",
                            "speed-up, CPU time", "speed-up, wall"], rows)
    print(table)
    body = "\n".join([
        f"Images per second of each renderer on the CPU, {threads} torch thread(s), {args.repeats} alternating rounds "
        f"of {args.rounds_of} batches each (new indices every batch); images per CPU second the median over rounds, "
        "speed-ups the median over rounds of (PIL time) / (torch time), in CPU time (process time, what a loaded "
        "machine disturbs least) and in wall-clock time.",
        "",
        table,
    ])
    report.write(body, {"results": results}, publish=args.publish)
    return 0


if __name__ == "__main__":
    sys.exit(main())
