"""A small variational autoencoder: latent diffusion's latent space, in miniature.

Stable Diffusion denoises not pixels but an autoencoder's latents (Rombach et al. 2022, "High-Resolution
Image Synthesis with Latent Diffusion Models", sec. 3, appendix G): SD3.5's VAE makes a 1024 x 1024 x 3
picture 128 x 128 x 16 numbers (f = 8). This one makes a 32 x 32 x 3 Shapes picture 8 x 8 x 4 (f = 4).

- The encoder (conv stem, residual blocks with GroupNorm and SiLU, a stride-2 conv per halving) gives
  the mean and log-variance of a diagonal Gaussian q(z|x); the decoder (residual blocks, nearest-
  neighbour upsampling + conv) turns a latent back into a picture.
- The loss is the SD autoencoder's without its extras: squared error summed over each picture's pixels
  + kl_weight * KL(q(z|x) || N(0, I)). The tiny KL weight (1e-6 in LDM) only keeps the latents from
  drifting to huge values. LDM adds a perceptual (LPIPS) loss and a patch discriminator; they need
  downloaded weights and make training slow and fickle. Without them fine detail and texture come out
  blurry (squared error is least for the average of the plausible pictures); on flat-coloured Shapes
  only the edges soften a little.
- Diffusion should see latents of mean 0, std 1: `fit_latent_factors` measures shift_factor (mean) and
  scaling_factor (1 / std) after training; `to_latents` / `from_latents` apply them where SD3's
  pipelines do, through diffusers' AutoencoderKL interface (`encode(x).latent_dist.sample(generator)`,
  `decode(z).sample`, `config`), so on either VAE.
- Saved and loaded like the other components (config.json + model.safetensors) by minidiff.tools.checkpoint
  (`save_autoencoder`, `load_autoencoder`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections import namedtuple
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class AutoencoderConfig:
    in_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (16, 32, 32)  # widths, one level per entry; each level after
    layers_per_block: int = 1  # the first halves the size, so down_factor = 2 ** (levels - 1), as diffusers
    norm_groups: int = 8
    image_size: int = 32
    scaling_factor: float = 1.0  # both set by fit_latent_factors after training
    shift_factor: float = 0.0

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)  # JSON gives back a list
        if self.image_size % self.down_factor:
            raise ValueError(f"image_size {self.image_size} is not divisible by the down factor {self.down_factor}")

    @property
    def down_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def with_down_factor(cls, down_factor: int, **fields) -> "AutoencoderConfig":
        """The default widths with one level per halving: f = 2: (16, 32), f = 4: (16, 32, 32), ..."""
        if down_factor < 2 or down_factor & (down_factor - 1):
            raise ValueError(f"the down factor must be a power of 2 from 2 up, got {down_factor}")
        first, *rest = cls.block_out_channels
        return cls(block_out_channels=(first,) + (rest[-1],) * int(math.log2(down_factor)), **fields)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AutoencoderConfig":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


class ResBlock(nn.Module):
    """x + conv(SiLU(GroupNorm(conv(SiLU(GroupNorm(x))))))."""

    def __init__(self, width: int, groups: int):
        super().__init__()
        self.layers = nn.Sequential(nn.GroupNorm(groups, width), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1),
                                    nn.GroupNorm(groups, width), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1))

    def forward(self, x):
        return x + self.layers(x)


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))), computed as diffusers' DiagonalGaussianDistribution."""

    def __init__(self, parameters: torch.Tensor):
        self.mean, logvar = parameters.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std, self.var = torch.exp(0.5 * self.logvar), torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        device = generator.device if generator is not None else self.mean.device  # a CPU generator draws on CPU
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per picture, summed over the latent's numbers."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


EncoderOutput = namedtuple("EncoderOutput", "latent_dist")  # .latent_dist or [0], as diffusers' outputs
DecoderOutput = namedtuple("DecoderOutput", "sample")


class Autoencoder(nn.Module):
    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        c, w, groups, self.config = config, config.block_out_channels, config.norm_groups, config
        down = [nn.Conv2d(c.in_channels, w[0], 3, padding=1)]
        for i, width in enumerate(w):
            down += [ResBlock(width, groups) for _ in range(c.layers_per_block)]
            if i < len(w) - 1:  # halve the size with a stride-2 convolution
                down.append(nn.Conv2d(width, w[i + 1], 3, stride=2, padding=1))
        self.encoder = nn.Sequential(*down, ResBlock(w[-1], groups), nn.GroupNorm(groups, w[-1]), nn.SiLU(),
                                     nn.Conv2d(w[-1], 2 * c.latent_channels, 3, padding=1))  # mean, log-variance
        up = [nn.Conv2d(c.latent_channels, w[-1], 3, padding=1), ResBlock(w[-1], groups)]
        for i in reversed(range(len(w))):
            up += [ResBlock(w[i], groups) for _ in range(c.layers_per_block)]
            if i > 0:  # double the size: repeat each pixel, then a convolution smooths
                up += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(w[i], w[i - 1], 3, padding=1)]
        self.decoder = nn.Sequential(*up, nn.GroupNorm(groups, w[0]), nn.SiLU(),
                                     nn.Conv2d(w[0], c.in_channels, 3, padding=1))

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        f = self.config.down_factor
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by the down factor {f}")
        out = DiagonalGaussian(self.encoder(x))
        return EncoderOutput(out) if return_dict else (out,)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        out = self.decoder(z)
        return DecoderOutput(out) if return_dict else (out,)


