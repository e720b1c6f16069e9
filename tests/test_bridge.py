"""The SD3 bridge against diffusers itself, on a tiny random SD3 pipeline; its errors; the CLI's choice.

The reference in each test is diffusers' own pipeline loaded independently from the same folder
and called with the same generator and arguments: the bridge must give the same pixels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from huggingface_hub.errors import GatedRepoError, HFValidationError, OfflineModeIsEnabled, RepositoryNotFoundError
from huggingface_hub.utils import httpx
from PIL import Image

from bridge import BridgeError, SD3Bridge
from bridge.sd3 import defaults_for
from minidiff.tools.pictures import ImageInputError

STEPS, GUIDANCE = 3, 4.0
GATED_ID = "stabilityai/stable-diffusion-3.5-medium"


def pixels(images):
    return np.stack([np.asarray(im) for im in images])


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def diffusers_pipes(tiny_sd3_dir):
    """diffusers' three SD3 pipelines, each loaded on its own from the saved folder."""
    from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline, StableDiffusion3Pipeline

    return {name: quiet(cls.from_pretrained(tiny_sd3_dir)) for name, cls in [
        ("sample", StableDiffusion3Pipeline), ("img2img", StableDiffusion3Img2ImgPipeline),
        ("inpaint", StableDiffusion3InpaintPipeline)]}


@pytest.fixture(scope="module")
def start_image(tiny_sd3):
    """A 32 x 32 picture: left half red, right half a blue disc on white."""
    image = Image.new("RGB", (32, 32), (255, 255, 255))
    image.paste((220, 30, 30), (0, 0, 16, 32))
    yy, xx = np.mgrid[:32, :32]
    array = np.asarray(image).copy()
    array[(yy - 16) ** 2 + (xx - 24) ** 2 < 36] = (30, 30, 220)
    return Image.fromarray(array)


@pytest.fixture(scope="module")
def right_half_mask():
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (16, 0, 32, 32))
    return mask


# --- same pixels as diffusers ---

def test_sample_matches_diffusers(tiny_sd3, diffusers_pipes):
    kwargs = dict(negative_prompt="green", num_inference_steps=STEPS, guidance_scale=GUIDANCE, num_images_per_prompt=2)
    ours = tiny_sd3.sample(["a red circle", "a blue square"], generator=gen(), **kwargs)
    theirs = diffusers_pipes["sample"](["a red circle", "a blue square"], generator=gen(), height=32, width=32, **kwargs)
    assert len(ours.images) == 4 and ours.images[0].size == (32, 32)
    assert np.array_equal(pixels(ours.images), pixels(theirs.images))
    # watching the steps changes nothing
    watched = tiny_sd3.sample(["a red circle", "a blue square"], generator=gen(), callback=lambda d: None,
                              capture_steps=[0, STEPS], **kwargs)
    assert np.array_equal(pixels(watched.images), pixels(theirs.images))


def test_img2img_matches_diffusers(tiny_sd3, diffusers_pipes, start_image):
    kwargs = dict(strength=0.6, num_inference_steps=5, guidance_scale=GUIDANCE)
    ours = tiny_sd3.img2img("a blue square", start_image, generator=gen(), **kwargs)
    theirs = diffusers_pipes["img2img"]("a blue square", image=start_image, generator=gen(), **kwargs)
    assert np.array_equal(pixels(ours.images), pixels(theirs.images))


def _decode(pipe, latents, shift: bool):
    """Latents -> PIL through the VAE, with or without the shift_factor (the reference, written out)."""
    config = pipe.vae.config
    z = latents / config.scaling_factor + (config.shift_factor if shift else 0.0)
    with torch.no_grad():
        return pipe.image_processor.postprocess(pipe.vae.decode(z, return_dict=False)[0], output_type="pil")


def test_inpaint_matches_diffusers_with_the_shift_decode_and_paste_back(tiny_sd3, diffusers_pipes, start_image,
                                                                        right_half_mask):
    kwargs = dict(strength=0.99, num_inference_steps=4, guidance_scale=GUIDANCE)
    ours = pixels(tiny_sd3.inpaint("a green triangle", start_image, right_half_mask, generator=gen(), **kwargs).images)
    inpaint = diffusers_pipes["inpaint"]
    latents = inpaint("a green triangle", image=start_image, mask_image=right_half_mask, generator=gen(),
                      output_type="latent", **kwargs).images
    decoded = pixels(_decode(inpaint, latents, shift=True))
    replace = (np.asarray(right_half_mask) >= 128)[None, :, :, None]
    expected = np.where(replace, decoded, np.asarray(start_image)[None])
    assert np.array_equal(ours, expected)
    assert np.array_equal(ours[0, :, :16], np.asarray(start_image)[:, :16])  # kept half: the input, exactly


