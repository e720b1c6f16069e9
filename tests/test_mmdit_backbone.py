"""The MMDiT as minidiff's denoising network (`train.py --backbone mmdit`): a flow and a DDPM model
train through the Trainer, save, load, sample, img2img and inpaint (kept pixels exact), resume bit for
bit, and refuse a changed backbone; the text width reaches either network through its config."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import train
from minidiff import MiniDiffusionPipeline
from minidiff.tools.shapes import Shapes
from minidiff.mmdit import MMDiT, MMDiTConfig
from minidiff.model import TextToImageModel
from minidiff.tools.checkpoint import config_from_dict, config_to_dict, load_model, read_safetensors
from minidiff.tools.cli import run
from minidiff.tools.trainer import Trainer, config_for_resume, latest_checkpoint
from minidiff.unet import UNet

from conftest import tiny_train_config, tiny_train_flags, tiny_unet_config

# the tiny run with a two-block MMDiT of width 16 (2 heads x 8), 4 x 4 patches: 16 image tokens
TINY_MMDIT = dict(backbone="mmdit", num_layers=2, num_heads=2, head_dim=8, patch_size=4)
# as train.py flags: the UNet's own settings left out (train.py refuses them for an MMDiT run)
TINY_MMDIT_FLAGS = tiny_train_flags(**TINY_MMDIT, base_channels=None, channel_mults=None, attention_levels=None)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module", params=["flow", "ddpm"])
def mmdit_model_dir(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"mmdit-{request.param}")
    Trainer(tiny_train_config(out, objective=request.param, **TINY_MMDIT)).train()
    return out


def test_the_text_width_reaches_either_network():
    captions = ["a red circle", "a blue square"]
    unet = TextToImageModel.for_captions(captions, tiny_unet_config(context_dim=5), text_dim=12)
    assert isinstance(unet.denoiser, UNet) and unet.config.backbone.context_dim == 12
    config = tiny_train_config("unused", **TINY_MMDIT).backbone_config()
    mmdit = TextToImageModel.for_captions(captions, config.with_text_dim(5), text_dim=12)
    assert isinstance(mmdit.denoiser, MMDiT) and mmdit.transformer is mmdit.denoiser
    cfg = mmdit.config.backbone
    assert (cfg.joint_attention_dim, cfg.pooled_projection_dim, cfg.in_channels, cfg.out_channels) == (12, 12, 3, 3)
    assert mmdit.sample_shape == (3, 16, 16) and mmdit.config.image_size == 16
    assert mmdit.transformer.context_embedder.in_features == 12
    saved = config_to_dict(mmdit.config)
    again = config_from_dict(json.loads(json.dumps(saved)))  # through JSON, as config.json
    assert again == mmdit.config and "transformer" in saved and "unet" not in saved


def test_trained_mmdit_saves_loads_and_draws(mmdit_model_dir):
    config = json.loads((mmdit_model_dir / "config.json").read_text())
    assert config["transformer"]["num_layers"] == 2 and config["transformer"]["qk_norm"] == "rms_norm"
    model = load_model(mmdit_model_dir)
    same = MiniDiffusionPipeline.from_pretrained(mmdit_model_dir, device="cpu").model
    assert isinstance(model.transformer, MMDiT)
    saved = read_safetensors(mmdit_model_dir / "model.safetensors")
    assert any(name.startswith("transformer.blocks.1.text.") for name in saved)
    for loaded in (model, same):
        state = loaded.state_dict()
        assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)
    # trained: the zero-initialised modulations have moved (adaLN-Zero starts every block as the identity)
    assert model.transformer.blocks[0].image.modulation.weight.abs().sum() > 0

    pipe = MiniDiffusionPipeline.from_pretrained(mmdit_model_dir, device="cpu")
    images = pipe.sample(["a red circle", "a blue square"], num_inference_steps=3, generator=gen()).images
    again = pipe.sample(["a red circle", "a blue square"], num_inference_steps=3, generator=gen()).images
    assert [im.size for im in images] == [(16, 16)] * 2
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, again))  # same seed, same pixels
    picture = Shapes(16, seed=3).pil_and_caption(0)[0]
    edited = pipe.img2img("a green square", picture, strength=0.5, num_inference_steps=4, generator=gen()).images[0]
    assert edited.size == (16, 16) and not np.array_equal(np.asarray(edited), np.asarray(picture))
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[:, 8:] = 255
    out = pipe.inpaint("a green square", picture, Image.fromarray(mask, mode="L"), num_inference_steps=4,
                       generator=gen()).images[0]
    keep = mask < 128
    assert np.array_equal(np.asarray(out)[keep], np.asarray(picture)[keep])
    assert not np.array_equal(np.asarray(out)[~keep], np.asarray(picture)[~keep])


@pytest.mark.slow
def test_mmdit_run_resumes_bitwise_and_keeps_its_backbone(tmp_path):
    """A run resumed from its step-3 checkpoint ends with the weights, EMA, optimizer and generator of
    the same run never stopped; a resumed run refuses another backbone or MMDiT size."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = tmp_path / "ref"
        assert run(train.main, ["--out", str(ref), *TINY_MMDIT_FLAGS, "--steps", "6", "--checkpoint-every", "3",
                                "--objective", "flow"]) == 0
        out = tmp_path / "run"
        shutil.copytree(ref / "checkpoints" / "step-00000003", out / "checkpoints" / "step-00000003")
        assert run(train.main, ["--out", str(out), "--resume", "--device", "cpu"]) == 0
    finally:
        torch.set_num_threads(threads)
    final = "checkpoints/step-00000006"
    for name in ("model.safetensors", f"{final}/model.safetensors", f"{final}/ema.safetensors",
                 f"{final}/optimizer.safetensors", f"{final}/rng.safetensors"):
        got, want = read_safetensors(out / name), read_safetensors(ref / name)
        assert got.keys() == want.keys(), name
        assert all(torch.equal(got[k], want[k]) for k in want), name
    assert any(k.startswith("transformer.") for k in read_safetensors(out / "model.safetensors"))
    checkpoint = latest_checkpoint(out)
    with pytest.raises(ValueError, match="--backbone unet differs from the resumed run's mmdit"):
        config_for_resume(checkpoint, {"backbone": "unet"})
    with pytest.raises(ValueError, match="--patch-size 2 differs from the resumed run's 4"):
        config_for_resume(checkpoint, {"patch_size": 2})


