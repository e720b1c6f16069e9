"""Training: the loss of either objective, one optimizer step, and a short loop.

DDPM (`objective="ddpm"`; Ho et al. 2020, Algorithm 1 and eq. 14, "L_simple"):

    x_0 ~ data, t ~ Uniform{0..T-1}, eps ~ N(0, I)
    x_t = sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) eps            (eq. 4)
    loss = || eps - eps_theta(x_t, t, caption) ||^2

Rectified flow (`objective="flow"`; Liu et al. 2022, Lipman et al. 2023; as SD3, Esser et al. 2024):

    x_0 ~ data, sigma ~ logit-normal (Esser sec. 3.1), shifted (eq. 23), eps ~ N(0, I)
    x_sigma = (1 - sigma) x_0 + sigma eps                 (Esser eq. 2, a_t = 1 - t, b_t = t: eq. 13)
    loss = || (eps - x_0) - v_theta(x_sigma, sigma * T, caption) ||^2  (the velocity along the line)

DDPM may weight each sample's loss by min(SNR_t, gamma) / SNR_t, SNR_t = alpha-bar_t / (1 - alpha-bar_t)
(min-SNR-gamma, Hang et al. 2023 sec. 3.4, `snr_gamma`). Why: eq. 15 gives x_0 - x0_theta =
(eps_theta - eps) / sqrt(SNR_t), so ||eps - eps_theta||^2 = SNR_t ||x_0 - x0_theta||^2: the noise loss
is the x_0 loss weighted by SNR_t, which grows without bound as t -> 0; the weight caps it at gamma.

A latent model (Rombach et al. 2022, as SD3) learns the same loss on x_0 = (z - shift) * scale, z ~ q(z|x)
its frozen autoencoder's latent of the picture (SD3's scripts: `vae.encode(pixels).latent_dist.sample()`).

The model's objective says how t is drawn, how x_0 is noised and what the network must predict;
`diffusion_loss` asks it. The caption is replaced by the empty prompt 10% of the time, so that the
network also learns the unconditional prediction that classifier-free guidance needs. All randomness
of a run comes from one `torch.Generator` and the data is indexed by step, so `TrainState` is the
whole state of a run: `minidiff.tools.trainer` saves it and resumes it bit for bit.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .autoencoder import Autoencoder, AutoencoderConfig
from .flow import FlowMatchConfig
from .mmdit import MMDiTConfig
from .model import TextToImageModel
from .runtime import autocast, pick_device, precision_for
from .scheduler import SchedulerConfig
from .unet import UNetConfig


@dataclass
class TrainConfig:
    """A training run. The defaults are the CPU preset (`python train.py`); `tools.trainer.PRESETS` the GPU's."""

    # the model
    image_size: int = 16
    backbone: str = "unet"  # "unet", or "mmdit" (SD3.5's transformer, minidiff/mmdit.py)
    base_channels: int = 24  # unet: width
    channel_mults: tuple[int, ...] = (1, 2, 2)  # unet
    attention_levels: tuple[int, ...] = ()  # unet: levels (0 = full size) with attention, besides the middle block
    num_layers: int = 4  # mmdit: joint blocks
    num_heads: int = 4  # mmdit: width = num_heads * head_dim
    head_dim: int = 16  # mmdit
    patch_size: int = 2  # mmdit: p x p pixels per image token
    text_dim: int = 128
    text_clip_init: bool = False  # text encoder: words start at std 0.02 as its positions (CLIP); two objects need it
    objective: str = "flow"  # "flow" (predict the velocity, as SD3) or "ddpm" (predict the noise)
    beta_schedule: str = "cosine"  # ddpm
    shift: float = 0.5  # flow: the timestep shift of Esser et al. eq. 23 (SD3.5 at 1024 px: 3.0; below 1 at 16 px)
    latent: bool = False  # denoise an autoencoder's latents, not pixels
    autoencoder: str | None = None  # latent: the autoencoder folder; None: train one first (tools.trainer)
    autoencoder_steps: int = 2400  # latent: the autoencoder's training steps, when trained first
    autoencoder_down_factor: int = 4  # latent: f of that autoencoder (latents f times smaller a side)
    cache_latents: int = 0  # latent: encode this many pictures once, then draw z ~ q(z|x) each step (tools.trainer)
    # the optimization
    steps: int = 850
    batch_size: int = 64
    lr: float = 2e-3  # peak learning rate
    warmup_steps: int = 50
    seed: int = 0
    snr_gamma: float | None = None  # ddpm: min-SNR-gamma weighting (the paper's: 5); None: L_simple
    caption_dropout: float = 0.1
    ema_decay: float = 0.999  # the cap of the EMA's warm-up (see EMA)
    grad_clip: float = 1.0
    mixed_precision: str = "auto"  # "no" (float32), "bf16", "fp16", or "auto": minidiff.runtime.precision_for
    # the data: shapes, mnist, fashion-mnist, cifar10 or an image folder (tools.datasets.load_dataset)
    data: str = "shapes"
    data_root: str | None = None  # torchvision download cache (default ~/.cache/minidiff)
    two_object_fraction: float = 0.0  # Shapes
    renderer: str = "torch"  # Shapes: "torch", a batch at once, or "pil", a picture at a time (tools.shapes)
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
        for name, allowed in (("backbone", ("unet", "mmdit")), ("objective", ("ddpm", "flow")),
                              ("mixed_precision", ("auto", "no", "bf16", "fp16"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.snr_gamma is not None and (self.objective != "ddpm" or not self.snr_gamma > 0):
            raise ValueError(f"snr_gamma (min-SNR weighting) must be above 0 and needs objective 'ddpm' "
                             f"(it weights the noise-prediction loss), got {self.snr_gamma} with {self.objective!r}")

    def backbone_config(self, autoencoder: AutoencoderConfig | None = None) -> UNetConfig | MMDiTConfig:
        """The denoising network; for a latent model sized for the latents of an autoencoder of
        config `autoencoder` (image_size / f a side, its latent channels)."""
        size, channels = self.image_size, 3
        if autoencoder is not None:
            f = autoencoder.down_factor
            if self.image_size % f:
                raise ValueError(f"image size {self.image_size} is not divisible by the autoencoder's down factor {f}")
            size, channels = self.image_size // f, autoencoder.latent_channels
        if self.backbone == "mmdit":  # SD3.5's RMS q/k norm
            return MMDiTConfig(sample_size=size, in_channels=channels, patch_size=self.patch_size,
                               num_layers=self.num_layers, num_attention_heads=self.num_heads,
                               attention_head_dim=self.head_dim, caption_projection_dim=self.num_heads * self.head_dim,
                               qk_norm="rms_norm").with_text_dim(self.text_dim)
        return UNetConfig(image_size=size, in_channels=channels, base_channels=self.base_channels,
                          channel_mults=self.channel_mults, attention_levels=self.attention_levels)

    def scheduler_config(self) -> SchedulerConfig | FlowMatchConfig:
        return FlowMatchConfig(shift=self.shift) if self.objective == "flow" else SchedulerConfig(
            beta_schedule=self.beta_schedule)


def build_model(config: TrainConfig, captions, autoencoder: Autoencoder | None = None) -> TextToImageModel:
    """A run's first model: weights from `config.seed`, words from `captions`, a latent one on its frozen `autoencoder`."""
    if config.latent != (autoencoder is not None):
        raise ValueError("a latent run (latent=True) needs its trained autoencoder, and a pixel run takes none")
    torch.manual_seed(config.seed)
    backbone = config.backbone_config(autoencoder.config if autoencoder is not None else None)
    return TextToImageModel.for_captions(captions, backbone, config.text_dim, config.scheduler_config(), autoencoder,
                                         config.text_clip_init)


class EMA:
    """Exponential moving average of the weights, shadow <- decay * shadow + (1 - decay) * weights,
    with diffusers' EMAModel warm-up: decay_k = min(max_decay, (1 + k) / (10 + k)) at update k + 1
    (0 at the first). Before the cap the window grows with the run: after n updates step j's weight is
    9 (j + 2)(j + 3)...(j + 9) / ((n + 1)(n + 2)...(n + 9)) ~ 9 j^8 / n^9, a mean age of n / 10 steps."""

    def __init__(self, model: torch.nn.Module, max_decay: float):
        self.max_decay = max_decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
        self._sources: list[torch.Tensor] | None = None  # views of the model's tensors, listed once

    @staticmethod
    def decay_at(step: int, max_decay: float) -> float:
        """The decay of the update after optimizer step `step` (0-based), as EMAModel.get_decay."""
        return 0.0 if step == 0 else min(max_decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        if self._sources is None:
            state = model.state_dict()
            self._sources = [state[k].detach() for k in self.shadow]
        decay = self.decay_at(step, self.max_decay)
        torch._foreach_lerp_(list(self.shadow.values()), [s.float() for s in self._sources], 1 - decay)


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def make_optimizer(model: torch.nn.Module, lr: float, device: torch.device, optimizer=torch.optim.Adam, **options):
    """Adam (or `optimizer`, with its `options`), fused into one kernel on CPU and CUDA."""
    fused = {"fused": True} if device.type in ("cpu", "cuda") else {}
    return optimizer(model.parameters(), lr=lr, **options, **fused)


def batch_indices(step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> range:
    """The dataset indices of one step: each rank reads its own slice of the global batch."""
    start = (step * world_size + rank) * batch_size
    return range(start, start + batch_size)


def load_batch(dataset, indices) -> tuple[torch.Tensor, list[str]]:
    items = [dataset[i] for i in indices]
    return torch.stack([image for image, _ in items]), [caption for _, caption in items]


def diffusion_loss(model, tokenizer, objective, images, captions, generator, caption_dropout, device,
                   shard: tuple[int, int] = (0, 1), precision: torch.dtype | None = None,
                   snr_gamma: float | None = None):
    """The loss per sample, and the timesteps drawn (module doc). `model` is the TextToImageModel or
    a wrapper of it (compiled, DDP). With `shard` = (rank, world_size), `images` is this rank's slice
    of a global batch: dropout, timesteps and noise are drawn for the whole batch and sliced."""
    rank, world_size = shard
    b = images.shape[0]
    mine = slice(rank * b, (rank + 1) * b)
    drop = (torch.rand(world_size * b, generator=generator) < caption_dropout)[mine]
    captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
    t = objective.sample_training_timesteps(world_size * b, generator)[mine]  # DDPM: integer t; flow: sigma * T
    noise = torch.randn((world_size * b, *images.shape[1:]), generator=generator)[mine]
    x_t = objective.add_noise(images, noise, t)  # DDPM: Ho eq. 4; flow: (1 - sigma) x_0 + sigma eps
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
    raises first. With fp16 a `GradScaler` scales the loss so that small gradients survive."""
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

    def __init__(self, config: TrainConfig, captions=(), model: TextToImageModel | None = None, optimizer=None,
                 autoencoder: Autoencoder | None = None):
        self.config = config
        self.device = pick_device(config.device)
        self.model = (model if model is not None else build_model(config, captions, autoencoder)).to(self.device)
        self.precision = precision_for(self.device, True, config.mixed_precision)  # bf16, fp16 or None (float32)
        if self.device.type != "cpu" or self.precision is None:  # faster convolutions, but not for bf16 on a CPU
            self.model.to(memory_format=torch.channels_last)
        self.objective = self.model.objective
        self.ema = EMA(self.model, config.ema_decay)
        self.optimizer = optimizer or make_optimizer(self.model, config.lr, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == torch.float16 else None
        self.generator = torch.Generator().manual_seed(config.seed)
        self.train_model = self.model  # what forward/backward runs through (the trainer may compile or wrap it)
        self.step, self.lr = 0, None

    def learning_rate(self) -> float:
        return learning_rate(self.config, self.step)

    def train_step(self, images, captions, shard: tuple[int, int] = (0, 1), should_stop=None):
        """Loss, then (unless `should_stop(loss)`) gradients, optimizer and EMA.
        -> (loss per sample, timesteps drawn), or None when stopped before any update."""
        self.lr = self.learning_rate()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        self.model.train()
        images = self.encode(images, shard)
        per_sample, t = diffusion_loss(self.train_model, self.model.tokenizer, self.objective, images, captions,
                                       self.generator, self.config.caption_dropout, self.device, shard=shard,
                                       precision=self.precision, snr_gamma=self.config.snr_gamma)
        loss = per_sample.mean()
        if should_stop is not None and should_stop(loss):
            return None
        apply_gradients(self.model, self.optimizer, self.ema, loss, self.step, self.config.grad_clip, self.scaler)
        self.step += 1
        return per_sample, t

    def encode(self, images: torch.Tensor, shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
        """x_0 of this step: the pictures, or a latent model's `to_latents` of them, sampled with the
        run's generator (under torchrun with rank r's of world_size seeds drawn from it)."""
        if self.model.vae is None:
            return images
        generator, (rank, world_size) = self.generator, shard
        if world_size > 1:
            seed = torch.randint(2**62, (world_size,), generator=self.generator)[rank].item()
            generator = torch.Generator().manual_seed(seed)
        return self.model.to_latents(images.to(self.device), generator).to(images.device)

    def ema_model(self) -> TextToImageModel:
        """A copy of the model with the EMA's averaged weights (what training saves), in eval mode."""
        averaged = copy.deepcopy(self.model)
        averaged.load_state_dict(self.ema.shadow)
        return averaged.eval()


def train(config: TrainConfig, dataset, autoencoder: Autoencoder | None = None):
    """The whole loop, without checkpoints, logs or signals (`python train.py` adds them): yields the
    state after every step; `state.ema_model()` is the model to sample from. `dataset` gives
    (image (3, H, W) in [-1, 1], caption) and `captions()`; a latent run needs its trained `autoencoder`.

        for state in train(TrainConfig(steps=300), Shapes()):
            pass
        pipe = MiniDiffusionPipeline(state.ema_model())"""
    state = TrainState(config, dataset.captions(), autoencoder=autoencoder)
    while state.step < config.steps:
        state.train_step(*load_batch(dataset, batch_indices(state.step, config.batch_size)))
        yield state