def test_diffusers_sd3_inpaint_still_drops_the_vae_shift(diffusers_pipes, start_image, right_half_mask):
    """Why the bridge decodes inpainting itself: diffusers 0.42's inpaint output is the decode *without*
    shift_factor (0.0609 here, as in SD3.5). If this fails, diffusers fixed it and the workaround can go."""
    inpaint = diffusers_pipes["inpaint"]
    kwargs = dict(image=start_image, mask_image=right_half_mask, strength=0.99, num_inference_steps=4,
                  guidance_scale=GUIDANCE)
    raw = pixels(inpaint("a green triangle", generator=gen(), **kwargs).images)
    latents = inpaint("a green triangle", generator=gen(), output_type="latent", **kwargs).images
    assert np.array_equal(raw, pixels(_decode(inpaint, latents, shift=False)))
    correct = pixels(_decode(inpaint, latents, shift=True))
    assert np.abs(raw.astype(int) - correct.astype(int)).mean() > 1.0


def test_inpaint_mask_must_match_the_image_size(tiny_sd3, start_image):
    with pytest.raises(ImageInputError, match="mask_image is 16x16 but image is 32x32"):
        tiny_sd3.inpaint("a cat", start_image, Image.new("L", (16, 16), 255), num_inference_steps=2)


# --- the per-step trace: flow-matching identities checked against the scheduler's sigmas ---

