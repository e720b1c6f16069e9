"""How well img2img and inpainting do what the chapter says, on a trained Shapes model.

    PYTHONPATH=. python benchmarks/edits.py --model runs/shapes --seeds 24

Run by hand (not a test). Each case runs once per seed s = 0 .. seeds - 1, on the s-th
Shapes input of its kind and with generator seed s; the deterministic analyser of
minidiff.evaluate reads the results. Prints a table of rates:

- img2img, strength 0.7, "a blue circle" from a red circle: the centre stays within 3 px
  and the colour becomes blue. Beside it, text to image with the same prompt and seeds:
  how often the model draws blue at all, the ceiling for the edit.
- inpainting (strength 0.99), the object's box (grown by 1 px) masked on a red circle:
  the analyser finds the asked object in the masked box. Prompts cycle through the 17
  other (colour, shape) pairs; text to image with the same prompts and seeds is the ceiling.
- inpainting the right half of a one-object image whose object lies in the right half
  (16 px models hold one object per image, so the masked half holds the object to replace):
  the analyser finds the asked object in the right half.
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
import torch
from PIL import Image

from minidiff import MiniDiffusionPipeline
from minidiff.tools.shapes import Shapes
from minidiff.tools.shapes import COLOURS, SHAPES, caption_for
from minidiff.tools.evaluate import analyse_object, object_centre
from minidiff.tools.figures import box_mask, shapes_example


def rate(flags: list[bool]) -> str:
    return f"{sum(flags) / len(flags):6.1%} ({sum(flags)}/{len(flags)})"


def other_objects(colour: str, shape: str) -> list[tuple[str, str]]:
    return [p for p in itertools.product(COLOURS, SHAPES) if p != (colour, shape)]


def right_half_examples(image_size: int, count: int, seed: int = 2) -> list[tuple[Image.Image, tuple]]:
    """One-object Shapes images whose object lies entirely in the right half."""
    data, found = Shapes(image_size, seed=seed), []
    for index in itertools.count():
        (obj,) = data.scene(index)
        if obj["box"][0] >= image_size / 2:
            found.append((data.pil_and_caption(index)[0], (obj["colour"], obj["shape"])))
            if len(found) == count:
                return found


def img2img_case(pipe, seeds: int, steps, strength: float) -> list[tuple[str, str]]:
    moved, not_red, blue, both, text_blue = [], [], [], [], []
    for s in range(seeds):
        image, _ = shapes_example(pipe.image_size, "red", "circle", nth=s)
        out = pipe.img2img("a blue circle", image, strength=strength, num_inference_steps=steps,
                           generator=torch.Generator().manual_seed(s)).images[0]
        before, after = object_centre(np.asarray(image)), object_centre(np.asarray(out))
        kept = after is not None and np.hypot(after[0] - before[0], after[1] - before[1]) <= 3
        colour = analyse_object(np.asarray(out))[0]
        moved.append(kept), not_red.append(colour != "red"), blue.append(colour == "blue")
        both.append(kept and colour == "blue")
        text = pipe.sample("a blue circle", num_inference_steps=steps, generator=torch.Generator().manual_seed(s))
        text_blue.append(analyse_object(np.asarray(text.images[0]))[0] == "blue")
    label = f'img2img {strength} "a blue circle" from a red circle'
    return [(f"{label}: centre within 3 px", rate(moved)), (f"{label}: no longer red", rate(not_red)),
            (f"{label}: colour blue", rate(blue)),
            (f"{label}: both", rate(both)), ('text to image "a blue circle": colour blue (ceiling)', rate(text_blue))]


def inpaint_object_case(pipe, seeds: int, steps) -> list[tuple[str, str]]:
    targets = other_objects("red", "circle")
    colour_ok, shape_ok, both, text_both = [], [], [], []
    for s in range(seeds):
        image, box = shapes_example(pipe.image_size, "red", "circle", nth=s)
        mask = box_mask(box, pipe.image_size)
        target = targets[s % len(targets)]
        out = pipe.inpaint(caption_for([target]), image, mask, num_inference_steps=steps,
                           generator=torch.Generator().manual_seed(s)).images[0]
        left, top, right, bottom = mask.getbbox()
        found = analyse_object(np.asarray(out)[top:bottom, left:right])
        colour_ok.append(found[0] == target[0]), shape_ok.append(found[1] == target[1]), both.append(found == target)
        text = pipe.sample(caption_for([target]), num_inference_steps=steps, generator=torch.Generator().manual_seed(s))
        text_both.append(analyse_object(np.asarray(text.images[0])) == target)
    label = "inpaint the object's box of a red circle, another object asked"
    return [(f"{label}: colour", rate(colour_ok)), (f"{label}: shape", rate(shape_ok)), (f"{label}: both", rate(both)),
            ("text to image, the same prompts: both (ceiling)", rate(text_both))]


def inpaint_half_case(pipe, seeds: int, steps) -> list[tuple[str, str]]:
    size = pipe.image_size
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 2, 0, size, size))
    colour_ok, shape_ok, both = [], [], []
    for s, (image, present) in enumerate(right_half_examples(size, seeds)):
        targets = other_objects(*present)
        target = targets[s % len(targets)]
        out = pipe.inpaint(caption_for([target]), image, mask, num_inference_steps=steps,
                           generator=torch.Generator().manual_seed(s)).images[0]
        found = analyse_object(np.asarray(out)[:, size // 2:])
        colour_ok.append(found[0] == target[0]), shape_ok.append(found[1] == target[1]), both.append(found == target)
    label = "inpaint the right half (object there), another object asked"
    return [(f"{label}: colour", rate(colour_ok)), (f"{label}: shape", rate(shape_ok)), (f"{label}: both", rate(both))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="folder written by train.py")
    parser.add_argument("--seeds", type=int, default=24, help="runs per case (default 24)")
    parser.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: the pipeline's)")
    parser.add_argument("--strength", type=float, default=0.7, help="img2img strength (default 0.7)")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    pipe = MiniDiffusionPipeline.from_pretrained(args.model, device=args.device)
    started = time.time()
    rows = (img2img_case(pipe, args.seeds, args.steps, args.strength)
            + inpaint_object_case(pipe, args.seeds, args.steps) + inpaint_half_case(pipe, args.seeds, args.steps))
    steps = args.steps or pipe.default_num_inference_steps
    print(f"model {args.model} ({pipe.image_size} px), {args.seeds} seeds, {steps} steps, guidance "
          f"{pipe.default_guidance_scale}, ddim; {time.time() - started:.0f} s on {pipe.device}")
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    from minidiff.tools.cli import run

    raise SystemExit(run(main))
