"""What made training faster: one change at a time to the CPU preset, each trained for its
whole run by the Trainer (what `python train.py` runs) and scored by minidiff.evaluate.

    python -m benchmarks.levers --threads 1 --variant preset: --variant lr2e-3:lr=2e-3 --publish
    python -m benchmarks.levers --threads 1 --variant ddpm-minsnr5:objective=ddpm,snr_gamma=5 --eval-steps 25

A variant is "NAME:key=value,..." with TrainConfig fields (tuples as 2/1; e.g. snr_gamma=5, the
min-SNR-gamma weighting of DDPM's loss, Hang et al. 2023) or these levers, which are not
training settings of minidiff and are applied here by wrapping its parts:
- sigma_sampling=uniform|logit_normal: flow models' training noise levels (FlowMatchConfig);
- stratified=1: the batch's timesteps drawn stratified (one per 1/B quantile of the
  distribution, shuffled) instead of independently;
- prediction=v: DDPM with v-prediction (Salimans & Ho 2022): the network predicts
  v = sqrt(alpha-bar) eps - sqrt(1 - alpha-bar) x_0 and is trained on it; for sampling it is
  wrapped to return eps = sqrt(alpha-bar) v + sqrt(1 - alpha-bar) x_t;
- precision=bf16|float32: the forward pass under bfloat16 autocast, or in float32 (the trainer's
  own choice: bf16 where the CPU has bf16 instructions, minidiff.runtime.precision_for);
- adam_beta2=B: Adam's second-moment decay (torch's default 0.999), set on the optimizer's groups.

This is a proxy for benchmarks/time_to_quality.py, checked against it (BENCHMARKS.md): a
variant's cost is its measured training time (`train s`, the Trainer's whole loop with this
many threads), its quality the accuracy at the end of its own run, so that the learning rate
decays as it does in `python train.py --steps N`. Each row is appended to
results/levers.jsonl (runs/benchmarks/ without --publish); the section is the table of every
row there, the latest for each name, so several processes (one thread each) can share a machine.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import minidiff.training as training
from minidiff.tools.evaluate import evaluate
from minidiff import MiniDiffusionPipeline
from minidiff.runtime import autocast
from minidiff.scheduler import expand_to
from minidiff.tools.trainer import Trainer

from .common import (Report, add_publish_flag, load_average, markdown_table, parse_variant, preset_config,
                     results_folder, set_threads)

LEVERS = {"sigma_sampling": str, "stratified": int, "prediction": str, "precision": str, "adam_beta2": float}


def stratified(sample):
    """Wrap a schedule's sample_training_timesteps(n, generator): the same distribution, but the
    n draws are one from each 1/n quantile (shuffled), by pushing stratified uniforms through
    the inverse CDF: u_i = (perm_i + U_i) / n; logit-normal sigma = sigmoid(Phi^-1(u))."""
    schedule = sample.__self__

    def draw(n, generator=None):
        u = (torch.randperm(n, generator=generator) + torch.rand(n, generator=generator)) / n
        if hasattr(schedule, "alphas_cumprod"):  # DDPM: uniform integers
            return (u * schedule.num_train_timesteps).long().clamp(max=schedule.num_train_timesteps - 1)
        if schedule.config.sigma_sampling == "logit_normal":
            sigma = torch.sigmoid(math.sqrt(2) * torch.erfinv(2 * u.clamp(1e-6, 1 - 1e-6) - 1))
        else:
            sigma = u
        return sigma * schedule.num_train_timesteps

    return draw


def predict_v(unet, alphas_cumprod) -> None:
    """Make an epsilon-predicting UNet a v-predicting one seen as epsilon by the samplers:
    its forward returns eps = sqrt(alpha-bar_t) v + sqrt(1 - alpha-bar_t) x_t, or v itself while
    `unet.return_v` is set (training). The forward is replaced on the instance, so the weights
    keep their names (the EMA and checkpoints see the same state_dict)."""
    network = unet.forward
    unet.return_v = False

    def forward(x, timesteps, context, mask):
        v = network(x, timesteps, context, mask)
        if unet.return_v:
            return v
        alpha_bar = expand_to(alphas_cumprod.to(x.device)[timesteps.long()], v)
        return alpha_bar**0.5 * v + (1 - alpha_bar) ** 0.5 * x

    unet.forward = forward


def v_prediction_loss(model, tokenizer, schedule, images, captions, generator, caption_dropout, device,
                      shard=(0, 1), precision=None, snr_gamma=None):
    """diffusion_loss's draws in the same order, with the target v = sqrt(ab) eps - sqrt(1 - ab) x_0."""
    b = images.shape[0]
    drop = torch.rand(b, generator=generator) < caption_dropout
    captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
    t = schedule.sample_training_timesteps(b, generator)
    noise = torch.randn(images.shape, generator=generator)
    x_t = schedule.add_noise(images, noise, t)
    alpha_bar = expand_to(schedule.alphas_cumprod[t], images)
    target = alpha_bar**0.5 * noise - (1 - alpha_bar) ** 0.5 * images
    ids, mask = tokenizer(captions)
    model.unet.return_v = True
    with autocast(device, precision):
        pred = model(x_t.to(device), t.to(device), ids.to(device), mask.to(device))
    model.unet.return_v = False
    return F.mse_loss(pred.float(), target.to(device), reduction="none").mean(dim=(1, 2, 3)), t


