"""A small text-conditioned UNet, the toy's denoising network: given x_t, the timestep t and the
caption's tokens it predicts the noise eps (a DDPM model) or the velocity eps - x_0 (a flow model).

Architecture after Ho et al. 2020 (appendix B) and Stable Diffusion (Rombach et al. 2022):
residual blocks with GroupNorm and a timestep embedding, self-attention at the low
resolutions, and cross-attention from image positions to the text tokens. Like SDXL and
SD3, a pooled text vector is also added to the timestep embedding, which gives every
residual block the caption's gist.

Shapes in comments: B batch, C channels, H x W spatial, L text tokens, D text dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


@dataclass
class UNetConfig:
    image_size: int = 16
    in_channels: int = 3
    base_channels: int = 24
    channel_mults: tuple[int, ...] = (1, 2, 2)  # one entry per resolution level
    num_res_blocks: int = 1  # per level, on the way down (one more on the way up)
    attention_levels: tuple[int, ...] = (2,)  # levels (0 = full resolution) with attention
    context_dim: int = 128  # text encoder output size
    num_heads: int = 4
    norm_groups: int = 8

    def __post_init__(self):
        self.channel_mults = tuple(self.channel_mults)
        self.attention_levels = tuple(self.attention_levels)
        if self.image_size % self.downsample_factor:
            raise ValueError(f"image_size {self.image_size} must be a multiple of {self.downsample_factor}")

    def with_text_dim(self, text_dim: int) -> "UNetConfig":
        """This UNet reading text tokens of width `text_dim` (its cross-attention and pooled vector)."""
        return replace(self, context_dim=text_dim)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mults) - 1)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps (Vaswani et al. 2017, as in Ho et al. 2020): (B,) -> (B, dim).
    DDPM models are given integer t, flow models t = sigma * T as a float."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=timesteps.device) / half)
    angles = timesteps.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def pool_text(context: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the real (unpadded) text tokens: (B, L, D), (B, L) -> (B, D)."""
    weights = context_mask.to(context.dtype)[..., None]  # (B, L, 1)
    return (context * weights).sum(1) / weights.sum(1).clamp(min=1)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, add the time embedding, GroupNorm -> SiLU -> conv, plus a skip."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out, H, W)
        h = h + self.emb_proj(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head attention with PyTorch's fused kernel. Self-attention when context is None."""

    def __init__(self, dim: int, context_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x, context=None, context_mask=None):
        context = x if context is None else context
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.num_heads)
        k, v = rearrange(self.to_kv(context), "b l (two h d) -> two b h l d", two=2, h=self.num_heads)
        mask = None if context_mask is None else context_mask[:, None, None, :]  # (B, 1, 1, L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class AttentionBlock(nn.Module):
    """A transformer block over the H*W positions: self-attention, cross-attention to the
    text tokens, feed-forward; each pre-normed and residual (as in Stable Diffusion)."""

    def __init__(self, channels: int, context_dim: int, num_heads: int, groups: int):
        super().__init__()
        self.norm_in = nn.GroupNorm(groups, channels)
        self.norm_self, self.norm_cross, self.norm_ff = (nn.LayerNorm(channels) for _ in range(3))
        self.self_attn = Attention(channels, channels, num_heads)
        self.cross_attn = Attention(channels, context_dim, num_heads)
        self.ff = nn.Sequential(nn.Linear(channels, 4 * channels), nn.GELU(), nn.Linear(4 * channels, channels))
        self.proj_out = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x, context, context_mask):
        h, w = x.shape[-2:]
        tokens = rearrange(self.norm_in(x), "b c h w -> b (h w) c")  # (B, HW, C)
        tokens = tokens + self.self_attn(self.norm_self(tokens))
        tokens = tokens + self.cross_attn(self.norm_cross(tokens), context, context_mask)
        tokens = tokens + self.ff(self.norm_ff(tokens))
        return x + rearrange(self.proj_out(tokens), "b (h w) c -> b c h w", h=h, w=w)


class Level(nn.Module):
    """The blocks of one resolution level: residual blocks, each followed by attention or not."""

    def __init__(self, channels_in: list[int], out_ch: int, emb_dim: int, attention: bool, config: UNetConfig):
        super().__init__()
        self.res = nn.ModuleList(ResBlock(c, out_ch, emb_dim, config.norm_groups) for c in channels_in)
        self.attn = nn.ModuleList(
            AttentionBlock(out_ch, config.context_dim, config.num_heads, config.norm_groups) if attention
            else nn.Identity() for _ in channels_in
        )


class UNet(nn.Module):
    """(x_t, t, text tokens, token mask): (B, 3, H, W), (B,), (B, L, D), (B, L) -> (B, 3, H, W),
    the predicted noise (a DDPM model, integer t) or velocity (a flow model, float t = sigma * T)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        ch, mults, n_res = config.base_channels, config.channel_mults, config.num_res_blocks
        emb_dim = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.text_pool_proj = nn.Linear(config.context_dim, emb_dim)
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)

        # Down path: remember the channel count of every activation kept for a skip connection.
        skip_channels, cur = [ch], ch
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        for level, mult in enumerate(mults):
            out_ch = ch * mult
            self.down.append(Level([cur] + [out_ch] * (n_res - 1), out_ch, emb_dim, level in config.attention_levels, config))
            cur = out_ch
            skip_channels += [cur] * n_res
            last = level == len(mults) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(cur, cur, 3, stride=2, padding=1))
            if not last:
                skip_channels.append(cur)

        self.mid_res1 = ResBlock(cur, cur, emb_dim, config.norm_groups)
        self.mid_attn = AttentionBlock(cur, config.context_dim, config.num_heads, config.norm_groups)
        self.mid_res2 = ResBlock(cur, cur, emb_dim, config.norm_groups)

        # Up path: each residual block takes the previous output concatenated with one skip.
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for level, mult in reversed(list(enumerate(mults))):
            out_ch = ch * mult
            ins = []
            for _ in range(n_res + 1):
                ins.append(cur + skip_channels.pop())
                cur = out_ch
            self.up.append(Level(ins, out_ch, emb_dim, level in config.attention_levels, config))
            self.upsample.append(
                nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cur, cur, 3, padding=1))
                if level > 0 else nn.Identity()
            )

        self.norm_out = nn.GroupNorm(config.norm_groups, cur)
        self.conv_out = nn.Conv2d(cur, config.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x, timesteps, context, context_mask):
        # conditioning vector: time embedding + mean of the real text tokens
        emb = self.time_mlp(timestep_embedding(timesteps, self.config.base_channels).to(x.dtype))
        emb = emb + self.text_pool_proj(pool_text(context, context_mask))  # (B, 4C)

        h = self.conv_in(x)  # (B, C, H, W)
        skips = [h]
        for level, down in zip(self.down, self.downsample):
            for res, attn in zip(level.res, level.attn):
                h = res(h, emb)
                h = attn(h, context, context_mask) if isinstance(attn, AttentionBlock) else h
                skips.append(h)
            if not isinstance(down, nn.Identity):
                h = down(h)  # (B, C', H/2, W/2)
                skips.append(h)

        h = self.mid_res2(self.mid_attn(self.mid_res1(h, emb), context, context_mask), emb)

        for level, up in zip(self.up, self.upsample):
            for res, attn in zip(level.res, level.attn):
                h = res(torch.cat([h, skips.pop()], dim=1), emb)
                h = attn(h, context, context_mask) if isinstance(attn, AttentionBlock) else h
            h = up(h)  # (B, C', 2H, 2W) except at full resolution

        return self.conv_out(F.silu(self.norm_out(h)))
