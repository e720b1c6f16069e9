"""How well, and how fast, does minidiff's autoencoder learn Shapes? Run by hand, not a test:

    PYTHONPATH=. python -m benchmarks.autoencoder_quality [--steps 2400 | --minutes M] [--threads 1]

Trains `minidiff.autoencoder` on Shapes at 32 px (30% two-object scenes, seed 0) and, every
`--eval-every` steps, measures the reconstruction PSNR on 256 held-out pictures (Shapes seed 12345):
PSNR = 10 log10(1 / MSE) with pixels in [0, 1], the MSE averaged over all held-out pixels (so one
figure for the whole set; a mean of per-picture PSNRs would read higher). Reconstruction = decode of
the posterior's mean; the PSNR through to_latents / from_latents (a sampled latent) is given too.
Goal: at least 30 dB. The learning rate falls along a cosine over the whole run, so the step count
is fixed up front: --minutes M picks as many steps as M CPU-minutes allow, timed on 10 trial steps.
After training it fits shift_factor / scaling_factor on 1024 training pictures and reports them,
with the held-out latents' mean and std after to_latents (about 0 and 1). Then it scores the
reconstructions of held-out one- and two-object scenes (256 each) with minidiff.evaluate's analyser,
as it scores a model's samples: the most a latent model on this autoencoder can score, since every
picture it makes is a decode. (A blurred square reads as a circle; two objects each get half the
width, so the small ones suffer first.)

Reports wall and CPU seconds (time.process_time: the machine may be shared, CPU time is what this
process used), training only, evaluation excluded; and writes 16 originals (top row) above their
reconstructions to --out (a PNG, and the numbers as JSON beside it); --publish also writes the
picture to docs/figures/autoencoder-reconstructions.png. Needs only minidiff.tools.shapes and
minidiff.autoencoder.

Measured with the defaults (widths 16,32,32, batch 16, lr 3e-3 cosine, kl_weight 1e-6, 2400 steps,
1 thread, 2-core x86 shared with other work, load average ~6): 30.55 dB held-out (30.54 through
sampled latents) after 148 CPU-s of training (285 s wall); 30 dB first passed at step 2000 (125 CPU-s).
Wider (32,64,64), batch 32, constant lr 2e-3: 30.46 dB after 800 steps, 259 CPU-s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from minidiff.autoencoder import AutoencoderConfig, fit_latent_factors, from_latents, to_latents, train_autoencoder
from minidiff.tools.checkpoint import save_autoencoder
from minidiff.tools.evaluate import accuracy, analyse, score
from minidiff.tools.pictures import tensor_to_pil
from minidiff.tools.shapes import Shapes

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = ROOT / "docs" / "figures" / "autoencoder-reconstructions.png"
HELD_OUT_SEED, HELD_OUT, FIT_PICTURES = 12345, 256, 1024


def psnr(reconstructions: torch.Tensor, originals: torch.Tensor) -> float:
    """PSNR in dB of pictures in [-1, 1], measured on [0, 1] pixels, from the MSE over all of them."""
    mse = ((reconstructions.clamp(-1, 1) - originals) / 2).pow(2).mean().item()
    return 10 * math.log10(1 / mse) if mse > 0 else math.inf


@torch.no_grad()
def reconstruct(autoencoder, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    return torch.cat([autoencoder.decode(autoencoder.encode(batch).latent_dist.mode()).sample
                      for batch in images.split(batch_size)])


def scored_reconstructions(autoencoder, two_objects: bool, count: int = HELD_OUT) -> dict[str, float]:
    """The evaluator's accuracy (colour, shape, both) on the reconstructions of `count` held-out scenes."""
    data = Shapes(image_size=32, seed=HELD_OUT_SEED + 1, two_object_fraction=1.0 if two_objects else 0.0)
    originals = torch.stack([data[i][0] for i in range(count)])
    found = [analyse(image, two_objects) for image in tensor_to_pil(reconstruct(autoencoder, originals))]
    scores = [score(f, [(o["colour"], o["shape"]) for o in data.scene(i)]) for i, f in enumerate(found)]
    return {kind: round(share, 3) for kind, share in accuracy(scores).items()}


