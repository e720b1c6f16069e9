"""Training: the loss of either objective, one optimizer step, and a short loop.

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

Both are one function, `diffusion_loss`: the model's objective says how t is drawn
(`sample_training_timesteps`), how x_0 is noised (`add_noise`) and what the network must
predict (`training_target`). In both, the caption is replaced by the empty prompt 10% of
the time, so that the same network also learns the unconditional prediction that
classifier-free guidance needs.

All randomness of a run (caption dropout, timesteps, noise) comes from one `torch.Generator` and
the data is indexed by step, so `TrainState` is the whole state of a run: `minidiff.tools.trainer`
saves it, resumes it bit for bit, and runs the same `train_step` under torchrun.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F

from .data import Shapes
from .flow import FlowMatchConfig
from .model import TextToImageModel
from .runtime import autocast, pick_device, precision_for
from .scheduler import SchedulerConfig
from .unet import UNetConfig


@dataclass
class TrainConfig:
    """A training run. The defaults are the CPU preset, the run `python train.py` makes on a
    laptop; `PRESETS["gpu"]` lists what the GPU run changes."""

    # the model
    image_size: int = 16
    base_channels: int = 24
    channel_mults: tuple[int, ...] = (1, 2, 2)
    attention_levels: tuple[int, ...] = (2,)  # UNet levels (0 = full size) with attention
    text_dim: int = 128
    objective: str = "flow"  # "flow" (rectified flow: predict the velocity, as SD3) or "ddpm" (predict the noise)
    beta_schedule: str = "cosine"  # ddpm only
    shift: float = 1.0  # flow only: the sampling shift of Esser et al. eq. 23 (SD3.5: 3.0)
    # the optimization
    steps: int = 1150
    batch_size: int = 64
    lr: float = 2e-3  # peak learning rate
    warmup_steps: int = 100
    seed: int = 0
    snr_gamma: float | None = None  # ddpm only: min-SNR-gamma loss weighting (5 is the paper's); None: L_simple
    caption_dropout: float = 0.1
    ema_decay: float = 0.999  # the cap of the EMA's warm-up (see EMA)
    grad_clip: float = 1.0
    precision: str = "auto"  # "float32", "bf16" (autocast), or "auto": `training_precision`
    # the data
    data: str = "shapes"  # or mnist, fashion-mnist, cifar10, or an image folder (tools.datasets.load_dataset)
    data_root: str | None = None  # torchvision download cache (default ~/.cache/minidiff)
    two_object_fraction: float = 0.0  # Shapes only
    # the run (tools.trainer)
    out: str = "runs/shapes"
    device: str | None = None
    compile: bool = False
    sample_every: int = 1000
    checkpoint_every: int = 500
    keep: int = 2  # training-state checkpoints kept
    log_every: int = 50
    max_minutes: float | None = None

    def __post_init__(self):
        if self.objective not in ("ddpm", "flow"):
            raise ValueError(f"objective must be one of ('ddpm', 'flow'), got {self.objective!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.snr_gamma is not None and (self.objective != "ddpm" or not self.snr_gamma > 0):
            raise ValueError(f"snr_gamma (min-SNR weighting) must be above 0 and needs objective 'ddpm' "
                             f"(it weights the noise-prediction loss), got {self.snr_gamma} with {self.objective!r}")

    def backbone_config(self) -> UNetConfig:
        """The denoising network this run trains (its text width is set from `text_dim`)."""
        return UNetConfig(image_size=self.image_size, base_channels=self.base_channels,
                          channel_mults=self.channel_mults, attention_levels=self.attention_levels)

    def scheduler_config(self) -> SchedulerConfig | FlowMatchConfig:
        """The noise schedule the model is trained with (saved in its config.json)."""
        return FlowMatchConfig(shift=self.shift) if self.objective == "flow" else SchedulerConfig(
            beta_schedule=self.beta_schedule)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown training settings {', '.join(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


PRECISIONS = ("auto", "float32", "bf16")


def training_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a run: None for "float32", bf16 for "bf16"; for "auto" what the device
    computes natively (`runtime.precision_for`) on a GPU, and float32 on the CPU: there bf16 autocast
    is opt-in (`--precision bf16`), as it made the CPU preset's step only 1.02-1.03x as fast on an
    AVX512-BF16 EPYC, at the same accuracy."""
    if precision == "auto":
        return precision_for(device) if device.type != "cpu" else None
    return torch.bfloat16 if precision == "bf16" else None


