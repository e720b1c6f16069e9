"""Generate images from a trained model, with diffusers' keywords.

    python sample.py --model runs/shapes --prompt "a red circle" --num-images 4 --out red.png
    python sample.py --prompt "a blue circle" --image red.png --strength 0.7 --out blue.png      # img2img
    python sample.py --prompt "a green square" --image red.png --mask mask.png --out green.png   # inpainting
    python sample.py --prompt "a red circle" --steps 40 --save-steps 0,1,10,40 --out red.png     # + red-steps.png
    python sample.py --noise-strip red.png --timesteps 0,100,250,500,999 --out noising.png
    python sample.py --model stabilityai/stable-diffusion-3.5-medium --prompt "a red circle" --out red.png

A PNG is written to --out (a labelled grid when more than one image is asked for).
--save-steps also writes OUT-steps.png: x_t after each listed step, predicted x0 below.
--noise-strip writes the forward process instead: the image noised to each --timesteps t.
--model is a minidiff folder (written by train.py) or a Stable Diffusion 3.5 model: a Hugging
Face id or a folder with model_index.json; --backend auto tells them apart.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from minidiff.checkpoint import atomic_write
from minidiff.cli import DEFAULT_MODEL, ArgumentParser, UsageError, open_pipeline, pick_backend, run, writable_folder
from minidiff.figures import noising_strip, trace_strip
from minidiff.images import load_image, make_grid


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="a folder written by train.py, or an SD3 model: Hugging Face id or diffusers folder")
    p.add_argument("--backend", choices=["auto", "minidiff", "sd3"], default="auto",
                   help="auto: a hub id or a folder with model_index.json is sd3, anything else minidiff")
    p.add_argument("--prompt", nargs="+", help="one or more prompts")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance_scale (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=1, help="num_images_per_prompt")
    p.add_argument("--sampler", choices=["ddim", "ddpm", "euler"], default=None,
                   help="minidiff only (default: the model's own, ddim for DDPM models, euler for flow models)")
    p.add_argument("--height", type=int, default=None, help="sd3 only (default: the model's native size)")
    p.add_argument("--width", type=int, default=None, help="sd3 only (default: the model's native size)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="sample.png", help="PNG to write")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    edit = p.add_argument_group("start from a picture")
    edit.add_argument("--image", default=None, help="img2img: start from this picture")
    edit.add_argument("--mask", default=None, help="inpainting (with --image): white is replaced, black is kept")
    edit.add_argument("--strength", type=float, default=None,
                      help="how far the picture is noised, 0..1 (default 0.7; 0.99 with --mask)")
    edit.add_argument("--resample-jumps", type=int, default=0, help="inpainting: RePaint resampling per step")
    look = p.add_argument_group("watch the process")
    look.add_argument("--save-steps", default=None, metavar="K,K,...",
                      help="also write OUT-steps.png with x_t and predicted x0 after these steps (0 = the start)")
    look.add_argument("--noise-strip", default=None, metavar="FILE",
                      help="instead of sampling, write FILE noised to each of --timesteps")
    look.add_argument("--timesteps", default="0,50,100,250,500,750,999", metavar="T,T,...",
                      help="timesteps of --noise-strip (default %(default)s)")
    return p.parse_args(argv)


def int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} takes whole numbers separated by commas, got {text!r}") from None


def check_args(args) -> None:
    """Flag combinations that cannot work, refused before anything is loaded."""
    if args.noise_strip is not None:
        clashing = [flag for flag, value in (("--prompt", args.prompt), ("--image", args.image), ("--mask", args.mask),
                                             ("--save-steps", args.save_steps)) if value is not None]
        if clashing:
            raise UsageError(f"--noise-strip draws the forward process only; drop {', '.join(clashing)}")
        return
    if not args.prompt:
        raise UsageError("--prompt is required (or --noise-strip FILE for a forward-noising strip)")
    if args.image is None:
        for flag, given in (("--mask", args.mask is not None), ("--strength", args.strength is not None)):
            if given:
                raise UsageError(f"{flag} needs --image FILE, the picture to start from")
    if args.resample_jumps and args.mask is None:
        raise UsageError("--resample-jumps applies to inpainting only; give --image and --mask")


def output_paths(args) -> list[Path]:
    out_path = Path(args.out)
    if out_path.suffix.lower() != ".png":
        raise UsageError(f"--out must name a .png file, got {args.out}")
    paths = [out_path]
    if args.save_steps is not None:
        paths.append(out_path.with_name(out_path.stem + "-steps.png"))
    for path in paths:
        if path.exists() and not args.overwrite:
            raise UsageError(f"{path} exists; pass --overwrite to replace it, or choose another --out")
    return paths


def load_pipeline(args):
    """The pipeline for args.model (args.backend, resolved by main); built in minidiff.cli.open_pipeline."""
    return open_pipeline(args.model, args.backend, args.device)


def write(picture, path: Path) -> None:
    """Save atomically: a kill mid-write leaves any old file whole."""
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))
    print(f"wrote {path}", file=sys.stderr)


def backend_options(args) -> dict:
    """The keywords only one backend takes, checked (before loading anything) against the backend."""
    if args.backend == "sd3":
        if args.sampler is not None:
            raise UsageError("--sampler applies to minidiff models; SD3 always uses its flow-matching Euler sampler")
        if args.resample_jumps:
            raise UsageError("--resample-jumps applies to minidiff models")
        return {"height": args.height, "width": args.width}
    if args.height is not None or args.width is not None:
        raise UsageError("--height/--width apply to SD3 models; a minidiff model renders at its trained size")
    options = {"sampler": args.sampler}  # None: the model's default
    if args.mask is not None:
        options["resample_jumps"] = args.resample_jumps
    return options


def main(argv=None) -> int:
    args = parse_args(argv)
    args.backend = pick_backend(args.model, args.backend)  # "auto" resolved once, here
    check_args(args)
    paths = output_paths(args)
    save_steps = int_list(args.save_steps, "--save-steps") if args.save_steps is not None else None

    options = backend_options(args)
    writable_folder(paths[0].parent, "--out")
    if args.noise_strip is not None:
        if args.backend != "minidiff":
            raise UsageError("--noise-strip shows minidiff's forward process; give a minidiff --model")
        timesteps = int_list(args.timesteps, "--timesteps")
        image = load_image(args.noise_strip, what="--noise-strip image")  # read before the model loads
        pipe = load_pipeline(args)
        strip = noising_strip(load_image(image, pipe.image_size), pipe.config.scheduler, timesteps,
                              torch.Generator().manual_seed(args.seed))
        write(strip, paths[0])
        return 0

    pipe = load_pipeline(args)
    common = dict(negative_prompt=args.negative_prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
                  generator=torch.Generator().manual_seed(args.seed), num_images_per_prompt=args.num_images,
                  capture_steps=save_steps, **options)
    prompts = args.prompt
    if args.mask is not None:
        strength = 0.99 if args.strength is None else args.strength
        result = pipe.inpaint(prompts, args.image, args.mask, strength=strength, **common)
    elif args.image is not None:
        strength = 0.7 if args.strength is None else args.strength
        result = pipe.img2img(prompts, args.image, strength=strength, **common)
    else:
        result = pipe.sample(prompts, **common)
    images = result.images
    labels = [p for p in prompts for _ in range(args.num_images)]
    picture = images[0] if len(images) == 1 else make_grid(
        images, labels=labels, columns=args.num_images if len(prompts) > 1 else None,
        scale=max(1, 96 // images[0].size[0]))
    write(picture, paths[0])
    if save_steps is not None:
        write(trace_strip(result.trace), paths[1])
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
