"""Where the time of one training step goes (CPU preset), and what the usual CPU tricks change.

    python -m benchmarks.profile_step --publish             # writes BENCHMARKS.md section 5
    python -m benchmarks.profile_step --batch-size 8 --repeats 2 --sanity-steps 3   # quick check

1. torch.profiler over `--profile-steps` training steps of the CPU preset (the step of
   benchmarks.common.TrainState: forward, backward, clip, Adam, EMA): the top operators
   by self CPU time, and which attention kernel scaled_dot_product_attention dispatched to.
2. Variants of the same step, each on its own copy of the model (same initial weights),
   timed in alternating rounds against the step as minidiff runs it now (the order flipped
   every round); the speed-up is the median of the per-round time ratios: float32 and bf16
   autocast of the forward, each in the default (NCHW) and the channels_last memory format,
   Adam foreach / fused, and every torch thread count from 1 to the number of cores.
3. bf16 sanity: the same `--sanity-steps` steps (same data, same noise) in float32 and under
   bf16 autocast from the same weights: the losses side by side, and the largest difference
   of one forward's noise prediction relative to its standard deviation.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from functools import partial

import torch

from minidiff.training import batch_indices, load_batch

from .common import (Report, TrainState, add_publish_flag, alternating_times, build_model, make_dataset,
                     markdown_table, median_ratio, preset_config, pyplot, results_folder, set_threads)


def make_variants(config, threads: int) -> dict[str, tuple[TrainState, int]]:
    """name -> (train state, thread count). "as is" is minidiff's step today: the trainer's own
    precision (`minidiff.runtime.precision_for(device, training=True)`: bf16 autocast on a CPU
    with bf16 instructions, else float32) and memory format (channels_last, except for bf16 on a CPU)."""
    def state(precision="as is", memory_format=None, **kwargs):
        s = TrainState(build_model(config, "minidiff"), config, **kwargs)
        if precision != "as is":
            s.precision = precision
        if memory_format is not None:
            s.model.to(memory_format=memory_format)
        return s

    variants = {"as is": (state(), threads)}
    for precision, name in ((None, "float32"), (torch.bfloat16, "bf16 autocast")):
        for memory_format, suffix in ((torch.contiguous_format, ""), (torch.channels_last, " channels_last")):
            variants[name + suffix] = (state(precision, memory_format), threads)
    variants["Adam foreach"] = (state(foreach=True), threads)
    variants["Adam fused"] = (state(fused=True), threads)
    for n in range(1, (os.cpu_count() or 1) + 1):
        if n != threads:
            variants[f"{n} thread{'s' if n > 1 else ''}"] = (state(), n)
    return variants


def profile(state: TrainState, batches, steps: int, top: int) -> tuple[list[list], list[str]]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for i in range(2):  # warm-up
        state.train_step(*batches[i % len(batches)])
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            state.train_step(*batches[i % len(batches)])
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    rows = [[f"`{e.key}`", f"{100 * e.self_cpu_time_total / total:.1f}%", f"{e.self_cpu_time_total / steps / 1000:.2f}",
             f"{e.count / steps:g}"] for e in events[:top]]
    attention = sorted({e.key for e in events if "attention" in e.key or "flash" in e.key})
    return rows, attention


def bf16_sanity(config, batches, steps: int) -> dict:
    states = {"float32": TrainState(build_model(config, "minidiff"), config),
              "bf16": TrainState(build_model(config, "minidiff"), config)}
    states["float32"].precision, states["bf16"].precision = None, torch.bfloat16
    losses = {name: [s.train_step(*batches[i % len(batches)]) for i in range(steps)] for name, s in states.items()}
    # one forward of the trained float32 weights, with and without autocast
    model = states["float32"].model.eval()
    images, captions = batches[0]
    torch.manual_seed(0)
    x, t = torch.randn(images.shape), torch.randint(0, 1000, (images.shape[0],))
    with torch.no_grad():
        context, mask = model.encode_prompt(captions)
        reference = model.unet(x, t, context, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.unet(x, t, context, mask).float()
    return {"losses": losses, "forward_max_error": ((low - reference).abs().max() / reference.std()).item()}


def plot(names, times, path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    base = statistics.median(times["as is"])
    for i, name in enumerate(names):
        speedups = [a / b for a, b in zip(times["as is"], times[name])]
        ax.barh(i, statistics.median(speedups), color="C0" if name == "as is" else "C2")
        ax.plot(speedups, [i] * len(speedups), ".", color="black", markersize=3)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set(xlabel=f"speed-up of the training step (as is: {1000 * base:.0f} ms per round)",
           title="training step variants, CPU preset (median; dots: rounds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, help="override the CPU preset's batch size")
    p.add_argument("--profile-steps", type=int, default=5, help="steps under the profiler (default 5)")
    p.add_argument("--top", type=int, default=15, help="operators listed (default 15)")
    p.add_argument("--repeats", type=int, default=8, help="alternating rounds per variant (default 8)")
    p.add_argument("--steps", type=int, default=2, help="steps per round (default 2)")
    p.add_argument("--sanity-steps", type=int, default=30, help="steps of the bf16 loss comparison (default 30)")
    p.add_argument("--threads", type=int, help="torch threads of the 'as is' step (default: torch's choice)")
    add_publish_flag(p)
    args = p.parse_args(argv)
    if min(args.profile_steps, args.repeats, args.steps, args.sanity_steps, args.top) < 1:
        p.error("counts must be at least 1")
    threads = set_threads(args.threads)
    report = Report("profile_step", "5. Where the time of a training step goes", threads)
    config = preset_config("cpu", batch_size=args.batch_size)
    dataset = make_dataset(config)
    batches = [load_batch(dataset, batch_indices(i, config.batch_size)) for i in range(4)]

    top_rows, attention_ops = profile(TrainState(build_model(config, "minidiff"), config), batches,
                                      args.profile_steps, args.top)
    print(markdown_table(["operator", "self CPU", "ms per step", "calls per step"], top_rows))
    print("attention kernels:", attention_ops)

    variants = make_variants(config, threads)

    def run(state, n):
        for i in range(args.steps):
            state.train_step(*batches[i % len(batches)])

    def switch_threads(state, n):
        """Set the thread count; after a change, one untimed step (on this machine the first
        step after a switch to 2 threads took 6 to 12 s instead of under 1 s)."""
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
            state.train_step(*batches[0])

    times = alternating_times({name: partial(run, *v) for name, v in variants.items()}, args.repeats,
                              prepare={name: partial(switch_threads, *v) for name, v in variants.items()})
    torch.set_num_threads(threads)
    b = config.batch_size * args.steps
    variant_rows = [[name, f"{statistics.median(b / t for t in times[name]):.1f}",
                     f"{median_ratio(times['as is'], times[name]):.3f}"] for name in variants]
    print(markdown_table(["variant", "img/s", "speed-up"], variant_rows))
    sanity = bf16_sanity(config, batches, args.sanity_steps)
    plot(list(variants), times, results_folder(args.publish) / "profile_step.png")

    f32, bf16 = sanity["losses"]["float32"], sanity["losses"]["bf16"]
    k = max(1, len(f32) // 5)
    body = "\n".join([
        f"CPU preset, batch {config.batch_size}, {config.image_size} px. Profile over {args.profile_steps} steps "
        f"(forward + backward + clip + Adam + EMA), top {args.top} operators by self CPU time:",
        "",
        markdown_table(["operator", "self CPU", "ms per step", "calls per step"], top_rows),
        "",
        f"scaled_dot_product_attention dispatched to: {', '.join(f'`{a}`' for a in attention_ops) or 'none found'}.",
        "",
        f"Variants, {args.repeats} alternating rounds of {args.steps} steps; speed-up = median over rounds of "
        "(time as is) / (time of the variant):",
        "",
        markdown_table(["variant", "train img/s", "speed-up vs as is"], variant_rows),
        "",
        f"bf16 autocast sanity ({args.sanity_steps} steps from the same weights and data): mean loss of the last "
        f"{k} steps {statistics.mean(f32[-k:]):.4f} (float32) vs {statistics.mean(bf16[-k:]):.4f} (bf16); "
        f"one forward's largest difference from float32 = {sanity['forward_max_error']:.3f} x std of the prediction.",
        "",
        "![variants](benchmarks/results/profile_step.png)",
    ])
    print(report.write(body, {"top_ops": top_rows, "attention_ops": attention_ops, "variants": variant_rows,
                              "times": times, "bf16_sanity": sanity}, publish=args.publish))
    return 0


if __name__ == "__main__":
    sys.exit(main())
