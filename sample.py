"""Generate images from a trained model, with diffusers' keywords.

    python sample.py --model runs/shapes --prompt "a red circle" --num-images 4 --out red.png

A PNG is written to --out (a labelled grid when more than one image is asked for).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from minidiff.checkpoint import atomic_write
from minidiff.cli import ArgumentParser, UsageError, run, writable_folder
from minidiff.images import make_grid


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/shapes", help="a folder written by train.py")
    p.add_argument("--prompt", required=True, nargs="+", help="one or more prompts")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance_scale (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=1, help="num_images_per_prompt")
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="sample.png", help="PNG to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p.parse_args(argv)


def load_pipeline(args):
    from minidiff import MiniDiffusionPipeline

    return MiniDiffusionPipeline.from_pretrained(args.model, device=args.device)


def main(argv=None) -> int:
    args = parse_args(argv)
    out_path = Path(args.out)
    if out_path.suffix.lower() != ".png":
        raise UsageError(f"--out must name a .png file, got {args.out}")
    if out_path.exists() and not args.overwrite:
        raise UsageError(f"{out_path} exists; pass --overwrite to replace it, or choose another --out")
    writable_folder(out_path.parent, "--out")
    pipe = load_pipeline(args)
    generator = torch.Generator().manual_seed(args.seed)
    prompts = args.prompt
    result = pipe.sample(prompts, negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                         guidance_scale=args.guidance, generator=generator, num_images_per_prompt=args.num_images,
                         sampler=args.sampler)
    images = result.images
    labels = [p for p in prompts for _ in range(args.num_images)]
    picture = images[0] if len(images) == 1 else make_grid(
        images, labels=labels, columns=args.num_images if len(prompts) > 1 else None,
        scale=max(1, 96 // images[0].size[0]))
    atomic_write(out_path, lambda tmp: picture.save(tmp, format="PNG"))  # a kill mid-write leaves the old file
    print(f"wrote {out_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
