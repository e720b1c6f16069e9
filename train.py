"""Train a text-to-image diffusion model: on the built-in Shapes data, your own pictures, or MNIST-like sets.

    python train.py                      # preset picked by device (CPU: 16 px, a few minutes)
    python train.py --objective flow --out runs/flow    # rectified flow, the maths of SD3
    python train.py --backbone mmdit --out runs/mmdit   # SD3.5's transformer (MMDiT) instead of the UNet
    python train.py --out runs/big --image-size 32 --steps 20000
    python train.py --latent --image-size 32 --out runs/latent    # an autoencoder first, then diffusion on its latents
    python train.py --out runs/big --resume                  # after a crash, a kill or Ctrl-C
    python train.py --out runs/mine --data my_pictures/ --image-size 32
    python train.py --out runs/digits --data mnist --image-size 28
    torchrun --nproc_per_node 4 train.py --out runs/big      # data parallel: 4 x --batch-size per step

The loop is minidiff/training.py's `train_step`, run by minidiff/tools/trainer.py (checkpoints,
resume, logs); this file reads flags and, under torchrun, sets up DistributedDataParallel (the
library itself knows nothing of distribution).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

import torch

from minidiff.autoencoder import AutoencoderConfig
from minidiff.runtime import pick_device
from minidiff.tools.checkpoint import load_autoencoder
from minidiff.tools.cli import ArgumentParser, UsageError, run, writable_folder
from minidiff.tools.datasets import DATA_NAMES, METADATA_NAME, ImageFolder, load_dataset
from minidiff.tools.trainer import CACHE_LATENTS, PRESETS, Trainer, config_for_resume, latest_checkpoint, \
    prepare_autoencoder
from minidiff.training import TrainConfig


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/shapes", help="run folder: checkpoints, samples, loss log, final model")
    p.add_argument("--preset", choices=sorted(PRESETS), help="defaults to 'gpu' on CUDA, else 'cpu'")
    p.add_argument("--data", help="shapes (default), mnist, fashion-mnist, cifar10, or a folder of images with an "
                                  "optional metadata.jsonl of {\"file_name\", \"text\"} lines")
    p.add_argument("--two-object-fraction", type=float,
                   help="Shapes from 32 px: the share of pictures with two objects (the gpu preset: 0.3)")
    p.add_argument("--renderer", choices=["pil", "torch"],
                   help="Shapes: draw a batch at once in torch (the default: 4x as fast as PIL on a CPU, and the "
                        "data keeps up with a GPU) or pictures one by one with PIL (4x4 supersampled)")
    p.add_argument("--data-root", help="where mnist/fashion-mnist/cifar10 are downloaded (default ~/.cache/minidiff)")
    p.add_argument("--objective", choices=["ddpm", "flow"],
                   help="ddpm: predict the noise (Ho et al. 2020); flow: rectified flow, predict the velocity "
                        "(as Stable Diffusion 3). Default: " + TrainConfig.objective)
    p.add_argument("--snr-gamma", type=float,
                   help="ddpm only: min-SNR-gamma loss weighting (Hang et al. 2023; 5 is the paper's); "
                        "default: off (Ho et al.'s L_simple)")
    p.add_argument("--shift", type=float, help="flow only: timestep shift, trained and sampled (SD3 eq. 23; SD3.5: 3)")
    p.add_argument("--latent", action="store_true", default=None,
                   help="a latent model: train an autoencoder first (or take --autoencoder), then denoise its latents")
    p.add_argument("--autoencoder", help="latent: the autoencoder folder to use instead of training one "
                                         "(implies --latent)")
    p.add_argument("--autoencoder-steps", type=int, help="latent: steps of the autoencoder trained first "
                                                         f"(default {TrainConfig.autoencoder_steps})")
    p.add_argument("--autoencoder-down-factor", type=int, metavar="F",
                   help="latent: the autoencoder trained first makes latents F times smaller a side (a power of 2; "
                        f"default {TrainConfig.autoencoder_down_factor}; 2 keeps two small objects apart at 32 px)")
    p.add_argument("--cache-latents", type=int, nargs="?", const=CACHE_LATENTS, metavar="N",
                   help="latent: encode N pictures once (default N: %(const)s), then sample their q(z|x) each step, "
                        "as diffusers' --cache_latents; 0: encode every batch. Default: " + str(TrainConfig.cache_latents))
    p.add_argument("--steps", type=int, help="optimizer steps in total")
    p.add_argument("--batch-size", type=int, help="images per step (per process under torchrun)")
    p.add_argument("--image-size", type=int)
    p.add_argument("--backbone", choices=["unet", "mmdit"],
                   help="the denoising network: unet, or mmdit (SD3.5's transformer). Default: " + TrainConfig.backbone)
    p.add_argument("--base-channels", type=int, help="UNet width")
    p.add_argument("--channel-mults", type=int, nargs="+", help="UNet width multiplier per resolution level")
    p.add_argument("--attention-levels", type=int, nargs="*", help="UNet levels (0 = full size) with attention")
    p.add_argument("--num-layers", type=int, help=f"MMDiT joint blocks (default {TrainConfig.num_layers})")
    p.add_argument("--num-heads", type=int, help=f"MMDiT attention heads (default {TrainConfig.num_heads})")
    p.add_argument("--head-dim", type=int,
                   help=f"MMDiT width per head; width = heads x head dim (default {TrainConfig.head_dim})")
    p.add_argument("--patch-size", type=int,
                   help=f"MMDiT pixels per image token, p x p (default {TrainConfig.patch_size})")
    p.add_argument("--text-dim", type=int, help="text encoder width")
    p.add_argument("--text-clip-init", action="store_true", default=None,
                   help="the text encoder's word embeddings start at std 0.02 like its positions (CLIP's init), "
                        "so it reads word order from the start: what two-object prompts need (docs/training.md)")
    p.add_argument("--lr", type=float, help="peak learning rate (Adam)")
    p.add_argument("--warmup-steps", type=int, help="linear learning-rate warm-up")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu, cuda, mps (default: best available)")
    p.add_argument("--max-minutes", type=float, help="stop cleanly and save after this long")
    p.add_argument("--sample-every", type=int, help="write a sample grid every N steps (0: only at the end)")
    p.add_argument("--checkpoint-every", type=int, help="save a resumable checkpoint every N steps")
    p.add_argument("--keep", type=int, help="resumable checkpoints kept (oldest deleted)")
    p.add_argument("--log-every", type=int, help="a row of loss.csv every N steps")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--mixed-precision", choices=["auto", "no", "bf16", "fp16"],
                   help="autocast of the forward pass, as diffusers' scripts' --mixed_precision; auto (the default): "
                        "bf16 on GPUs and CPUs that compute it natively, fp16 on older GPUs, else no (float32)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint, with its own settings "
                        "(only --steps, --lr, --device and the --*-every/--keep/--max-minutes flags may change)")
    return p.parse_args(argv)


def precision_name(dtype: torch.dtype | None) -> str:
    return {None: "float32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + gradient scaler"}[dtype]


def given_settings(args: argparse.Namespace) -> dict:
    """The TrainConfig fields the user set on the command line (a data folder as an absolute
    path, so that a run resumed from elsewhere still finds it)."""
    if args.data is not None and args.data not in DATA_NAMES and Path(args.data).is_dir():
        args.data = str(Path(args.data).resolve())
    if args.autoencoder is not None:
        args.autoencoder, args.latent = str(Path(args.autoencoder).resolve()), True
    names = {f.name for f in fields(TrainConfig)}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if k in names and v is not None}


# the flags of one network only: given for the other, they would change nothing
NETWORK_SETTINGS = {"unet": ("base_channels", "channel_mults", "attention_levels"),
                    "mmdit": ("num_layers", "num_heads", "head_dim", "patch_size")}


def build_config(args: argparse.Namespace) -> TrainConfig:
    """A new run: the device's preset, then the flags."""
    device = pick_device(args.device)
    preset = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    given = given_settings(args)
    backbone = given.get("backbone", TrainConfig.backbone)
    for network, names in NETWORK_SETTINGS.items():
        for name in names:
            if network != backbone and name in given:
                hint = " or add --backbone mmdit" if network == "mmdit" else ""
                raise UsageError(f"--{name.replace('_', '-')} sets the {network} network, but this run trains the "
                                 f"{backbone}; drop the flag{hint}")
    if "autoencoder" in given and "autoencoder_down_factor" in given:
        raise UsageError("--autoencoder-down-factor sets the autoencoder trained first; --autoencoder DIR brings "
                         "its own, with its own factor: drop one of them")
    if given.get("renderer") == "torch" and given.get("data", "shapes") != "shapes":
        raise UsageError(f"--renderer torch draws Shapes; --data {given['data']} is read from files, so drop it")
    return TrainConfig(**{**PRESETS[preset], **given})


