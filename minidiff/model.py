"""The whole trainable model, assembled the way a diffusers pipeline assembles SD3.5's parts:
a tokenizer and text encoder (SD3.5: CLIP-L, CLIP-G and T5), a denoising network (SD3.5: an
MMDiT; here a UNet by default, or the same MMDiT in miniature), and the objective it was trained
with (SD3.5: rectified flow), under one config. A latent model also holds the autoencoder whose
latents it denoises (SD3.5: its VAE). (Saving and loading a model folder, config.json beside
model.safetensors: `minidiff.tools.checkpoint`.)"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .autoencoder import Autoencoder, LatentSpace, from_latents, to_latents
from .flow import FlowMatchConfig, RectifiedFlow
from .mmdit import MMDiT, MMDiTConfig
from .scheduler import DDPM, SchedulerConfig
from .text import TextEncoder, TextEncoderConfig, Tokenizer
from .unet import UNet, UNetConfig

# config.json's "objective" -> (its schedule's config, the objective)
OBJECTIVES = {"ddpm": (SchedulerConfig, DDPM), "flow": (FlowMatchConfig, RectifiedFlow)}
# denoising networks: config.json key (and the model's attribute, as in diffusers' pipelines) ->
# (config class, network). Each takes (x_t, t, text tokens, token mask) and returns x_t's shape;
# each config has `image_size`, `in_channels` and `with_text_dim` (the width of the text tokens it reads).
BACKBONES = {"unet": (UNetConfig, UNet), "transformer": (MMDiTConfig, MMDiT)}


@dataclass
class ModelConfig:
    """Everything needed to rebuild the model."""

    backbone: UNetConfig | MMDiTConfig = field(default_factory=UNetConfig)  # a network of BACKBONES
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    # the schedule the model was trained with: SchedulerConfig for DDPM, FlowMatchConfig for rectified flow
    scheduler: SchedulerConfig | FlowMatchConfig = field(default_factory=SchedulerConfig)
    vocab: list[str] = field(default_factory=list)
    autoencoder: LatentSpace | None = None  # None: the denoiser works on pixels

    @property
    def objective(self) -> str:
        """ "ddpm" (the network predicts the noise eps) or "flow" (it predicts the velocity eps - x_0)."""
        return next(name for name, (config, _) in OBJECTIVES.items() if isinstance(self.scheduler, config))

    @property
    def backbone_name(self) -> str:
        return next(name for name, (config, _) in BACKBONES.items() if isinstance(self.backbone, config))

    @property
    def image_size(self) -> int:
        """The pictures' size in pixels (the denoiser's, times the autoencoder's down factor)."""
        return self.backbone.image_size * (self.autoencoder.down_factor if self.autoencoder else 1)


class TextToImageModel(nn.Module):
    """The networks trained together: eps_theta(x_t, t, prompt), or v_theta for a flow model.
    `model.denoiser` is the denoising network (also reachable by its name, `model.unet` or
    `model.transformer`); `model.vae` the autoencoder of a latent model (None for a pixel model)."""

    def __init__(self, config: ModelConfig, autoencoder: Autoencoder | None = None):
        super().__init__()
        self.config = config
        LatentSpace.check(config.autoencoder, autoencoder, config.backbone.in_channels)
        # The autoencoder was trained before the denoiser and stays frozen: like SD3.5's VAE beside its
        # transformer, it is kept out of this module's parameters() and state_dict(), so the optimizer,
        # the EMA and model.safetensors hold only what is trained here (`_apply` still moves it).
        object.__setattr__(self, "vae", autoencoder.requires_grad_(False).eval() if autoencoder else None)
        self.tokenizer = Tokenizer(config.vocab, config.text_encoder.max_length)
        self.text_encoder = TextEncoder(config.text_encoder)
        setattr(self, config.backbone_name, BACKBONES[config.backbone_name][1](config.backbone))
        self.objective = OBJECTIVES[config.objective][1](config.scheduler)  # DDPM or RectifiedFlow

    @property
    def denoiser(self) -> nn.Module:
        return getattr(self, self.config.backbone_name)

    # What the denoiser sees. SD3.5 denoises the latents of a VAE, and so does a latent model: the
    # conversions are the autoencoder's, at the places SD3's pipelines put them (autoencoder.py);
    # for a pixel model they are the identity.
    @property
    def sample_shape(self) -> tuple[int, int, int]:  # (C, h, w): latent channels and size, or (3, H, W)
        return self.config.backbone.in_channels, self.config.backbone.image_size, self.config.backbone.image_size

    @torch.no_grad()
    def to_latents(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        """(B, 3, H, W) pixels -> (B, C, h, w): (z - shift) * scale, z sampled from q(z|x) with `generator`."""
        return images if self.vae is None else to_latents(self.vae, images, generator)

    @torch.no_grad()
    def from_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, 3, H, W) pixels: decode(latents / scale + shift)."""
        return latents if self.vae is None else from_latents(self.vae, latents)

    def _apply(self, fn, recurse=True):  # .to(device), .float(), ...: the autoencoder goes along
        super()._apply(fn, recurse)
        if self.vae is not None:
            self.vae._apply(fn, recurse)
        return self

    @classmethod
    def for_captions(cls, captions, backbone: UNetConfig | MMDiTConfig, text_dim: int = 128, scheduler=None,
                     autoencoder: Autoencoder | None = None, text_clip_init: bool = False):
        """Build a model whose vocabulary covers `captions` (text width `text_dim`, TextEncoderConfig.clip_init
        `text_clip_init`); with an `autoencoder`, a latent model (`backbone` then sized for its latents)."""
        tokenizer = Tokenizer.from_captions(captions)
        text = TextEncoderConfig(len(tokenizer.vocab), tokenizer.max_length, text_dim, clip_init=text_clip_init)
        backbone = backbone.with_text_dim(text_dim)  # the network reads text tokens of that width
        latent = LatentSpace.of(autoencoder) if autoencoder else None
        return cls(ModelConfig(backbone=backbone, text_encoder=text, scheduler=scheduler or SchedulerConfig(),
                               vocab=tokenizer.vocab, autoencoder=latent), autoencoder)

    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (context (B, L, D), mask (B, L)). The empty prompt is the unconditional one."""
        device = next(self.parameters()).device
        ids, mask = self.tokenizer(prompts)
        ids, mask = ids.to(device), mask.to(device)
        return self.text_encoder(ids, mask), mask

    def forward(self, x_t, timesteps, token_ids, token_mask) -> torch.Tensor:
        """Training entry point (one call through both networks, as DDP wants):
        (B, 3, H, W), (B,), (B, L), (B, L) -> predicted noise or velocity (B, 3, H, W).
        Sampling encodes the prompt once and calls `self.denoiser` at every step instead."""
        return self.denoiser(x_t, timesteps, self.text_encoder(token_ids, token_mask), token_mask)
