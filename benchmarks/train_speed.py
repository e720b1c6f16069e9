"""Training and sampling throughput: minidiff's UNet against diffusers' UNet2DConditionModel.

    python -m benchmarks.train_speed --publish            # both presets, writes BENCHMARKS.md section 1
    python -m benchmarks.train_speed --presets cpu --repeats 3   # a quick check, into runs/benchmarks/

What is measured, for each preset of minidiff.tools.trainer.PRESETS (its image size, batch size
and UNet width, on this machine's device):

- training step: L_simple forward + backward + gradient clipping + AdamW + EMA update,
  exactly as Trainer.train does it (benchmarks.common.TrainState.train_step), on batches of
  the Shapes data rendered beforehand (rendering is the same for both and is reported
  apart, as ms per batch);
- sampling step: one classifier-free-guidance forward of the UNet on 2B rows (B images,
  conditional and unconditional), no grad, through MiniDiffusionPipeline.predict.

Both models share minidiff's tokenizer and text encoder (same initial weights), the noise
schedule, the data and the optimizer; only the UNet differs. The diffusers UNet is built
from the same UNetConfig (benchmarks.common.diffusers_unet_kwargs), and its parameter count
must be within 10% of minidiff's. The FLOPs of one UNet forward per image (counted by
torch.utils.flop_counter: convolutions, matmuls, attention) are printed too, so a speed
difference can be told apart from a size difference.

Timing: `--repeats` rounds, each timing `--steps` consecutive steps of one model and then of
the other, the order flipped every round (A B, B A, ...). images/s is the median over rounds;
the ratio minidiff / diffusers is the median of the per-round ratios, which cancels most of
any load that other processes put on the machine (the load average is recorded too).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys

import torch

from minidiff import MiniDiffusionPipeline
from minidiff.training import batch_indices, load_batch

from .common import (BACKBONES, Report, TrainState, add_publish_flag, alternating_times, build_model,
                     count_parameters, make_dataset, markdown_table, median_ratio, preset_config, pyplot,
                     results_folder, set_threads)

GOAL = 1.5  # minidiff images/s over diffusers' at equal parameters (issue 6)


def forward_gflops_per_image(model, images, captions) -> float:
    """GFLOPs of one UNet forward per image, counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    context, mask = model.encode_prompt(captions)
    t = torch.full((images.shape[0],), 500)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.unet(images, t, context, mask)
    return counter.get_total_flops() / images.shape[0] / 1e9


def bench_preset(preset: str, args) -> dict:
    config = preset_config(preset, batch_size=args.batch_size)
    dataset = make_dataset(config)
    b = config.batch_size
    batches = [load_batch(dataset, batch_indices(i, b)) for i in range(args.batches)]
    data_ms = alternating_times({"data": lambda: load_batch(dataset, batch_indices(99, b))}, repeats=3, warmup=0)["data"]

    states = {name: TrainState(build_model(config, name), config) for name in BACKBONES}
    info = {name: {"unet_params": count_parameters(s.model.unet), "text_params": count_parameters(s.model.text_encoder),
                   "gflops_per_image": forward_gflops_per_image(s.model, *batches[0])} for name, s in states.items()}
    relative = info["diffusers"]["unet_params"] / info["minidiff"]["unet_params"] - 1
    for name in BACKBONES:
        print(f"[{preset}] {name}: UNet {info[name]['unet_params']:,} parameters, text encoder "
              f"{info[name]['text_params']:,}; {info[name]['gflops_per_image']:.3f} GFLOP per image per forward")
    print(f"[{preset}] diffusers' UNet has {relative:+.1%} parameters relative to minidiff's")
    if abs(relative) > 0.10:
        raise SystemExit(f"error: parameter counts differ by {relative:+.1%}, more than 10%")

    def trainer(state):
        counter = itertools.count()

        def run():
            for _ in range(args.steps):
                state.train_step(*batches[next(counter) % len(batches)])
        return run

    def sampler(state):
        pipe = MiniDiffusionPipeline(state.model, device="cpu")
        images, captions = batches[0]
        context, mask = pipe.encode_prompts(captions, None, 1, args.guidance)  # (2B, L, D): CFG doubles the batch
        x = torch.randn(images.shape)

        def run():
            for _ in range(args.steps):
                pipe.predict(x, 500, context, mask, args.guidance)
        return run

    train = alternating_times({n: trainer(s) for n, s in states.items()}, args.repeats, warmup=args.warmup)
    sample = alternating_times({n: sampler(s) for n, s in states.items()}, args.repeats, warmup=args.warmup)
    result = {"preset": preset, "image_size": config.image_size, "batch_size": b, "base_channels": config.base_channels,
              "data_ms_per_batch": 1000 * statistics.median(data_ms), "parameter_difference": relative, "models": info}
    for kind, times in (("train", train), ("sample", sample)):
        for name in BACKBONES:
            per_round = [b * args.steps / t for t in times[name]]
            info[name][f"{kind}_images_per_s"] = statistics.median(per_round)
            info[name][f"{kind}_rounds"] = per_round
        # images/s ratio = inverse time ratio, per round
        result[f"{kind}_ratio"] = median_ratio(times["diffusers"], times["minidiff"])
        print(f"[{preset}] {kind}: minidiff {info['minidiff'][f'{kind}_images_per_s']:.1f} img/s, diffusers "
              f"{info['diffusers'][f'{kind}_images_per_s']:.1f} img/s, ratio {result[f'{kind}_ratio']:.2f}")
    return result


