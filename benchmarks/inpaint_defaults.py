"""Inpainting's settings, one at a time from the defaults (strength 0.99, guidance 3, 50 steps),
on a trained Shapes model (issue 24 item 10: "a green square" into the left half of the README's
red circle came back as a noisy green block filling the mask).

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/inpaint_defaults.py --model runs/shapes --seeds 24

Run by hand (not a test). Two cases, seeds s = 0 .. seeds - 1 (the generator's seed):
- "half": the README's picture (`sample("a red circle")`, seed 123456), the left half masked,
  "a green square" asked; the analyser of minidiff.evaluate reads the left half;
- "box": edits.py's case, the s-th red circle of the Shapes data with its box (grown by 1 px)
  masked, another (colour, shape) asked (cycling through the 17 others); read in the box.
Columns: how often the asked object is read back ("asked"); "rough", the mean distance (0-255)
of the object's fully covered pixels from their mean colour (a Shapes object is flat: about 0; a
speckled block is high); "fill", the share of the masked pixels the object covers; and for
"half" the same two read from text to image with the same prompt and settings (the model alone).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from minidiff import MiniDiffusionPipeline
from minidiff.tools.shapes import caption_for
from minidiff.tools.evaluate import analyse_object, object_coverage
from minidiff.tools.figures import box_mask, shapes_example

DEFAULTS = dict(strength=0.99, guidance_scale=3.0, num_inference_steps=50, resample_jumps=0)
SWEEP = [("strength", [0.8, 0.9, 1.0]), ("guidance_scale", [1.0, 2.0, 5.0, 7.5]),
         ("num_inference_steps", [20, 100]), ("resample_jumps", [2])]


def read(region: np.ndarray, mask: np.ndarray) -> tuple[tuple, float, float]:
    """(H, W, 3) uint8 and its (H, W) bool mask -> ((colour, shape), roughness, fill)."""
    found = analyse_object(region)
    coverage = object_coverage(region)
    if coverage is None:
        return found, float("nan"), 0.0
    core = region[coverage > 0.8].astype(np.float32)
    rough = float(np.linalg.norm(core - core.mean(axis=0), axis=1).mean()) if len(core) else float("nan")
    return found, rough, float((coverage[mask] > 0.5).mean())


def half_case(pipe, seeds: int, settings: dict) -> dict:
    red = pipe.sample("a red circle", generator=torch.Generator().manual_seed(123456)).images[0]
    size = pipe.image_size
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (0, 0, size // 2, size))
    options = {k: v for k, v in settings.items() if k != "strength"}
    out = pipe.inpaint("a green square", red, mask, strength=settings["strength"], num_images_per_prompt=seeds,
                       generator=torch.Generator().manual_seed(0), **options).images
    text = pipe.sample("a green square", num_images_per_prompt=seeds, generator=torch.Generator().manual_seed(0),
                       **{k: v for k, v in options.items() if k != "resample_jumps"}).images
    rows = [read(np.asarray(o)[:, : size // 2], np.ones((size, size // 2), dtype=bool)) for o in out]
    texts = [read(np.asarray(t), np.ones((size, size), dtype=bool)) for t in text]
    return dict(asked=np.mean([f == ("green", "square") for f, _, _ in rows]),
                rough=np.nanmean([r for _, r, _ in rows]), fill=np.mean([f for _, _, f in rows]),
                text_asked=np.mean([f == ("green", "square") for f, _, _ in texts]),
                text_rough=np.nanmean([r for _, r, _ in texts]))


def box_case(pipe, seeds: int, settings: dict) -> dict:
    import itertools

    from minidiff.tools.shapes import COLOURS, SHAPES

    targets = [p for p in itertools.product(COLOURS, SHAPES) if p != ("red", "circle")]
    asked, rough, fill = [], [], []
    for s in range(seeds):
        image, box = shapes_example(pipe.image_size, "red", "circle", nth=s)
        mask = box_mask(box, pipe.image_size)
        target = targets[s % len(targets)]
        out = pipe.inpaint(caption_for([target]), image, mask, generator=torch.Generator().manual_seed(s),
                           **settings).images[0]
        left, top, right, bottom = mask.getbbox()
        found, r, f = read(np.asarray(out)[top:bottom, left:right],
                           np.asarray(mask)[top:bottom, left:right] > 0)
        asked.append(found == target), rough.append(r), fill.append(f)
    return dict(asked=np.mean(asked), rough=np.nanmean(rough), fill=np.mean(fill))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="folder written by train.py")
    parser.add_argument("--seeds", type=int, default=24)
    parser.add_argument("--only", nargs="*", help='these rows only, by name ("defaults", "guidance_scale 2.0")')
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    pipe = MiniDiffusionPipeline.from_pretrained(args.model, device=args.device)
    started = time.time()
    variants = [("defaults", DEFAULTS)] + [(f"{k} {v}", {**DEFAULTS, k: v}) for k, values in SWEEP for v in values]
    variants = [(name, settings) for name, settings in variants if not args.only or name in args.only]
    print(f"model {args.model} ({pipe.image_size} px, {pipe.samplers[0]}), {args.seeds} seeds per case")
    print(f"{'settings':<23} | half: asked  rough  fill | text: asked  rough | box: asked  rough  fill")
    for name, settings in variants:
        half, box = half_case(pipe, args.seeds, settings), box_case(pipe, args.seeds, settings)
        print(f"{name:<23} | {half['asked']:10.0%} {half['rough']:6.1f} {half['fill']:5.0%} | "
              f"{half['text_asked']:11.0%} {half['text_rough']:6.1f} | {box['asked']:9.0%} {box['rough']:6.1f} "
              f"{box['fill']:5.0%}")
    print(f"{time.time() - started:.0f} s on {pipe.device}")
    return 0


if __name__ == "__main__":
    from minidiff.tools.cli import run

    raise SystemExit(run(main))
