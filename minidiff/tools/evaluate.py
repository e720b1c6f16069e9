"""Prompt accuracy of a Shapes model, judged by a deterministic analyser of the pixels.

    python -m minidiff.evaluate --model runs/shapes

For every prompt, several images are sampled with fixed seeds; the analyser reads the
colour and the shape of the object(s) back from each image, and we count how often they
match the prompt. The analyser uses no learning: on the ground-truth Shapes images it
scores close to 100% (see tests/test_evaluate.py).

How it reads one object (a region with a black background):
- coverage: brightness (max over R, G, B) over the object's peak brightness, so anti-aliased
  edges count fractionally;
- colour: the mean RGB of the fully covered pixels, matched to the nearest reference colour;
- shape: fill = area / (height x width), both measured softly from the coverage:
  a square fills its box (1.0), a circle pi/4 (0.79), a triangle half (0.5); a triangle
  is also much narrower in its top third than in its bottom third (top_to_bottom).
"""

from __future__ import annotations

import itertools
import sys

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .shapes import COLOURS, SHAPES, caption_for

REFERENCE = np.array(list(COLOURS.values()), dtype=np.float32)


def object_coverage(region: np.ndarray) -> np.ndarray | None:
    """(H, W, 3) uint8 -> (H, W) coverage in [0, 1] of the object, or None where nothing is drawn."""
    brightness = region.astype(np.float32).max(axis=2)
    if brightness.max() < 60:
        return None
    peak = np.percentile(brightness[brightness >= 0.5 * brightness.max()], 75)
    coverage = np.clip(brightness / peak, 0, 1)
    coverage[coverage < 0.25] = 0  # ignore faint stray pixels
    return coverage


def object_centre(region: np.ndarray) -> tuple[float, float] | None:
    """(H, W, 3) uint8 -> (x, y) centre of the object in pixels (coverage-weighted), or None."""
    coverage = object_coverage(region)
    if coverage is None:
        return None
    ys, xs = np.indices(coverage.shape)
    return float((xs * coverage).sum() / coverage.sum()), float((ys * coverage).sum() / coverage.sum())