def to_latents(vae, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pixels in [-1, 1] -> the latents diffusion works on. StableDiffusion3Img2ImgPipeline.prepare_latents:
    `init_latents = retrieve_latents(self.vae.encode(image), generator=generator)`, then
    `init_latents = (init_latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor`."""
    return standardized(vae, vae.encode(images).latent_dist.sample(generator))


def standardized(vae, z: torch.Tensor) -> torch.Tensor:
    """z ~ q(z|x) -> (z - shift_factor) * scaling_factor: latents of mean 0, std 1 (fit_latent_factors)."""
    return (z - vae.config.shift_factor) * vae.config.scaling_factor


def from_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> pixels. The end of StableDiffusion3Pipeline.__call__:
    `latents = (latents / self.vae.config.scaling_factor) + self.vae.config.shift_factor`, then
    `image = self.vae.decode(latents, return_dict=False)[0]`."""
    return vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample


@torch.no_grad()
def fit_latent_factors(autoencoder: Autoencoder, images: torch.Tensor, generator: torch.Generator | None = None,
                       batch_size: int = 256) -> tuple[float, float]:
    """Set (and return) config.shift_factor = mean and scaling_factor = 1 / std of the sampled latents of
    `images` (N, 3, H, W), so that to_latents gives mean 0, std 1 on them (as LDM rescales its KL latents)."""
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    z = torch.cat([autoencoder.encode(batch).latent_dist.sample(generator) for batch in images.split(batch_size)])
    autoencoder.config.shift_factor, autoencoder.config.scaling_factor = z.mean().item(), 1.0 / z.std().item()
    return autoencoder.config.shift_factor, autoencoder.config.scaling_factor


def autoencoder_train_step(autoencoder: Autoencoder, optimizer, images: torch.Tensor, generator: torch.Generator,
                           kl_weight: float = 1e-6) -> dict[str, float]:
    """One step: encode, sample z (the reparameterisation trick: z = mean + std * noise, so gradients reach
    both), decode, loss = squared error summed per picture + kl_weight * KL, both averaged over the batch."""
    posterior = autoencoder.encode(images).latent_dist
    reconstruction = autoencoder.decode(posterior.sample(generator)).sample
    squared_error = (reconstruction - images).pow(2).sum(dim=[1, 2, 3]).mean()
    kl = posterior.kl().mean()
    loss = squared_error + kl_weight * kl
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": loss.item(), "mse": squared_error.item() / images[0].numel(), "kl": kl.item()}


def train_autoencoder(config: AutoencoderConfig, dataset, steps: int, batch_size: int = 32, lr: float = 2e-3,
                      kl_weight: float = 1e-6, generator: torch.Generator | None = None, autoencoder=None,
                      optimizer=None, start_step: int = 0, stop_step: int | None = None):
    """Adam, the learning rate falling from `lr` to 0 along a half cosine; returns (autoencoder, optimizer).
    Step s reads pictures s * batch_size ... of `dataset`; all randomness comes from `generator`. To resume,
    pass the run's autoencoder, optimizer, generator (states restored) and `start_step`: the result is the
    unbroken run's, bit for bit. `stop_step` pauses early (the schedule still spans `steps`)."""
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    if autoencoder is None:
        with torch.random.fork_rng():  # initial weights from the generator; the global RNG is left alone
            torch.manual_seed(int(torch.randint(2**62, (), generator=generator)))
            autoencoder = Autoencoder(config)
    optimizer = optimizer if optimizer is not None else torch.optim.Adam(autoencoder.parameters(), lr=lr)
    autoencoder.train()
    for step in range(start_step, steps if stop_step is None else stop_step):
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        images = torch.stack([dataset[i][0] for i in range(step * batch_size, (step + 1) * batch_size)])
        autoencoder_train_step(autoencoder, optimizer, images, generator, kl_weight)
    return autoencoder.eval(), optimizer


def fingerprint(autoencoder: Autoencoder) -> str:
    """sha256 of the weights and the config (latent factors included): a latent model records the
    fingerprint of the autoencoder it was trained on, whose latents are the only ones it knows."""
    digest = hashlib.sha256(json.dumps(autoencoder.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(autoencoder.state_dict().items()):
        tensor = tensor.detach().contiguous().cpu()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class LatentSpace:
    """Which autoencoder's latents a latent model denoises (saved in its config.json): its fingerprint
    and how much smaller than the picture a latent is."""

    sha256: str
    down_factor: int

    @classmethod
    def of(cls, autoencoder: Autoencoder) -> "LatentSpace":
        return cls(fingerprint(autoencoder), autoencoder.config.down_factor)

    @staticmethod
    def check(latent: "LatentSpace | None", autoencoder: Autoencoder | None, in_channels: int) -> None:
        """A model's config (`latent`, None for a pixel model) and the autoencoder given with it agree."""
        if (latent is None) != (autoencoder is None):
            raise ValueError("this latent model needs the autoencoder it was trained with; none was given"
                             if autoencoder is None else "this is a pixel model (its config names no autoencoder)")
        if autoencoder is not None and fingerprint(autoencoder) != latent.sha256:
            raise ValueError("this autoencoder is not the one the model was trained with (its fingerprint differs)")
        if autoencoder is not None and autoencoder.config.latent_channels != in_channels:
            raise ValueError(f"the denoiser takes {in_channels} channels, the autoencoder's latents "
                             f"have {autoencoder.config.latent_channels}")
