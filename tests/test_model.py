"""Tokenizer, text encoder and UNet: shapes, conditioning, configs that round-trip."""

from __future__ import annotations

import pytest
import torch

from minidiff.model import TextToImageModel
from minidiff.text import TextEncoder, TextEncoderConfig, Tokenizer
from minidiff.tools.checkpoint import config_from_dict, config_to_dict
from minidiff.unet import UNet, UNetConfig, timestep_embedding

from conftest import tiny_unet_config


def test_tokenizer_pads_marks_and_warns_on_unknown_words():
    tok = Tokenizer.from_captions(["a red circle", "a blue square"])
    ids, mask = tok(["a red circle", ""])
    assert ids.shape == (2, tok.max_length)
    assert mask[0].sum() == 5 and mask[1].sum() == 2  # <bos> a red circle <eos>; <bos> <eos>
    with pytest.warns(UserWarning, match="dragon"):
        ids2, _ = tok(["a red dragon circle"])
    assert torch.equal(ids2[0], ids[0])  # the unknown word is dropped, nothing else changes
    assert tok(["An RED circle"])[0].equal(ids[:1])  # case and "an" are normalised


def test_text_encoder_attends_with_the_math_kernel_under_bf16():
    """bf16's flash kernel on a CPU is several times slower at caption lengths (benchmarks/attention_kernels.py)."""
    encoder, ids = TextEncoder(TextEncoderConfig()).train(), torch.randint(3, 32, (4, 15))
    with torch.profiler.profile() as profile, torch.autocast("cpu", dtype=torch.bfloat16):
        encoder(ids, ids > 5).float().sum().backward()
    kernels = {event.key for event in profile.key_averages() if "_attention_" in event.key}
    assert "aten::_scaled_dot_product_attention_math" in kernels and not any("flash" in k for k in kernels), kernels


@pytest.mark.parametrize("seed", range(3))
def test_clip_init_tells_the_left_object_from_the_right_from_the_first_step(seed):
    """With clip_init words start at the positions' std 0.02 (CLIP's init), so moving "red" from the first
    object to the second changes its encoding about as much as changing it to "blue" does. With
    nn.Embedding's N(0, 1) words (the default) it changes 2% as much: nearly a bag of words, with which
    two-object colours were never learnt (BENCHMARKS.md section 9)."""
    left, right = "a red circle on the left and a blue square", "a blue square on the left and a red circle"
    tokenizer = Tokenizer.from_captions([left])
    ids, mask = tokenizer([left, right])
    first, second = (ids == tokenizer.index["red"]).float().argmax(dim=1)  # where "red" is in each caption
    ratios = {}
    for clip_init in (True, False):
        torch.manual_seed(seed)
        encoder = TextEncoder(TextEncoderConfig(len(tokenizer.vocab), tokenizer.max_length, clip_init=clip_init))
        with torch.no_grad():
            out = encoder(ids, mask)
        red_first, red_second, blue_first = out[0, first], out[1, second], out[1, first]
        ratios[clip_init] = ((red_first - red_second).norm() / (red_first - blue_first).norm()).item()
    assert ratios[True] > 0.5 and ratios[False] < 0.1, ratios


def test_text_clip_init_reaches_the_model_and_its_saved_config():
    from minidiff.training import TrainConfig, build_model

    captions = ["a red circle", "a blue square on the left and a red circle on the right"]
    for flag in (False, True):
        model = build_model(TrainConfig(text_clip_init=flag), captions)
        assert model.config.text_encoder.clip_init is flag
        assert config_from_dict(config_to_dict(model.config)).text_encoder.clip_init is flag
        std = model.text_encoder.token_embedding.weight.std().item()
        assert abs(std - (0.02 if flag else 1.0)) < 0.3 * (0.02 if flag else 1.0), std
    old = config_to_dict(build_model(TrainConfig(), captions).config)
    del old["text_encoder"]["clip_init"]  # a folder saved before the option loads as it was trained
    assert config_from_dict(old).text_encoder.clip_init is False


def test_timestep_embedding_is_distinct_per_step():
    emb = timestep_embedding(torch.arange(1000), 64)
    assert emb.shape == (1000, 64)
    assert torch.cdist(emb[:-1], emb[1:]).diagonal().min() > 1e-3


@pytest.mark.parametrize("size,mults", [(16, (1, 2)), (32, (1, 2, 2))])
def test_unet_shapes_and_text_dependence(size, mults):
    torch.manual_seed(0)
    unet = UNet(tiny_unet_config(image_size=size, channel_mults=mults, context_dim=8))
    for p in unet.parameters():  # zero-initialised output layers would hide the conditioning
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(2, 3, size, size)
    t = torch.tensor([3, 900])
    ctx = torch.randn(2, 5, 8)
    mask = torch.ones(2, 5, dtype=torch.bool)
    out = unet(x, t, ctx, mask)
    assert out.shape == x.shape
    assert not torch.allclose(out, unet(x, t, torch.randn(2, 5, 8), mask))  # text matters
    assert not torch.allclose(out, unet(x, t + 50, ctx, mask))  # time matters
    mask2 = mask.clone()
    mask2[:, 3:] = False  # padded tokens are ignored
    ctx2 = ctx.clone()
    ctx2[:, 3:] = 100.0
    torch.testing.assert_close(unet(x, t, ctx, mask2), unet(x, t, ctx2, mask2))


def test_image_size_must_fit_the_downsampling():
    with pytest.raises(ValueError, match="multiple of 4"):
        UNetConfig(image_size=18, channel_mults=(1, 2, 2))


def test_model_config_round_trips():
    model = TextToImageModel.for_captions(["a red circle"], tiny_unet_config(), text_dim=16)
    again = config_from_dict(config_to_dict(model.config))
    assert again == model.config