def to_uint8_grid(rows: list[torch.Tensor], scale: int) -> Image.Image:
    """Rows of pictures (N, 3, H, W) in [-1, 1] -> one PIL image, each pixel a scale x scale square."""
    grid = torch.cat([torch.cat(list(row), dim=2) for row in rows], dim=1)  # (3, rows * H, N * W)
    grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    array = ((grid.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2400, help="training steps")
    p.add_argument("--minutes", type=float, default=None, help="instead of --steps: as many steps as this many "
                   "CPU-minutes allow (timed on 10 trial steps)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--widths", default="16,32,32", help="block_out_channels, e.g. 16,32,32 (3 levels: f = 4)")
    p.add_argument("--latent-channels", type=int, default=4)
    p.add_argument("--layers-per-block", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="the training generator's seed")
    p.add_argument("--eval-every", type=int, default=400)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on a shared machine)")
    p.add_argument("--out", default=str(ROOT / "runs" / "autoencoder" / "reconstructions.png"))
    p.add_argument("--save", default=None, help="also save the trained autoencoder to this folder")
    p.add_argument("--publish", action="store_true", help=f"also write the picture to {PUBLISHED.relative_to(ROOT)}")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    config = AutoencoderConfig(block_out_channels=tuple(int(w) for w in args.widths.split(",")),
                               latent_channels=args.latent_channels, layers_per_block=args.layers_per_block,
                               image_size=32)
    train_set = Shapes(image_size=32, seed=0, two_object_fraction=0.3)
    held_out = torch.stack([Shapes(image_size=32, seed=HELD_OUT_SEED, two_object_fraction=0.3)[i][0]
                            for i in range(HELD_OUT)])
    generator = torch.Generator().manual_seed(args.seed)
    if args.minutes is not None:  # time 10 throwaway steps of the same size
        start = time.process_time()
        train_autoencoder(config, train_set, 10, args.batch_size, args.lr, args.kl_weight, torch.Generator())
        args.steps = max(1, int(60 * args.minutes / ((time.process_time() - start) / 10)))
        print(f"--minutes {args.minutes}: {args.steps} steps")
    autoencoder = optimizer = None
    step, wall, cpu, curve = 0, 0.0, 0.0, []
    print(f"config {config.to_dict()}, batch {args.batch_size}, lr {args.lr}, kl_weight {args.kl_weight}, "
          f"{args.threads} torch threads, {os.cpu_count()} logical cores, load average {os.getloadavg()[0]:.2f}")
    while step < args.steps:
        stop = min(step + args.eval_every, args.steps)
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        autoencoder, optimizer = train_autoencoder(  # continues the same run, part after part
            config, train_set, args.steps, args.batch_size, args.lr, args.kl_weight, generator, autoencoder,
            optimizer, start_step=step, stop_step=stop)
        wall, cpu, step = wall + time.perf_counter() - wall_start, cpu + time.process_time() - cpu_start, stop
        curve.append({"step": step, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                      "psnr_db": round(psnr(reconstruct(autoencoder, held_out), held_out), 2)})
        print(f"step {step:5d}  wall {wall:7.1f} s  cpu {cpu:7.1f} s  held-out PSNR {curve[-1]['psnr_db']:.2f} dB",
              flush=True)

    shift, scale = fit_latent_factors(autoencoder, torch.stack([train_set[i][0] for i in range(FIT_PICTURES)]))
    with torch.no_grad():
        latents = to_latents(autoencoder, held_out, torch.Generator().manual_seed(1))
        sampled_psnr = psnr(from_latents(autoencoder, latents), held_out)
    result = {
        "command": "python -m benchmarks.autoencoder_quality " + " ".join(sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, "
                   f"torch {torch.__version__}, {args.threads} torch threads",
        "load_average_end": os.getloadavg(), "config": config.to_dict(),
        "batch_size": args.batch_size, "lr": args.lr, "kl_weight": args.kl_weight, "seed": args.seed,
        "steps": step, "train_wall_s": round(wall, 1), "train_cpu_s": round(cpu, 1),
        "psnr_db": curve[-1]["psnr_db"], "psnr_db_through_sampled_latents": round(sampled_psnr, 2),
        "shift_factor": shift, "scaling_factor": scale,
        "held_out_latent_mean": latents.mean().item(), "held_out_latent_std": latents.std().item(),
        "evaluator_on_reconstructions": {"single": scored_reconstructions(autoencoder, False),
                                         "two": scored_reconstructions(autoencoder, True)},
        "curve": curve,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}, indent=1))
    picture = to_uint8_grid([held_out[:16], reconstruct(autoencoder, held_out[:16])], scale=4)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} (originals above, reconstructions below) and {out.with_suffix('.json')}")
    if args.publish:
        PUBLISHED.parent.mkdir(parents=True, exist_ok=True)
        picture.save(PUBLISHED)
        print(f"wrote {PUBLISHED}")
    if args.save:
        save_autoencoder(args.save, autoencoder)
        print(f"saved the autoencoder to {args.save}")


if __name__ == "__main__":
    main()