def analyse_object(region: np.ndarray) -> tuple[str | None, str | None]:
    """(H, W, 3) uint8 -> (colour, shape), or (None, None) where nothing is drawn."""
    rgb = region.astype(np.float32)
    coverage = object_coverage(region)
    if coverage is None:
        return None, None
    core = coverage > 0.8
    colour_rgb = rgb[core].mean(axis=0)
    colour = list(COLOURS)[int(np.argmin(((REFERENCE - colour_rgb) ** 2).sum(axis=1)))]

    area = coverage.sum()
    rows = coverage.max(axis=1)  # (H,) how much of each row the object reaches
    height, width = rows.sum(), coverage.max(axis=0).sum()
    fill = area / max(height * width, 1e-6)
    row_widths = coverage.sum(axis=1)[rows > 0]
    third = max(1, len(row_widths) // 3)
    top_to_bottom = row_widths[:third].mean() / max(row_widths[-third:].mean(), 1e-6)
    # thresholds sit midway between the classes as measured on ground-truth Shapes (16-64 px):
    # fill + top_to_bottom / 4 is at most 0.78 for triangles, at least 0.87 for circles;
    # fill is at most 0.85 for circles, at least 0.98 for squares
    if fill + top_to_bottom / 4 < 0.82:
        shape = "triangle"
    elif fill < 0.92:
        shape = "circle"
    else:
        shape = "square"
    return colour, shape


def analyse(image: Image.Image, two_objects: bool = False) -> list[tuple[str | None, str | None]]:
    """The (colour, shape) of each object: one, or left half then right half."""
    array = np.asarray(image.convert("RGB"))
    if not two_objects:
        return [analyse_object(array)]
    half = array.shape[1] // 2
    return [analyse_object(array[:, :half]), analyse_object(array[:, half:])]


def evaluation_prompts(image_size: int, two_object_prompts: int = 18, tokenizer=None) -> list[tuple[str, list]]:
    """Every single-object prompt, plus (from 32 px, for a model whose `tokenizer` knows their words,
    that is one trained with two-object pictures) a fixed selection of two-object prompts."""
    pairs = list(itertools.product(COLOURS, SHAPES))
    prompts = [(caption_for([p]), [p]) for p in pairs]
    two_words = caption_for(pairs[:2])
    if image_size >= 32 and (tokenizer is None or not tokenizer.unknown_words(two_words)):
        for i in range(two_object_prompts):  # a fixed, varied selection
            left, right = pairs[(7 * i) % len(pairs)], pairs[(11 * i + 5) % len(pairs)]
            prompts.append((caption_for([left, right]), [left, right]))
    return prompts


def score(found: list, expected: list) -> dict[str, bool]:
    return {
        "colour": all(f[0] == e[0] for f, e in zip(found, expected)),
        "shape": all(f[1] == e[1] for f, e in zip(found, expected)),
        "both": all(f == tuple(e) for f, e in zip(found, expected)),
    }


def accuracy(scores: list[dict[str, bool]]) -> dict[str, float]:
    """The share of `score` results right, per kind: {"colour": ..., "shape": ..., "both": ...}."""
    return {k: sum(s[k] for s in scores) / len(scores) for k in ("colour", "shape", "both")}


def check_shapes_model(pipe, prompts: list[str], name: str = "this model") -> None:
    """Refuse a model that was not trained on Shapes: its vocabulary lacks words of the
    evaluation prompts (a model trained on other captions would be scored on prompts it
    cannot read, and the percentage would mean nothing)."""
    missing = sorted({w for prompt in prompts for w in pipe.model.tokenizer.unknown_words(prompt)})
    if missing:
        shown = ", ".join(missing[:6]) + (", ..." if len(missing) > 6 else "")
        raise ValueError(f"{name} was not trained on Shapes (its vocabulary lacks {shown}); minidiff.evaluate "
                         "scores Shapes models only: for other data, look at the grids in the run's samples/ folder")


@torch.no_grad()
def evaluate(pipe, samples_per_prompt: int = 8, seed: int = 0, progress: bool = False, **sample_kwargs) -> dict:
    """Sample every prompt `samples_per_prompt` times (seed + prompt index as the generator
    seed) and return accuracies: {"single": {...}, "two": {...} or None, "per_prompt": [...]}.
    `progress`: a bar over the images on stderr. A model not trained on Shapes is refused (ValueError)."""
    prompts = evaluation_prompts(pipe.image_size, tokenizer=pipe.model.tokenizer)
    check_shapes_model(pipe, [prompt for prompt, _ in prompts])
    results = {"single": [], "two": []}
    per_prompt = []
    bar = tqdm(total=len(prompts) * samples_per_prompt, unit="image", disable=not progress, dynamic_ncols=True)
    for index, (prompt, expected) in enumerate(prompts):
        generator = torch.Generator().manual_seed(seed + index)
        out = pipe.sample(prompt, num_images_per_prompt=samples_per_prompt, generator=generator, **sample_kwargs)
        scores = [score(analyse(img, two_objects=len(expected) == 2), expected) for img in out.images]
        results["single" if len(expected) == 1 else "two"] += scores
        per_prompt.append({"prompt": prompt, "both": sum(s["both"] for s in scores) / len(scores)})
        bar.update(samples_per_prompt)
    bar.close()
    summary = {"per_prompt": per_prompt}
    for kind, scores in results.items():
        summary[kind] = accuracy(scores) if scores else None
    return summary


def main(argv=None) -> int:
    from .cli import ArgumentParser

    parser = ArgumentParser(prog="python -m minidiff.evaluate", description="Prompt accuracy of a minidiff Shapes model.")
    parser.add_argument("--model", required=True, help="folder written by train.py")
    parser.add_argument("--samples-per-prompt", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: the pipeline's)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance_scale (default: the pipeline's)")
    parser.add_argument("--sampler", choices=["ddim", "ddpm", "euler"], default=None,
                        help="default: the model's own sampler")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--per-prompt", action="store_true", help="also print each prompt's accuracy")

    from .checkpoint import CheckpointError
    from .cli import open_pipeline

    try:
        args = parser.parse_args(argv)
        if args.samples_per_prompt < 1:
            raise ValueError(f"--samples-per-prompt must be at least 1, got {args.samples_per_prompt}")
        pipe = open_pipeline(args.model, "minidiff", device=args.device)
        check_shapes_model(pipe, [prompt for prompt, _ in evaluation_prompts(pipe.image_size, tokenizer=pipe.model.tokenizer)],
                           args.model)
        summary = evaluate(pipe, args.samples_per_prompt, args.seed, progress=True, num_inference_steps=args.steps,
                           guidance_scale=args.guidance, sampler=args.sampler)
    except (CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for kind in ("single", "two"):
        if summary[kind]:
            s = summary[kind]
            print(f"{kind}-object prompts: colour {s['colour']:.1%}  shape {s['shape']:.1%}  both {s['both']:.1%}")
    if pipe.image_size >= 32 and not summary["two"]:
        print("two-object prompts: not scored, the model was trained without two-object pictures "
              "(train.py --two-object-fraction)")
    if args.per_prompt:
        for row in summary["per_prompt"]:
            print(f"  {row['both']:6.1%}  {row['prompt']}")
    return 0


if __name__ == "__main__":
    from .cli import run

    sys.exit(run(main))
