"""Time to quality: prompt accuracy against minutes of training, for several training recipes.

    python -m benchmarks.time_to_quality --minutes 20 --publish  # minidiff vs the diffusers UNet: section 2
    python -m benchmarks.time_to_quality --runs minidiff diffusers-recipe --minutes 12 --name recipe --publish
    python -m benchmarks.time_to_quality --runs minidiff --variant flow:objective=flow --name objective
    python -m benchmarks.time_to_quality --runs minidiff --variant mmdit:backbone=mmdit --name mmdit  # SD3.5's network
    python -m benchmarks.time_to_quality --minutes 1 --eval-every 0.5 --samples-per-prompt 1   # a quick check
    python -m benchmarks.time_to_quality --runs --variant latent32:image_size=32,latent=true,cache_latents=8192 ...

The runs (`--runs`, plus `--variant NAME:key=value,...` for minidiff's defaults with some
TrainConfig fields changed, and `--diffusers-variant NAME:key=value,...` for diffusers' UNet with
them changed, where `weight_decay=` and `lr_schedule=constant` give AdamW's decay and
train_text_to_image.py's constant rate):
- minidiff: `python train.py`'s CPU preset, trained by train.py's Trainer (its renderer, and for a
  latent variant its autoencoder trained first and its latent cache, all on the run's clock).
- diffusers-unet: the same recipe with diffusers' UNet2DConditionModel in place of minidiff's
  (benchmarks.common; same text encoder and initial text weights, same Shapes data in the same
  order, same noise/timestep/caption-dropout draws); only the UNet differs.
- diffusers-recipe: what a diffusers user would pick: that UNet, `DDPMScheduler()`'s defaults
  (linear betas, epsilon), and train_text_to_image.py's defaults (AdamW lr 1e-4, weight decay
  1e-2, "constant" learning rate, which has no warm-up; EMA 0.9999; gradient norm 1.0).
Each gets the same budget of training wall-clock (data rendering +
training steps; `--clock cpu` counts this process's CPU time instead, which other jobs on a
shared machine inflate far less); every `--eval-every` minutes of that clock, the EMA weights (what
train.py saves) are scored with minidiff.evaluate (single-object prompt accuracy, colour
and shape both right; from 32 px, for models trained with two-object pictures, two-object
accuracy too) through MiniDiffusionPipeline. Evaluation time is not counted; a run's setup is
(building the model, and a latent run's autoencoder training and latent caching).

The two runs are interleaved in segments of `--eval-every` minutes (A B, B A, ...) in one
process, so a change in the machine's load during the run hits both alike.
"Minutes to target" is the first evaluation at or above `--target`, so its resolution is
`--eval-every`.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time


from minidiff.tools.evaluate import evaluate
from minidiff import MiniDiffusionPipeline
from minidiff.tools.trainer import Trainer, train_run_autoencoder
from minidiff.training import batch_indices, load_batch

from .common import (Report, TrainState, add_publish_flag, build_model, count_parameters, make_dataset,
                     markdown_table, parse_variant, preset_config, pyplot, results_folder, set_threads)


RECIPES = {  # run name -> (UNet, TrainConfig changes, TrainState options)
    "minidiff": ("minidiff", {}, {}),
    "diffusers-unet": ("diffusers", {}, {}),
    "diffusers-recipe": ("diffusers", dict(objective="ddpm", beta_schedule="linear", lr=1e-4, warmup_steps=0,
                                           ema_decay=0.9999), dict(weight_decay=1e-2, lr_schedule="constant")),
}
DIFFUSERS_OPTIONS = {"weight_decay": float, "lr_schedule": str}  # TrainState options a --diffusers-variant may set


class Run:
    """One model's training, advanced in slices of its training clock, with its evaluations."""

    def __init__(self, name: str, backbone: str, config, dataset, clock=time.perf_counter, **state_options):
        self.backbone, self.dataset, self.clock = name, dataset, clock
        start = self.clock()  # the setup is on the training clock: a latent run's autoencoder and cache are in the budget
        autoencoder = train_run_autoencoder(config, dataset) if config.latent else None
        if autoencoder is not None:
            print(f"{name:16s} autoencoder: {config.autoencoder_steps} steps in {(self.clock() - start) / 60:.2f} min",
                  flush=True)
        if backbone == "minidiff" and not state_options:  # train.py's Trainer (its renderer, its latent cache)
            self.state = Trainer(dataclasses.replace(config, device="cpu"), dataset, autoencoder=autoencoder)
        else:
            self.state = TrainState(build_model(config, backbone, autoencoder=autoencoder), config, **state_options)
        self.seconds = self.setup_seconds = self.clock() - start  # training clock
        self.losses: list[float] = []
        self.points: list[dict] = []

    def train_until(self, seconds: float) -> None:
        c = self.state.config
        while self.seconds < seconds:
            start = self.clock()
            indices = batch_indices(self.state.step, c.batch_size)
            if isinstance(self.state, Trainer):
                per_sample, _ = self.state.train_step(*self.state.load_batch(indices))
                self.losses.append(per_sample.mean().item())
            else:
                self.losses.append(self.state.train_step(*load_batch(self.dataset, indices)))
            self.seconds += self.clock() - start

    def evaluate(self, args) -> dict:
        model = self.state.ema_model() if args.weights == "ema" else self.state.model.eval()
        start = time.perf_counter()
        summary = evaluate(MiniDiffusionPipeline(model, device="cpu"), args.samples_per_prompt, seed=0,
                           num_inference_steps=args.eval_steps, guidance_scale=args.guidance,
                           sampler=args.sampler if args.sampler in ("ddpm", "ddim") and model.config.objective == "ddpm"
                           else None)
        recent = self.losses[-50:]
        point = {"minutes": self.seconds / 60, "step": self.state.step, "accuracy": summary["single"]["both"],
                 "two_object": summary["two"]["both"] if summary["two"] else None,
                 "colour": summary["single"]["colour"], "shape": summary["single"]["shape"],
                 "loss": statistics.mean(recent) if recent else float("nan"),
                 "eval_seconds": time.perf_counter() - start}
        self.points.append(point)
        two = f"  two-object {point['two_object']:.1%}" if point["two_object"] is not None else ""
        print(f"{self.backbone:16s} {point['minutes']:6.2f} min  step {point['step']:5d}  loss {point['loss']:.4f}  "
              f"accuracy {point['accuracy']:.1%}{two}  (eval {point['eval_seconds']:.0f} s)", flush=True)
        return point

    def minutes_to(self, target: float, key: str = "accuracy") -> float | None:
        return next((p["minutes"] for p in self.points if (p[key] or 0) >= target), None)