def test_callback_gives_the_velocity_and_x0_of_each_euler_step(tiny_sd3):
    from diffusers import FlowMatchEulerDiscreteScheduler

    seen = []
    out = tiny_sd3.sample("a red circle", num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=gen(),
                          callback=lambda d: seen.append({k: v.clone() if torch.is_tensor(v) else v
                                                          for k, v in d.items()}),
                          capture_steps=[0, 1, STEPS])
    assert [d["i"] for d in seen] == list(range(STEPS))
    assert set(seen[0]) == {"i", "t", "x", "denoised", "noise_pred"}
    assert seen[0]["x"].shape == (1, 16, 16, 16)  # latents: 16 channels, 32 px / 2
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(tiny_sd3.pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    sigmas = scheduler.sigmas
    for i in range(1, STEPS):  # x_{i} = x_{i-1} + (sigma_i+1 - sigma_i) v_i, and x0_i = x_{i-1} - sigma_i v_i
        x_before, d = seen[i - 1]["x"], seen[i]
        torch.testing.assert_close(d["x"], x_before + (sigmas[i + 1] - sigmas[i]) * d["noise_pred"])
        torch.testing.assert_close(d["denoised"], x_before - sigmas[i] * d["noise_pred"])
    # the last step lands on sigma = 0, where the Euler step *is* the predicted x0
    torch.testing.assert_close(seen[-1]["denoised"], seen[-1]["x"])
    trace = out.trace
    assert [r["step"] for r in trace] == [0, 1, STEPS]
    assert trace[0]["pred_x0"] is None and trace[0]["timestep"] == pytest.approx(float(scheduler.timesteps[0]))
    assert all(len(r["x_t"]) == 1 and r["x_t"][0].size == (32, 32) for r in trace)
    assert np.array_equal(np.asarray(trace[-1]["x_t"][0]), np.asarray(out.images[0]))  # decoded with the shift
    assert np.abs(pixels(trace[-1]["pred_x0"]).astype(int) - pixels(out.images).astype(int)).max() <= 1


def test_capture_steps_out_of_range_is_a_clear_error(tiny_sd3, start_image):
    with pytest.raises(ValueError, match="capture_steps"):
        tiny_sd3.sample("a cat", num_inference_steps=2, capture_steps=[3])
    with pytest.raises(ValueError, match="capture_steps"):  # strength 0.5 of 4 steps runs 2
        tiny_sd3.img2img("a cat", start_image, strength=0.5, num_inference_steps=4, capture_steps=[3])


# --- defaults, sizes, options ---

@pytest.mark.parametrize("name,expected", [
    ("stabilityai/stable-diffusion-3.5-medium", (40, 4.5)),
    ("stabilityai/stable-diffusion-3.5-large", (28, 3.5)),
    ("stabilityai/stable-diffusion-3.5-large-turbo", (4, 0.0)),
    ("/models/sd3.5_large_turbo", (4, 0.0)),
    ("/tmp/my-finetune", (28, 3.5)),
    ("/mnt/large_disk/stable-diffusion-3.5-medium/", (40, 4.5)),  # the model's own name, not the folders above it
    ("/mnt/large_disk/my-finetune", (28, 3.5)),
    ("~/.cache/huggingface/hub/models--stabilityai--stable-diffusion-3.5-large-turbo/snapshots/0123abc", (4, 0.0)),
])
def test_defaults_per_model(name, expected):
    assert defaults_for(name) == expected


def test_native_size_and_size_rule(tiny_sd3):
    assert tiny_sd3.image_size == 32 and tiny_sd3.size_multiple == 4  # 16 latent px * vae 2; vae 2 * patch 2
    assert (tiny_sd3.default_num_inference_steps, tiny_sd3.default_guidance_scale) == (28, 3.5)  # generic folder
    assert tiny_sd3.sample("a cat", num_inference_steps=1, height=24, width=40).images[0].size == (40, 24)
    with pytest.raises(ValueError, match="multiple of 4"):
        tiny_sd3.sample("a cat", num_inference_steps=1, height=30)


def test_drop_t5_loads_without_the_third_encoder(tiny_sd3_dir, tiny_sd3):
    no_t5 = SD3Bridge.from_pretrained(tiny_sd3_dir, device="cpu", drop_t5=True)
    assert no_t5.pipe.text_encoder_3 is None and no_t5.inpaint_pipe.text_encoder_3 is None
    assert tiny_sd3.pipe.text_encoder_3 is not None
    run = lambda p: pixels(p.sample("a red circle", num_inference_steps=2, generator=gen()).images)  # noqa: E731
    assert not np.array_equal(run(no_t5), run(tiny_sd3))  # the prompt now reaches the model through CLIP alone


@pytest.mark.parametrize("kwargs,message", [
    (dict(offload="gpu"), "offload must be one of"),
    (dict(offload="model"), "the device is the CPU"),
    (dict(quantization="int4"), "quantization must be one of"),
    (dict(quantization="nf4"), "needs a CUDA GPU"),
])
def test_bad_load_options(tiny_sd3_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        SD3Bridge.from_pretrained(tiny_sd3_dir, device="cpu", **kwargs)


@pytest.mark.parametrize("offload,method", [("model", "enable_model_cpu_offload"),
                                            ("sequential", "enable_sequential_cpu_offload")])
def test_offload_options_reach_diffusers(diffusers_pipes, monkeypatch, offload, method):
    """The wiring only (offloading itself needs a GPU and accelerate): which diffusers method is called,
    with which device, after the img2img/inpaint siblings exist."""
    calls = []
    pipe = diffusers_pipes["sample"]
    monkeypatch.setattr(type(pipe), method, lambda self, device=None: calls.append((self, device)))
    monkeypatch.setattr(type(pipe), "maybe_free_model_hooks", lambda self: calls.append((self, "free")))
    bridge = SD3Bridge(pipe, device="cpu", offload=offload)
    assert calls == [(pipe, torch.device("cpu"))] and bridge.inpaint_pipe.vae is pipe.vae
    bridge.sample("a cat", num_inference_steps=1, capture_steps=[1])  # the trace decodes after diffusers' own free
    frees = calls.count((pipe, "free"))  # one by diffusers at the end of its call, one more by the bridge
    assert frees == (2 if offload == "model" else 1)


# --- errors a user can act on (the hub's errors simulated: no network) ---

def _http_error(cls, status):
    url = f"https://huggingface.co/api/models/{GATED_ID}"
    return cls(f"{status} Client Error for url: {url}", response=httpx.Response(status, request=httpx.Request("GET", url)))


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """Make diffusers' metadata call raise `error` (as the Hub would) over an empty local cache."""
    import huggingface_hub
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))

    def install(error, token=None):
        def model_info(*args, **kwargs):
            raise error

        monkeypatch.setattr("diffusers.pipelines.pipeline_utils.model_info", model_info)
        monkeypatch.setattr(huggingface_hub, "get_token", lambda: token)
    return install


