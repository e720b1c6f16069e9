"""How fast are Shapes pictures drawn? Images per second of the PIL renderer (one picture at a
time, `Shapes[i]`) against the torch one (a batch at once, `Shapes.batch`), on the CPU.

    python -m benchmarks.renderer                                   # 16 and 32 px, batches of 64 and 256
    python -m benchmarks.renderer --sizes 32 --batch-sizes 128 --threads 2 --publish

Two measurements per image size and batch size, each in images per second:
  draw    the renderers alone, from scenes described beforehand: PIL `render` + its conversion to
          a tensor for each scene, stacked, against `render_batch` on the whole batch
  batch   what a trainer would call: `Shapes.batch(indices, renderer="pil")` (the same tensors as
          stacking `Shapes[i]`) against `Shapes.batch(indices)`; both include describing each
          scene (`Shapes.scene`: a `random.Random` seeded by (seed, index) per picture) and its
          caption, which the two share
and `scenes`, the scene descriptions and captions alone. 32 px images hold two objects in 30% of
the pictures (the GPU preset's share); 16 px ones one object. Every call draws at least
--min-images pictures (whole batches); the contenders take turns, the order flipped every round
(A B, B A, ...), and each figure is the median over --repeats rounds; a speed-up is the median of
the rounds' ratios. Wall-clock by default; `--clock cpu` counts this process's CPU time instead,
which other jobs on a shared machine inflate far less. --threads torch threads (default 1).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch

from benchmarks.common import Report, add_publish_flag, markdown_table, median_ratio, set_threads
from minidiff.tools.pictures import pil_to_tensor
from minidiff.tools.shapes import Shapes, render, render_batch, scene_caption

TWO_OBJECT_FRACTION = 0.3  # at 32 px and up, as the GPU preset


def contenders(size: int, batch_size: int, batches: int) -> dict:
    """The timed functions for one image size and batch size, each drawing `batches` batches and
    letting each go before the next, as a training loop does."""
    data = Shapes(size, seed=0, two_object_fraction=TWO_OBJECT_FRACTION if size >= 32 else 0.0)
    index_batches = [range(b * batch_size, (b + 1) * batch_size) for b in range(batches)]
    scene_batches = [[data.scene(i) for i in indices] for indices in index_batches]

    def each(draw, batches):
        return lambda: [draw(batch) is None for batch in batches]  # nothing kept but a flag

    return {
        "draw PIL": each(lambda scenes: torch.stack([pil_to_tensor(render(s, size)) for s in scenes]), scene_batches),
        "draw torch": each(lambda scenes: render_batch(scenes, size), scene_batches),
        "batch PIL": each(lambda indices: data.batch(indices, renderer="pil"), index_batches),
        "batch torch": each(lambda indices: data.batch(indices), index_batches),
        "scenes": each(lambda indices: [scene_caption(data.scene(i)) for i in indices], index_batches),
    }


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def alternating_times(fns: dict, repeats: int, clock) -> dict[str, list[float]]:
    """Seconds per call of each function on `clock`, after one untimed call each; `repeats`
    rounds, the order flipped every round (A B, B A, A B, ...)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            start = clock()
            fns[name]()
            times[name].append(clock() - start)
    return times


def measure(size: int, batch_size: int, args) -> dict:
    batches = math.ceil(args.min_images / batch_size)
    images = batches * batch_size
    times = alternating_times(contenders(size, batch_size, batches), args.repeats, CLOCKS[args.clock])
    rate = {name: images / statistics.median(t) for name, t in times.items()}
    return {"size": size, "batch_size": batch_size, "images_per_call": images, "images_per_second": rate,
            "draw_speedup": median_ratio(times["draw PIL"], times["draw torch"]),
            "batch_speedup": median_ratio(times["batch PIL"], times["batch torch"]),
            "seconds": times}


def body(results: list[dict], args) -> str:
    header = ["px", "batch", "draw: PIL", "draw: torch", "draw speed-up", "batch: PIL", "batch: torch",
              "batch speed-up", "scenes alone"]
    rows = [[r["size"], r["batch_size"], *(f"{r['images_per_second'][k]:,.0f}" for k in ("draw PIL", "draw torch")),
             f"{r['draw_speedup']:.1f}x",
             *(f"{r['images_per_second'][k]:,.0f}" for k in ("batch PIL", "batch torch")),
             f"{r['batch_speedup']:.1f}x", f"{r['images_per_second']['scenes']:,.0f}"] for r in results]
    clock = "wall-clock" if args.clock == "wall" else "this process's CPU time"
    return (f"Images per second ({clock}), CPU, median of {args.repeats} alternating rounds of at least "
            f"{args.min_images} images each. draw: the renderers alone on scenes described beforehand (PIL `render` + "
            f"`pil_to_tensor` per picture, stacked; `render_batch`). batch: `Shapes.batch(indices, "
            f"renderer=\"pil\")` and `Shapes.batch(indices)`, scene descriptions and captions included. scenes: "
            f"`Shapes.scene` and the caption alone. 32 px: {TWO_OBJECT_FRACTION:.0%} two-object pictures.\n\n"
            + markdown_table(header, rows))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 32], help="image sizes (default 16 32)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256], help="default 64 256")
    p.add_argument("--repeats", type=int, default=9, help="alternating rounds (default 9)")
    p.add_argument("--min-images", type=int, default=4096, help="pictures per timed call at least (default 4096)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="wall-clock (default) or this process's "
                                                                             "CPU time")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--name", default="renderer", help="the result's name: NAME.md, NAME.json and its block of "
                                                      "BENCHMARKS.md (default renderer)")
    add_publish_flag(p)
    args = p.parse_args(argv)
    if min(args.repeats, args.min_images, *args.batch_sizes) < 1:
        p.error("--repeats, --min-images and --batch-sizes must be at least 1")
    threads = set_threads(args.threads)
    report = Report(args.name, f"Images per second: {args.name}", threads, module="renderer", level=3)
    results = [measure(size, batch_size, args) for size in args.sizes for batch_size in args.batch_sizes]
    print(report.write(body(results, args), {"results": results}, publish=args.publish))
    return 0


if __name__ == "__main__":
    sys.exit(main())
