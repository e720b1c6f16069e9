"""MMDiT, the Multimodal Diffusion Transformer of Stable Diffusion 3 / 3.5, in miniature.

Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis", sec. 4
and fig. 2: image patches and text tokens are two streams with their *own* weights that meet in *one*
attention over the joined sequence [image; text]; one conditioning vector c (timestep + pooled text)
modulates every block with adaLN-Zero (Peebles & Xie 2023, "DiT"). SD3.5 adds RMS q/k norm (Esser et
al. sec. 5.3.2) and, in Medium ("MMDiT-X"), an image-only self-attention in the first blocks. Equal
to diffusers' `SD3Transformer2DModel`; the mapping to its weights is the last part of this file.

Shapes: B batch, C channels, H x W latent pixels, N = (H/p)(W/p) image tokens, L text tokens,
D = heads * head_dim the width of both streams, T joint_attention_dim (the text encoders' width).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


@dataclass
class MMDiTConfig:  # field names as diffusers' SD3Transformer2DModel config
    sample_size: int = 16  # latent height = width the model is made for
    patch_size: int = 2
    in_channels: int = 4
    num_layers: int = 4
    attention_head_dim: int = 32
    num_attention_heads: int = 4
    joint_attention_dim: int = 128  # T, width of the text tokens coming in
    caption_projection_dim: int = 128  # D, text tokens after `context_embedder`
    pooled_projection_dim: int = 128  # width of the pooled text vector
    out_channels: int | None = None  # None: in_channels
    pos_embed_max_size: int | None = None  # None: a table per grid, no crop
    dual_attention_layers: tuple[int, ...] = ()  # MMDiT-X blocks (SD3.5 Medium: 0..12)
    qk_norm: str | None = None  # None (SD3) or "rms_norm" (SD3.5)

    def __post_init__(self):
        self.dual_attention_layers = tuple(self.dual_attention_layers)
        self.out_channels = self.out_channels or self.in_channels
        if self.qk_norm not in (None, "rms_norm"):
            raise ValueError(f"qk_norm must be None or 'rms_norm', got {self.qk_norm!r}")
        if self.sample_size % self.patch_size:
            raise ValueError(f"sample_size {self.sample_size} must be divisible by patch_size {self.patch_size}")
        if self.width % 4:  # the position table: sin and cos of the patch's row and of its column
            raise ValueError(f"num_attention_heads * attention_head_dim must be a multiple of 4, got {self.width}")
        if self.caption_projection_dim != self.width:
            raise ValueError(f"caption_projection_dim must equal num_attention_heads * attention_head_dim "
                             f"= {self.width}, got {self.caption_projection_dim}")

    width = property(lambda self: self.num_attention_heads * self.attention_head_dim)  # D
    image_size = property(lambda self: self.sample_size)

    to_dict = asdict  # -> {field: value}

    def with_text_dim(self, text_dim: int) -> MMDiTConfig:
        """This MMDiT reading text tokens of width `text_dim` whose pooled vector is their mean (minidiff's
        own text encoder; SD3.5's: T5 + CLIP tokens of 4096, pooled CLIP vectors of 2048)."""
        return replace(self, joint_attention_dim=text_dim, pooled_projection_dim=text_dim)


def timestep_embedding(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of (B,) float timesteps -> (B, dim), as diffusers' Timesteps."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t[:, None].float() * freqs[None]  # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def sincos_2d(dim: int, h: int, w: int, base: int) -> torch.Tensor:
    """Fixed 2-D position table (h*w, dim), as in MAE / DiT: the first half of the channels encodes the
    column, the second the row, each [sin | cos]; positions i * base / size (a bigger grid, finer steps)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim/4,) in float64
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float32) / (h / base),
                                torch.arange(w, dtype=torch.float32) / (w / base), indexing="ij")  # (h, w) each
    angles = [torch.outer(pos.reshape(-1), omega) for pos in (cols, rows)]  # 2 x (h*w, dim/4)
    return torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN (DiT sec. 3.2): LayerNorm without its own affine, then c's scale and shift."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale) + shift


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens (a conv with stride p), plus the fixed position table,
    built for pos_embed_max_size and cropped to the centre of it (or built for the grid)."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.p, self.max_size, self.base = cfg.patch_size, cfg.pos_embed_max_size, cfg.sample_size // cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_channels, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        table = sincos_2d(cfg.width, self.max_size, self.max_size, self.base)[None] if self.max_size else None
        self.register_buffer("pos_embed", table)  # (1, max_size^2, D), or None: a table per grid

    def forward(self, x):  # (B, C, H, W) -> (B, N, D)
        h, w = x.shape[-2] // self.p, x.shape[-1] // self.p
        if self.max_size:  # crop the centre h x w of the max_size x max_size table
            if max(h, w) > self.max_size:
                raise ValueError(f"a {h}x{w} patch grid is larger than pos_embed_max_size {self.max_size}")
            top, left = (self.max_size - h) // 2, (self.max_size - w) // 2
            table = self.pos_embed.reshape(self.max_size, self.max_size, -1)[top:top + h, left:left + w]
            pos = table.reshape(1, h * w, -1)
        else:  # without a max size: a table for this grid
            pos = sincos_2d(self.proj.out_channels, h, w, self.base)[None].to(x.device)
        return (rearrange(self.proj(x), "b d h w -> b (h w) d") + pos).contiguous()


class RMSNorm(nn.RMSNorm):
    """x / rms(x) * g, in float32 as diffusers' RMSNorm: under bf16 autocast q and k arrive in bf16 while g
    stays float32, which PyTorch's fused kernel refuses (with a warning). The result has the wider dtype."""

    def forward(self, x):
        out = F.rms_norm(x.float(), self.normalized_shape, self.weight.float(), self.eps)
        return out.to(torch.promote_types(x.dtype, self.weight.dtype))


class Attention(nn.Module):
    """q, k, v (and out) projections of one stream, split into heads, with optional RMS q/k norm."""

    def __init__(self, cfg: MMDiTConfig, out: bool = True):
        super().__init__()
        d, self.heads = cfg.width, cfg.num_attention_heads
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        # SD3.5: RMS norm of each head's q and k, x / rms(x) * g (keeps the attention logits in check)
        norm = (lambda: RMSNorm(cfg.attention_head_dim, eps=1e-6)) if cfg.qk_norm else nn.Identity
        self.q_norm, self.k_norm = norm(), norm()
        self.out = nn.Linear(d, d) if out else None  # the last block's text stream has no output

    def qkv(self, x):  # (B, N, D) -> 3 x (B, heads, N, head_dim)
        q, k, v = (rearrange(f(x), "b n (h d) -> b h n d", h=self.heads) for f in (self.q, self.k, self.v))
        return self.q_norm(q), self.k_norm(k), v

    def forward(self, x):  # plain self-attention (MMDiT-X's image-only one): (B, N, D) -> (B, N, D)
        return self.out(rearrange(F.scaled_dot_product_attention(*self.qkv(x)), "b h n d -> b n (h d)"))


class Stream(Attention):
    """One modality's weights in a joint block (a column of fig. 2b): q/k/v/out, modulation, MLP."""

    def __init__(self, cfg: MMDiTConfig, chunks: int, last: bool = False):
        super().__init__(cfg, out=not last)
        d = cfg.width
        self.modulation = nn.Linear(d, chunks * d)  # c -> shift, scale, gate for attention and MLP (, attention 2)
        self.mlp = None if last else nn.Sequential(nn.Linear(d, 4 * d), nn.GELU("tanh"), nn.Linear(4 * d, d))


class JointBlock(nn.Module):
    """MM-DiT block (fig. 2b): both streams attend together, each keeps its own weights."""

    def __init__(self, cfg: MMDiTConfig, last: bool, dual: bool):
        super().__init__()
        self.last, self.dual = last, dual
        self.image = Stream(cfg, 9 if dual else 6)
        self.text = Stream(cfg, 2 if last else 6, last=last)  # last: only norm + q/k/v ("context_pre_only")
        self.image_attn2 = Attention(cfg) if dual else None  # MMDiT-X (SD3.5 Medium)

    def forward(self, x, ctx, c, mask=None):  # x (B, N, D), ctx (B, L, D), c (B, D), mask (B, 1, 1, N+L)
        n = x.shape[1]
        shift1, scale1, gate1, shift2, scale2, gate2, *extra = self.image.modulation(F.silu(c))[:, None].chunk(
            9 if self.dual else 6, dim=-1)  # each (B, 1, D)
        mod = self.text.modulation(F.silu(c))[:, None]
        if self.last:  # diffusers' AdaLayerNormContinuous: scale first, then shift; no gate
            t_scale1, t_shift1 = mod.chunk(2, dim=-1)
        else:
            t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = mod.chunk(6, dim=-1)
        # ONE attention over the joined tokens [image; text]: diffusers' order (Stability's reference code
        # puts the text first; without a mask that changes only float rounding, attention ignores order)
        qkv = zip(self.image.qkv(modulate(x, shift1, scale1)),
                  self.text.qkv(modulate(ctx, t_shift1, t_scale1)))
        q, k, v = (torch.cat(pair, dim=2) for pair in qkv)  # (B, heads, N+L, head_dim)
        out = rearrange(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), "b h n d -> b n (h d)")
        x_in = x  # MMDiT-X's second attention reads the block's input, with its own shift/scale
        x = x + gate1 * self.image.out(out[:, :n])
        if self.dual:
            shift3, scale3, gate3 = extra
            x = x + gate3 * self.image_attn2(modulate(x_in, shift3, scale3))
        x = x + gate2 * self.image.mlp(modulate(x, shift2, scale2))
        if self.last:
            return x, None
        ctx = ctx + t_gate1 * self.text.out(out[:, n:])
        ctx = ctx + t_gate2 * self.text.mlp(modulate(ctx, t_shift2, t_scale2))
        return x, ctx


class MMDiT(nn.Module):
    """Predicts the flow velocity v(x_t, t, text) of latents x (B, C, H, W); fig. 2a."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.cfg, d = cfg, cfg.width
        self.patch_embed = PatchEmbed(cfg)
        self.t_embedder = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))
        self.pooled_embedder = nn.Sequential(nn.Linear(cfg.pooled_projection_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, d)
        self.blocks = nn.ModuleList(JointBlock(cfg, last=i == cfg.num_layers - 1, dual=i in cfg.dual_attention_layers)
                                    for i in range(cfg.num_layers))
        self.final_modulation = nn.Linear(d, 2 * d)  # c -> scale, shift
        self.final_linear = nn.Linear(d, cfg.patch_size ** 2 * cfg.out_channels)
        for name, m in self.named_modules():  # DiT's init: xavier, but modulations and output zero (adaLN-Zero)
            if isinstance(m, nn.Linear):
                zero = name.endswith(("modulation", "final_linear"))
                (nn.init.zeros_ if zero else nn.init.xavier_uniform_)(m.weight), nn.init.zeros_(m.bias)

    def forward(self, x, timesteps, context, context_mask=None, pooled=None, *, skip_layers=()):
        """x (B, C, H, W), timesteps (B,) (SD3: sigma * 1000), context (B, L, T), context_mask (B, L) bool
        (False = padding, kept out of the attention), pooled (B, pooled_projection_dim) or None: the mean
        of the real context tokens. skip_layers: blocks to leave out (skip-layer guidance)."""
        if pooled is None:  # mean of the real tokens
            keep = (torch.ones_like(context[..., :1]) if context_mask is None else context_mask[..., None]).to(context)
            pooled = (context * keep).sum(1) / keep.sum(1).clamp(min=1)  # (B, T)
        # conditioning (fig. 2a): c = MLP(sinusoidal(t)) + MLP(pooled text)
        c = self.t_embedder(timestep_embedding(timesteps).to(pooled.dtype)) + self.pooled_embedder(pooled)  # (B, D)
        h, w = x.shape[-2:]
        x, ctx = self.patch_embed(x), self.context_embedder(context)  # (B, N, D), (B, L, D)
        # keys the attention may use: all N image tokens, the text tokens where context_mask is True
        mask = None if context_mask is None else F.pad(context_mask.bool(), (x.shape[1], 0), value=True)[:, None, None]
        for i, block in enumerate(self.blocks):
            if i not in skip_layers:
                x, ctx = block(x, ctx, c, mask)
        scale, shift = self.final_modulation(F.silu(c))[:, None].chunk(2, dim=-1)
        x = self.final_linear(modulate(x, shift, scale))  # (B, N, p*p*C)
        p = self.cfg.patch_size
        return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=h // p, p=p, q=p)

    # -- the same weights in diffusers' SD3Transformer2DModel (names: `diffusers_name` below) --

    @classmethod
    def from_diffusers(cls, transformer) -> MMDiT:
        """An MMDiT with the config of a diffusers SD3Transformer2DModel and a copy of its weights."""
        cfg = MMDiTConfig(**{f.name: transformer.config[f.name] for f in fields(MMDiTConfig)})  # refuses bad fields
        with torch.device("meta"):  # names and shapes only, nothing allocated
            names = {name: diffusers_name(name) for name in cls(cfg).state_dict()}
        theirs = transformer.state_dict()
        if set(theirs) != set(names.values()):
            raise ValueError(f"transformer has other weights than SD3Transformer2DModel's (a LoRA? IP-Adapter? fused "
                             f"q/k/v?): {sorted(set(theirs) ^ set(names.values()))[:4]}")
        model = cls(cfg).to(device=transformer.device, dtype=transformer.dtype)
        model.load_state_dict({name: theirs[their_name] for name, their_name in names.items()})
        return model

    def to_diffusers(self):
        """A diffusers SD3Transformer2DModel with a copy of these weights."""
        from diffusers import SD3Transformer2DModel

        weight = self.patch_embed.proj.weight
        transformer = SD3Transformer2DModel(**self.cfg.to_dict()).to(device=weight.device, dtype=weight.dtype)
        transformer.load_state_dict({diffusers_name(name): value for name, value in self.state_dict().items()})
        return transformer

    def as_diffusers_transformer(self) -> DiffusersMMDiT:
        """This MMDiT (the same weights, not a copy) behind SD3Transformer2DModel's call, for its pipelines."""
        return DiffusersMMDiT(self)


# --- The diffusers side: parameter names, and the call its SD3 pipelines make ---------------------------

DIFFUSERS_NAMES = [  # (part of a name here, the same part in diffusers' SD3Transformer2DModel), in this order
    ("patch_embed", "pos_embed"), ("final_modulation", "norm_out.linear"), ("final_linear", "proj_out"),
    ("t_embedder.0", "time_text_embed.timestep_embedder.linear_1"),
    ("t_embedder.2", "time_text_embed.timestep_embedder.linear_2"),
    ("pooled_embedder.0", "time_text_embed.text_embedder.linear_1"),
    ("pooled_embedder.2", "time_text_embed.text_embedder.linear_2"), ("blocks", "transformer_blocks"),
    # a block: the image stream is diffusers' norm1, attn, ff; the text stream their "context"/"added" twins
    ("image.modulation", "norm1.linear"), ("image.mlp.0", "ff.net.0.proj"), ("image.mlp.2", "ff.net.2"),
    ("text.modulation", "norm1_context.linear"), ("text.mlp.0", "ff_context.net.0.proj"),
    ("text.mlp.2", "ff_context.net.2"), ("text.q", "attn.add_q_proj"), ("text.k", "attn.add_k_proj"),
    ("text.v", "attn.add_v_proj"), ("text.out", "attn.to_add_out"), ("text.q_norm", "attn.norm_added_q"),
    ("text.k_norm", "attn.norm_added_k"), ("image", "attn"), ("image_attn2", "attn2"),
    ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("out", "to_out.0"), ("q_norm", "norm_q"), ("k_norm", "norm_k"),
]


def diffusers_name(name: str) -> str:
    """A parameter's name here -> its name in SD3Transformer2DModel, e.g. "blocks.3.text.q.weight" ->
    "transformer_blocks.3.attn.add_q_proj.weight": each rule replaces whole dotted parts, once, in order."""
    name = f".{name}."
    for ours, theirs in DIFFUSERS_NAMES:
        name = name.replace(f".{ours}.", f".{theirs}.", 1)
    return name[1:-1]


class DiffusersMMDiT(nn.Module):
    """An MMDiT behind SD3Transformer2DModel.forward's signature and `.config`, for diffusers' SD3 pipelines."""

    def __init__(self, mmdit: MMDiT):
        from diffusers.configuration_utils import FrozenDict

        super().__init__()
        self.mmdit, self.config = mmdit, FrozenDict(mmdit.cfg.to_dict())

    dtype = property(lambda self: self.mmdit.patch_embed.proj.weight.dtype)
    device = property(lambda self: self.mmdit.patch_embed.proj.weight.device)

    def forward(self, hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None,
                block_controlnet_hidden_states=None, joint_attention_kwargs=None, return_dict=True, skip_layers=None):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        if block_controlnet_hidden_states is not None or joint_attention_kwargs:
            raise ValueError("MMDiT takes no block_controlnet_hidden_states nor joint_attention_kwargs")
        sample = self.mmdit(hidden_states, timestep, encoder_hidden_states, pooled=pooled_projections,
                            skip_layers=skip_layers or ())
        return Transformer2DModelOutput(sample=sample) if return_dict else (sample,)
