"""The whole trainable model: tokenizer, text encoder and UNet, with one config."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .scheduler import FlowMatchConfig, SchedulerConfig
from .text import TextEncoder, TextEncoderConfig, Tokenizer
from .unet import UNet, UNetConfig


@dataclass
class ModelConfig:
    """Everything needed to rebuild the model; saved as config.json beside model.safetensors."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    # the noise schedule the model was trained with: SchedulerConfig for a DDPM (epsilon-predicting)
    # model, FlowMatchConfig for a rectified-flow (velocity-predicting) one
    scheduler: SchedulerConfig | FlowMatchConfig = field(default_factory=SchedulerConfig)
    vocab: list[str] = field(default_factory=list)

    @property
    def objective(self) -> str:
        """ "ddpm" (the network predicts the noise eps) or "flow" (it predicts the velocity eps - x_0)."""
        return "flow" if isinstance(self.scheduler, FlowMatchConfig) else "ddpm"

    @property
    def image_size(self) -> int:
        return self.unet.image_size

    def to_dict(self) -> dict:
        return {"objective": self.objective, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        objective = d.get("objective", "ddpm")  # configs written before flow models existed are DDPM
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")
        return cls(
            unet=UNetConfig(**d["unet"]),
            text_encoder=TextEncoderConfig(**d["text_encoder"]),
            scheduler=OBJECTIVES[objective](**d["scheduler"]),
            vocab=list(d["vocab"]),
        )


OBJECTIVES = {"ddpm": SchedulerConfig, "flow": FlowMatchConfig}  # what config.json's "objective" names


class TextToImageModel(nn.Module):
    """epsilon_theta(x_t, t, prompt) (or the velocity v_theta for a flow model): the text encoder
    and the UNet, trained together."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tokenizer = Tokenizer(config.vocab, config.text_encoder.max_length)
        self.text_encoder = TextEncoder(config.text_encoder)
        self.unet = UNet(config.unet)

    @classmethod
    def for_captions(cls, captions, unet: UNetConfig, text_dim: int = 128,
                     scheduler: SchedulerConfig | FlowMatchConfig | None = None):
        """Build a model whose vocabulary covers `captions`."""
        tokenizer = Tokenizer.from_captions(captions)
        text = TextEncoderConfig(vocab_size=len(tokenizer.vocab), max_length=tokenizer.max_length, dim=text_dim)
        unet.context_dim = text_dim
        return cls(ModelConfig(unet=unet, text_encoder=text, scheduler=scheduler or SchedulerConfig(), vocab=tokenizer.vocab))

    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (context (B, L, D), mask (B, L)). The empty prompt is the unconditional one."""
        device = next(self.parameters()).device
        ids, mask = self.tokenizer(prompts)
        ids, mask = ids.to(device), mask.to(device)
        return self.text_encoder(ids, mask), mask

    def forward(self, x_t, timesteps, token_ids, token_mask) -> torch.Tensor:
        """Training entry point (one call through both networks, as DDP wants):
        (B, 3, H, W), (B,), (B, L), (B, L) -> predicted noise or velocity (B, 3, H, W).
        Sampling encodes the prompt once and calls `self.unet` at every step instead."""
        return self.unet(x_t, timesteps, self.text_encoder(token_ids, token_mask), token_mask)
