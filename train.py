"""Train a text-to-image diffusion model on the built-in Shapes data.

    python train.py                      # preset picked by device (CPU: 16 px, a few minutes)
    python train.py --out runs/big --image-size 32 --steps 20000
    python train.py --out runs/big --resume

The loop lives in minidiff/training.py; this file only reads flags.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from minidiff.cli import UsageError, run
from minidiff.runtime import pick_device
from minidiff.training import PRESETS, TrainConfig, Trainer


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/shapes", help="run folder: checkpoints, samples, loss log, final model")
    p.add_argument("--preset", choices=sorted(PRESETS), help="defaults to 'gpu' on CUDA, else 'cpu'")
    p.add_argument("--steps", type=int, help="optimizer steps in total")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--image-size", type=int)
    p.add_argument("--base-channels", type=int, help="UNet width")
    p.add_argument("--lr", type=float, help="peak learning rate (AdamW)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu, cuda, mps (default: best available)")
    p.add_argument("--max-minutes", type=float, help="stop cleanly and save after this long")
    p.add_argument("--sample-every", type=int, help="write a sample grid every N steps (0: never)")
    p.add_argument("--checkpoint-every", type=int, help="save a resumable checkpoint every N steps")
    p.add_argument("--keep", type=int, help="resumable checkpoints kept (oldest deleted)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> TrainConfig:
    device = pick_device(args.device)
    preset = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    values = {**PRESETS[preset], "out": args.out, "device": args.device}
    names = {f.name for f in fields(TrainConfig)}
    values.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    config = TrainConfig(**values)
    if config.steps < 1 or config.batch_size < 1:
        raise UsageError("--steps and --batch-size must be at least 1")
    return config


def main(argv=None) -> int:
    args = parse_args(argv)
    config = build_config(args)
    out = Path(config.out)
    trainer = Trainer(config)
    if args.resume:
        checkpoint = trainer.latest_checkpoint()
        if checkpoint is None:
            raise UsageError(f"--resume: {out} holds no checkpoint to resume from")
        trainer.load_checkpoint(checkpoint)
        print(f"resuming from {checkpoint} (step {trainer.step})", file=sys.stderr)
    elif trainer.latest_checkpoint() is not None or (out / "model.safetensors").exists():
        raise UsageError(f"{out} already holds a training run; pass --resume to continue it, or choose another --out")
    print(f"training on {trainer.device}: {config.image_size} px, {config.steps} steps of {config.batch_size}, "
          f"{sum(p.numel() for p in trainer.model.parameters()) / 1e6:.2f} M parameters", file=sys.stderr)
    result = trainer.train()
    print(f"stopped after step {result['step']} ({result['stop_reason']}, {result['seconds'] / 60:.1f} min); "
          f"model saved to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
