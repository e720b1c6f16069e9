"""Generate images from a trained model, with diffusers' keywords.

    python sample.py --model runs/shapes --prompt "a red circle" --num-images 4 --out red.png
    python sample.py --model stabilityai/stable-diffusion-3.5-medium --prompt "a red circle" --out red.png

A PNG is written to --out (a labelled grid when more than one image is asked for). --model is a
minidiff folder (written by train.py) or a Stable Diffusion 3.5 model: a Hugging Face id or a
folder with model_index.json; --backend auto tells them apart.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from minidiff.cli import UsageError, run
from minidiff.images import make_grid

DEFAULT_MODEL = "runs/shapes"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="a folder written by train.py, or an SD3 model: Hugging Face id or diffusers folder")
    p.add_argument("--backend", choices=["auto", "minidiff", "sd3"], default="auto",
                   help="auto: a hub id or a folder with model_index.json is sd3, anything else minidiff")
    p.add_argument("--prompt", required=True, nargs="+", help="one or more prompts")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance_scale (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=1, help="num_images_per_prompt")
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default=None, help="minidiff only (default ddim)")
    p.add_argument("--height", type=int, default=None, help="sd3 only (default: the model's native size)")
    p.add_argument("--width", type=int, default=None, help="sd3 only (default: the model's native size)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="sample.png", help="PNG to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p.parse_args(argv)


def pick_backend(model: str, backend: str = "auto") -> str:
    """auto: a folder with model_index.json, or a Hugging Face id (owner/name that is not an existing
    path), is sd3; anything else (a minidiff checkpoint folder, the default runs/shapes) is minidiff."""
    if backend != "auto":
        return backend
    from bridge.sd3 import looks_like_hub_id

    path = Path(model).expanduser()
    if (path / "model_index.json").is_file():
        return "sd3"
    if not path.exists() and model != DEFAULT_MODEL and looks_like_hub_id(model):
        return "sd3"
    return "minidiff"


def load_pipeline(args):
    """The one place a pipeline is built: minidiff's or the SD3 bridge, by pick_backend."""
    if pick_backend(args.model, args.backend) == "sd3":
        from bridge import SD3Bridge

        return SD3Bridge.from_pretrained(args.model, device=args.device)
    from minidiff import MiniDiffusionPipeline

    return MiniDiffusionPipeline.from_pretrained(args.model, device=args.device)


def backend_options(args) -> dict:
    """The keywords only one backend takes, checked (before loading anything) against the backend."""
    if pick_backend(args.model, args.backend) == "sd3":
        if args.sampler is not None:
            raise UsageError("--sampler applies to minidiff models; SD3 always uses its flow-matching Euler sampler")
        return {"height": args.height, "width": args.width}
    if args.height is not None or args.width is not None:
        raise UsageError("--height/--width apply to SD3 models; a minidiff model renders at its trained size")
    return {"sampler": args.sampler or "ddim"}


def main(argv=None) -> int:
    args = parse_args(argv)
    out_path = Path(args.out)
    if out_path.suffix.lower() != ".png":
        raise UsageError(f"--out must name a .png file, got {args.out}")
    if out_path.exists() and not args.overwrite:
        raise UsageError(f"{out_path} exists; pass --overwrite to replace it, or choose another --out")
    options = backend_options(args)
    pipe = load_pipeline(args)
    generator = torch.Generator().manual_seed(args.seed)
    prompts = args.prompt
    result = pipe.sample(prompts, negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                         guidance_scale=args.guidance, generator=generator, num_images_per_prompt=args.num_images,
                         **options)
    images = result.images
    labels = [p for p in prompts for _ in range(args.num_images)]
    picture = images[0] if len(images) == 1 else make_grid(
        images, labels=labels, columns=args.num_images if len(prompts) > 1 else None,
        scale=max(1, 96 // images[0].size[0]))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(out_path)
    print(f"wrote {out_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
