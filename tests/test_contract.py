"""The contract of minidiff.tools.contract, checked the same way on both backends.

`MiniDiffusionPipeline` (the tiny trained toy models, a DDPM one and a rectified-flow one,
tests/conftest.py) and `SD3Bridge` (a tiny random SD3 pipeline, tests/sd3_tiny.py) must answer
`sample`, `img2img` and `inpaint` with the same keywords, the same output object and the same
trace. Each test runs once per model: minidiff-ddpm, minidiff-flow, sd3.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from minidiff.tools.contract import ImageOutput, TextToImagePipeline

STEPS = 3
TRACE_KEYS = {"step", "timestep", "x_t", "pred_x0", "noise_pred"}


PIPES = {"minidiff-ddpm": "tiny_pipe", "minidiff-flow": "tiny_flow_pipe", "sd3": "tiny_sd3"}


@pytest.fixture(params=PIPES)
def pipe(request) -> TextToImagePipeline:
    return request.getfixturevalue(PIPES[request.param])


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
    steps_run = 4 if call == "sample" else 2  # int(4 * 0.5) and 4 - int(4 - 4 * 0.5) agree
    assert pipe.steps_run(4, None if call == "sample" else 0.5) == steps_run
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


@pytest.mark.parametrize("call", ["img2img", "inpaint"])
def test_steps_run_is_what_an_edit_really_runs(pipe, call):
    """DDPM models run int(N * s) of N steps (diffusers' SD pipelines), flow models and SD3
    N - int(N - N * s) (SD3's): 4 steps at 0.99 is 3 or 4, 10 at 0.25 is 2 or 3. `steps_run` says
    so, and the call makes exactly that many steps (what the web app's progress counts on)."""
    flow = getattr(getattr(pipe, "config", None), "objective", "flow") == "flow"
    for steps, strength, ddpm_runs, flow_runs in ((4, 0.99, 3, 4), (10, 0.25, 2, 3), (5, 1.0, 5, 5)):
        expected = flow_runs if flow else ddpm_runs
        assert pipe.steps_run(steps, strength) == expected
        seen = []
        CALLS[call](pipe, num_inference_steps=steps, strength=strength, generator=gen(), callback=seen.append)
        assert len(seen) == expected, (steps, strength)
    assert pipe.steps_run(7) == 7


def test_defaults_size_and_samplers_are_what_a_call_uses(pipe):
    """None means the backend's default everywhere: `defaults`, `size` and the first of `samplers`;
    a sampler or size the backend lacks is a ValueError before anything runs."""
    steps, guidance = pipe.defaults()
    assert (steps, guidance) == (pipe.default_num_inference_steps, pipe.default_guidance_scale)
    assert pipe.defaults(3, 1.5) == (3, 1.5)
    assert pipe.size() == (pipe.image_size, pipe.image_size)
    assert pipe.samplers and pipe.check_sampler(None) == pipe.samplers[0]
    with pytest.raises(ValueError, match="sampler"):
        pipe.sample("a red circle", sampler="no-such-sampler", num_inference_steps=1)
    with pytest.raises(ValueError):
        pipe.size(pipe.image_size + 1, pipe.image_size)
    # the default sampler is the one a call without `sampler` runs: the same images
    run = lambda **kw: pixels(pipe.sample("a red circle", num_inference_steps=2, generator=gen(), **kw).images)  # noqa
    assert np.array_equal(run(), run(sampler=pipe.samplers[0]))


def test_batches_cut_a_call_in_order_and_the_images_follow_the_batches(pipe):
    call = pipe.call_type(["a red circle", "a blue square"], num_images_per_prompt=3, batch_size=4)
    batches = pipe.batches(call)
    assert [b.prompt for b in batches] == [["a red circle"] * 3 + ["a blue square"], ["a blue square"] * 2]
    assert pipe.batches(pipe.call_type("a red circle", num_images_per_prompt=3, batch_size=3)) == \
        [pipe.call_type("a red circle", num_images_per_prompt=3, batch_size=3)]
    with pytest.raises(ValueError, match="batch_size"):
        pipe.batches(pipe.call_type("a red circle", batch_size=0))
    run = lambda size: pixels(pipe.sample(["a red circle", "a blue square"], num_images_per_prompt=2,  # noqa: E731
                                          num_inference_steps=2, batch_size=size, generator=gen()).images)
    two = run(2)
    assert two.shape[0] == 4 and np.array_equal(run(2), two)  # the same seed and batch_size: the same images
    generator = gen()  # each batch draws from the generator in turn: as two calls, one after the other
    in_turn = [pixels(pipe.sample([prompt] * 2, num_inference_steps=2, generator=generator).images)
               for prompt in ("a red circle", "a blue square")]
    assert np.array_equal(two, np.concatenate(in_turn))
