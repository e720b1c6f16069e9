"""The chapter's figures, reproduced on the toy model.

    python -m minidiff.tools.figures --model runs/shapes --out figures/
    python -m minidiff.tools.figures --model runs/shapes --flow-model runs/flow --out figures/

writes, with the model's own schedule and fixed seeds (a DDPM or a rectified-flow model alike):

    forward-noising.png   a Shapes image noised to t = 0 ... T - 1 (the forward process: Ho et al. 2020
                          eq. 4, or for a flow model x_sigma = (1 - sigma) x_0 + sigma eps, sigma = t / T)
    denoising-steps.png   a generation after 0, 1, 10 and 40 of 40 steps: x_t, and the predicted x_0 below
    negative-prompt.png   the same seeds without (top) and with (bottom) a negative prompt
    img2img-strength.png  a red circle turned towards "a blue circle" at strengths 0.2, 0.4, 0.7, 1.0
    inpainting.png        two objects, a mask over the right one (white = replaced), four inpainted results

With --flow-model (a model trained with `--objective flow`), also the same five for it in
`flow/`, and

    ddpm-vs-flow.png      one prompt and seed (so the same starting noise) denoised by the DDPM model
                          and by the flow model: x_t and predicted x_0 at the same fractions of the run

Small images are enlarged with nearest-neighbour so each pixel stays a visible square.
The strips are also what `sample.py --save-steps` and `sample.py --noise-strip` write.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .shapes import COLOURS, Shapes, render
from .pictures import pil_to_tensor, tensor_to_pil
from ..scheduler import randn
from .pictures import make_grid, scale_for

FIGURES = ("forward-noising.png", "denoising-steps.png", "negative-prompt.png", "img2img-strength.png",
           "inpainting.png")
COMPARISON = "ddpm-vs-flow.png"
FLOW_FOLDER = "flow"  # where --flow-model's own figures go, inside --out


def noising_strip(image: Image.Image, objective, timesteps: list[int],
                  generator: torch.Generator | None = None) -> Image.Image:
    """The input, then x_t for each t, one noise tensor eps for all t so only the noise level changes:
    x_t = sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) eps (Ho et al. 2020 eq. 4) for a DDPM
    model; x_sigma = (1 - sigma) x_0 + sigma eps with sigma = t / T (Esser et al. 2024 eq. 2 with
    rectified flow's a_t = 1 - t, b_t = t, their eq. 13) for a flow one, labelled with sigma.
    `objective`: the model's (`model.objective`)."""
    T = objective.num_train_timesteps
    bad = [t for t in timesteps if not 0 <= t < T]
    if bad or not timesteps:
        raise ValueError(f"timesteps must lie in 0..{T - 1}, got {bad or 'none'}")
    x0 = pil_to_tensor(image)[None]  # (1, 3, H, W)
    noise = randn(x0.shape, generator, x0.device)
    noised = objective.add_noise(x0.expand(len(timesteps), -1, -1, -1), noise.expand(len(timesteps), -1, -1, -1),
                               torch.tensor(timesteps))
    tiles = [image.convert("RGB")] + tensor_to_pil(noised)
    labels = [f"sigma={t / T:.2f}" if objective.name == "flow" else f"t={t}" for t in timesteps]
    return make_grid(tiles, labels=["input"] + labels, scale=scale_for(image))


def trace_rows(trace: list[dict], b: int = 0, name: str = "") -> tuple[list[Image.Image], list[str]]:
    """Image `b` of a trace as two rows of tiles and their labels: x_t after each captured step,
    then the x_0 predicted at that step (a blank at step 0, the start). `name` prefixes the labels."""
    tiles, labels = [], []
    for record in trace:
        tiles.append(record["x_t"][b])
        labels.append(f"{name}step {record['step']}")
    for record in trace:  # the x0 predicted by the model at timestep t of that step
        blank = Image.new("RGB", record["x_t"][b].size, (255, 255, 255))
        tiles.append(record["pred_x0"][b] if record["pred_x0"] is not None else blank)
        # a flow model's (and SD3's) timestep is a float, sigma * T: whole numbers are enough for a label
        labels.append(f"{name}x0 from t={record['timestep']:.0f}" if record["pred_x0"] is not None else "")
    return tiles, labels


def trace_strip(trace: list[dict]) -> Image.Image:
    """`ImageOutput.trace` as a grid: per generated image, a row of x_t after each captured
    step and a row of the predicted x_0 at that step (none at step 0, the start)."""
    if not trace:
        raise ValueError("the trace is empty: ask for steps with capture_steps")
    tiles, labels = [], []
    for b in range(len(trace[0]["x_t"])):
        rows = trace_rows(trace, b)
        tiles += rows[0]
        labels += rows[1]
    return make_grid(tiles, labels=labels, columns=len(trace), scale=scale_for(tiles[0]))


def ddpm_vs_flow_strip(ddpm_pipe, flow_pipe, prompt: str = "a red circle", steps: int = 40, seed: int = 0,
                       fractions: tuple[float, ...] = (0, 0.1, 0.25, 0.5, 0.75, 1.0)) -> Image.Image:
    """`prompt` denoised in `steps` steps by a DDPM model (its default sampler) and by a flow model
    (Euler), from the same seed, so from the same starting noise x_T: for each, a row of x_t and a
    row of predicted x_0 at the same fractions of the run. The DDPM rows come first."""
    if ddpm_pipe.config.objective != "ddpm" or flow_pipe.config.objective != "flow":
        raise ValueError(f"need a DDPM model and a flow model, got {ddpm_pipe.config.objective} and "
                         f"{flow_pipe.config.objective}")
    if ddpm_pipe.image_size != flow_pipe.image_size:
        raise ValueError(f"the two models draw {ddpm_pipe.image_size} px and {flow_pipe.image_size} px images; "
                         "the same starting noise needs one size")
    capture = sorted({round(f * steps) for f in fractions})
    tiles, labels = [], []
    for name, pipe in (("DDPM ", ddpm_pipe), ("flow ", flow_pipe)):
        trace = pipe.sample(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                            capture_steps=capture).trace
        rows = trace_rows(trace, 0, name)
        tiles += rows[0]
        labels += rows[1]
    return make_grid(tiles, labels=labels, columns=len(capture), scale=scale_for(tiles[0]))


def shapes_example(image_size: int, colour: str, shape: str, nth: int = 0, seed: int = 1) -> tuple[Image.Image, tuple]:
    """The `nth` one-object Shapes image (data seed `seed`) showing a `colour` `shape`: (image, box)."""
    data, found = Shapes(image_size, seed=seed), -1
    for index in range(100_000):
        objects = data.scene(index)
        if len(objects) == 1 and objects[0]["colour"] == colour and objects[0]["shape"] == shape:
            found += 1
            if found == nth:
                return data.pil_and_caption(index)[0], objects[0]["box"]
    raise ValueError(f"no {colour} {shape} among the first 100000 Shapes images")


def box_mask(box: tuple, image_size: int, margin: int = 1) -> Image.Image:
    """An inpainting mask: white over the box (x0, y0, x1, y1) grown by `margin` pixels, black elsewhere."""
    x0, y0, x1, y1 = box
    mask = Image.new("L", (image_size, image_size), 0)
    # pixels the object touches are floor(x0) .. ceil(x1) - 1; PIL's rectangle includes both ends
    ImageDraw.Draw(mask).rectangle((math.floor(x0) - margin, math.floor(y0) - margin,
                                    math.ceil(x1) - 1 + margin, math.ceil(y1) - 1 + margin), fill=255)
    return mask


def two_object_picture(image_size: int, left: tuple[str, str] = ("red", "circle"),
                       right: tuple[str, str] = ("blue", "square")) -> Image.Image:
    """One (colour, shape) centred in each half, drawn by the Shapes renderer. Inpaint one half and
    the other, kept exactly, stays plain to see. (At 16 px the training images hold one object
    each: the model never drew a picture like this one.)"""
    half = image_size / 2
    side = math.floor(0.75 * half)  # whole pixels, so the two halves stay apart
    objects = []
    for (colour, shape), left_edge in ((left, 0.0), (right, half)):
        x0, y0 = left_edge + (half - side) // 2, (image_size - side) // 2
        objects.append({"shape": shape, "rgb": COLOURS[colour], "box": (x0, y0, x0 + side, y0 + side)})
    return render(objects, image_size)


def half_mask(image_size: int, side: str = "right") -> Image.Image:
    """An inpainting mask: white (replace) over the `side` half ("left" or "right"), black (keep) over the other."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    mask = Image.new("L", (image_size, image_size), 0)
    start = image_size // 2 if side == "right" else 0
    mask.paste(255, (start, 0, start + image_size // 2, image_size))
    return mask


def render_figures(pipe, out: Path, seed: int = 0, steps: int = 40) -> list[Path]:
    """Write the FIGURES into the folder `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    size = pipe.image_size
    gen = lambda: torch.Generator().manual_seed(seed)  # noqa: E731  the same seed for every figure
    # the input of the noising and img2img figures: the smallest of the first eight red circles
    red_circle, _ = min((shapes_example(size, "red", "circle", nth) for nth in range(8)),
                          key=lambda example: example[1][2] - example[1][0])
    figures = {}
    T = pipe.model.objective.num_train_timesteps
    figures["forward-noising.png"] = noising_strip(red_circle, pipe.model.objective,
                                                   [0, T // 20, T // 10, T // 4, T // 2, 3 * T // 4, T - 1], gen())

    capture = sorted({k for k in (0, 1, 10, 40, steps) if k <= steps})
    run = pipe.sample("a red circle", num_inference_steps=steps, generator=gen(), capture_steps=capture)
    figures["denoising-steps.png"] = trace_strip(run.trace)

    prompt, negative = "a circle", "a red circle"
    plain = pipe.sample(prompt, num_inference_steps=steps, generator=gen(), num_images_per_prompt=4).images
    steered = pipe.sample(prompt, negative_prompt=negative, num_inference_steps=steps, generator=gen(),
                          num_images_per_prompt=4).images
    figures["negative-prompt.png"] = make_grid(plain + steered, columns=4, scale=scale_for(plain[0]),
                                               labels=[f'"{prompt}"'] * 4 + [f'negative "{negative}"'] * 4)

    strengths = (0.2, 0.4, 0.7, 1.0)
    edited = [pipe.img2img("a blue circle", red_circle, strength=s, num_inference_steps=steps,
                           generator=gen()).images[0] for s in strengths]
    figures["img2img-strength.png"] = make_grid([red_circle] + edited, scale=scale_for(red_circle),
                                                labels=["input"] + [f"strength {s}" for s in strengths])

    # the right half replaced, the left half (a red circle) kept: what is kept stays plain to see
    picture, mask, prompt = two_object_picture(size), half_mask(size, "right"), "a yellow triangle"
    painted = pipe.inpaint(prompt, picture, mask, num_inference_steps=steps, generator=gen(),
                           num_images_per_prompt=4).images
    figures["inpainting.png"] = make_grid([picture, mask.convert("RGB")] + painted, scale=scale_for(picture),
                                          labels=["input", "mask"] + [f'"{prompt}"'] * 4)
    paths = []
    for name in FIGURES:
        figures[name].save(out / name)
        paths.append(out / name)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Render the chapter's figures with a trained minidiff model.")
    parser.add_argument("--model", required=True, help="folder written by train.py")
    parser.add_argument("--flow-model", help="a model trained with --objective flow: its figures go to OUT/flow/, "
                                             f"and {COMPARISON} compares it with --model (a DDPM model)")
    parser.add_argument("--out", required=True, help="folder for the PNG files")
    parser.add_argument("--steps", type=int, default=40, help="num_inference_steps (default 40, as the chapter)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--overwrite", action="store_true", help="replace figures already in --out")
    args = parser.parse_args(argv)

    from .cli import UsageError, open_pipeline

    out = Path(args.out)
    names = list(FIGURES)
    if args.flow_model:
        names += [f"{FLOW_FOLDER}/{name}" for name in FIGURES] + [COMPARISON]
    existing = [str(out / name) for name in names if (out / name).exists()]
    if existing and not args.overwrite:
        raise UsageError(f"{existing[0]} exists; pass --overwrite to replace the figures, or choose another --out")
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    pipe = open_pipeline(args.model, "minidiff", device=args.device)
    flow_pipe = None
    if args.flow_model:  # both loaded and checked before anything is written
        flow_pipe = open_pipeline(args.flow_model, "minidiff", device=args.device)
        if flow_pipe.config.objective != "flow" or pipe.config.objective != "ddpm":
            raise UsageError(f"--flow-model needs a flow model and --model a DDPM one; {args.flow_model} is "
                             f"{flow_pipe.config.objective} and {args.model} is {pipe.config.objective}")
        if flow_pipe.image_size != pipe.image_size:
            raise UsageError(f"{args.model} draws {pipe.image_size} px images and {args.flow_model} "
                             f"{flow_pipe.image_size} px; the comparison needs one size")
    paths = render_figures(pipe, out, args.seed, args.steps)
    if flow_pipe is not None:
        paths += render_figures(flow_pipe, out / FLOW_FOLDER, args.seed, args.steps)
        ddpm_vs_flow_strip(pipe, flow_pipe, steps=args.steps, seed=args.seed).save(out / COMPARISON)
        paths.append(out / COMPARISON)
    for path in paths:
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from .cli import run

    sys.exit(run(main))
