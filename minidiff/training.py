"""Training: the two objectives, EMA weights, checkpoints you can resume from.

DDPM (`objective="ddpm"`; Ho et al. 2020, Algorithm 1 and eq. 14, "L_simple"):

    x_0 ~ data, t ~ Uniform{0..T-1}, eps ~ N(0, I)
    x_t = sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) eps            (eq. 4)
    loss = || eps - eps_theta(x_t, t, caption) ||^2

Rectified flow (`objective="flow"`; Liu et al. 2022, Lipman et al. 2023; as SD3, Esser et al. 2024):

    x_0 ~ data, sigma ~ logit-normal (Esser sec. 3.1), eps ~ N(0, I)
    x_sigma = (1 - sigma) x_0 + sigma eps                              (Esser eq. 1, a straight line)
    loss = || (eps - x_0) - v_theta(x_sigma, sigma * T, caption) ||^2  (the velocity along the line)

DDPM may weight each sample's loss by min(SNR_t, gamma) / SNR_t, SNR_t = alpha-bar_t / (1 - alpha-bar_t)
(min-SNR-gamma, Hang et al. 2023, `snr_gamma`; diffusers' train_text_to_image.py --snr_gamma): the
low-noise steps, whose noise is easy to read off and whose gradients otherwise dominate, count less.

Both are one function, `diffusion_loss`: the schedule object says how t is drawn
(`sample_training_timesteps`), how x_0 is noised (`add_noise`) and what the network must
predict (`training_target`). In both, the caption is replaced by the empty prompt 10% of
the time, so that the same network also learns the unconditional prediction that
classifier-free guidance needs.

All randomness of a run (timesteps, noise, caption dropout) comes from one
`torch.Generator` whose state is checkpointed, and the data is indexed by step, so a
resumed run continues exactly where it stopped: a run killed at any moment and resumed
ends with the same weights, bit for bit, as one that never stopped.

Data parallelism (train.py under torchrun) needs nothing from this module but a rank, a
world size, a `wrap` for the model (DDP) and a `sync_stop` that makes every rank act on
the same stop decision. Each rank reads its own slice of the global batch
(`batch_indices`), and every rank draws the randomness of the whole global batch from the
same generator and keeps its slice (`diffusion_loss`), so N processes with batch B train
like one process with batch N x B.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import math
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from .checkpoint import (CheckpointError, atomic_write, read_json, read_safetensors, save_model, write_json,
                         write_safetensors)
from .data import Shapes, load_dataset
from .images import make_grid
from .model import TextToImageModel
from .runtime import autocast, pick_device, precision_for
from .scheduler import FlowMatchConfig, FlowMatchEulerScheduler, NoiseSchedule, SchedulerConfig
from .unet import UNetConfig

LOSS_BINS = 4  # the loss is also logged per quarter of the timestep range
TRAIN_STATE_FORMAT, TRAIN_STATE_VERSION = "minidiff-train-state", 1  # state.json of a resumable checkpoint
# what the ranks agree on after every forward pass (the largest code wins)
GO_ON, TIME_LIMIT, INTERRUPTED, NOT_FINITE, FAILED = 0, 1, 2, 3, 4
OBJECTIVES = ("ddpm", "flow")


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
    # "flow" (rectified flow: predict the velocity, as SD3) or "ddpm" (predict the noise). Flow is the
    # default: at 800 steps of the CPU preset it scored 88.9% where DDPM scored 79.2% (BENCHMARKS.md, "What made training faster")
    objective: str = "flow"
    beta_schedule: str = "cosine"  # ddpm only
    snr_gamma: float | None = None  # ddpm only: min-SNR-gamma loss weighting (5 is the paper's); None: plain L_simple
    shift: float = 1.0  # flow only: the sampling shift of Esser et al. eq. 23 (SD3.5: 3.0)
    caption_dropout: float = 0.1
    ema_decay: float = 0.999  # the cap of the EMA's warm-up (see EMA): reached after about 9,000 steps
    grad_clip: float = 1.0
    sample_every: int = 1000
    checkpoint_every: int = 500
    keep: int = 2  # training-state checkpoints kept
    log_every: int = 50
    max_minutes: float | None = None
    compile: bool = False
    device: str | None = None
    two_object_fraction: float = 0.0  # Shapes only
    data: str = "shapes"  # or mnist, fashion-mnist, cifar10, or an image folder (see data.load_dataset)
    data_root: str | None = None  # torchvision download cache (default ~/.cache/minidiff)

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.snr_gamma is not None and (self.objective != "ddpm" or not self.snr_gamma > 0):
            raise ValueError(f"snr_gamma (min-SNR weighting) must be above 0 and needs objective 'ddpm' "
                             f"(it weights the noise-prediction loss), got {self.snr_gamma} with {self.objective!r}")

    def scheduler_config(self) -> SchedulerConfig | FlowMatchConfig:
        """The noise schedule the model is trained with (saved in its config.json)."""
        if self.objective == "flow":
            return FlowMatchConfig(shift=self.shift)
        return SchedulerConfig(beta_schedule=self.beta_schedule)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training settings {', '.join(unknown)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**values)


# Settings a resumed run may change (`train.py --resume --steps 20000`); the others define the
# run (model, data, batch, seed, ...) and must stay what the checkpoint says. A longer --steps
# stretches the cosine learning-rate decay from the step where the run resumes.
RUN_SETTINGS = ("out", "steps", "lr", "device", "max_minutes", "sample_every", "checkpoint_every", "keep", "log_every",
                "compile", "data_root")


# Defaults picked by device when train.py is run without flags; see README for what they reach.
# Self-attention at the 8x8 (CPU) / 16x16 (GPU) level is left out: it cost about a third of the step
# and the model reaches 95% without it. The CPU preset is the fastest setting measured to reach 95%
# on two seeds: width 24 (a step 22% shorter than width 32's) at a peak learning rate of 2e-3, 1,150
# steps (BENCHMARKS.md, "What made training faster").
PRESETS = {
    "cpu": dict(image_size=16, base_channels=24, steps=1150, batch_size=64, lr=2e-3, attention_levels=(2,)),
    "gpu": dict(image_size=32, base_channels=64, steps=4000, batch_size=128, attention_levels=(2,),
                two_object_fraction=0.3),
}


class EMA:
    """Exponential moving average of the weights, shadow <- decay * shadow + (1 - decay) * weights,
    with diffusers' EMAModel warm-up of the decay: 0 at the first update (the shadow starts as the
    weights after it), then decay_k = min(max_decay, (1 + k) / (10 + k)) at update k + 1 (EMAModel's
    get_decay(k + 1)). `max_decay` is a cap the warm-up reaches only after about 9 / (1 - max_decay)
    updates: 0.999 after 8,991; at 2,400 steps the decay is 0.9963, an average over roughly the
    last 270 steps.

    The parameters and buffers are listed once (the tensors `state_dict` hands out share the
    model's storage), so an update is one foreach lerp over cached lists."""

    def __init__(self, model: torch.nn.Module, max_decay: float):
        self.max_decay = max_decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
        self._sources: list[torch.Tensor] | None = None

    @staticmethod
    def decay_at(step: int, max_decay: float) -> float:
        """The decay of the update after optimizer step `step` (0-based), as diffusers' EMAModel.get_decay."""
        return 0.0 if step == 0 else min(max_decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        if self._sources is None:
            state = model.state_dict()
            self._sources = [state[k].detach() for k in self.shadow]
        decay = self.decay_at(step, self.max_decay)
        torch._foreach_lerp_(list(self.shadow.values()), [s.float() for s in self._sources], 1 - decay)

    def averaged_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """A copy of `model` holding the averaged weights (what train.py saves), in eval mode."""
        averaged = copy.deepcopy(model)
        averaged.load_state_dict(self.shadow)
        return averaged.eval()


def apply_gradients(model, optimizer, ema: EMA, loss: torch.Tensor, step: int, grad_clip: float,
                    scaler: torch.amp.GradScaler | None = None) -> None:
    """Backward, clip the gradient norm, one Adam step, then the EMA. A non-finite gradient
    norm raises before anything is applied (under DDP it is the same on every rank: the
    gradients are averaged by then).

    With fp16 autocast (CUDA cards without bf16) a `torch.amp.GradScaler` scales the loss so
    that small gradients survive fp16; its non-finite steps are the scaler's to skip (it
    lowers the scale), so the non-finite check then applies to the unscaled loss only."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if not torch.isfinite(grad_norm):
            raise FloatingPointError(f"gradient norm became {grad_norm.item()} at step {step + 1}")
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
    ema.update(model, step)


def make_optimizer(model: torch.nn.Module, lr: float, device: torch.device, weight_decay: float = 0.0):
    """Adam (AdamW when `weight_decay` > 0), with PyTorch's fused kernel on CPU and CUDA (one
    kernel for all parameters, a few % faster than the loop; MPS keeps the default)."""
    fused = {"fused": True} if device.type in ("cpu", "cuda") else {}
    if weight_decay > 0:
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, **fused)
    return torch.optim.Adam(model.parameters(), lr=lr, **fused)  # no weight decay: small models, short runs


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


def min_snr_weights(schedule: NoiseSchedule, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """min(SNR_t, gamma) / SNR_t for each timestep, SNR_t = alpha-bar_t / (1 - alpha-bar_t): the
    min-SNR-gamma weights of Hang et al. 2023 (sec. 3.4) for an epsilon-predicting model, as
    diffusers' train_text_to_image.py computes them with training_utils.compute_snr."""
    alpha_bar = schedule.alphas_cumprod[timesteps]
    snr = alpha_bar / (1 - alpha_bar)
    return snr.clamp(max=gamma) / snr


def diffusion_loss(model, tokenizer, schedule: NoiseSchedule | FlowMatchEulerScheduler, images, captions, generator,
                   caption_dropout, device, shard: tuple[int, int] = (0, 1), precision: torch.dtype | None = None,
                   snr_gamma: float | None = None):
    """The training loss per sample, and the timesteps drawn: L_simple of Ho et al. 2020 (eq. 14)
    with a DDPM `schedule` (times the min-SNR weights with `snr_gamma`), the flow-matching loss
    with a `FlowMatchEulerScheduler` (module doc). `model` may be the TextToImageModel itself or a
    wrapper of it (compiled, DDP); `precision` the autocast dtype (None: the device's choice, see
    runtime.precision_for).

    `shard` = (rank, world_size): `images` is this rank's slice of a global batch of
    world_size x B samples. The caption dropout, timesteps and noise are drawn for the whole
    global batch and sliced, so every sample gets the numbers it would get in one process
    with the global batch (the ranks share one generator, in step)."""
    rank, world_size = shard
    b = images.shape[0]
    mine = slice(rank * b, (rank + 1) * b)
    drop = (torch.rand(world_size * b, generator=generator) < caption_dropout)[mine]
    captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
    t = schedule.sample_training_timesteps(world_size * b, generator)[mine]  # DDPM: integer t; flow: sigma * T
    noise = torch.randn((world_size * b, *images.shape[1:]), generator=generator)[mine]
    x_t = schedule.add_noise(images, noise, t)  # DDPM: Ho eq. 4; flow: (1 - sigma) x_0 + sigma eps
    target = schedule.training_target(images, noise)  # DDPM: eps; flow: eps - x_0
    ids, mask = tokenizer(captions)
    with autocast(device, precision):
        pred = model(x_t.to(device), t.to(device), ids.to(device), mask.to(device))
    per_sample = F.mse_loss(pred.float(), target.to(device), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(schedule, t, snr_gamma).to(per_sample)
    return per_sample, t


def training_schedule(config: SchedulerConfig | FlowMatchConfig) -> NoiseSchedule | FlowMatchEulerScheduler:
    """The forward process a model's config names: DDPM's, or rectified flow's."""
    return FlowMatchEulerScheduler(config) if isinstance(config, FlowMatchConfig) else NoiseSchedule(config)


@torch.no_grad()
def sample_grid(model: TextToImageModel, prompts: list[str], seed: int = 0, steps: int = 25,
                per_prompt: int = 1) -> Image.Image:
    """`per_prompt` samples of each prompt, 6 to a row; labelled unless the prompt is empty."""
    from .pipeline import MiniDiffusionPipeline  # the pipeline imports training's neighbours, not training

    pipe = MiniDiffusionPipeline(model, device=next(model.parameters()).device)
    out = pipe.sample(prompts, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                      num_images_per_prompt=per_prompt)
    labels = [short_label(p) for p in prompts for _ in range(per_prompt)]
    return make_grid(out.images, labels=labels if any(labels) else None, columns=6, scale=4)


def short_label(prompt: str, width: int = 28) -> str:
    prompt = prompt.removeprefix("a ")
    return prompt if len(prompt) <= width else prompt[: width - 3] + "..."


def latest_checkpoint(out) -> Path | None:
    """The newest complete checkpoint of the run in `out` (half-written ones are named .tmp-*)."""
    found = sorted((Path(out) / "checkpoints").glob("step-*"))
    return found[-1] if found else None


def read_train_state(checkpoint: Path) -> dict:
    """state.json of a resumable checkpoint, checked for format and version."""
    state = read_json(Path(checkpoint) / "state.json")
    if state.get("format") != TRAIN_STATE_FORMAT:
        raise CheckpointError(f"{checkpoint} is not a minidiff training checkpoint (its state.json has no "
                              f"\"format\": \"{TRAIN_STATE_FORMAT}\")")
    if state.get("format_version") != TRAIN_STATE_VERSION:
        raise CheckpointError(f"{checkpoint} was written by an incompatible minidiff (training state format "
                              f"{state.get('format_version')}, this version reads {TRAIN_STATE_VERSION}); "
                              f"start a new run or use the minidiff version that wrote it")
    if not isinstance(state.get("step"), int) or not isinstance(state.get("train_config"), dict):
        raise CheckpointError(f"{checkpoint / 'state.json'} has no step or train_config; the checkpoint is corrupt")
    return state


def config_for_resume(checkpoint: Path, given: dict) -> tuple[TrainConfig, dict]:
    """The training config of a resumed run: the checkpoint's, with the settings in `given`
    (what the user asked for) applied where RUN_SETTINGS allows. Returns it and the changes,
    {name: (old, new)}. A request to change anything else is refused, so flags can never
    quietly train a different model than the checkpoint's."""
    state = read_train_state(checkpoint)
    try:
        config = TrainConfig.from_dict(state["train_config"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{checkpoint / 'state.json'} holds an invalid train_config ({error})") from None
    changes = {}
    for name, value in given.items():
        old = getattr(config, name)
        if value is None or value == old:
            continue
        if name not in RUN_SETTINGS:
            raise ValueError(f"--{name.replace('_', '-')} {value} differs from the resumed run's {old}; a run keeps "
                             f"its model, data and batch: drop the flag, or start a new run with another --out")
        changes[name] = (old, value)
        setattr(config, name, value)
    if config.steps < state["step"]:
        raise ValueError(f"--steps {config.steps} is below the step the run has reached ({state['step']}); "
                         f"pass --steps {state['step']} or more")
    return config, changes


@contextlib.contextmanager
def stop_requests():
    """While training, Ctrl-C (SIGINT) and SIGTERM ask the loop to stop after the current
    step and save; a second Ctrl-C stops at once, without saving. Yields a list that gets
    the signal number. (Signals can only be caught on the main thread; elsewhere, no-op.)"""
    received: list[int] = []

    def handler(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)
        print("\nstopping after this step and saving (Ctrl-C again: quit without saving)", file=sys.stderr)

    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class Trainer:
    """Trains a TextToImageModel on `dataset` (default: the one config.data names).

    For data parallelism: `rank` and `world_size`, `wrap(model)` -> the module forward and
    backward run through (DDP), and `sync_stop(code)` -> the code every rank acts on (an
    all-reduce max); train.py builds them. Only rank 0 logs, samples and saves."""

    def __init__(self, config: TrainConfig, dataset=None, rank: int = 0, world_size: int = 1, wrap=None,
                 sync_stop=None):
        self.config, self.rank, self.world_size = config, rank, world_size
        self.sync_stop = sync_stop or (lambda code: code)
        self.out = Path(config.out)
        self.device = pick_device(config.device)
        self.dataset = dataset if dataset is not None else load_dataset(
            config.data, config.image_size, config.seed, config.data_root, config.two_object_fraction)
        torch.manual_seed(config.seed)  # weight initialisation
        unet = UNetConfig(image_size=config.image_size, base_channels=config.base_channels,
                          channel_mults=config.channel_mults, attention_levels=config.attention_levels)
        self.model = TextToImageModel.for_captions(
            self.dataset.captions(), unet, config.text_dim, config.scheduler_config()).to(self.device)
        self.model.to(memory_format=torch.channels_last)  # convolutions run a few % faster (BENCHMARKS.md)
        self.schedule = training_schedule(self.model.config.scheduler)
        self.ema = EMA(self.model, config.ema_decay)
        self.optimizer = make_optimizer(self.model, config.lr, self.device)
        # bf16 autocast where the GPU has bf16, fp16 + a gradient scaler on older CUDA cards, else float32
        self.precision = precision_for(self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == torch.float16 else None
        self.generator = torch.Generator().manual_seed(config.seed)  # the same on every rank: see diffusion_loss
        self.step = 0
        # what forward/backward runs through: compiled and/or DDP-wrapped, same parameters
        self.train_model = wrap(self.model) if wrap is not None else self.model
        if config.compile:
            self.train_model = torch.compile(self.train_model)
        self.loss_rows: list[dict] = []
        self.window = new_log_window()  # the loss since the last row of loss_rows (checkpointed too)

    # ---- checkpoints -------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoints"

    def save_checkpoint(self) -> Path:
        """Everything needed to continue bit for bit (weights, EMA, AdamW moments, generator
        state, step; the data position and learning rate follow from the step), in
        safetensors + JSON, written to a temporary folder and renamed into place, so a
        half-written checkpoint never counts. A step saved once is not written again: the
        state at a step is the same whenever it is reached."""
        final = self.checkpoint_dir / f"step-{self.step:08d}"
        if not final.is_dir():
            for stale in self.checkpoint_dir.glob(".tmp-step-*"):  # left by a run killed while saving
                shutil.rmtree(stale, ignore_errors=True)
            tmp = self.checkpoint_dir / f".tmp-step-{self.step:08d}"
            write_safetensors(tmp / "model.safetensors", self.model.state_dict())
            write_safetensors(tmp / "ema.safetensors", self.ema.shadow)
            write_safetensors(tmp / "optimizer.safetensors", optimizer_tensors(self.optimizer))
            write_safetensors(tmp / "rng.safetensors", {"generator": self.generator.get_state()})
            write_json(tmp / "state.json", {
                "format": TRAIN_STATE_FORMAT, "format_version": TRAIN_STATE_VERSION, "step": self.step,
                "train_config": self.config.to_dict(), "loss_rows": self.loss_rows,
                "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "log_window": {**self.window, "bins": self.window["bins"].tolist()}})
            tmp.rename(final)
        for old in sorted(self.checkpoint_dir.glob("step-*"))[: -self.config.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load_checkpoint(self, path: Path) -> None:
        """Read a whole checkpoint first, then change the trainer: a bad file changes nothing."""
        path = Path(path)
        state = read_train_state(path)
        model = read_safetensors(path / "model.safetensors")
        ema = read_safetensors(path / "ema.safetensors")
        optimizer = read_safetensors(path / "optimizer.safetensors")
        rng = read_safetensors(path / "rng.safetensors")
        try:
            self.model.load_state_dict(model)
            # empty_like keeps each tensor's memory format (channels_last): the same kernels as before the stop
            self.ema.shadow = {k: torch.empty_like(v).copy_(ema[k]) for k, v in self.ema.shadow.items()}
            load_optimizer_tensors(self.optimizer, optimizer)
            self.generator.set_state(rng["generator"])
        except (KeyError, RuntimeError, ValueError) as error:
            reason = " ".join(str(error).split())[:200]
            raise CheckpointError(f"{path} does not fit this run's model ({reason}); the checkpoint is partial, "
                                  f"corrupt or from another run, or the data's captions changed since") from None
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        self.step = state["step"]
        self.loss_rows = state.get("loss_rows", [])
        window = state.get("log_window")
        if window:
            self.window = {**window, "bins": torch.tensor(window["bins"])}

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.out)

    def save_pipeline(self) -> None:
        """The EMA weights as a sampling checkpoint: `out`/config.json + model.safetensors."""
        save_model(self.out, self.model, self.ema.shadow, trained_steps=self.step)

    def save(self) -> None:
        """A resumable checkpoint and the sampling model, together: `model.safetensors` never lags
        behind the checkpoints (sample.py and evaluate read it)."""
        self.save_checkpoint()
        self.save_pipeline()

    def periodic_reports(self) -> None:
        c = self.config
        if c.sample_every and self.step % c.sample_every == 0:
            self.write_samples(f"step-{self.step:08d}")
        if c.checkpoint_every and self.step % c.checkpoint_every == 0:
            self.save()

    def final_reports(self) -> None:
        self.save()
        self.write_samples("final")
        self.write_loss_log()

    def on_main_rank(self, work) -> None:
        """Run `work` on rank 0 (writing samples and checkpoints). Under DDP every rank then
        learns whether it failed, so that an error on rank 0 stops all ranks at once instead of
        leaving them waiting in the next all-reduce until a timeout."""
        error = None
        if self.rank == 0:
            try:
                work()
            except BaseException as caught:  # KeyboardInterrupt too: the other ranks must not wait
                error = caught
        if self.world_size > 1 and self.sync_stop(FAILED if error is not None else GO_ON) == FAILED and error is None:
            raise RuntimeError("rank 0 failed while saving or sampling; see its error")
        if error is not None:
            raise error

    # ---- the loop ----------------------------------------------------------------------
    def ema_model(self) -> TextToImageModel:
        return self.ema.averaged_model(self.model)

    def stop_code(self, loss: torch.Tensor, signals: list, start_time: float) -> int:
        """This rank's view: should training stop now? (Rank 0 alone keeps the clock.)"""
        if not torch.isfinite(loss):
            return NOT_FINITE
        if signals:
            return INTERRUPTED
        minutes = self.config.max_minutes
        if self.rank == 0 and minutes is not None and time.monotonic() - start_time > 60 * minutes:
            return TIME_LIMIT
        return GO_ON

    def train(self) -> dict:
        c = self.config
        is_main = self.rank == 0
        start_time = time.monotonic()
        self.throughput = [0, time.monotonic()]  # images and start time of the log window (not checkpointed)
        stop_reason = "done"
        with stop_requests() as signals:
            with tqdm(total=c.steps, initial=self.step, disable=not is_main, unit="step", dynamic_ncols=True) as bar:
                while self.step < c.steps:
                    # the random state before this step: a stop below throws the step away, and the
                    # checkpoint must then hold the state that draws this step's numbers again
                    rng_at_step = self.generator.get_state()
                    indices = batch_indices(self.step, c.batch_size, self.rank, self.world_size)
                    images, captions = load_batch(self.dataset, indices)
                    lr = learning_rate(c, self.step)
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr
                    self.model.train()
                    per_sample, t = diffusion_loss(self.train_model, self.model.tokenizer, self.schedule, images,
                                                   captions, self.generator, c.caption_dropout, self.device,
                                                   shard=(self.rank, self.world_size), precision=self.precision,
                                                   snr_gamma=c.snr_gamma)
                    loss = per_sample.mean()
                    # every rank acts on the same decision, so that all stop after the same step
                    stop = self.sync_stop(self.stop_code(loss, signals, start_time))
                    if stop == NOT_FINITE:  # nothing of this step is applied; the checkpoints stay as they were
                        value = loss.item() if not torch.isfinite(loss) else "non-finite on another rank"
                        raise FloatingPointError(f"loss became {value} at step {self.step + 1}")
                    if stop != GO_ON:
                        self.generator.set_state(rng_at_step)  # the step is not applied: undo its draws
                        stop_reason = "interrupted" if stop == INTERRUPTED else f"time limit of {c.max_minutes} min"
                        break
                    apply_gradients(self.model, self.optimizer, self.ema, loss, self.step, c.grad_clip, self.scaler)
                    self.step += 1
                    if is_main:
                        self.record_loss(per_sample.detach(), t, lr, images.shape[0] * self.world_size, bar)
                    if (c.sample_every and self.step % c.sample_every == 0) or (
                            c.checkpoint_every and self.step % c.checkpoint_every == 0):
                        self.on_main_rank(self.periodic_reports)
            if is_main:  # still inside stop_requests: a first Ctrl-C now waits for the save
                print(f"saving the model and sample grid (step {self.step})", file=sys.stderr)
            self.on_main_rank(self.final_reports)
        return {"step": self.step, "stop_reason": stop_reason, "seconds": time.monotonic() - start_time}

    def record_loss(self, per_sample: torch.Tensor, t: torch.Tensor, lr: float, images: int, bar) -> None:
        """Add a step to the log window; every log_every steps, close it into a loss_rows row
        (mean loss, learning rate, images/s, and the loss per timestep bin).
        The loss logged is rank 0's share of the global batch."""
        w, c = self.window, self.config
        per_sample = per_sample.float().cpu()
        b = (t * LOSS_BINS // self.schedule.num_train_timesteps).long().clamp(max=LOSS_BINS - 1)
        w["bins"][0].index_add_(0, b, per_sample)
        w["bins"][1].index_add_(0, b, torch.ones_like(per_sample))
        w["loss"] += per_sample.mean().item()
        w["steps"] += 1
        self.throughput[0] += images
        bar.update(1)
        if self.step % c.log_every == 0 or self.step == c.steps:
            elapsed = time.monotonic() - self.throughput[1]
            row = {"step": self.step, "loss": w["loss"] / w["steps"], "lr": lr,
                   "images_per_s": self.throughput[0] / max(elapsed, 1e-9)}
            row.update({f"loss_t{i}": (w["bins"][0, i] / w["bins"][1, i].clamp(min=1)).item() for i in range(LOSS_BINS)})
            self.loss_rows.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.0f}")
            self.window = new_log_window()
            self.throughput = [0, time.monotonic()]

    # ---- reports -----------------------------------------------------------------------
    def write_samples(self, name: str) -> None:
        """Shapes: one image for each of its 18 captions (minidiff.evaluate scores them).
        Other data: a row of 6 per caption (the most frequent ones), or 12 unconditional
        samples; for data we cannot score, this grid is the report."""
        prompts = sample_prompts(self.dataset)
        per_prompt = 1 if isinstance(self.dataset, Shapes) else 12 if prompts == [""] else 6
        grid = sample_grid(self.ema_model(), prompts, seed=self.config.seed, per_prompt=per_prompt)
        atomic_write(self.out / "samples" / f"{name}.png", lambda tmp: grid.save(tmp, format="PNG"))

    def write_loss_log(self) -> None:
        if not self.loss_rows:
            return
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(self.loss_rows[0]))
        writer.writeheader()
        writer.writerows(self.loss_rows)
        atomic_write(self.out / "loss.csv", lambda tmp: Path(tmp).write_text(text.getvalue()))
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [r["step"] for r in self.loss_rows]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(steps, [r["loss"] for r in self.loss_rows], label="all t", color="black")
        for i in range(LOSS_BINS):
            lo, hi = i * self.schedule.num_train_timesteps // LOSS_BINS, (i + 1) * self.schedule.num_train_timesteps // LOSS_BINS
            ax.plot(steps, [r[f"loss_t{i}"] for r in self.loss_rows], label=f"t in [{lo}, {hi})", alpha=0.6)
        ax.set(xlabel="step", ylabel="MSE on the noise" if self.model.config.objective == "ddpm" else "MSE on the velocity", yscale="log", title="training loss")
        ax.legend()
        fig.tight_layout()
        atomic_write(self.out / "loss.png", lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
        plt.close(fig)


def new_log_window() -> dict:
    """Sums of the loss since the last log row: overall, and per timestep bin (sum, count)."""
    return {"loss": 0.0, "steps": 0, "bins": torch.zeros(2, LOSS_BINS)}


def sample_prompts(dataset) -> list[str]:
    """What the sample grids show: the data set's choice, else its first distinct captions."""
    if hasattr(dataset, "sample_prompts"):
        return dataset.sample_prompts()
    return sorted(set(dataset.captions()))[:10]


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
    # the moments in each parameter's memory format (channels_last), as they were before saving:
    # fused kernels may round differently on another layout, and resume must be bit for bit
    for group in optimizer.param_groups:
        for param in group["params"]:
            for name, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value) and value.shape == param.shape:
                    optimizer.state[param][name] = torch.empty_like(param).copy_(value)