def plot(runs: dict[str, Run], target: float, path, two_target: float | None = None) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    two = any(p["two_object"] is not None for r in runs.values() for p in r.points)
    for name, run in runs.items():
        line, = ax.plot([0] + [p["minutes"] for p in run.points], [0] + [p["accuracy"] for p in run.points], "o-",
                        label=f"{name}{' single-object' if two else ''}", markersize=4)
        if any(p["two_object"] is not None for p in run.points):
            ax.plot([0] + [p["minutes"] for p in run.points], [0] + [p["two_object"] or 0 for p in run.points], "s--",
                    color=line.get_color(), label=f"{name} two-object", markersize=4)
    ax.axhline(target, color="gray", linestyle="--", linewidth=0.8, label=f"target {target:.0%}")
    if two and two_target is not None:
        ax.axhline(two_target, color="gray", linestyle=":", linewidth=0.8, label=f"two-object target {two_target:.0%}")
    ax.set(xlabel="minutes of training (evaluation excluded)", ylabel="prompt accuracy" if two else
           "single-object prompt accuracy", ylim=(0, 1.02), title="time to quality, CPU preset")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def body(runs: dict[str, Run], args, config) -> str:
    names = list(runs)
    two = any(p["two_object"] is not None for r in runs.values() for p in r.points)  # 32 px and up
    columns = ("minutes", "step", "accuracy", *(("two-object",) if two else ()), "loss")
    header = ["point"] + [f"{n} {what}" for n in names for what in columns]
    rows = []
    for k in range(max(len(r.points) for r in runs.values())):
        row = [k + 1]
        for run in runs.values():
            p = run.points[k] if k < len(run.points) else None
            cells = [f"{p['minutes']:.2f}", p["step"], f"{p['accuracy']:.1%}"] + (
                ["" if p["two_object"] is None else f"{p['two_object']:.1%}"] if two else []) + [f"{p['loss']:.4f}"] \
                if p else [""] * len(columns)
            row += cells
        rows.append(row)

    def minutes(run):
        found = run.minutes_to(args.target)
        return f"{found:.1f}" if found is not None else f"not within {args.minutes:g}"

    first = runs[names[0]]
    ratios = []
    for name in names[1:]:
        a, b = first.minutes_to(args.target), runs[name].minutes_to(args.target)
        if a and b:
            ratios.append(f"{name} / {names[0]} = {b / a:.2f}")
        elif a:
            ratios.append(f"{name} / {names[0]} > {args.minutes / a:.2f} ({name} did not reach it within the budget)")
        else:
            ratios.append(f"{name} / {names[0]}: undefined ({names[0]} did not reach it)")
    described = "; ".join(f"{name}: {run.description}" for name, run in runs.items())
    setup = "; ".join(f"{name} {run.setup_seconds / 60:.2f}" for name, run in runs.items())

    def two_minutes(run):
        found = run.minutes_to(args.two_target, "two_object")
        best = max((p["two_object"] for p in run.points if p["two_object"] is not None), default=None)
        return (f"{found:.1f}" if found is not None else f"not within {args.minutes:g} (best {best:.1%})"
                if best is not None else "not scored")
    return "\n".join([
        f"CPU preset ({config.image_size} px, batch {config.batch_size}, base width {config.base_channels}); "
        f"runs: {described}. "
        f"Budget {args.minutes:g} min of training ({args.clock} clock) each; evaluation every {args.eval_every:g} min of "
        f"{args.weights} weights with {args.samples_per_prompt} samples per prompt x 18 prompts, each model's default "
        f"sampler (euler for flow models, {args.sampler or 'ddpm'} for DDPM models) at {args.eval_steps or 'the default'} steps, "
        f"guidance {args.guidance if args.guidance is not None else 'default'}.",
        "",
        markdown_table(header, rows),
        "",
        f"Minutes to {args.target:.0%} single-object accuracy: "
        + ", ".join(f"{name} {minutes(run)}" for name, run in runs.items()) + "; " + "; ".join(ratios) + "."
        + (f" Minutes to {args.two_target:.0%} two-object accuracy: "
           + ", ".join(f"{name} {two_minutes(run)}" for name, run in runs.items()) + "." if two else ""),
        "",
        f"Setup minutes, counted in each run's clock (model; a latent run's autoencoder training and latent cache): "
        f"{setup}.",
        "",
        f"![accuracy against minutes](benchmarks/results/{args.name}.png)",
    ])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=20.0, help="training budget per model (default 20)")
    p.add_argument("--eval-every", type=float, default=1.0, help="minutes of training between evaluations (default 1)")
    p.add_argument("--samples-per-prompt", type=int, default=4, help="evaluation samples per prompt (default 4)")
    p.add_argument("--eval-steps", type=int, help="sampling steps of the evaluation (default: the pipeline's, 50)")
    p.add_argument("--guidance", type=float, help="guidance scale of the evaluation (default: the pipeline's)")
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default=None,
                   help="sampler of DDPM models' evaluations (default: the pipeline's); flow models use Euler")
    p.add_argument("--runs", nargs="*", default=["minidiff", "diffusers-unet"], choices=sorted(RECIPES),
                   help="recipes to train (default: minidiff diffusers-unet)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:key=value,...",
                   help="also train minidiff's recipe with these TrainConfig fields changed (tuples as 1/2)")
    p.add_argument("--diffusers-variant", action="append", default=[], metavar="NAME:key=value,...",
                   help="also train diffusers' UNet with these TrainConfig fields changed, and weight_decay=, "
                        "lr_schedule=constant|cosine; for a learning-rate sweep of the diffusers recipe, say")
    p.add_argument("--name", default="time_to_quality",
                   help="results/<name>.{md,json,png} and the BENCHMARKS.md section of that name")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema", help="weights evaluated (default: ema)")
    p.add_argument("--target", type=float, default=0.95, help="accuracy target (default 0.95)")
    p.add_argument("--two-target", type=float, default=0.6,
                   help="two-object accuracy target, where two-object prompts are scored (default 0.6)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="training clock: wall-clock, or this process's CPU time (with --threads 1 on a shared "
                        "machine: not inflated by other jobs; default wall)")
    p.add_argument("--preset", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    add_publish_flag(p)
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.eval_every <= 0 or args.samples_per_prompt < 1 or not 0 < args.target <= 1:
        p.error("--minutes and --eval-every must be > 0, --samples-per-prompt >= 1, --target in (0, 1]")
    threads = set_threads(args.threads)
    report = Report(args.name, f"Time to quality: {args.name}", threads, "time_to_quality", level=3)
    config = preset_config(args.preset)
    datasets = {}  # one Shapes per (size, seed, two-object fraction): runs may differ in size
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    specs = {name: RECIPES[name] for name in args.runs}
    for text in args.variant:
        name, changes, _ = parse_variant(text)
        specs[name] = ("minidiff", changes, {})
    for text in args.diffusers_variant:
        name, changes, options = parse_variant(text, DIFFUSERS_OPTIONS)
        specs[name] = ("diffusers", changes, options)
    runs = {}
    for name, (backbone, changes, options) in specs.items():
        run_config = dataclasses.replace(config, **changes)
        key = (run_config.image_size, run_config.seed, run_config.two_object_fraction)
        dataset = datasets.setdefault(key, make_dataset(run_config))
        runs[name] = Run(name, backbone, run_config, dataset, clock, **options)
        network = "MMDiT" if run_config.backbone == "mmdit" else "UNet"
        runs[name].description = (f"{backbone} {network} ({count_parameters(runs[name].state.model.denoiser):,} "
                                  f"parameters)"
                                  + "".join(f", {k}={v}" for k, v in {**changes, **options}.items()))
    names = list(runs)
    segments = max(1, round(args.minutes / args.eval_every))
    for k in range(1, segments + 1):
        until = 60 * min(args.minutes, k * args.eval_every)
        for name in (names if k % 2 else names[::-1]):
            runs[name].train_until(until)
            runs[name].evaluate(args)
    plot(runs, args.target, results_folder(args.publish) / f"{args.name}.png", args.two_target)
    data = {name: {"points": run.points, "minutes_to_target": run.minutes_to(args.target), "setup_seconds":
                   run.setup_seconds, "minutes_to_two_target": run.minutes_to(args.two_target, "two_object")}
            for name, run in runs.items()}
    print(report.write(body(runs, args, config), data, publish=args.publish))
    return 0


if __name__ == "__main__":
    sys.exit(main())
