"""Generate images from a trained model, with diffusers' keywords.

    python sample.py --model runs/shapes --prompt "a red circle" --num-images 4 --out red.png
    python sample.py --prompt "a blue circle" --image red.png --strength 0.7 --out blue.png      # img2img
    python sample.py --prompt "a green square" --image red.png --mask mask.png --out green.png   # inpainting
    python sample.py --prompt "a red circle" --steps 40 --save-steps 0,1,10,40 --out red.png     # + red-steps.png
    python sample.py --noise-strip red.png --timesteps 0,100,250,500,999 --out noising.png
    python sample.py --model stabilityai/stable-diffusion-3.5-medium --prompt "a red circle" --out red.png

A PNG is written to --out: a labelled grid, about square, when more than one image is asked
for; small images are enlarged (nearest neighbour) to about 96 px a side, --raw-size keeps
the model's size. Images are made --batch-size at a time, so memory does not grow with
--num-images; a grid holds at most 1,024 images: for more, --out-dir DIR writes one PNG
per image as each batch finishes.
--save-steps also writes OUT-steps.png: x_t after each listed step, predicted x0 below.
--noise-strip writes the forward process instead: the image noised to each --timesteps t.
--model is a minidiff folder (written by train.py) or a Stable Diffusion 3.5 model: a Hugging
Face id or a folder with model_index.json; --backend auto tells them apart.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from minidiff.tools import cores
from minidiff.tools.checkpoint import atomic_write
from minidiff.tools.cli import (DEFAULT_MODEL, ArgumentParser, UsageError, open_pipeline, pick_backend,
                                pipeline_class, run, writable_folder)
from minidiff.tools.contract import merge_outputs
from minidiff.tools.figures import noising_strip, trace_strip
from minidiff.tools.pictures import enlarge, grid_columns, load_image, make_grid, scale_for

SD3_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_GRID_IMAGES = 1024  # a 32 x 32 grid of 96 px tiles: about 3,000 px a side
MAX_TRACE_IMAGES = 64  # --save-steps draws two rows per image
BATCH_PIXELS = 64 * 32 * 32  # default --batch-size: 64 images of 32 px, 256 of 16 px, 1 of SD3's 1024 px


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="a folder written by train.py, or an SD3 model: Hugging Face id or diffusers folder "
                        "(default: %(default)s)")
    p.add_argument("--backend", choices=["auto", "minidiff", "sd3"], default="auto",
                   help="auto: a hub id or a folder with model_index.json is sd3, anything else minidiff")
    p.add_argument("--prompt", nargs="+", help="one or more prompts")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance_scale (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=1, help="num_images_per_prompt")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"images per forward pass (default: as many as hold {BATCH_PIXELS:,} pixels, at least 1)")
    p.add_argument("--sampler", choices=["ddim", "ddpm", "euler"], default=None,
                   help="default: the model's own (ddpm for DDPM models, euler for flow models and SD3)")
    p.add_argument("--height", type=int, default=None, help="default: the model's size (SD3: any multiple of 16)")
    p.add_argument("--width", type=int, default=None, help="default: the model's size (SD3: any multiple of 16)")
    sd3 = p.add_argument_group("Stable Diffusion 3.5 only (docs/sd3-bridge.md: memory, quantisation, LoRA)")
    sd3.add_argument("--dtype", choices=list(SD3_DTYPES), default=None,
                     help="default: bfloat16 on CUDA cards and CPUs with native bf16, float16 on older CUDA cards, "
                          "float32 elsewhere")
    sd3.add_argument("--drop-t5", action="store_true", help="leave out the 4.7B-parameter T5 text encoder")
    sd3.add_argument("--offload", choices=["model", "sequential"], default=None,
                     help="move models (or layers) to the GPU only while they run: less memory, slower")
    sd3.add_argument("--quantize", choices=["int8", "nf4"], default=None,
                     help="transformer and T5 weights: int8 (torchao, CPU or CUDA) or nf4 (bitsandbytes, CUDA)")
    sd3.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                     help="a LoRA file, folder or hub id, at SCALE (default 1); repeat for several")
    sd3.add_argument("--skip-layer-guidance", nargs="?", const="recommended", default=None, metavar="L,L,...",
                     help="text-to-image: skip-layer guidance on these transformer layers "
                          "(alone: the model's recommended ones, 7,8,9 for SD3.5 Medium)")
    sd3.add_argument("--max-sequence-length", type=int, default=None, metavar="N",
                     help="T5 tokens read from the prompt, up to 512 (default 256)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="sample.png", help="PNG to write (default: %(default)s)")
    p.add_argument("--out-dir", default=None, metavar="DIR",
                   help="instead of --out: one PNG per image in DIR, written as each batch finishes (for many images)")
    p.add_argument("--raw-size", action="store_true",
                   help="save images at the model's size instead of enlarged to about 96 px (nearest neighbour)")
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
                                             ("--save-steps", args.save_steps), ("--out-dir", args.out_dir))
                    if value is not None]
        if clashing:
            raise UsageError(f"--noise-strip draws the forward process only; drop {', '.join(clashing)}")
        return
    if not args.prompt:
        raise UsageError("--prompt is required (or --noise-strip FILE for a forward-noising strip)")
    for flag, value in (("--num-images", args.num_images), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    total = len(args.prompt) * args.num_images
    if args.out_dir is None and total > MAX_GRID_IMAGES:
        raise UsageError(f"{total:,} images are too many for one grid (at most {MAX_GRID_IMAGES:,}); "
                         "write one PNG per image with --out-dir DIR")
    if args.save_steps is not None and args.out_dir is not None:
        raise UsageError("--save-steps writes OUT-steps.png beside --out; drop --out-dir")
    if args.save_steps is not None and total > MAX_TRACE_IMAGES:
        raise UsageError(f"--save-steps draws two rows per image; ask for at most {MAX_TRACE_IMAGES} images, "
                         f"not {total:,}")
    if args.image is None:
        for flag, given in (("--mask", args.mask is not None), ("--strength", args.strength is not None)):
            if given:
                raise UsageError(f"{flag} needs --image FILE, the picture to start from")
    if args.resample_jumps and args.mask is None:
        raise UsageError("--resample-jumps applies to inpainting only; give --image and --mask")
    if args.skip_layer_guidance is not None and args.image is not None:
        raise UsageError("--skip-layer-guidance applies to text-to-image only (diffusers' SD3 img2img and "
                         "inpaint pipelines have no skip-layer guidance); drop it or --image")


def image_names(prompts: list[str], num_images: int) -> list[str]:
    """--out-dir's file names: a running number, then the prompt (`00000-a-red-circle.png`)."""
    digits = max(5, len(str(len(prompts) * num_images - 1)))
    slugs = [re.sub(r"[^a-z0-9]+", "-", p.lower()).strip("-")[:60] or "image" for p in prompts]
    return [f"{k:0{digits}d}-{slug}.png" for k, slug in enumerate(s for s in slugs for _ in range(num_images))]