def check_config(config: TrainConfig, autoencoder: AutoencoderConfig | None = None) -> None:
    """A new or resumed run's settings, before any work; `autoencoder`: a latent run's (given or to train)."""
    for name in ("steps", "batch_size", "keep", "log_every", "autoencoder_steps"):
        if getattr(config, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")
    for name in ("sample_every", "checkpoint_every", "warmup_steps", "cache_latents"):
        if getattr(config, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(config, name)}")
    if config.cache_latents and not config.latent:
        raise UsageError("--cache-latents keeps an autoencoder's latents: add --latent (or --autoencoder DIR), or drop it")
    if config.autoencoder_down_factor != TrainConfig.autoencoder_down_factor and not config.latent:
        raise UsageError("--autoencoder-down-factor shapes a latent run's autoencoder: add --latent, or drop it")
    if not config.shift > 0:
        raise UsageError(f"--shift must be above 0, got {config.shift}")
    if not 0 <= config.two_object_fraction <= 1:
        raise UsageError(f"--two-object-fraction must be between 0 and 1, got {config.two_object_fraction}")
    if config.two_object_fraction > 0 and config.image_size < 32:
        raise UsageError(f"--two-object-fraction needs --image-size 32 or more (two objects side by side), "
                         f"got {config.image_size}")
    if not config.lr > 0:
        raise UsageError(f"--lr must be above 0, got {config.lr}")
    if config.max_minutes is not None and not config.max_minutes > 0:
        raise UsageError(f"--max-minutes must be above 0, got {config.max_minutes}")
    if config.image_size < 8:
        raise UsageError(f"--image-size must be at least 8, got {config.image_size}")
    if config.backbone == "mmdit":
        for name in NETWORK_SETTINGS["mmdit"]:
            if getattr(config, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")
        if config.num_heads * config.head_dim % 4:  # the 2-D position table: sin and cos of rows and columns
            raise UsageError(f"--num-heads x --head-dim must be a multiple of 4 (the width holds the sin and cos of a "
                             f"patch's row and column), got {config.num_heads} x {config.head_dim}")
        if config.image_size % config.patch_size:
            raise UsageError(f"--patch-size {config.patch_size} must divide --image-size {config.image_size} "
                             f"(the image is cut into whole patches)")
    if autoencoder is not None and config.image_size % autoencoder.down_factor:
        raise UsageError(f"--image-size {config.image_size} is not divisible by the autoencoder's down factor "
                         f"{autoencoder.down_factor}: a latent model needs a whole number of latents a side")
    try:  # the network's own rule on sizes, checked before any work
        config.backbone_config(autoencoder)
    except ValueError as error:
        halves = f" (the UNet halves it {len(config.channel_mults) - 1} times)" if config.backbone == "unet" else ""
        latent = f" on {config.image_size // autoencoder.down_factor} px latents" if autoencoder else ""
        raise UsageError(f"--image-size: {error}{latent}{halves}") from None


def start_distributed(config: TrainConfig) -> dict:
    """Under torchrun (RANK, WORLD_SIZE and LOCAL_RANK set): join the process group (nccl on
    CUDA, gloo on CPU) and give the Trainer its rank, the DDP wrapper, and `sync_stop`, an
    all-reduce max through which every rank acts on the same stop decision (rank 0's clock,
    anyone's Ctrl-C, anyone's non-finite loss). Without torchrun: one process, no wrapper."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return {}
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    device = pick_device(config.device)
    if device.type == "mps":  # gloo, the only backend on a Mac, cannot all-reduce MPS tensors
        raise UsageError("torchrun on a Mac: DDP cannot run on MPS (gloo reduces CPU tensors only); "
                         "train in one process (python train.py), or pass --device cpu to use DDP on the CPU")
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    config.device = str(device)

    def wrap(model):
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def sync_stop(code: int) -> int:
        flag = torch.tensor([code], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    return {"rank": rank, "world_size": world_size, "wrap": wrap, "sync_stop": sync_stop}


def open_dataset(config: TrainConfig, distributed: dict):
    """The training data; under torchrun rank 0 opens it first (a download happens once),
    the other ranks after it (the cache folder must then be shared by all ranks)."""
    def build():
        return load_dataset(config.data, config.image_size, config.seed, config.data_root, config.two_object_fraction)

    if not distributed:
        return build()
    import torch.distributed as dist

    dataset = build() if distributed["rank"] == 0 else None
    dist.barrier()
    return dataset if dataset is not None else build()


def latent_autoencoder_config(config: TrainConfig) -> AutoencoderConfig | None:
    """A latent run's autoencoder config, read before anything is written: the run's own autoencoder
    (resumed), the --autoencoder folder (checked whole: a broken one is one clear error), or the
    default one it will train; None for a pixel run."""
    if not config.latent:
        return None
    own = Path(config.out) / "autoencoder"
    if own.is_dir() or config.autoencoder is not None:
        return load_autoencoder(own if own.is_dir() else config.autoencoder).config
    try:  # the factor is what counts here
        return AutoencoderConfig.with_down_factor(config.autoencoder_down_factor)
    except ValueError as error:
        raise UsageError(f"--autoencoder-down-factor: {error}") from None


def open_autoencoder(config: TrainConfig, dataset, distributed: dict, say):
    """The first phase of a latent run (minidiff.tools.trainer.prepare_autoencoder); under torchrun
    rank 0 trains and writes it, the other ranks then read what it wrote."""
    if not distributed:
        return prepare_autoencoder(config, dataset, say)
    import torch.distributed as dist

    autoencoder = prepare_autoencoder(config, dataset, say) if distributed["rank"] == 0 else None
    dist.barrier()
    return autoencoder if autoencoder is not None else prepare_autoencoder(config, dataset)


def saved_state(out: Path) -> str:
    """Which step the last checkpoint and model.safetensors hold, and how to bring them level."""
    last = latest_checkpoint(out)
    if last is None:
        return "no checkpoint had been saved yet"
    config = out / "config.json"
    model_step = json.loads(config.read_text()).get("trained_steps") if config.exists() else None
    checkpoint_step = int(last.name.removeprefix("step-"))
    if model_step == checkpoint_step:
        return f"the last checkpoint, {last}, and {out / 'model.safetensors'} hold step {checkpoint_step}"
    held = f"holds step {model_step}" if model_step is not None else "is missing"
    return (f"the last checkpoint is {last} (step {checkpoint_step}) but {out / 'model.safetensors'} {held}: "
            f"`python train.py --out {out} --resume` writes it afresh")


def data_notes(dataset, name: str, batch_size: int) -> list[str]:
    """What a user should know about their data before a long run: a folder without captions,
    a folder smaller than one batch."""
    folder = getattr(dataset, "dataset", dataset)  # Endless wraps a finite set
    notes = []
    if isinstance(folder, ImageFolder) and not folder.captioned:
        notes.append(f"{name} has no {METADATA_NAME}: every caption is empty and the model learns "
                     "unconditionally (prompts will be ignored); to caption the images, add one "
                     '{"file_name": ..., "text": ...} line per image')
    if isinstance(folder, ImageFolder) and len(folder) < batch_size:
        notes.append(f"{name} holds {len(folder)} images, fewer than one batch of {batch_size}: each batch "
                     "repeats them (fine for a test; real training wants many more)")
    return notes


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    checkpoint = None
    if args.resume:
        if args.preset:
            raise UsageError("--preset picks a new run's settings; a resumed run keeps its own (drop --preset)")
        checkpoint = latest_checkpoint(out)
        if checkpoint is None:
            raise UsageError(f"--resume: {out} holds no checkpoint to resume from; start the run without --resume")
        config, changes = config_for_resume(checkpoint, given_settings(args))
        config.device = args.device  # the machine may have changed since
    else:
        config, changes = build_config(args), {}
        if latest_checkpoint(out) is not None or (out / "model.safetensors").exists():
            raise UsageError(f"{out} already holds a training run; pass --resume to continue it, or choose another --out")
    config.out = str(out)
    check_config(config, latent_autoencoder_config(config))
    writable_folder(out, "--out")
    distributed = start_distributed(config)
    is_main = distributed.get("rank", 0) == 0
    say = (lambda text: print(text, file=sys.stderr)) if is_main else (lambda text: None)
    try:
        dataset = open_dataset(config, distributed)
        trainer = Trainer(config, dataset, autoencoder=open_autoencoder(config, dataset, distributed, say),
                          **distributed)
        if checkpoint is not None:
            trainer.load_checkpoint(checkpoint)
            changed = "".join(f", {k} {old} -> {new}" for k, (old, new) in changes.items() if k != "out")
            if trainer.step >= config.steps:  # nothing to train: say so, rather than save and render it all again
                say(f"{out} is already at its last step ({trainer.step} of {config.steps}); to train longer, pass "
                    f"--steps N with N above {trainer.step}, e.g. --resume --steps {2 * trainer.step}")
                return 0
            say(f"resuming from {checkpoint} (step {trainer.step}{changed})")
        for note in data_notes(trainer.dataset, config.data, config.batch_size):
            say(f"warning: {note}")
        ranks = distributed.get("world_size", 1)
        say(f"training on {trainer.device}{f' x {ranks} processes' if ranks > 1 else ''} "
            f"({precision_name(trainer.precision)}): {config.objective} objective, {config.backbone}, "
            f"{config.image_size} px{' as latents of %dx%dx%d' % trainer.model.sample_shape if config.latent else ''}, "
            f"{config.steps} steps of {config.batch_size * ranks} images, data {config.data}, "
            f"{sum(p.numel() for p in trainer.model.parameters()) / 1e6:.2f} M parameters")
        try:
            result = trainer.train()
        except FloatingPointError as error:
            last = latest_checkpoint(out)
            kept = (f"the last good checkpoint, {last}, is kept: continue from it with --resume and a lower --lr"
                    if last else "no checkpoint had been saved yet: start again with a lower --lr")
            print(f"error: training stopped: {error}; {kept}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"error: interrupted twice, stopped without saving; {saved_state(out)}", file=sys.stderr)
            return 130
        except torch.cuda.OutOfMemoryError:
            print(f"error: the GPU ran out of memory with --batch-size {config.batch_size} at {config.image_size} px; "
                  f"try --batch-size {max(1, config.batch_size // 2)}", file=sys.stderr)
            return 1
    finally:
        if distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
    peak = (f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
            if trainer.device.type == "cuda" else "")
    finish = (f"; to finish the run ({config.steps} steps): python train.py --out {out} --resume"
              if result["step"] < config.steps else "")
    say(f"stopped after step {result['step']} ({result['stop_reason']}, {result['seconds'] / 60:.1f} min{peak}); "
        f"model saved to {out}{finish}")
    return 0


if __name__ == "__main__":
    code = run(main)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun, gloo's threads can outlive the process group, and a C++ thread still running
        # when the interpreter tears down aborts the process ("terminate called without an active
        # exception") after all the work is saved: leave without the teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
