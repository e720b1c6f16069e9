"""How much time does the bridge add to diffusers? Run by hand, not a test:

    PYTHONPATH=. python benchmarks/bridge_overhead.py [--steps 10] [--repeats 30] [--threads 1]

On the tiny random SD3 pipeline of tests/sd3_tiny.py (32 x 32 images, so the model's own work
is as small as it gets and any overhead of the wrapper shows as much as it can), time
`SD3Bridge.sample(...)` against calling the same diffusers pipeline object directly with the
same arguments. The calls alternate, so a busy machine slows all alike; the medians are compared.
Goal: a ratio within 1.02. On a shared machine that ratio wanders by a few percent from run to
run, so the script also times the bridge's own Python work alone (diffusers replaced by a stub
that returns at once): that figure, against the direct call's time, is the overhead proper.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on a shared machine)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from sd3_tiny import build_tiny_sd3

    from bridge import SD3Bridge

    with tempfile.TemporaryDirectory() as folder:
        bridge = SD3Bridge.from_pretrained(build_tiny_sd3(Path(folder) / "tiny-sd3"), device="cpu")
    pipe = bridge.pipe  # the very same diffusers pipeline, called directly
    pipe.set_progress_bar_config(disable=True)
    prompt, guidance, size = ["a red circle"], 4.0, bridge.image_size

    def direct():
        return pipe(prompt, negative_prompt=[""], num_inference_steps=args.steps, guidance_scale=guidance,
                    generator=torch.Generator().manual_seed(0), height=size, width=size).images

    def through_bridge():
        return bridge.sample(prompt, num_inference_steps=args.steps, guidance_scale=guidance,
                             generator=torch.Generator().manual_seed(0)).images

    def with_callback():
        return bridge.sample(prompt, num_inference_steps=args.steps, guidance_scale=guidance,
                             generator=torch.Generator().manual_seed(0), callback=lambda step: None).images

    runs = {"diffusers": direct, "bridge": through_bridge, "bridge+callback": with_callback}
    times = {name: [] for name in runs}
    for _ in range(3):  # warm-up
        for fn in runs.values():
            fn()
    for _ in range(args.repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}

    # The wrapper alone: the same bridge.sample call with the diffusers pipeline swapped for a stub.
    images = direct()

    class Stub:
        scheduler = pipe.scheduler
        tokenizer, tokenizer_3, text_encoder_3 = pipe.tokenizer, pipe.tokenizer_3, pipe.text_encoder_3  # prompt checks

        def __call__(self, *args, **kwargs):
            return SimpleNamespace(images=images)

    bridge.pipe = Stub()
    wrapper = []
    for _ in range(2000):
        start = time.perf_counter()
        through_bridge()
        wrapper.append(time.perf_counter() - start)
    bridge.pipe = pipe
    wrapper_median = statistics.median(wrapper)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, load average {load:.1f} (others' work included); "
          f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}")
    print(f"work: tiny random SD3, {size}x{size}, {args.steps} steps, guidance {guidance}, "
          f"{args.repeats} alternating repeats")
    for name, m in median.items():
        print(f"{name:>16}: median {m * 1000:8.2f} ms   ratio to diffusers {m / median['diffusers']:.3f}")
    print(f"{'bridge alone':>16}: median {wrapper_median * 1e6:8.1f} us   = "
          f"{100 * wrapper_median / median['diffusers']:.3f}% of the direct call")


if __name__ == "__main__":
    main()
