"""minidiff.mmdit: the from-scratch MMDiT equals diffusers' SD3Transformer2DModel (random weights, tiny
sizes, float32 on CPU), and runs diffusers' SD3 pipelines through the bridge to the same pixels."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from minidiff.mmdit import MMDiT, MMDiTConfig

TINY = dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=16, pooled_projection_dim=20,
            pos_embed_max_size=12, dual_attention_layers=(), qk_norm=None)
CONFIGS = {  # shaped like the real models, shrunk
    "sd3-medium": {},
    "sd3.5-large": dict(qk_norm="rms_norm"),
    "sd3.5-medium": dict(qk_norm="rms_norm", dual_attention_layers=(0, 1)),
    "patch-1": dict(sample_size=8, patch_size=1, qk_norm="rms_norm", dual_attention_layers=(1,)),
    "no-max-size": dict(pos_embed_max_size=None, qk_norm="rms_norm", dual_attention_layers=(0,)),
    "one-layer": dict(num_layers=1, qk_norm="rms_norm", dual_attention_layers=(0,)),  # the last block is MMDiT-X
}


def randomise(module: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Re-draw every parameter, so that zero-initialised modulations or unit norms hide no bug."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * std)
    return module.eval()


def diffusers_transformer(**overrides):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return randomise(SD3Transformer2DModel(**{**TINY, **overrides}))


def inputs(cfg, batch=2, length=5, height=None, width=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg["in_channels"], height or cfg["sample_size"], width or cfg["sample_size"], generator=g)
    context = torch.randn(batch, length, cfg["joint_attention_dim"], generator=g)
    pooled = torch.randn(batch, cfg["pooled_projection_dim"], generator=g)
    return x, torch.tensor([1000.0, 3.7])[:batch], context, pooled


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("length", [1, 7])
@torch.no_grad()
def test_equals_diffusers(name, length):
    transformer = diffusers_transformer(**CONFIGS[name])
    ours = MMDiT.from_diffusers(transformer)
    cfg = {**TINY, **CONFIGS[name]}
    smaller = (cfg["sample_size"] - 2 * cfg["patch_size"], cfg["sample_size"])  # non-square: another crop
    for height, width in [(None, None), smaller]:
        x, t, context, pooled = inputs(cfg, length=length, height=height, width=width)
        expected = transformer(x, context, pooled, t, return_dict=False)[0]
        got = ours(x, t, context, pooled=pooled)
        assert got.shape == expected.shape == x.shape
        assert (got - expected).abs().max() <= 1e-5, f"{name}: max |diff| {(got - expected).abs().max():.2e}"


@pytest.mark.parametrize("overrides", [{}, dict(sample_size=8, patch_size=1, pos_embed_max_size=20)])
def test_position_table_equals_diffusers(overrides):
    """from_diffusers copies diffusers' saved table, so check the one built here on its own."""
    from diffusers import SD3Transformer2DModel

    expected = SD3Transformer2DModel(**{**TINY, **overrides}).pos_embed.pos_embed  # (1, max^2, D)
    assert torch.equal(MMDiT(MMDiTConfig(**{**TINY, **overrides})).patch_embed.pos_embed, expected)


@torch.no_grad()
def test_skip_layers_equal_diffusers():
    transformer = diffusers_transformer(**CONFIGS["sd3.5-medium"])
    x, t, context, pooled = inputs(TINY)
    expected = transformer(x, context, pooled, t, skip_layers=[1], return_dict=False)[0]
    torch.testing.assert_close(MMDiT.from_diffusers(transformer)(x, t, context, pooled=pooled, skip_layers=[1]),
                               expected, rtol=0, atol=1e-5)


@torch.no_grad()
def test_to_diffusers_round_trip():
    ours = randomise(MMDiT(MMDiTConfig(**{**TINY, **CONFIGS["sd3.5-medium"]})))
    transformer = ours.to_diffusers()
    x, t, context, pooled = inputs(TINY)
    torch.testing.assert_close(transformer(x, context, pooled, t, return_dict=False)[0],
                               ours(x, t, context, pooled=pooled), rtol=0, atol=1e-5)
    again = MMDiT.from_diffusers(transformer).state_dict()
    assert all(torch.equal(value, again[name]) for name, value in ours.state_dict().items())
    assert transformer.config.qk_norm == "rms_norm" and tuple(transformer.config.dual_attention_layers) == (0, 1)


@torch.no_grad()
def test_context_mask_and_pooled_default():
    """A mask keeps padded text tokens out (as if they were not there); pooled defaults to the
    mean of the real tokens. This is how the toy model's own text encoder will call it."""
    cfg = {**TINY, "pooled_projection_dim": TINY["joint_attention_dim"], "qk_norm": "rms_norm"}
    model = randomise(MMDiT(MMDiTConfig(**cfg)))
    x, t, context, _ = inputs(cfg, length=6)
    mask = torch.tensor([[True] * 3 + [False] * 3, [True] * 5 + [False]])
    padded = model(x, t, context, context_mask=mask)
    for i, n in enumerate([3, 5]):
        alone = model(x[i:i + 1], t[i:i + 1], context[i:i + 1, :n])
        torch.testing.assert_close(padded[i:i + 1], alone, rtol=1e-5, atol=1e-5)  # (another attention kernel)
        real = context[i:i + 1, :n]
        with_pooled = model(x[i:i + 1], t[i:i + 1], real, pooled=real.mean(1))
        torch.testing.assert_close(alone, with_pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(x, t, context, context_mask=torch.ones(2, 6, dtype=torch.bool)),
                               model(x, t, context), rtol=1e-5, atol=1e-5)