@pytest.mark.parametrize("error,token,needles", [
    (lambda: _http_error(GatedRepoError, 401), None,
     ["gated", "hf auth login", "HF_TOKEN", "accept the licence", f"https://huggingface.co/{GATED_ID}"]),
    (lambda: _http_error(GatedRepoError, 403), "hf_fake", ["no access", "accept the licence"]),
    (lambda: _http_error(RepositoryNotFoundError, 404), "hf_fake", ["no model with that id", "check the path or the id"]),
    (lambda: _http_error(RepositoryNotFoundError, 401), None, ["check the path or the id", "hf auth login"]),
    (lambda: OfflineModeIsEnabled("offline"), None, ["not in the local Hugging Face cache", "connect"]),
    (lambda: httpx.ConnectError("no route"), None, ["not in the local Hugging Face cache", "connect"]),
    (lambda: HFValidationError("bad id"), None, ["owner/name"]),
])
def test_hub_errors_say_what_to_do(fake_hub, error, token, needles):
    fake_hub(error(), token)
    with pytest.raises(BridgeError) as caught:
        SD3Bridge.from_pretrained(GATED_ID, device="cpu")
    message = str(caught.value)
    assert "\n" not in message and all(n in message for n in needles), message
    if token is not None:
        assert "not logged in" not in message


def test_folder_without_model_index_is_explained(tmp_path):
    with pytest.raises(BridgeError, match="model_index.json"):
        SD3Bridge.from_pretrained(tmp_path, device="cpu")


def test_cli_prints_one_line_and_exits_2(fake_hub, tmp_path, capsys):
    import sample
    from minidiff.tools.cli import run

    fake_hub(_http_error(GatedRepoError, 401))
    out = tmp_path / "x.png"
    code = run(sample.main, ["--model", GATED_ID, "--prompt", "a cat", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists()
    assert err[-1].startswith("error: ") and "hf auth login" in err[-1] and "Traceback" not in "".join(err)


# --- the CLI picks the backend ---

def test_pick_backend(tiny_sd3_dir, tiny_model_dir, tmp_path):
    from sample import DEFAULT_MODEL, pick_backend

    assert pick_backend(str(tiny_sd3_dir)) == "sd3"  # a folder with model_index.json
    assert pick_backend(str(tiny_model_dir)) == "minidiff"  # config.json with "format": "minidiff"
    assert pick_backend(GATED_ID) == "sd3"  # a hub id
    assert pick_backend(DEFAULT_MODEL) == "minidiff"  # even before it has been trained
    assert pick_backend(str(tmp_path / "not-yet-trained")) == "minidiff"  # an absolute path is never a hub id
    assert pick_backend(GATED_ID, "minidiff") == "minidiff" and pick_backend(str(tiny_model_dir), "sd3") == "sd3"


def test_cli_runs_sd3_and_rejects_what_does_not_apply(tiny_sd3_dir, tiny_model_dir, tmp_path, capsys):
    import sample
    from minidiff.tools.cli import run

    out = tmp_path / "sd3.png"
    base = ["--prompt", "a red circle", "--steps", "2", "--device", "cpu"]
    assert run(sample.main, ["--model", str(tiny_sd3_dir), *base, "--height", "16", "--raw-size", "--out", str(out)]) == 0
    assert Image.open(out).size == (32, 16)
    assert run(sample.main, ["--model", str(tiny_sd3_dir), *base, "--sampler", "ddpm", "--out", str(tmp_path / "a.png")]) == 2
    assert run(sample.main, ["--model", str(tiny_model_dir), *base, "--width", "32", "--out", str(tmp_path / "b.png")]) == 2
    err = capsys.readouterr().err
    assert "sampler must be one of ['euler'] for this model, got 'ddpm'" in err
    assert "width 32: this minidiff model renders at its trained size, 16" in err
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "b.png").exists()
    assert run(sample.main, ["--prompt", "x", "--backend", "flux"]) == 2  # unknown backend: one line, exit 2
    assert "invalid choice: 'flux'" in capsys.readouterr().err