PRESETS = {  # train.py --preset: what each run changes of TrainConfig's defaults (BENCHMARKS.md measures them)
    "cpu": {},
    "gpu": dict(image_size=32, base_channels=64, steps=4000, batch_size=128, lr=1e-3, two_object_fraction=0.3),
}


def build_model(config: TrainConfig, captions) -> TextToImageModel:
    """The model a run starts from: weights drawn from `config.seed`, vocabulary from `captions`."""
    torch.manual_seed(config.seed)
    return TextToImageModel.for_captions(captions, config.backbone_config(), config.text_dim, config.scheduler_config())


class EMA:
    """Exponential moving average of the weights, shadow <- decay * shadow + (1 - decay) * weights,
    with diffusers' EMAModel warm-up of the decay: 0 at the first update, then
    decay_k = min(max_decay, (1 + k) / (10 + k)) at update k + 1 (EMAModel.get_decay(k + 1)); the
    cap is reached only after about 9 / (1 - max_decay) updates. (An update is one foreach lerp
    over the model's tensors, listed once: `state_dict` hands out views of their storage.)"""

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
        """A copy of `model` with the averaged weights (what training saves), in eval mode."""
        averaged = copy.deepcopy(model)
        averaged.load_state_dict(self.shadow)
        return averaged.eval()


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def make_optimizer(model: torch.nn.Module, lr: float, device: torch.device, weight_decay: float = 0.0):
    """Adam (AdamW when `weight_decay` > 0), fused into one kernel on CPU and CUDA."""
    fused = {"fused": True} if device.type in ("cpu", "cuda") else {}
    if weight_decay > 0:
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, **fused)
    return torch.optim.Adam(model.parameters(), lr=lr, **fused)  # no weight decay: small models, short runs