def output_paths(args) -> list[Path]:
    """The files this run writes, refused before any work if one exists (without --overwrite)."""
    if args.out_dir is not None:
        folder = Path(args.out_dir)
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"--out-dir: {folder} is a file, not a folder; choose another --out-dir")
        paths = [folder / name for name in image_names(args.prompt, args.num_images)]
        existing = next((path for path in paths if path.exists()), None)
        if existing is not None and not args.overwrite:
            raise UsageError(f"{existing} exists; pass --overwrite to replace it, or choose another --out-dir")
        return paths
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
    """The pipeline for args.model (args.backend, resolved by main), built by minidiff.tools.cli.open_pipeline,
    with the loading options and LoRAs asked for."""
    options = {name: value for name, value in (("dtype", SD3_DTYPES.get(args.dtype)), ("drop_t5", args.drop_t5),
                                               ("offload", args.offload), ("quantization", args.quantize))
               if value not in (None, False)}
    pipe = open_pipeline(args.model, args.backend, args.device, **options)
    for lora in args.lora:
        path, scale = lora_and_scale(lora)
        pipe.load_lora_weights(path, scale=scale)
    return pipe


def write(picture, path: Path, quiet: bool = False) -> None:
    """Save atomically: a kill mid-write leaves any old file whole."""
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))
    if not quiet:
        print(f"wrote {path}", file=sys.stderr)


def lora_and_scale(text: str) -> tuple[str, float]:
    """--lora PATH[:SCALE] -> (PATH, SCALE); a colon not followed by a number belongs to the path."""
    path, _, scale = text.rpartition(":")
    try:
        return (path, float(scale)) if path else (text, 1.0)
    except ValueError:
        return text, 1.0


def skip_layers(text: str):
    """--skip-layer-guidance alone -> True (the model's recommended layers); L,L,... -> a list of layers."""
    return True if text == "recommended" else int_list(text, "--skip-layer-guidance")


# flags that only some backends take: (flag, the keyword it sets, its value)
def backend_flags(args) -> list[tuple[str, str, object]]:
    return [("--dtype", "dtype", args.dtype), ("--drop-t5", "drop_t5", args.drop_t5),
            ("--offload", "offload", args.offload), ("--quantize", "quantization", args.quantize),
            ("--lora", "load_lora_weights", args.lora), ("--skip-layer-guidance", "skip_layer_guidance",
                                                         args.skip_layer_guidance),
            ("--max-sequence-length", "max_sequence_length", args.max_sequence_length),
            ("--resample-jumps", "resample_jumps", args.resample_jumps)]


