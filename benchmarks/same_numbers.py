"""Does a refactor change any number? Train and sample through the command line in two checkouts
and compare the weights byte for byte and the pictures pixel for pixel.

    python -m benchmarks.same_numbers --base da8d601            # this tree against a commit
    python -m benchmarks.same_numbers --base da8d601 --quick    # only the 300-step runs
    python -m benchmarks.same_numbers --base da8d601 --side base &   # the two sides at once, then compare:
    python -m benchmarks.same_numbers --base da8d601 --side head; \
        python -m benchmarks.same_numbers --base da8d601 --reuse-base --reuse-head

The base commit is checked out with `git worktree` into a temporary folder; both sides run with
this interpreter and the same thread count (--threads, default 1). Each side runs:
  train.py --steps 300 (flow, the default objective), train.py --steps 300 --objective ddpm,
  and (without --quick) the default `python train.py`; then from each model sample.py text to
  image (2 prompts x 4 images), img2img (strength 0.7) and inpainting (right half) with fixed seeds,
  and for the DDPM model both of its samplers.
It prints one line per file, `same` or `DIFFERENT`, and exits 1 if anything differs.
Outputs go to runs/same-numbers/{base,head} (kept, so a second call can reuse the base side with
--reuse-base).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


THREADS = "1"  # the same on both sides (set by --threads): float sums depend on the thread count


def run(cwd: Path, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(cwd), "OMP_NUM_THREADS": THREADS}
    subprocess.run([sys.executable, *args], cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def produce(checkout: Path, out: Path, quick: bool) -> None:
    """Every file this check compares, made with `checkout`'s code into `out`."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    models = {"flow300": ["--steps", "300"], "ddpm300": ["--steps", "300", "--objective", "ddpm"]}
    if not quick:
        models["default"] = []
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (8, 0, 16, 16))
    mask.save(out / "mask.png")
    for name, flags in models.items():
        run(checkout, "train.py", "--out", str(out / name), "--sample-every", "0", *flags)
        samplers = ["ddpm", "ddim"] if "ddpm" in name else [None]
        for sampler in samplers:
            extra = ["--sampler", sampler] if sampler else []
            tag = f"{name}-{sampler or 'default'}"
            model = ["--model", str(out / name), *extra]
            run(checkout, "sample.py", *model, "--prompt", "a red circle", "a blue square", "--num-images", "4",
                "--seed", "3", "--raw-size", "--out", str(out / f"{tag}-sample.png"))
            run(checkout, "sample.py", *model, "--prompt", "a red circle", "--seed", "1", "--raw-size",
                "--out", str(out / f"{tag}-input.png"))
            run(checkout, "sample.py", *model, "--prompt", "a blue circle", "--image", str(out / f"{tag}-input.png"),
                "--strength", "0.7", "--seed", "2", "--raw-size", "--out", str(out / f"{tag}-img2img.png"))
            run(checkout, "sample.py", *model, "--prompt", "a green square", "--image", str(out / f"{tag}-input.png"),
                "--mask", str(out / "mask.png"), "--seed", "2", "--raw-size", "--out", str(out / f"{tag}-inpaint.png"))


def compare(base: Path, head: Path) -> bool:
    same_all = True
    for path in sorted(base.rglob("*")):
        if path.suffix not in (".png", ".safetensors") or "checkpoints" in path.parts or "samples" in path.parts:
            continue
        other = head / path.relative_to(base)
        if not other.exists():
            print(f"MISSING   {other}")
            same_all = False
            continue
        if path.suffix == ".safetensors":
            same = path.read_bytes() == other.read_bytes()
        else:
            a, b = np.asarray(Image.open(path)), np.asarray(Image.open(other))
            same = a.shape == b.shape and bool((a == b).all())
        print(f"{'same     ' if same else 'DIFFERENT'} {path.relative_to(base)}")
        same_all &= same
    return same_all


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the commit to compare against")
    p.add_argument("--quick", action="store_true", help="only the 300-step models")
    p.add_argument("--reuse-base", action="store_true", help="keep runs/same-numbers/base from an earlier call")
    p.add_argument("--out", default=str(ROOT / "runs" / "same-numbers"))
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every run, on both sides (default 1)")
    p.add_argument("--side", choices=["both", "base", "head"], default="both",
                   help="make only one side's files (to run them at the same time), then compare with --side both "
                        "--reuse-base --reuse-head")
    p.add_argument("--reuse-head", action="store_true", help="keep runs/same-numbers/head from an earlier call")
    args = p.parse_args(argv)
    global THREADS
    THREADS = str(args.threads)
    out = Path(args.out)
    if args.side != "head" and not (args.reuse_base and (out / "base").is_dir()):
        with tempfile.TemporaryDirectory() as tmp:
            checkout = Path(tmp) / "base"
            subprocess.run(["git", "worktree", "add", "--detach", str(checkout), args.base], cwd=ROOT, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                produce(checkout, out / "base", args.quick)
            finally:
                subprocess.run(["git", "worktree", "remove", "--force", str(checkout)], cwd=ROOT, check=True)
    if args.side == "base":
        return 0
    if not (args.reuse_head and (out / "head").is_dir()):
        produce(ROOT, out / "head", args.quick)
    if args.side == "head":
        return 0
    same = compare(out / "base", out / "head")
    print("all the same" if same else "some files differ")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
