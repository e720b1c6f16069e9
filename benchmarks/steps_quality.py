"""Steps against quality: "how many steps do I need?", and how much guidance.

    python -m benchmarks.steps_quality --model runs/shapes --publish   # writes BENCHMARKS.md section 3
    python -m benchmarks.steps_quality --model runs/flow --steps 5 10 20 50 --name steps_quality_flow --publish
    python -m benchmarks.steps_quality --model runs/shapes --steps 10 20 --guidance-scales 1 4 \\
        --samples-per-prompt 1                             # a quick check

For a trained model folder: prompt accuracy (minidiff.evaluate: every evaluation prompt,
`--samples-per-prompt` fixed seeds each, judged by the pixel analyser) and seconds per image
(wall-clock of that evaluation divided by the images it made, so it includes the text
encoder and the conversion to PIL images; "evaluation s" is that whole evaluation, what
`python -m minidiff.evaluate` takes; "one image s" is one picture of one prompt alone, as the
app and sample.py make it, the median of 3) for

- each sampler the model accepts (a DDPM model: DDPM, Ho et al. 2020, and DDIM, Song et al.
  2021, eta = 0; a flow model: Euler, as SD3) at each of `--steps`, at the pipeline's
  default guidance scale;
- each sampler at the pipeline's default step count for each of `--guidance-scales`
  (classifier-free guidance, Ho & Salimans 2022; at 1 the unconditional pass is skipped).

The same seeds are used everywhere, so rows differ only by the setting.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from minidiff.tools.checkpoint import CheckpointError
from minidiff.tools.evaluate import evaluate, evaluation_prompts
from minidiff import MiniDiffusionPipeline

from .common import Report, add_publish_flag, markdown_table, pyplot, results_folder, set_threads


def measure(pipe, args, sampler: str, steps: int, guidance: float) -> dict:
    images = len(evaluation_prompts(pipe.image_size, tokenizer=pipe.model.tokenizer)) * args.samples_per_prompt
    start = time.perf_counter()
    summary = evaluate(pipe, args.samples_per_prompt, seed=args.seed, num_inference_steps=steps,
                       guidance_scale=guidance, sampler=sampler)
    seconds = time.perf_counter() - start
    prompt = evaluation_prompts(pipe.image_size, tokenizer=pipe.model.tokenizer)[0][0]
    one = []
    for repeat in range(3):  # one picture, as the app and sample.py make it: median of 3
        begin = time.perf_counter()
        pipe.sample(prompt, num_inference_steps=steps, guidance_scale=guidance, sampler=sampler,
                    generator=torch.Generator().manual_seed(repeat))
        one.append(time.perf_counter() - begin)
    row = {"sampler": sampler, "steps": steps, "guidance": guidance, "single": summary["single"]["both"],
           "colour": summary["single"]["colour"], "shape": summary["single"]["shape"],
           "two": summary["two"]["both"] if summary["two"] else None, "seconds_per_image": seconds / images,
           "evaluation_seconds": seconds, "one_image_seconds": statistics.median(one)}
    print(f"{sampler} {steps:4d} steps, guidance {guidance:g}: single {row['single']:.1%}"
          + (f", two {row['two']:.1%}" if row["two"] is not None else "") + f", {row['seconds_per_image']:.4f} s/image"
          + f", evaluation {seconds:.1f} s, one image {row['one_image_seconds']:.3f} s",
          flush=True)
    return row


def plot(step_rows, guidance_rows, path) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for i, sampler in enumerate(sorted({r["sampler"] for r in step_rows})):
        rows = [r for r in step_rows if r["sampler"] == sampler]
        left.plot([r["steps"] for r in rows], [r["single"] for r in rows], "o-", color=f"C{i}", label=f"{sampler} accuracy")
    left.set(xscale="log", xlabel="sampling steps", ylabel="single-object accuracy", ylim=(0, 1.02),
             title="accuracy and time against steps")
    seconds = left.twinx()
    for i, sampler in enumerate(sorted({r["sampler"] for r in step_rows})):
        rows = [r for r in step_rows if r["sampler"] == sampler]
        seconds.plot([r["steps"] for r in rows], [r["seconds_per_image"] for r in rows], "s--", color=f"C{i}",
                     alpha=0.5, markersize=3, label=f"{sampler} s/image")
    seconds.set(ylabel="seconds per image (dashed)", yscale="log")
    lines = left.get_legend_handles_labels()
    more = seconds.get_legend_handles_labels()
    left.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="lower right")
    for i, sampler in enumerate(sorted({r["sampler"] for r in guidance_rows})):
        rows = [r for r in guidance_rows if r["sampler"] == sampler]
        right.plot([r["guidance"] for r in rows], [r["single"] for r in rows], "o-", color=f"C{i}", label=sampler)
    right.set(xlabel="guidance scale", ylabel="single-object accuracy", ylim=(0, 1.02),
              title=f"accuracy against guidance ({guidance_rows[0]['steps']} steps)" if guidance_rows else "")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(rows) -> str:
    two = any(r["two"] is not None for r in rows)
    header = ["sampler", "steps", "guidance", "single-object accuracy", "colour", "shape"]
    header += ["two-object accuracy"] if two else []
    header += ["s / image", "evaluation s", "one image s"]
    lines = []
    for r in rows:
        line = [r["sampler"], r["steps"], f"{r['guidance']:g}", f"{r['single']:.1%}", f"{r['colour']:.1%}",
                f"{r['shape']:.1%}"]
        line += [f"{r['two']:.1%}"] if two else []
        lines.append(line + [f"{r['seconds_per_image']:.4f}", f"{r['evaluation_seconds']:.1f}",
                             f"{r['one_image_seconds']:.3f}"])
    return markdown_table(header, lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/shapes", help="folder written by train.py (default runs/shapes)")
    p.add_argument("--samplers", nargs="+", choices=["ddpm", "ddim", "euler"],
                   help="default: every sampler the model accepts")
    p.add_argument("--steps", nargs="+", type=int, default=[10, 20, 50, 100, 250])
    p.add_argument("--guidance-scales", nargs="+", type=float, default=[1, 2, 3, 4, 5, 6, 7, 8])
    p.add_argument("--samples-per-prompt", type=int, default=8, help="(default 8, as minidiff.evaluate)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--device", default="cpu")
    add_publish_flag(p)
    p.add_argument("--name", default="steps_quality",
                   help="results/<name>.{md,json,png} and the BENCHMARKS.md section of that name")
    args = p.parse_args(argv)
    if args.samples_per_prompt < 1 or min(args.steps) < 1 or min(args.guidance_scales) < 0:
        p.error("--samples-per-prompt and --steps must be >= 1, --guidance-scales >= 0")
    threads = set_threads(args.threads)
    try:
        pipe = MiniDiffusionPipeline.from_pretrained(args.model, device=args.device)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    args.samplers = args.samplers or list(pipe.samplers)
    report = Report(args.name, f"Steps and guidance against quality: {args.name}", threads, "steps_quality",
                    level=3)
    default_steps, default_guidance = pipe.default_num_inference_steps, pipe.default_guidance_scale
    step_rows = [measure(pipe, args, sampler, steps, default_guidance)
                 for sampler in args.samplers for steps in args.steps]
    guidance_rows = [measure(pipe, args, sampler, default_steps, g)
                     for sampler in args.samplers for g in args.guidance_scales]
    plot(step_rows, guidance_rows, results_folder(args.publish) / f"{args.name}.png")
    body = "\n".join([
        f"Model `{args.model}` ({pipe.config.objective}, {pipe.image_size} px); {args.samples_per_prompt} samples per prompt, seed {args.seed}, "
        f"{len(evaluation_prompts(pipe.image_size, tokenizer=pipe.model.tokenizer))} prompts. Seconds per image = wall-clock of the evaluation / images; one image: one prompt's one picture alone, median of 3.",
        "",
        f"Steps (guidance {default_guidance:g}):",
        "",
        table(step_rows),
        "",
        f"Guidance ({default_steps} steps):",
        "",
        table(guidance_rows),
        "",
        f"![steps and guidance](benchmarks/results/{args.name}.png)",
    ])
    print(report.write(body, {"model": args.model, "steps": step_rows, "guidance": guidance_rows},
                       publish=args.publish))
    return 0


if __name__ == "__main__":
    sys.exit(main())