def call_options(args) -> dict:
    """The keywords of the call beyond the contract's, checked (before loading anything) against
    what the backend's pipeline takes: a flag it does not take is one line naming who takes it."""
    options = {"sampler": args.sampler, "height": args.height, "width": args.width}
    for flag, name, value in backend_flags(args):
        if value in (None, False, [], 0):
            continue
        takers = [backend for backend in ("minidiff", "sd3") if takes(pipeline_class(backend), name)]
        if args.backend not in takers:
            who = " and ".join({"minidiff": "minidiff", "sd3": "SD3"}[b] for b in takers)
            raise UsageError(f"{flag} applies to {who} models (a Hugging Face id or a diffusers folder for SD3); "
                             f"drop it for this {args.backend} model")
        if name in ("skip_layer_guidance", "max_sequence_length", "resample_jumps"):
            options[name] = skip_layers(value) if name == "skip_layer_guidance" else value
    return options


def takes(pipeline_class, name: str) -> bool:
    """Does this pipeline class take `name`: a loading option, a call keyword, or a method?"""
    import dataclasses

    return (name in pipeline_class.load_options or name in {f.name for f in dataclasses.fields(pipeline_class.call_type)}
            or hasattr(pipeline_class, name))


def main(argv=None) -> int:
    args = parse_args(argv)
    args.backend = pick_backend(args.model, args.backend)  # "auto" resolved once, here
    check_args(args)
    paths = output_paths(args)
    save_steps = int_list(args.save_steps, "--save-steps") if args.save_steps is not None else None

    options = call_options(args)
    writable_folder(paths[0].parent, "--out-dir" if args.out_dir is not None else "--out")
    if args.noise_strip is not None:
        if args.backend != "minidiff":
            raise UsageError("--noise-strip shows minidiff's forward process; give a minidiff --model")
        timesteps = int_list(args.timesteps, "--timesteps")
        image = load_image(args.noise_strip, what="--noise-strip image")  # read before the model loads
        pipe = load_pipeline(args)
        strip = noising_strip(load_image(image, pipe.image_size), pipe.model.objective, timesteps,
                              torch.Generator().manual_seed(args.seed))
        write(strip, paths[0])
        return 0

    pipe = load_pipeline(args)
    if args.image is not None:
        options.update(image=args.image, strength=args.strength if args.strength is not None else
                       0.99 if args.mask is not None else 0.7)
        options["mask_image"] = args.mask
    generator = torch.Generator().manual_seed(args.seed)  # one stream: the same seed and --batch-size, the same images
    outputs, written = [], 0
    with ImageProgress(len(args.prompt) * args.num_images) as progress:
        for prompt in args.prompt:  # prompt by prompt, each in batches of --batch-size (the pipeline's `batches`)
            call = pipe.call_type(prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                                  guidance_scale=args.guidance, generator=generator, capture_steps=save_steps,
                                  num_images_per_prompt=args.num_images, callback=progress.step,
                                  batch_size=args.batch_size or max(1, BATCH_PIXELS // pipe.image_size ** 2),
                                  **options)
            for batch in pipe.batches(call):
                cores.adjust()  # fewer threads while other programs keep cores busy
                result = pipe.generate(batch)
                progress.finished(len(result.images))
                if args.out_dir is not None:  # written now, not kept: memory does not grow with the count
                    for image in result.images:
                        write(for_viewing(image, args.raw_size), paths[written], quiet=True)
                        written += 1
                else:
                    outputs.append(result)
    if args.out_dir is not None:
        print(f"wrote {written} images to {args.out_dir}", file=sys.stderr)
        return 0
    merged = merge_outputs(outputs)
    images = merged.images
    labels = [p for p in args.prompt for _ in range(args.num_images)]
    picture = for_viewing(images[0], args.raw_size) if len(images) == 1 else make_grid(
        images, labels=labels, columns=grid_columns(len(images), group=args.num_images if len(args.prompt) > 1 else 1),
        scale=1 if args.raw_size else scale_for(images[0]))
    write(picture, paths[0])
    if save_steps is not None:
        write(trace_strip(merged.trace), paths[1])
    return 0


def for_viewing(image, raw_size: bool = False):
    """A single image as saved: enlarged as the grids' tiles are (nearest neighbour, to about
    96 px a side), so that a 16 px sample is not a speck in an image viewer; or as it is."""
    return image if raw_size else enlarge(image, scale_for(image))


class ImageProgress:
    """A progress bar over images on stderr. It opens at the first denoising step, so that a
    mistake found before any work (a bad image, a bad strength) is still the only line printed,
    and moves as each batch finishes."""

    def __init__(self, total: int):
        self.total, self.bar = total, None

    def step(self, record=None) -> None:
        if self.bar is None:
            self.bar = tqdm(total=self.total, unit="image", dynamic_ncols=True)

    def finished(self, n: int) -> None:
        self.step()
        self.bar.update(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()


if __name__ == "__main__":
    sys.exit(run(main))
