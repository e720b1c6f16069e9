"""What SD3.5 users ask of the bridge (issue 11): LoRA, quantised loading, skip-layer guidance, long
prompts, and the command line that reaches them. On the tiny random SD3 pipeline of sd3_tiny.py,
against diffusers' own pipelines loaded independently from the same folder."""

from __future__ import annotations

import dataclasses

import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from sd3_tiny import build_tiny_lora, diffusers_pipe, gen, pixels

from bridge import SD3Bridge

GUIDANCE = 4.0
LONG_PROMPT = "a photo of a red circle " * 4  # 20 words: past the tiny CLIP's 16 tokens


@pytest.fixture(scope="module")
def lora_dir(tiny_sd3_dir, tmp_path_factory):
    return build_tiny_lora(tiny_sd3_dir, tmp_path_factory.mktemp("tiny-lora"))


@pytest.fixture(scope="module")
def square():
    image = Image.new("RGB", (32, 32), (255, 255, 255))
    image.paste((220, 30, 30), (0, 0, 16, 32))
    return image


# --- LoRA ---

def test_lora_reaches_all_three_calls_scales_and_unloads_like_diffusers(tiny_sd3_dir, lora_dir, square):
    """A LoRA loaded once through the bridge changes sample, img2img and inpaint (the transformer is
    shared); each equals diffusers' own load_lora_weights + set_adapters at the same scale."""
    bridge = SD3Bridge.from_pretrained(tiny_sd3_dir, device="cpu")  # its own: LoRA changes the modules
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (16, 0, 32, 32))
    kwargs = dict(num_inference_steps=2, guidance_scale=GUIDANCE)
    calls = {"sample": lambda p, g: p.sample("a red circle", generator=g, **kwargs),
             "img2img": lambda p, g: p.img2img("a red circle", square, strength=0.8, generator=g, **kwargs),
             "inpaint": lambda p, g: p.inpaint("a red circle", square, mask, generator=g, **kwargs)}
    run = lambda: {name: pixels(call(bridge, gen()).images) for name, call in calls.items()}  # noqa: E731
    base = run()
    assert bridge.load_lora_weights(lora_dir, scale=1.0) == "lora_0" and bridge.loras == {"lora_0": 1.0}
    full = run()
    bridge.set_lora_scale("lora_0", 0.5)
    half = run()
    for name in calls:
        assert not np.array_equal(full[name], base[name]) and not np.array_equal(half[name], full[name]), name

    reference = {kind: diffusers_pipe(tiny_sd3_dir, kind) for kind in calls}
    for pipe in reference.values():
        pipe.load_lora_weights(lora_dir, adapter_name="lora_0")
    for scale, ours in ((1.0, full), (0.5, half)):
        for pipe in reference.values():
            pipe.set_adapters(["lora_0"], [scale])
        assert np.array_equal(ours["sample"], pixels(reference["sample"](
            "a red circle", generator=gen(), height=32, width=32, **kwargs).images))
        assert np.array_equal(ours["img2img"], pixels(reference["img2img"](
            "a red circle", image=square, strength=0.8, generator=gen(), **kwargs).images))

    with pytest.raises(ValueError, match="already loaded"):
        bridge.load_lora_weights(lora_dir, adapter_name="lora_0")
    bridge.unload_lora_weights()
    assert bridge.loras == {} and all(np.array_equal(v, base[k]) for k, v in run().items())


# --- quantised loading (torchao int8 weight-only: runs on the CPU) ---