def plot(results: list[dict], path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, kind, title in zip(axes, ("train", "sample"), ("training step", "sampling step (CFG forward)")):
        for i, r in enumerate(results):
            for j, name in enumerate(BACKBONES):
                rounds = r["models"][name][f"{kind}_rounds"]
                x = i + (j - 0.5) * 0.38
                ax.bar(x, statistics.median(rounds), width=0.36, color=("C0", "C1")[j], label=name if i == 0 else None)
                ax.plot([x] * len(rounds), rounds, ".", color="black", markersize=3)
            top = max(r["models"][n][f"{kind}_images_per_s"] for n in BACKBONES)
            ax.text(i, top * 1.02, f"x{r[f'{kind}_ratio']:.2f}", ha="center", va="bottom")
        ax.set_xticks(range(len(results)), [f"{r['preset']} preset\n{r['image_size']} px, batch {r['batch_size']}"
                                            for r in results])
        ax.set(ylabel="images / s (median; dots: rounds)", title=title)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.1)
        ax.legend()
    fig.suptitle("minidiff vs diffusers UNet2DConditionModel, equal size (ratio over bars)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def body(results: list[dict], args) -> str:
    rows, ratio_rows = [], []
    for r in results:
        for name in BACKBONES:
            m = r["models"][name]
            rows.append([r["preset"], f"{r['image_size']} px, batch {r['batch_size']}", name, f"{m['unet_params']:,}",
                         f"{m['text_params']:,}", f"{m['gflops_per_image']:.3f}", f"{m['train_images_per_s']:.1f}",
                         f"{m['sample_images_per_s']:.1f}"])
        ratio_rows.append([r["preset"], f"{r['parameter_difference']:+.1%}", f"{r['train_ratio']:.2f}",
                           f"{r['sample_ratio']:.2f}", f"{r['data_ms_per_batch']:.1f}",
                           "yes" if min(r["train_ratio"], r["sample_ratio"]) >= GOAL else "no"])
    return "\n".join([
        f"{args.repeats} alternating rounds of {args.steps} steps each (after {args.warmup} warm-up), CPU, float32. "
        "Training step = forward + backward + clip + Adam + EMA; sampling step = one CFG forward of 2B rows, "
        "no grad. GFLOP: one UNet forward per image (torch.utils.flop_counter).",
        "",
        markdown_table(["preset", "size", "UNet", "UNet params", "text encoder params", "GFLOP/img",
                        "train img/s", "sample img/s"], rows),
        "",
        markdown_table(["preset", "diffusers params vs minidiff", "train ratio minidiff/diffusers",
                        "sample ratio minidiff/diffusers", "data ms/batch (not timed above)",
                        f"goal >= {GOAL}x met"], ratio_rows),
        "",
        "![throughput](benchmarks/results/train_speed.png)",
    ])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", choices=["cpu", "gpu"], default=["cpu", "gpu"])
    p.add_argument("--batch-size", type=int, help="override the presets' batch size")
    p.add_argument("--repeats", type=int, default=10, help="alternating rounds (default 10)")
    p.add_argument("--steps", type=int, default=3, help="steps timed per round (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds per model first (default 1)")
    p.add_argument("--batches", type=int, default=4, help="distinct data batches cycled through (default 4)")
    p.add_argument("--guidance", type=float, default=4.0, help="CFG scale of the sampling step (> 1: batch 2B)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    add_publish_flag(p)
    args = p.parse_args(argv)
    if min(args.repeats, args.steps, args.batches) < 1 or (args.batch_size is not None and args.batch_size < 1):
        p.error("--repeats, --steps, --batches and --batch-size must be at least 1")
    threads = set_threads(args.threads)
    report = Report("train_speed", "1. Training and sampling throughput against diffusers", threads)
    results = [bench_preset(preset, args) for preset in args.presets]
    plot(results, results_folder(args.publish) / "train_speed.png")
    print(report.write(body(results, args), {"results": results}, publish=args.publish))
    return 0


if __name__ == "__main__":
    sys.exit(main())