def test_qk_norm_under_bf16_autocast_is_diffusers_float32_rms_norm_without_a_warning():
    """Under bf16 autocast the q/k RMS norm gets bf16 heads and float32 weights: it normalises in float32,
    as diffusers' RMSNorm does, rather than warn and fall back (torch's fused kernel takes one dtype)."""
    from diffusers.models.normalization import RMSNorm as DiffusersRMSNorm

    cfg = {**TINY, "qk_norm": "rms_norm"}
    model = randomise(MMDiT(MMDiTConfig(**cfg)))
    with warnings.catch_warnings(), torch.autocast("cpu", dtype=torch.bfloat16):
        warnings.simplefilter("error")
        model(*inputs(cfg)[:3], pooled=inputs(cfg)[3])
    ours = model.blocks[0].image.q_norm
    theirs = DiffusersRMSNorm(cfg["attention_head_dim"], eps=1e-6)
    theirs.weight.data.copy_(ours.weight)
    heads = torch.randn(2, 2, 5, cfg["attention_head_dim"]).bfloat16()
    got, expected = ours(heads), theirs(heads)
    assert got.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_fresh_model_starts_at_zero_and_learns():
    """adaLN-Zero: modulations and the output layer start at zero, so every block is the identity and
    the prediction is 0; gradients still reach the final layer."""
    model = MMDiT(MMDiTConfig(**TINY))
    x, t, context, pooled = inputs(TINY)
    out = model(x, t, context, pooled=pooled)
    assert torch.equal(out, torch.zeros_like(out))
    out.sub(x).pow(2).mean().backward()
    assert model.final_linear.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("field, value", [("qk_norm", "layer_norm"), ("sample_size", 15)])
def test_bad_config_names_the_field(field, value, monkeypatch):
    with pytest.raises(ValueError, match=field):
        MMDiTConfig(**{**TINY, field: value})
    from diffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel(**{**TINY, field: value})  # diffusers builds both
    monkeypatch.setattr(MMDiT, "__init__", lambda *args: pytest.fail("built before refusing"))
    with pytest.raises(ValueError, match=field):
        MMDiT.from_diffusers(transformer)


def test_refuses_weights_it_does_not_know():
    transformer = diffusers_transformer()
    transformer.fuse_qkv_projections()  # adds attn.to_qkv, ...
    with pytest.raises(ValueError, match="to_qkv"):
        MMDiT.from_diffusers(transformer)


@torch.no_grad()
def test_as_diffusers_transformer():
    transformer = diffusers_transformer(**CONFIGS["sd3.5-large"])
    wrapper = MMDiT.from_diffusers(transformer).as_diffusers_transformer()
    assert wrapper.config.patch_size == 2 and wrapper.config.sample_size == 16 and wrapper.config.in_channels == 4
    assert dict(wrapper.config) == {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")}
    assert wrapper.dtype == torch.float32 and wrapper.device == torch.device("cpu")
    x, t, context, pooled = inputs(TINY)
    keywords = dict(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t,
                    joint_attention_kwargs=None)
    expected = transformer(**keywords).sample
    assert torch.equal(wrapper(**keywords).sample, expected)
    as_tuple = wrapper(**keywords, return_dict=False)
    assert type(as_tuple) is tuple and len(as_tuple) == 1 and torch.equal(as_tuple[0], expected)
    with pytest.raises(ValueError, match="controlnet"):
        wrapper(**keywords, block_controlnet_hidden_states=[x])


def test_sd3_pipelines_give_the_same_pixels(tiny_sd3_dir):
    """The strongest check: diffusers' own SD3 text-to-image, img2img and inpaint pipelines (through the
    bridge), once with diffusers' transformer and once with ours, give the same pixels."""
    from bridge import SD3Bridge
    from sd3_tiny import gen, pixels

    bridge = SD3Bridge.from_pretrained(tiny_sd3_dir, device="cpu")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    mask = Image.fromarray(np.where(np.arange(32)[None, :] >= 16, 255, 0).repeat(32, 0).astype(np.uint8))

    def run(b):
        return [pixels(b.sample("a red circle", num_inference_steps=2, guidance_scale=3.0, generator=gen(0)).images),
                pixels(b.img2img("a blue square", image, strength=0.7, num_inference_steps=3, generator=gen(1)).images),
                pixels(b.inpaint("a cat", image, mask, num_inference_steps=3, generator=gen(2)).images)]

    expected = run(bridge)
    pipe = bridge.pipe
    pipe.transformer = MMDiT.from_diffusers(pipe.transformer).as_diffusers_transformer()
    ours = SD3Bridge(pipe, device="cpu")  # the img2img / inpaint siblings get the new transformer too
    assert ours.img2img_pipe.transformer is ours.inpaint_pipe.transformer is pipe.transformer
    for call, want, got in zip(["sample", "img2img", "inpaint"], expected, run(ours)):
        assert want.std() > 10, f"{call}: a flat image proves nothing"
        assert np.array_equal(got, want), f"{call}: max |diff| {np.abs(got.astype(int) - want).max()}"