def train_variant(config, levers: dict) -> tuple[Trainer, float, float]:
    """Train `config` with `levers` applied; returns the trainer, wall and CPU seconds of train()."""
    saved = training.diffusion_loss
    try:
        trainer = Trainer(config)
        schedule = trainer.objective
        if "sigma_sampling" in levers:
            schedule.config.sigma_sampling = levers["sigma_sampling"]
        if levers.get("stratified"):
            schedule.sample_training_timesteps = stratified(schedule.sample_training_timesteps)
        if levers.get("prediction") == "v":
            predict_v(trainer.model.unet, schedule.alphas_cumprod)
            training.diffusion_loss = v_prediction_loss
        if "adam_beta2" in levers:
            for group in trainer.optimizer.param_groups:
                group["betas"] = (group["betas"][0], levers["adam_beta2"])
        if "precision" in levers:
            trainer.precision = {"bf16": torch.bfloat16, "float32": None}[levers["precision"]]
        wall, cpu = time.perf_counter(), time.process_time()
        trainer.train()
        return trainer, time.perf_counter() - wall, time.process_time() - cpu
    finally:
        training.diffusion_loss = saved


def read_rows(path) -> list[dict]:
    if not path.exists():
        return []
    latest = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            latest[row["name"]] = row
    return list(latest.values())


SHOWN = ("objective", "base_channels", "lr", "steps", "batch_size", "precision")  # columns of their own


def body(rows: list[dict]) -> str:
    steps = sorted({s for row in rows for s in row["accuracy"]}, key=lambda k: tuple(float(v) for v in k.split("@")))
    header = ["variant", "objective", "width", "peak lr", "steps x batch", "precision", "other changes", "train s",
              "ms/step", "threads"] + ["accuracy, {} steps, guidance {}".format(*s.split("@")) for s in steps] + ["date, load at start"]
    table = [[r["name"], r["objective"], r["base_channels"], f"{r['lr']:g}", f"{r['steps']} x {r['batch_size']}",
              r.get("precision", "bf16" if "precision=bf16" in r["changes"] else "float32"),  # rows before bf16 was the default
              r["other"] or "-", f"{r['train_seconds']:.0f}", f"{r['ms_per_step']:.0f}", r["threads"]]
             + [f"{r['accuracy'][s]:.1%}" if s in r["accuracy"] else "" for s in steps] + [f"{r['date']}, {r['load']}"]
             for r in rows]
    return ("Each variant trained by the Trainer for its whole run (`--checkpoint-every 0 --sample-every 0`), "
            "its EMA weights scored by minidiff.evaluate (8 samples x 18 single-object prompts, the model's "
            "default sampler and guidance unless the column says). A row is "
            "`python -m benchmarks.levers --threads 1 --variant NAME:CHANGES` with the CPU preset of its date "
            "(until 26 Nov 03:34 UTC width 32, lr 1e-3, 1,200 steps; since, width 24, lr 2e-3, 1,150 steps; "
            "from 30 Nov 19:15 UTC bf16 autocast on this CPU, the precision column; from 30 Nov 19:52 UTC "
            "Shapes drawn by the torch renderer, before that `renderer=torch` among the changes; from 1 Dec 01:43 UTC "
            "shift 0.5, warm-up 50, 850 steps, attention in the middle block only) "
            "and its changes; the columns give the settings that differ between rows. `train s`: wall-clock "
            "seconds of the training loop with that many torch threads, two such processes sharing the 2 "
            "cores (`python train.py` alone uses both).\n\n" + markdown_table(header, table))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", required=True, metavar="NAME:key=value,...",
                   help="a change to the CPU preset (repeat for several; 'preset:' is the preset itself)")
    p.add_argument("--eval-steps", type=int, nargs="+", default=[50], help="sampling steps to score (default 50)")
    p.add_argument("--guidance-scales", type=float, nargs="+", default=[3.0],
                   help="guidance scales to score (default 3.0, the pipeline's)")
    p.add_argument("--samples-per-prompt", type=int, default=8)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    add_publish_flag(p)
    args = p.parse_args(argv)
    variants = [parse_variant(text, LEVERS) for text in args.variant]
    threads = set_threads(args.threads)
    report = Report("levers", "The runs", threads, level=3)
    path = results_folder(args.publish) / "levers.jsonl"
    for name, changes, levers in variants:
        date = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
        with tempfile.TemporaryDirectory() as out:
            config = preset_config("cpu", out=out, device="cpu", sample_every=0, checkpoint_every=0, **changes)
            load = load_average()
            trainer, wall, cpu = train_variant(config, levers)
            model = trainer.ema_model()
        pipe = MiniDiffusionPipeline(model, device="cpu")
        accuracy, eval_seconds = {}, {}
        for s in args.eval_steps:
            for g in args.guidance_scales:
                start = time.perf_counter()
                accuracy[f"{s}@{g:g}"] = evaluate(pipe, args.samples_per_prompt, 0, num_inference_steps=s,
                                                  guidance_scale=g)["single"]["both"]
                eval_seconds[f"{s}@{g:g}"] = time.perf_counter() - start
        other = {k: v for k, v in {**changes, **levers}.items() if k not in SHOWN}
        row = {"name": name, "changes": ", ".join(f"{k}={v}" for k, v in {**changes, **levers}.items()),
               "other": ", ".join(f"{k}={v}" for k, v in other.items()), "objective": config.objective,
               "base_channels": config.base_channels, "lr": config.lr, "steps": config.steps,
               "batch_size": config.batch_size, "train_seconds": wall, "cpu_seconds": cpu,
               "ms_per_step": 1000 * wall / config.steps, "threads": threads, "accuracy": accuracy,
               "eval_seconds": eval_seconds, "precision": "bf16" if trainer.precision == torch.bfloat16 else "float32",
               "date": date, "load": load}
        print(json.dumps(row), flush=True)
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    rows = read_rows(path)
    print(report.write(body(rows), {"rows": rows}, publish=args.publish))
    return 0


if __name__ == "__main__":
    sys.exit(main())
