"""Training: the DDPM objective, EMA weights, checkpoints you can resume from.

The objective (Ho et al. 2020, Algorithm 1 and eq. 14, "L_simple"):

    x_0 ~ data, t ~ Uniform{0..T-1}, eps ~ N(0, I)
    x_t = sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) eps            (eq. 4)
    loss = || eps - eps_theta(x_t, t, caption) ||^2

with the caption replaced by the empty prompt 10% of the time, so that the same network
also learns the unconditional prediction that classifier-free guidance needs.

All randomness of a run (timesteps, noise, caption dropout) comes from one
`torch.Generator` whose state is checkpointed, and the data is indexed by step, so a
resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoint import CheckpointError, read_json, read_safetensors, save_model, write_json, write_safetensors
from .data import Shapes, single_object_prompts
from .images import make_grid
from .model import TextToImageModel
from .runtime import autocast, pick_device
from .scheduler import NoiseSchedule, SchedulerConfig
from .unet import UNetConfig

LOSS_BINS = 4  # the loss is also logged per quarter of the timestep range


@dataclass
class TrainConfig:
    out: str = "runs/shapes"
    steps: int = 3000
    batch_size: int = 64
    image_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 100
    seed: int = 0
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)
    attention_levels: tuple[int, ...] = (1, 2)
    text_dim: int = 128
    beta_schedule: str = "cosine"
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    sample_every: int = 1000
    checkpoint_every: int = 500
    keep: int = 2  # training-state checkpoints kept
    log_every: int = 50
    max_minutes: float | None = None
    compile: bool = False
    device: str | None = None
    two_object_fraction: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


# Defaults picked by device when train.py is run without flags; see README for what they reach.
PRESETS = {
    "cpu": dict(image_size=16, base_channels=32, steps=3000, batch_size=64),
    "gpu": dict(image_size=32, base_channels=64, steps=8000, batch_size=128, two_object_fraction=0.3),
}


class EMA:
    """Exponential moving average of the weights, with the usual warm-up of the decay:
    decay_k = min(max_decay, (1 + k) / (10 + k)) (as in diffusers' EMAModel)."""

    def __init__(self, model: torch.nn.Module, max_decay: float):
        self.max_decay = max_decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = min(self.max_decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            self.shadow[k].lerp_(v.float(), 1 - decay)


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def batch_indices(step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> range:
    """The dataset indices of one step: each rank reads its own slice of the global batch."""
    start = (step * world_size + rank) * batch_size
    return range(start, start + batch_size)


def load_batch(dataset, indices) -> tuple[torch.Tensor, list[str]]:
    items = [dataset[i] for i in indices]
    return torch.stack([image for image, _ in items]), [caption for _, caption in items]


def diffusion_loss(model, tokenizer, schedule: NoiseSchedule, images, captions, generator, caption_dropout, device):
    """L_simple of Ho et al. 2020 (eq. 14), per sample; also returns the timesteps drawn.
    `model` may be the TextToImageModel itself or a wrapper of it (compiled, DDP)."""
    b = images.shape[0]
    drop = torch.rand(b, generator=generator) < caption_dropout
    captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
    t = torch.randint(0, schedule.num_train_timesteps, (b,), generator=generator)
    noise = torch.randn(images.shape, generator=generator)
    x_t = schedule.add_noise(images, noise, t)  # eq. 4
    ids, mask = tokenizer(captions)
    with autocast(device):
        pred = model(x_t.to(device), t.to(device), ids.to(device), mask.to(device))
    per_sample = F.mse_loss(pred.float(), noise.to(device), reduction="none").mean(dim=(1, 2, 3))
    return per_sample, t


@torch.no_grad()
def sample_grid(model: TextToImageModel, prompts: list[str], seed: int = 0, steps: int = 25) -> "Image":
    from .pipeline import MiniDiffusionPipeline  # the pipeline imports training's neighbours, not training

    pipe = MiniDiffusionPipeline(model, device=next(model.parameters()).device)
    out = pipe.sample(prompts, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed))
    return make_grid(out.images, labels=[p.removeprefix("a ") for p in prompts], columns=6, scale=4)


class Trainer:
    def __init__(self, config: TrainConfig, dataset=None, rank: int = 0, world_size: int = 1, wrap=None):
        self.config, self.rank, self.world_size = config, rank, world_size
        self.out = Path(config.out)
        self.device = pick_device(config.device)
        self.dataset = dataset if dataset is not None else Shapes(
            config.image_size, seed=config.seed, two_object_fraction=config.two_object_fraction)
        torch.manual_seed(config.seed)  # weight initialisation
        unet = UNetConfig(image_size=config.image_size, base_channels=config.base_channels,
                          channel_mults=config.channel_mults, attention_levels=config.attention_levels)
        self.model = TextToImageModel.for_captions(
            self.dataset.captions(), unet, config.text_dim, SchedulerConfig(beta_schedule=config.beta_schedule)
        ).to(self.device)
        self.schedule = NoiseSchedule(self.model.config.scheduler)
        self.ema = EMA(self.model, config.ema_decay)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=0.0)
        self.generator = torch.Generator().manual_seed(config.seed + rank)
        self.step = 0
        # what forward/backward runs through: compiled and/or DDP-wrapped, same parameters
        self.train_model = wrap(self.model) if wrap is not None else self.model
        if config.compile:
            self.train_model = torch.compile(self.train_model)
        self.loss_rows: list[dict] = []

    # ---- checkpoints -------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoints"

    def save_checkpoint(self) -> Path:
        """Everything needed to continue bit for bit, in safetensors + JSON, written to a
        temporary folder and renamed into place (so a half-written checkpoint never counts)."""
        final = self.checkpoint_dir / f"step-{self.step:08d}"
        tmp = self.checkpoint_dir / f".tmp-step-{self.step:08d}"
        shutil.rmtree(tmp, ignore_errors=True)
        write_safetensors(tmp / "model.safetensors", self.model.state_dict())
        write_safetensors(tmp / "ema.safetensors", self.ema.shadow)
        write_safetensors(tmp / "optimizer.safetensors", optimizer_tensors(self.optimizer))
        write_safetensors(tmp / "rng.safetensors", {"generator": self.generator.get_state()})
        write_json(tmp / "state.json", {"step": self.step, "train_config": self.config.to_dict(),
                                        "loss_rows": self.loss_rows})
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(self.checkpoint_dir.glob("step-*"))[: -self.config.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load_checkpoint(self, path: Path) -> None:
        state = read_json(path / "state.json")
        self.model.load_state_dict(read_safetensors(path / "model.safetensors"))
        self.ema.shadow = read_safetensors(path / "ema.safetensors")
        load_optimizer_tensors(self.optimizer, read_safetensors(path / "optimizer.safetensors"))
        self.generator.set_state(read_safetensors(path / "rng.safetensors")["generator"])
        self.step = int(state["step"])
        self.loss_rows = state.get("loss_rows", [])

    def latest_checkpoint(self) -> Path | None:
        found = sorted(self.checkpoint_dir.glob("step-*"))
        return found[-1] if found else None

    def save_pipeline(self) -> None:
        """The EMA weights as a sampling checkpoint: `out`/config.json + model.safetensors."""
        save_model(self.out, self.model, {k: v for k, v in self.ema.shadow.items()})

    # ---- the loop ----------------------------------------------------------------------
    def ema_model(self) -> TextToImageModel:
        model = TextToImageModel(self.model.config).to(self.device)
        model.load_state_dict(self.ema.shadow)
        return model.eval()

    def train(self) -> dict:
        c = self.config
        is_main = self.rank == 0
        start_time = time.monotonic()
        bins = torch.zeros(2, LOSS_BINS)  # running sum and count of the loss per timestep bin
        window_loss, window_steps, window_images, window_start = 0.0, 0, 0, time.monotonic()
        stop_reason = "done"
        bar = tqdm(total=c.steps, initial=self.step, disable=not is_main, unit="step", dynamic_ncols=True)
        try:
            while self.step < c.steps:
                if c.max_minutes is not None and time.monotonic() - start_time > 60 * c.max_minutes:
                    stop_reason = f"time limit of {c.max_minutes} min"
                    break
                images, captions = load_batch(self.dataset, batch_indices(self.step, c.batch_size, self.rank, self.world_size))
                lr = learning_rate(c, self.step)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                self.model.train()
                per_sample, t = diffusion_loss(self.train_model, self.model.tokenizer, self.schedule, images, captions, self.generator,
                                               c.caption_dropout, self.device)
                loss = per_sample.mean()
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss.item()} at step {self.step}")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
                self.optimizer.step()
                self.ema.update(self.model, self.step)
                self.step += 1

                b = (t * LOSS_BINS // self.schedule.num_train_timesteps)
                bins[0].index_add_(0, b, per_sample.detach().float().cpu())
                bins[1].index_add_(0, b, torch.ones_like(per_sample.detach().float().cpu()))
                window_loss += loss.item()
                window_steps += 1
                window_images += images.shape[0] * self.world_size
                if is_main:
                    bar.update(1)
                if is_main and (self.step % c.log_every == 0 or self.step == c.steps):
                    elapsed = time.monotonic() - window_start
                    row = {"step": self.step, "loss": window_loss / window_steps,
                           "lr": lr, "images_per_s": window_images / max(elapsed, 1e-9)}
                    row.update({f"loss_t{i}": (bins[0, i] / bins[1, i].clamp(min=1)).item() for i in range(LOSS_BINS)})
                    self.loss_rows.append(row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.0f}")
                    bins.zero_()
                    window_loss, window_steps, window_images, window_start = 0.0, 0, 0, time.monotonic()
                if is_main and c.sample_every and self.step % c.sample_every == 0:
                    self.write_samples(f"step-{self.step:08d}")
                if is_main and c.checkpoint_every and self.step % c.checkpoint_every == 0:
                    self.save_checkpoint()
        except KeyboardInterrupt:
            stop_reason = "interrupted"
        finally:
            bar.close()
        if is_main:
            self.save_checkpoint()
            self.save_pipeline()
            self.write_samples("final")
            self.write_loss_log()
        return {"step": self.step, "stop_reason": stop_reason, "seconds": time.monotonic() - start_time}

    # ---- reports -----------------------------------------------------------------------
    def write_samples(self, name: str) -> None:
        prompts = sorted(set(self.dataset.captions()))[:18] if not isinstance(self.dataset, Shapes) else single_object_prompts()
        grid = sample_grid(self.ema_model(), prompts, seed=self.config.seed)
        (self.out / "samples").mkdir(parents=True, exist_ok=True)
        grid.save(self.out / "samples" / f"{name}.png")

    def write_loss_log(self) -> None:
        if not self.loss_rows:
            return
        with open(self.out / "loss.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(self.loss_rows[0]))
            writer.writeheader()
            writer.writerows(self.loss_rows)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [r["step"] for r in self.loss_rows]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(steps, [r["loss"] for r in self.loss_rows], label="all t", color="black")
        for i in range(LOSS_BINS):
            lo, hi = i * self.schedule.num_train_timesteps // LOSS_BINS, (i + 1) * self.schedule.num_train_timesteps // LOSS_BINS
            ax.plot(steps, [r[f"loss_t{i}"] for r in self.loss_rows], label=f"t in [{lo}, {hi})", alpha=0.6)
        ax.set(xlabel="step", ylabel="MSE on the noise", yscale="log", title="training loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.out / "loss.png", dpi=100)
        plt.close(fig)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW state as flat named tensors ("<param index>.<name>"), for safetensors."""
    flat = {}
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            flat[f"{index}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return flat


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, flat: dict[str, torch.Tensor]) -> None:
    state_dict = optimizer.state_dict()
    state: dict[int, dict] = {}
    for key, value in flat.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    state_dict["state"] = state
    optimizer.load_state_dict(state_dict)