def batch_indices(step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> range:
    """The dataset indices of one step: each rank reads its own slice of the global batch."""
    start = (step * world_size + rank) * batch_size
    return range(start, start + batch_size)


def load_batch(dataset, indices, device=None) -> tuple[torch.Tensor, list[str]]:
    """(images (B, 3, H, W), captions): drawn at once on `device` by a set with `batch` (Shapes),
    else read one by one and stacked."""
    if hasattr(dataset, "batch"):
        return dataset.batch(indices, device)
    items = [dataset[i] for i in indices]
    return torch.stack([image for image, _ in items]).to(device), [caption for _, caption in items]


def diffusion_loss(model, tokenizer, objective, images, captions, generator, caption_dropout, device,
                   shard: tuple[int, int] = (0, 1), precision: torch.dtype | None = None,
                   snr_gamma: float | None = None):
    """The training loss per sample, and the timesteps drawn (module doc). `model` may be the
    TextToImageModel or a wrapper of it (compiled, DDP); `precision` the autocast dtype.
    `shard` = (rank, world_size): `images` is this rank's slice of a global batch; the dropout,
    timesteps and noise are drawn for the whole global batch and sliced, so every sample gets
    the numbers it would get in one process (the ranks share one generator, in step)."""
    rank, world_size = shard
    b = images.shape[0]
    mine = slice(rank * b, (rank + 1) * b)
    drop = (torch.rand(world_size * b, generator=generator) < caption_dropout)[mine]
    captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
    t = objective.sample_training_timesteps(world_size * b, generator)[mine]  # DDPM: integer t; flow: sigma * T
    noise = torch.randn((world_size * b, *images.shape[1:]), generator=generator)[mine].to(images.device)
    x_t = objective.add_noise(images, noise, t.to(images.device))  # DDPM: Ho eq. 4; flow: (1 - sigma) x_0 + sigma eps
    target = objective.training_target(images, noise)  # DDPM: eps; flow: eps - x_0
    ids, mask = tokenizer(captions)
    with autocast(device, precision):
        pred = model(x_t.to(device), t.to(device), ids.to(device), mask.to(device))
    per_sample = F.mse_loss(pred.float(), target.to(device), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        per_sample = per_sample * objective.min_snr_weights(t, snr_gamma).to(per_sample)
    return per_sample, t


def apply_gradients(model, optimizer, ema: EMA, loss: torch.Tensor, step: int, grad_clip: float,
                    scaler: torch.amp.GradScaler | None = None) -> None:
    """Backward, clip the gradient norm, one Adam step, then the EMA; a non-finite gradient norm
    raises before anything is applied. With fp16 (CUDA cards without bf16) a `GradScaler` scales
    the loss so that small gradients survive, and skips its own non-finite steps."""
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


class TrainState:
    """Everything a run changes as it trains: the model, its EMA, the optimizer, the generator,
    the step. `train_step` is one step of Algorithm 1 (or its flow twin)."""

    def __init__(self, config: TrainConfig, captions=(), model: TextToImageModel | None = None, optimizer=None):
        self.config = config
        self.device = pick_device(config.device)
        self.model = (model if model is not None else build_model(config, captions)).to(self.device)
        self.model.to(memory_format=torch.channels_last)  # convolutions run a few % faster
        self.objective = self.model.objective
        self.ema = EMA(self.model, config.ema_decay)
        self.optimizer = optimizer or make_optimizer(self.model, config.lr, self.device)
        # "auto": bf16 autocast where the GPU has bf16, fp16 + a gradient scaler on older CUDA cards, else float32
        self.precision = training_precision(config.precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == torch.float16 else None
        self.generator = torch.Generator().manual_seed(config.seed)
        self.train_model = self.model  # what forward/backward runs through (the trainer may compile or wrap it)
        self.step, self.lr = 0, None

    def learning_rate(self) -> float:
        return learning_rate(self.config, self.step)

    def train_step(self, images, captions, shard: tuple[int, int] = (0, 1), should_stop=None):
        """Loss, then (unless `should_stop(loss)` says so) gradients, optimizer and EMA.
        -> (loss per sample, timesteps drawn), or None when stopped before any update."""
        self.lr = self.learning_rate()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        self.model.train()
        per_sample, t = diffusion_loss(self.train_model, self.model.tokenizer, self.objective, images, captions,
                                       self.generator, self.config.caption_dropout, self.device, shard=shard,
                                       precision=self.precision, snr_gamma=self.config.snr_gamma)
        loss = per_sample.mean()
        if should_stop is not None and should_stop(loss):
            return None
        apply_gradients(self.model, self.optimizer, self.ema, loss, self.step, self.config.grad_clip, self.scaler)
        self.step += 1
        return per_sample, t

    def ema_model(self) -> TextToImageModel:
        return self.ema.averaged_model(self.model)


def train(config: TrainConfig, dataset=None):
    """The whole loop, without checkpoints, logs or signals (`python train.py` adds them):
    yields the state after every step; `state.ema_model()` is the model to sample from.

        for state in train(TrainConfig(steps=300)):
            pass
        pipe = MiniDiffusionPipeline(state.ema_model())"""
    dataset = dataset or Shapes(config.image_size, seed=config.seed, two_object_fraction=config.two_object_fraction)
    state = TrainState(config, dataset.captions())
    while state.step < config.steps:
        state.train_step(*load_batch(dataset, batch_indices(state.step, config.batch_size), state.device))
        yield state