def test_mmdit_config_refuses_what_it_cannot_build_naming_the_field():
    with pytest.raises(ValueError, match="patch_size"):
        tiny_train_config("unused", **{**TINY_MMDIT, "patch_size": 3}).backbone_config()
    with pytest.raises(ValueError, match="num_attention_heads \\* attention_head_dim must be a multiple of 4"):
        MMDiTConfig(num_attention_heads=3, attention_head_dim=5, caption_projection_dim=15)
    cfg = MMDiTConfig(num_attention_heads=3, attention_head_dim=4, caption_projection_dim=12, in_channels=3)
    x = torch.randn(1, 3, 16, 16)
    assert MMDiT(cfg)(x, torch.tensor([5.0]), torch.randn(1, 2, cfg.joint_attention_dim)).shape == x.shape


@pytest.mark.slow
def test_the_tools_take_an_mmdit_model_like_a_unet_one(mmdit_model_dir, tmp_path, capsys):
    """python -m minidiff.evaluate, python -m minidiff.figures and the app load it and draw with it."""
    from minidiff.tools import evaluate, figures
    from minidiff.tools.webapp import AppModel, Result, Settings, generate

    assert evaluate.main(["--model", str(mmdit_model_dir), "--samples-per-prompt", "1", "--steps", "2"]) == 0
    assert "single-object prompts: colour" in capsys.readouterr().out
    assert figures.main(["--model", str(mmdit_model_dir), "--out", str(tmp_path / "figures"), "--steps", "2"]) == 0
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == sorted(figures.FIGURES)
    app = AppModel.load(str(mmdit_model_dir), device="cpu")
    assert app.backend == "minidiff" and isinstance(app.pipe.model.denoiser, MMDiT)
    result = list(generate(app, "txt2img", Settings("a red circle", steps=3)))[-1]
    assert isinstance(result, Result) and result.images[0].size == (16, 16)
