"""Time to quality: prompt accuracy against minutes of training, minidiff against the
diffusers-UNet baseline.

    python -m benchmarks.time_to_quality --minutes 20 --publish  # writes BENCHMARKS.md section 2
    python -m benchmarks.time_to_quality --minutes 20 --sampler ddpm --eval-steps 20   # cheaper evaluations
    python -m benchmarks.time_to_quality --minutes 1 --eval-every 0.5 --samples-per-prompt 1

Both models start from the CPU preset of minidiff.training (same text encoder and initial
text weights, same Shapes data in the same order, same noise/timestep/caption-dropout
draws, L_simple, AdamW with the same learning-rate schedule, EMA); only the UNet differs
(benchmarks.common). Each gets the same budget of training wall-clock (data rendering +
training steps; `--clock cpu` counts this process's CPU time instead, which other jobs on a
shared machine inflate far less); every `--eval-every` minutes of that clock, the EMA weights (what
train.py saves) are scored with minidiff.evaluate (single-object prompt accuracy, colour
and shape both right) through MiniDiffusionPipeline. Evaluation time is not counted.

The two runs are interleaved in segments of `--eval-every` minutes (A B, B A, ...) in one
process, so a change in the machine's load during the run hits both alike.
"Minutes to target" is the first evaluation at or above `--target`, so its resolution is
`--eval-every`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


from minidiff.evaluate import evaluate
from minidiff.pipeline import MiniDiffusionPipeline
from minidiff.training import batch_indices, load_batch

from .common import (BACKBONES, Report, TrainState, add_publish_flag, build_model, count_parameters, make_dataset,
                     markdown_table, preset_config, pyplot, results_folder, set_threads)


class Run:
    """One model's training, advanced in slices of its training clock, with its evaluations."""

    def __init__(self, backbone: str, config, dataset, clock=time.perf_counter):
        self.backbone, self.dataset, self.clock = backbone, dataset, clock
        self.state = TrainState(build_model(config, backbone), config)
        self.seconds = 0.0  # training clock
        self.losses: list[float] = []
        self.points: list[dict] = []

    def train_until(self, seconds: float) -> None:
        c = self.state.config
        while self.seconds < seconds:
            start = self.clock()
            images, captions = load_batch(self.dataset, batch_indices(self.state.step, c.batch_size))
            self.losses.append(self.state.train_step(images, captions))
            self.seconds += self.clock() - start

    def evaluate(self, args) -> dict:
        model = self.state.ema_model() if args.weights == "ema" else self.state.model.eval()
        start = time.perf_counter()
        summary = evaluate(MiniDiffusionPipeline(model, device="cpu"), args.samples_per_prompt, seed=0,
                           num_inference_steps=args.eval_steps, guidance_scale=args.guidance, sampler=args.sampler)
        recent = self.losses[-50:]
        point = {"minutes": self.seconds / 60, "step": self.state.step, "accuracy": summary["single"]["both"],
                 "colour": summary["single"]["colour"], "shape": summary["single"]["shape"],
                 "loss": statistics.mean(recent) if recent else float("nan"),
                 "eval_seconds": time.perf_counter() - start}
        self.points.append(point)
        print(f"{self.backbone:9s} {point['minutes']:6.2f} min  step {point['step']:5d}  loss {point['loss']:.4f}  "
              f"accuracy {point['accuracy']:.1%}  (eval {point['eval_seconds']:.0f} s)", flush=True)
        return point

    def minutes_to(self, target: float) -> float | None:
        return next((p["minutes"] for p in self.points if p["accuracy"] >= target), None)


def plot(runs: dict[str, Run], target: float, path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, run in runs.items():
        ax.plot([0] + [p["minutes"] for p in run.points], [0] + [p["accuracy"] for p in run.points], "o-",
                label=f"{name} UNet", markersize=4)
    ax.axhline(target, color="gray", linestyle="--", linewidth=0.8, label=f"target {target:.0%}")
    ax.set(xlabel="minutes of training (evaluation excluded)", ylabel="single-object prompt accuracy",
           ylim=(0, 1.02), title="time to quality, CPU preset")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def body(runs: dict[str, Run], args, config) -> str:
    first, second = runs["minidiff"], runs["diffusers"]
    rows = [[f"{a['minutes']:.2f} / {b['minutes']:.2f}", a["step"], f"{a['accuracy']:.1%}", f"{a['loss']:.4f}",
             b["step"], f"{b['accuracy']:.1%}", f"{b['loss']:.4f}"] for a, b in zip(first.points, second.points)]

    def minutes(run):
        found = run.minutes_to(args.target)
        return f"{found:.1f}" if found is not None else f"not within {args.minutes:g}"

    a, b = first.minutes_to(args.target), second.minutes_to(args.target)
    verdict = (f"ratio diffusers / minidiff = {b / a:.2f} (goal: >= 2)" if a and b else
               "ratio: undefined (a model did not reach the target within the budget)")
    return "\n".join([
        f"CPU preset ({config.image_size} px, batch {config.batch_size}, base width {config.base_channels}, lr "
        f"{config.lr:g}, schedule over {config.steps} steps); UNet parameters: minidiff "
        f"{count_parameters(first.state.model.unet):,}, diffusers {count_parameters(second.state.model.unet):,}. "
        f"Budget {args.minutes:g} min of training ({args.clock} clock) each; evaluation every {args.eval_every:g} min of {args.weights} weights "
        f"with {args.samples_per_prompt} samples per prompt x 18 prompts, {args.sampler} {args.eval_steps or 'default'} steps, "
        f"guidance {args.guidance if args.guidance is not None else 'default'}.",
        "",
        markdown_table(["training minutes (minidiff / diffusers)", "minidiff step", "minidiff accuracy", "minidiff loss",
                        "diffusers step", "diffusers accuracy", "diffusers loss"], rows),
        "",
        f"Minutes to {args.target:.0%} single-object accuracy: minidiff {minutes(first)}, diffusers {minutes(second)}; "
        f"{verdict}.",
        "",
        "![accuracy against minutes](benchmarks/results/time_to_quality.png)",
    ])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=20.0, help="training budget per model (default 20)")
    p.add_argument("--eval-every", type=float, default=1.0, help="minutes of training between evaluations (default 1)")
    p.add_argument("--samples-per-prompt", type=int, default=4, help="evaluation samples per prompt (default 4)")
    p.add_argument("--eval-steps", type=int, help="sampling steps of the evaluation (default: the pipeline's, 50)")
    p.add_argument("--guidance", type=float, help="guidance scale of the evaluation (default: the pipeline's)")
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim", help="sampler of the evaluation (default ddim)")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema", help="weights evaluated (default: ema)")
    p.add_argument("--target", type=float, default=0.95, help="accuracy target (default 0.95)")
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
    report = Report("time_to_quality", "2. Time to quality", threads)
    config = preset_config(args.preset)
    dataset = make_dataset(config)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    runs = {name: Run(name, config, dataset, clock) for name in BACKBONES}
    segments = max(1, round(args.minutes / args.eval_every))
    for k in range(1, segments + 1):
        until = 60 * min(args.minutes, k * args.eval_every)
        for name in (BACKBONES if k % 2 else BACKBONES[::-1]):
            runs[name].train_until(until)
            runs[name].evaluate(args)
    plot(runs, args.target, results_folder(args.publish) / "time_to_quality.png")
    data = {name: {"points": run.points, "minutes_to_target": run.minutes_to(args.target)} for name, run in runs.items()}
    print(report.write(body(runs, args, config), data, publish=args.publish))
    return 0


if __name__ == "__main__":
    sys.exit(main())