def test_int8_quantised_transformer_and_t5_load_sample_and_are_shared(tiny_sd3_dir, tiny_sd3, square):
    from torchao.utils import TorchAOBaseTensor

    bridge = SD3Bridge.from_pretrained(tiny_sd3_dir, device="cpu", quantization="int8")
    weight = bridge.pipe.transformer.transformer_blocks[0].attn.to_q.weight
    t5_weight = bridge.pipe.text_encoder_3.encoder.block[0].layer[0].SelfAttention.q.weight
    assert isinstance(weight, TorchAOBaseTensor) and isinstance(t5_weight, TorchAOBaseTensor)
    assert not isinstance(bridge.pipe.vae.decoder.conv_in.weight, TorchAOBaseTensor)  # the small models are not
    assert bridge.img2img_pipe.transformer is bridge.pipe.transformer is bridge.inpaint_pipe.transformer
    kwargs = dict(num_inference_steps=2, guidance_scale=GUIDANCE, generator=gen())
    quantised = pixels(bridge.sample("a red circle", **kwargs).images).astype(int)
    full = pixels(tiny_sd3.sample("a red circle", **{**kwargs, "generator": gen()}).images).astype(int)
    assert 0 < np.abs(quantised - full).mean() < 3  # rounded weights: close to float32, not equal
    assert bridge.img2img("a cat", square, strength=0.5, **{**kwargs, "generator": gen()}).images[0].size == (32, 32)


# --- skip-layer guidance ---

SLG_STEPS = 6  # diffusers skips layers at steps i with 0.01 * N < i < 0.2 * N: step 1 of 6


def test_skip_layer_guidance_matches_diffusers_and_changes_the_image(tiny_sd3, tiny_sd3_dir):
    kwargs = dict(num_inference_steps=SLG_STEPS, guidance_scale=GUIDANCE)
    ours = pixels(tiny_sd3.sample("a red circle", generator=gen(), skip_layer_guidance=[1], **kwargs).images)
    plain = pixels(tiny_sd3.sample("a red circle", generator=gen(), **kwargs).images)
    theirs = diffusers_pipe(tiny_sd3_dir)("a red circle", generator=gen(), height=32, width=32,
                                          skip_guidance_layers=[1], skip_layer_guidance_scale=2.5,
                                          skip_layer_guidance_start=0.01, skip_layer_guidance_stop=0.2, **kwargs)
    assert np.array_equal(ours, pixels(theirs.images)) and not np.array_equal(ours, plain)


def test_skip_layer_guidance_true_uses_the_medium_layers(tiny_sd3_dir, monkeypatch):
    import diffusers

    seen = []
    monkeypatch.setattr(diffusers.StableDiffusion3Pipeline, "__call__", lambda self, *a, **k: seen.append(k) or
                        (_ for _ in ()).throw(KeyboardInterrupt))
    medium = SD3Bridge(diffusers_pipe(tiny_sd3_dir), name="stabilityai/stable-diffusion-3.5-medium", device="cpu")
    with pytest.raises(KeyboardInterrupt):
        medium.sample("a cat", skip_layer_guidance=True)
    assert seen[0]["skip_guidance_layers"] == [7, 8, 9] and seen[0]["skip_layer_guidance_scale"] == 2.5
    with pytest.raises(KeyboardInterrupt):
        medium.sample("a cat")  # off unless asked for, as in Stability's reference inference
    assert "skip_guidance_layers" not in seen[1]


@pytest.mark.parametrize("call,kwargs,message", [
    ("sample", dict(skip_layer_guidance=True), "no recommended skip layers"),  # a generic folder
    ("sample", dict(skip_layer_guidance=[2]), "layer indices from 0 to 1"),
    ("sample", dict(skip_layer_guidance=[1], guidance_scale=0.0), "off at guidance_scale 0.0"),
    ("img2img", dict(skip_layer_guidance=[1]), "not in its img2img pipeline"),
    ("inpaint", dict(skip_layer_guidance=[1]), "not in its inpaint pipeline"),
    ("sample", dict(max_sequence_length=513), "from 1 to 512"),
])
def test_what_the_bridge_cannot_do_is_a_clear_error(tiny_sd3, square, call, kwargs, message):
    args = {"sample": ("a cat",), "img2img": ("a cat", square), "inpaint": ("a cat", square, square.convert("L"))}
    with pytest.raises(ValueError, match=message):
        getattr(tiny_sd3, call)(*args[call], num_inference_steps=1, **kwargs)


# --- long prompts ---

