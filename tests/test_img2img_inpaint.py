"""img2img and inpainting: strength as diffusers counts it, the RePaint blend, exact paste-back.
What every minidiff model must do runs on both tiny models, DDPM and rectified flow
(`minidiff_pipe`); the DDPM formulas (diffusers' timesteps, add_noise) on the DDPM one."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from PIL import Image

from minidiff.tools.shapes import Shapes
from minidiff.tools.pictures import pil_to_tensor
from minidiff.tools.pictures import ImageInputError
from minidiff.scheduler import NoiseSchedule

STEPS = 4


def pixels(images):
    return np.stack([np.asarray(im) for im in images])


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def picture():
    return Shapes(16, seed=3).pil_and_caption(0)[0]


@pytest.fixture
def count_unet_calls(monkeypatch):
    """count_unet_calls(pipe) wraps that pipeline's UNet forward; -> the list its calls append their
    timesteps to."""
    def count(pipe):
        calls = []
        unet = pipe.model.unet
        original = unet.forward

        def counted(x, timesteps, *args, **kwargs):
            calls.append(float(timesteps[0]))
            return original(x, timesteps, *args, **kwargs)

        monkeypatch.setattr(unet, "forward", counted)
        return calls

    return count


def half_mask(size=16, value=255):
    """White (replace) on the right half, black (keep) on the left."""
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[:, size // 2:] = value
    return Image.fromarray(mask, mode="L")


# --- img2img ------------------------------------------------------------------------------------

@pytest.mark.parametrize("output_type", ["pil", "pt"])
def test_strength_zero_returns_the_input_without_calling_the_model(minidiff_pipe, picture, count_unet_calls,
                                                                  output_type):
    calls = count_unet_calls(minidiff_pipe)
    out = minidiff_pipe.img2img("a blue circle", picture, strength=0.0, num_images_per_prompt=2, generator=gen(),
                                output_type=output_type)
    assert calls == []
    if output_type == "pil":
        assert all(np.array_equal(np.asarray(im), np.asarray(picture)) for im in out.images)
    else:
        expected = (pil_to_tensor(picture) + 1) / 2
        assert all(torch.allclose(im, expected, atol=1e-6) for im in out.images)


@pytest.mark.parametrize("steps,strength", [(4, 0.5), (4, 1.0), (5, 0.3), (10, 0.29), (3, 0.99)])
def test_model_calls_are_int_n_times_strength_on_diffusers_timesteps(tiny_pipe, picture, count_unet_calls, steps,
                                                                     strength):
    """The timesteps visited are exactly those of diffusers' img2img `get_timesteps` (reference).
    (A flow model's: test_flow.py and test_steps_run_is_the_objectives_rule_... below.)"""
    calls = count_unet_calls(tiny_pipe)
    import diffusers
    from diffusers import StableDiffusionImg2ImgPipeline

    config = tiny_pipe.config.scheduler
    theirs = diffusers.DDIMScheduler(num_train_timesteps=config.num_train_timesteps,
                                     timestep_spacing=config.timestep_spacing, steps_offset=config.steps_offset)
    theirs.set_timesteps(steps)
    expected, count = StableDiffusionImg2ImgPipeline.get_timesteps(types.SimpleNamespace(scheduler=theirs), steps,
                                                                   strength, "cpu")
    tiny_pipe.img2img("a blue circle", picture, strength=strength, num_inference_steps=steps, generator=gen())
    assert len(calls) == int(steps * strength) == count
    assert calls == expected.tolist()


def test_img2img_starts_from_the_input_noised_with_add_noise(tiny_pipe, picture):
    """Step 0 of the trace is sqrt(alpha-bar_t) x0 + sqrt(1 - alpha-bar_t) eps, eps the generator's first draw."""
    out = tiny_pipe.img2img("a blue circle", picture, strength=0.5, num_inference_steps=STEPS, generator=gen(7),
                            capture_steps=[0])
    tiny_pipe_schedule = NoiseSchedule(tiny_pipe.config.scheduler)
    tiny_pipe_schedule.set_timesteps(STEPS)
    t = int(tiny_pipe_schedule.timesteps[STEPS - STEPS // 2])
    eps = torch.randn(1, 3, 16, 16, generator=gen(7))
    alpha_bar = tiny_pipe_schedule.alphas_cumprod[t]
    x_t = alpha_bar.sqrt() * pil_to_tensor(picture)[None] + (1 - alpha_bar).sqrt() * eps
    expected = ((x_t.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
    assert out.trace[0]["timestep"] == t
    assert np.abs(np.asarray(out.trace[0]["x_t"][0]).astype(int) - expected).max() <= 1


def test_strength_one_ignores_the_input(minidiff_pipe, picture):
    """At strength 1 img2img starts from pure noise: the same images as text to image, whatever the input."""
    kwargs = dict(num_inference_steps=STEPS, num_images_per_prompt=2)
    text = minidiff_pipe.sample("a blue circle", generator=gen(3), **kwargs).images
    edited = minidiff_pipe.img2img("a blue circle", picture, strength=1.0, generator=gen(3), **kwargs).images
    other = minidiff_pipe.img2img("a blue circle", Image.new("RGB", (16, 16), "white"), strength=1.0, generator=gen(3),
                              **kwargs).images
    assert np.array_equal(pixels(text), pixels(edited)) and np.array_equal(pixels(text), pixels(other))


def test_img2img_same_seed_same_result_and_the_input_matters(minidiff_pipe, picture):
    run = lambda image, seed: pixels(minidiff_pipe.img2img("a blue circle", image, strength=0.5,  # noqa: E731
                                                           num_inference_steps=STEPS, generator=gen(seed)).images)
    assert np.array_equal(run(picture, 1), run(picture, 1))
    assert not np.array_equal(run(picture, 1), run(picture, 2))
    assert not np.array_equal(run(picture, 1), run(Image.new("RGB", (16, 16), "white"), 1))


def test_any_mode_and_size_is_converted_and_resized_with_a_warning(minidiff_pipe, tmp_path):
    path = tmp_path / "grey.png"
    Image.new("L", (40, 30), 128).save(path)
    with pytest.warns(UserWarning, match="40x30 resized to 16x16"):
        out = minidiff_pipe.img2img("a red square", str(path), strength=0.5, num_inference_steps=2, generator=gen())
    assert out.images[0].size == (16, 16) and out.images[0].mode == "RGB"


@pytest.mark.parametrize("call", ["img2img", "inpaint"])
@pytest.mark.parametrize("strength", [-0.1, 1.5])
def test_strength_outside_zero_one_is_an_error(minidiff_pipe, picture, count_unet_calls, call, strength):
    calls = count_unet_calls(minidiff_pipe)
    args = (picture,) if call == "img2img" else (picture, half_mask())
    with pytest.raises(ValueError, match="strength must be between 0 and 1"):
        getattr(minidiff_pipe, call)("a red circle", *args, strength=strength)
    assert calls == []


def test_unreadable_image_is_a_clear_error(minidiff_pipe, tmp_path):
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(ImageInputError, match="not a readable image"):
        minidiff_pipe.img2img("a red circle", tmp_path / "bad.png")
    with pytest.raises(ImageInputError, match="not found"):
        minidiff_pipe.inpaint("a red circle", tmp_path / "missing.png", half_mask())


def test_steps_run_is_the_objectives_rule_and_the_calls_run_that_many(minidiff_pipe, picture):
    """DDPM models run int(N * s) of N steps (diffusers' SD pipelines), flow models N - int(N - N * s)
    (SD3's): the pipeline's `steps_run` says so, and img2img calls the model exactly that often."""
    pipe = minidiff_pipe
    flow = pipe.config.objective == "flow"
    assert pipe.steps_run(4, 0.5) == 2 and pipe.steps_run(4) == 4 and pipe.steps_run(4, 0.2) == (1 if flow else 0)
    assert pipe.steps_run(50, 0.99) == (50 if flow else 49) and pipe.steps_run(40, 0.7) == 28
    for steps, strength in ((50, 0.99), (10, 0.25), (4, 0.2)):
        seen = []
        pipe.img2img("a red circle", picture, strength=strength, num_inference_steps=steps, callback=seen.append)
        assert len(seen) == pipe.steps_run(steps, strength)


# --- inpainting ---------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler,jumps", [(0, 0), (-1, 0), (0, 1)])
def test_inpaint_keeps_every_black_mask_pixel(minidiff_pipe, picture, sampler, jumps):
    """Binarised at 0.5: grey 100 keeps, grey 200 replaces; kept pixels equal the input exactly.
    With the model's first and last sampler (DDPM models: ddpm, ddim; flow: euler), RePaint's jumps or not."""
    sampler = minidiff_pipe.samplers[sampler]
    rng = np.random.default_rng(0)
    mask = Image.fromarray(rng.choice(np.array([0, 100, 200, 255], dtype=np.uint8), size=(16, 16)), mode="L")
    out = minidiff_pipe.inpaint("a green square", picture, mask, num_inference_steps=STEPS, num_images_per_prompt=2,
                            generator=gen(), sampler=sampler, resample_jumps=jumps)
    keep = np.asarray(mask) < 128
    for image in out.images:
        result = np.asarray(image)
        assert np.array_equal(result[keep], np.asarray(picture)[keep])
        assert not np.array_equal(result[~keep], np.asarray(picture)[~keep])


def test_inpaint_blends_the_kept_region_noised_with_one_noise_tensor(minidiff_pipe, picture):
    """After step i the kept region is add_noise(input, eps, t_{i+1}) with the same eps at every
    step (eps = the generator's first draw, which also started the run), the input after the last.
    add_noise is the objective's: DDPM eq. 4, or the flow's straight line (1 - sigma) x0 + sigma eps."""
    schedule = minidiff_pipe.model.objective.make_sampler(None, STEPS)
    timesteps = schedule.timesteps.tolist()
    x0 = pil_to_tensor(picture)[None]
    eps = torch.randn(1, 3, 16, 16, generator=gen(5))
    keep = ~torch.from_numpy(np.asarray(half_mask()) >= 128)
    seen = []
    minidiff_pipe.inpaint("a green square", picture, half_mask(), strength=0.9, num_inference_steps=STEPS,
                          generator=gen(5), callback=seen.append)
    runs = {"ddpm": 3, "flow": 4}[minidiff_pipe.config.objective]  # int(4 * 0.9); 4 - int(4 - 3.6)
    assert [s["i"] for s in seen] == list(range(runs))  # the last `runs` timesteps
    for step, next_t in zip(seen, timesteps[STEPS - runs + 1:] + [None]):
        expected = x0 if next_t is None else schedule.add_noise(x0, eps, torch.tensor([next_t]))
        torch.testing.assert_close(step["x"][0][:, keep], expected[0][:, keep], atol=1e-5, rtol=0)


def test_all_black_mask_returns_the_input(minidiff_pipe, picture):
    out = minidiff_pipe.inpaint("a green square", picture, Image.new("L", (16, 16), 0), num_inference_steps=STEPS,
                            generator=gen())
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(picture))


def test_all_white_mask_at_strength_one_is_text_to_image(minidiff_pipe, picture):
    kwargs = dict(num_inference_steps=STEPS, num_images_per_prompt=2)
    painted = minidiff_pipe.inpaint("a green square", picture, Image.new("L", (16, 16), 255), strength=1.0,
                                    generator=gen(4), **kwargs).images
    text = minidiff_pipe.sample("a green square", generator=gen(4), **kwargs).images
    assert np.array_equal(pixels(painted), pixels(text))


def test_inpaint_same_seed_same_result(minidiff_pipe, picture):
    run = lambda seed: pixels(minidiff_pipe.inpaint("a green square", picture, half_mask(),  # noqa: E731
                                                    num_inference_steps=STEPS, generator=gen(seed)).images)
    assert np.array_equal(run(1), run(1))
    assert not np.array_equal(run(1), run(2))


def test_resampling_adds_model_calls_but_reports_each_step_once(minidiff_pipe, picture, count_unet_calls):
    calls = count_unet_calls(minidiff_pipe)
    seen = []
    minidiff_pipe.inpaint("a green square", picture, half_mask(), strength=1.0, num_inference_steps=STEPS,
                          generator=gen(), resample_jumps=2, callback=seen.append)
    assert len(calls) == STEPS + 2 * (STEPS - 1)  # no jump back after the last step
    assert [s["i"] for s in seen] == list(range(STEPS))
    with pytest.raises(ValueError, match="resample_jumps"):
        minidiff_pipe.inpaint("a green square", picture, half_mask(), resample_jumps=-1)


def test_mask_of_another_size_than_the_image_is_refused(minidiff_pipe, picture, count_unet_calls):
    calls = count_unet_calls(minidiff_pipe)
    with pytest.raises(ImageInputError, match="mask_image is 8x8 but image is 16x16"):
        minidiff_pipe.inpaint("a green square", picture, Image.new("L", (8, 8), 255))
    assert calls == []


def test_mask_in_any_mode_and_resized_together_with_the_image(minidiff_pipe, picture, tmp_path):
    """A 32 px RGB image and RGBA mask: both resized to 16 px; kept pixels equal the resized input."""
    big = picture.resize((32, 32), Image.Resampling.NEAREST)
    mask = half_mask(32).convert("RGBA")
    mask.save(tmp_path / "mask.png")
    with pytest.warns(UserWarning, match="resized to 16x16"):
        out = minidiff_pipe.inpaint("a green square", big, tmp_path / "mask.png", num_inference_steps=2, generator=gen())
    resized = np.asarray(big.resize((16, 16), Image.Resampling.BICUBIC))
    assert np.array_equal(np.asarray(out.images[0])[:, :8], resized[:, :8])
