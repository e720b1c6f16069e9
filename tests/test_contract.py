"""The contract of minidiff.contract, checked the same way on both backends.

`MiniDiffusionPipeline` (the tiny trained toy model, tests/conftest.py) and `SD3Bridge` (a tiny
random SD3 pipeline, tests/sd3_tiny.py) must answer `sample`, `img2img` and `inpaint` with the
same keywords, the same output object and the same trace. Each test runs once per backend.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from minidiff.contract import ImageOutput, TextToImagePipeline

STEPS = 3
TRACE_KEYS = {"step", "timestep", "x_t", "pred_x0", "noise_pred"}


@pytest.fixture(params=["minidiff", "sd3"])
def pipe(request) -> TextToImagePipeline:
    return request.getfixturevalue({"minidiff": "tiny_pipe", "sd3": "tiny_sd3"}[request.param])


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def pixels(images):
    return np.stack([np.asarray(im) for im in images])


def picture(size: int) -> Image.Image:
    """A deterministic test picture: a red square on a blue-green gradient."""
    yy, xx = np.mgrid[:size, :size]
    array = np.stack([np.zeros_like(xx), 255 * xx // size, 255 * yy // size], axis=-1).astype(np.uint8)
    array[size // 4: size // 2, size // 4: size // 2] = (230, 20, 20)
    return Image.fromarray(array)


def left_half_kept(size: int) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 2, 0, size, size))
    return mask


CALLS = {  # name -> function(pipe, **kwargs) calling it with its own image inputs
    "sample": lambda p, **kw: p.sample("a red circle", **kw),
    "img2img": lambda p, **kw: p.img2img("a red circle", picture(p.image_size), **{"strength": 0.7, **kw}),
    "inpaint": lambda p, **kw: p.inpaint("a red circle", picture(p.image_size), left_half_kept(p.image_size),
                                         **{"strength": 0.99, **kw}),
}


def test_is_a_text_to_image_pipeline(pipe):
    assert isinstance(pipe, TextToImagePipeline)
    assert pipe.default_num_inference_steps >= 1 and pipe.default_guidance_scale >= 0


@pytest.mark.parametrize("call", CALLS)
def test_same_seed_same_images(pipe, call):
    run = lambda seed: CALLS[call](pipe, num_inference_steps=STEPS, generator=gen(seed))  # noqa: E731
    a, b, c = run(1), run(1), run(2)
    assert isinstance(a, ImageOutput) and a.trace == []
    assert a.images[0].size == (pipe.image_size, pipe.image_size)
    assert np.array_equal(pixels(a.images), pixels(b.images))
    assert not np.array_equal(pixels(a.images), pixels(c.images))


@pytest.mark.parametrize("call", CALLS)
def test_prompt_list_and_images_per_prompt(pipe, call):
    def run(prompt, n):
        kwargs = dict(num_inference_steps=2, generator=gen(), num_images_per_prompt=n)
        if call == "sample":
            return pipe.sample(prompt, **kwargs).images
        if call == "img2img":
            return pipe.img2img(prompt, picture(pipe.image_size), **kwargs).images
        return pipe.inpaint(prompt, picture(pipe.image_size), left_half_kept(pipe.image_size), **kwargs).images

    images = run(["a red circle", "a blue square", "a green triangle"], 2)
    assert len(images) == 6 and all(isinstance(im, Image.Image) for im in images)
    assert len(run("a red circle", 1)) == 1


def test_negative_prompt_accepted_and_used_with_guidance(pipe):
    run = lambda negative: pixels(pipe.sample("a red circle", negative_prompt=negative, guidance_scale=5.0,  # noqa
                                              num_inference_steps=STEPS, generator=gen()).images)
    assert not np.array_equal(run(None), run("a blue square"))
    two = pipe.sample(["a red circle", "a green triangle"], negative_prompt=["blue", "green"], num_inference_steps=2,
                      guidance_scale=5.0, generator=gen())
    assert len(two.images) == 2
    with pytest.raises(ValueError, match="negative prompts"):
        pipe.sample(["a red circle", "a green triangle"], negative_prompt=["blue"], num_inference_steps=2)


def test_img2img_strength_zero_returns_the_input(pipe):
    image = picture(pipe.image_size)
    out = pipe.img2img("a blue square", image, strength=0.0, num_inference_steps=STEPS, generator=gen(),
                       num_images_per_prompt=2)
    assert len(out.images) == 2
    assert all(np.array_equal(np.asarray(im), np.asarray(image)) for im in out.images)


def test_inpaint_keeps_every_black_mask_pixel(pipe):
    image, mask = picture(pipe.image_size), left_half_kept(pipe.image_size)
    out = pipe.inpaint("a blue square", image, mask, num_inference_steps=STEPS, generator=gen())
    kept = np.asarray(mask) == 0
    result = np.asarray(out.images[0])
    assert np.array_equal(result[kept], np.asarray(image)[kept])
    assert not np.array_equal(result[~kept], np.asarray(image)[~kept])


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("kwargs,message", [
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(guidance_scale=-1.0), "guidance_scale"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt"),
])
def test_bad_arguments_are_value_errors(pipe, call, kwargs, message):
    with pytest.raises(ValueError, match=message):
        CALLS[call](pipe, **kwargs)


@pytest.mark.parametrize("call", ["img2img", "inpaint"])
@pytest.mark.parametrize("strength", [-0.1, 1.5])
def test_bad_strength_is_a_value_error(pipe, call, strength):
    with pytest.raises(ValueError, match="strength"):
        CALLS[call](pipe, strength=strength, num_inference_steps=2)


@pytest.mark.parametrize("call", CALLS)
def test_callback_and_capture_steps_trace(pipe, call):
    seen = []
    out = CALLS[call](pipe, num_inference_steps=4, generator=gen(), callback=seen.append, capture_steps=[0, 1, 2],
                      **({} if call == "sample" else {"strength": 0.5}))  # strength 0.5 of 4 steps: 2 run
    steps_run = 4 if call == "sample" else 2
    assert [d["i"] for d in seen] == list(range(steps_run))
    assert set(seen[0]) == {"i", "t", "x", "denoised", "noise_pred"}
    assert [r["step"] for r in out.trace] == [0, 1, 2]
    size = (pipe.image_size, pipe.image_size)
    for record in out.trace:
        assert set(record) == TRACE_KEYS
        assert len(record["x_t"]) == 1 and record["x_t"][0].size == size
        if record["step"] == 0:
            assert record["pred_x0"] is None
        else:
            assert len(record["pred_x0"]) == 1 and record["pred_x0"][0].size == size
        assert record["noise_pred"] is None or record["noise_pred"][0].size == size
    assert out.trace[0]["timestep"] >= out.trace[-1]["timestep"]  # from noisy towards clean