def test_long_prompts_warn_where_they_are_cut_and_max_sequence_length_reaches_diffusers(tiny_sd3, tiny_sd3_dir):
    kwargs = dict(num_inference_steps=2, guidance_scale=GUIDANCE)
    with pytest.warns(UserWarning) as caught:
        ours = tiny_sd3.sample(LONG_PROMPT, generator=gen(), max_sequence_length=4, **kwargs)
    messages = [str(w.message) for w in caught]
    assert any("CLIP tokens; the CLIP encoders read the first 16 (T5 reads up to 4 tokens" in m for m in messages)
    assert any("longer than T5's 4 tokens; raise max_sequence_length (up to 512)" in m for m in messages)
    theirs = diffusers_pipe(tiny_sd3_dir)(LONG_PROMPT, generator=gen(), height=32, width=32, max_sequence_length=4,
                                          **kwargs)
    assert np.array_equal(pixels(ours.images), pixels(theirs.images))
    with pytest.warns(UserWarning, match="CLIP tokens"):  # and T5, at its default 256 tokens, reads all of it
        default = tiny_sd3.sample(LONG_PROMPT, generator=gen(), **kwargs)
    assert not np.array_equal(pixels(default.images), pixels(ours.images))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_sd3.sample("a red circle", num_inference_steps=1)  # a short prompt: no warning


# --- the command line ---

SD3_FLAGS = [["--dtype", "float32"], ["--drop-t5"], ["--offload", "model"], ["--quantize", "int8"],
             ["--lora", "some/lora"], ["--skip-layer-guidance"], ["--max-sequence-length", "77"]]


@pytest.mark.parametrize("flag", SD3_FLAGS, ids=lambda f: f[0])
def test_cli_sd3_flags_are_an_error_with_minidiff(tiny_model_dir, tmp_path, capsys, flag):
    import sample
    from minidiff.tools.cli import run

    out = tmp_path / "x.png"
    assert run(sample.main, ["--model", str(tiny_model_dir), "--prompt", "a cat", "--out", str(out), *flag]) == 2
    err = capsys.readouterr().err
    assert f"{flag[0]} applies to SD3 models" in err and "Traceback" not in err and not out.exists()


def test_cli_reaches_the_bridge_options(tiny_sd3_dir, lora_dir, tmp_path, capsys, monkeypatch):
    import sample
    from minidiff.tools.cli import run

    loaded, calls = {}, []
    original = SD3Bridge.from_pretrained.__func__
    monkeypatch.setattr(SD3Bridge, "from_pretrained", classmethod(
        lambda cls, model, **kw: loaded.update(kw) or original(cls, model, **kw)))
    generate = SD3Bridge.generate
    monkeypatch.setattr(SD3Bridge, "generate", lambda self, call: calls.append((self, call)) or generate(
        self, dataclasses.replace(call, num_inference_steps=1, skip_layer_guidance=None)))
    base = ["--model", str(tiny_sd3_dir), "--prompt", "a red circle", "--steps", "2", "--device", "cpu", "--raw-size"]
    out = tmp_path / "sd3.png"
    assert run(sample.main, [*base, "--out", str(out), "--dtype", "float32", "--drop-t5", "--quantize", "int8",
                             "--lora", f"{lora_dir}:0.5", "--skip-layer-guidance", "--max-sequence-length", "8"]) == 0
    assert Image.open(out).size == (32, 32)
    assert loaded == dict(device="cpu", dtype=torch.float32, drop_t5=True, quantization="int8")
    bridge, kwargs = calls[0]
    assert bridge.loras == {"lora_0": 0.5} and bridge.pipe.text_encoder_3 is None
    assert kwargs.skip_layer_guidance is True and kwargs.max_sequence_length == 8
    assert run(sample.main, [*base, "--out", str(tmp_path / "b.png"), "--skip-layer-guidance", "7,8"]) == 0
    assert calls[1][1].skip_layer_guidance == [7, 8]
    assert run(sample.main, [*base, "--out", str(tmp_path / "c.png"), "--image", str(out),
                             "--skip-layer-guidance"]) == 2
    assert "--skip-layer-guidance applies to text-to-image only" in capsys.readouterr().err
    assert run(sample.main, [*base, "--out", str(tmp_path / "d.png"), "--offload", "model"]) == 2
    assert "the device is the CPU" in capsys.readouterr().err
