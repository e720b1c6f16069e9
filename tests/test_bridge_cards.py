"""The bridge as someone about to run SD3.5 on a real card would use it (issue 11): shared modules
and their dtypes, per-model defaults reaching diffusers, offload hooks, the CFG-off path, input
resizing, T5-less folders, load errors. All on the tiny random SD3 pipeline of sd3_tiny.py, with
diffusers' own pipelines, loaded independently from the same folder, as the reference."""

from __future__ import annotations

import json
import traceback
import warnings

import numpy as np
import pytest
import torch
from huggingface_hub.errors import GatedRepoError
from huggingface_hub.utils import httpx
from PIL import Image
from sd3_tiny import diffusers_pipe, gen, pixels

from bridge import BridgeError, SD3Bridge
from bridge.sd3 import default_dtype, explain_load_error

GATED_ID = "stabilityai/stable-diffusion-3.5-medium"
GUIDANCE = 4.0


@pytest.fixture(scope="module")
def picture():
    """40 x 24, not the tiny model's 32 x 32: every call resizes it. Left third red, a blue disc right."""
    yy, xx = np.mgrid[:24, :40]
    array = np.full((24, 40, 3), 255, np.uint8)
    array[:, :13] = (220, 30, 30)
    array[(yy - 12) ** 2 + (xx - 28) ** 2 < 49] = (30, 30, 220)
    return Image.fromarray(array)


@pytest.fixture(scope="module")
def mask():
    """The right half of `picture` (40 x 24) is replaced."""
    mask = Image.new("L", (40, 24), 0)
    mask.paste(255, (20, 0, 40, 24))
    return mask


def wo_dtypes(text_encoder_3):
    return {block.layer[-1].DenseReluDense.wo.weight.dtype for block in text_encoder_3.encoder.block}


# --- 1. the siblings share every module and keep every dtype ---

def test_siblings_share_the_modules_and_keep_their_dtypes(tiny_sd3_dir):
    pipe = diffusers_pipe(tiny_sd3_dir)
    pipe.transformer.to(torch.bfloat16)  # a transformer in one dtype, the VAE kept in float32 beside it
    bridge = SD3Bridge(pipe, device="cpu")
    for sibling in (bridge.img2img_pipe, bridge.inpaint_pipe):
        for name, module in pipe.components.items():
            assert getattr(sibling, name) is module, name  # the same object: no copy
    assert bridge.pipe.transformer.dtype == torch.bfloat16 and bridge.pipe.vae.dtype == torch.float32


def test_float16_keeps_t5_wo_in_float32_and_its_embeddings_finite(tiny_sd3_dir):
    """transformers keeps T5's `wo` layers in float32 under float16; recasting them (what from_pipe
    did) is what makes T5 overflow. Scaled-up `wo` weights put the tiny T5's activations past
    float16's 65504, as T5-XXL's are on real prompts."""
    half = SD3Bridge.from_pretrained(tiny_sd3_dir, device="cpu", dtype=torch.float16)
    full = diffusers_pipe(tiny_sd3_dir)
    assert half.pipe.transformer.dtype == torch.float16 and wo_dtypes(half.pipe.text_encoder_3) == {torch.float32}
    for pipe in (half.pipe, full):
        for block in pipe.text_encoder_3.encoder.block:
            block.layer[-1].DenseReluDense.wo.weight.data *= 1e5

    def t5(pipe):
        with torch.no_grad():
            return pipe._get_t5_prompt_embeds("a red circle", device=torch.device("cpu")).float()

    reference = t5(full)
    for pipe in (half.pipe, half.img2img_pipe, half.inpaint_pipe):  # the siblings see the same T5
        embeds = t5(pipe)
        assert torch.isfinite(embeds).all() and (embeds - reference).abs().max() < 0.02
    half.pipe.text_encoder_3.to(torch.float16)  # the recast from_pipe used to do
    assert (t5(half.pipe) - reference).abs().max() > 0.5


@pytest.mark.parametrize("device,bf16,expected", [("cuda", True, torch.bfloat16), ("cuda", False, torch.float16),
                                                  ("cpu", False, torch.float32)])
def test_default_dtype_is_float16_on_cuda_cards_without_bf16(monkeypatch, device, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16 or including_emulation)
    assert default_dtype(torch.device(device)) == expected


def test_default_dtype_is_float32_on_a_cpu_that_computes_bf16(monkeypatch):
    from minidiff import runtime

    monkeypatch.setattr(runtime, "cpu_computes_bf16", lambda: True)  # the toy may train in bf16 there; SD3 may not
    assert runtime.precision_for(torch.device("cpu")) == torch.bfloat16
    assert default_dtype(torch.device("cpu")) == torch.float32


# --- the per-model defaults reach diffusers ---

class _Stop(Exception):
    """Raised by the spy once it has seen diffusers' keywords: the call itself is not needed."""


@pytest.fixture
def spy_calls(monkeypatch):
    """Record the keywords of every diffusers SD3 pipeline call (which then stops with _Stop)."""
    import diffusers

    seen = []
    for cls in (diffusers.StableDiffusion3Pipeline, diffusers.StableDiffusion3Img2ImgPipeline,
                diffusers.StableDiffusion3InpaintPipeline):
        def spy(self, *args, _cls=cls, **kwargs):
            seen.append((_cls.__name__, kwargs))
            raise _Stop
        monkeypatch.setattr(cls, "__call__", spy)
    return seen


@pytest.mark.parametrize("name_or_path,steps,guidance", [
    ("stabilityai/stable-diffusion-3.5-large-turbo", 4, 0.0),
    ("/mnt/large_disk/stable-diffusion-3.5-medium", 40, 4.5),  # "large" in a folder above is not the model
    ("/tmp/my-finetune", 28, 3.5),
])
def test_a_pipeline_passed_in_gets_its_own_defaults_and_they_reach_diffusers(tiny_sd3_dir, spy_calls, picture,
                                                                             mask, name_or_path, steps, guidance):
    pipe = diffusers_pipe(tiny_sd3_dir)
    pipe.register_to_config(_name_or_path=name_or_path)  # what from_pretrained(name_or_path) records
    bridge = SD3Bridge(pipe, device="cpu")  # no name given: the pipeline's own
    for call in (lambda: bridge.sample("a cat"), lambda: bridge.img2img("a cat", picture),
                 lambda: bridge.inpaint("a cat", picture, mask)):
        with pytest.raises(_Stop), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the resize warning
            call()
    assert [(kw["num_inference_steps"], kw["guidance_scale"]) for _, kw in spy_calls] == [(steps, guidance)] * 3


# --- offloading: real accelerate hooks (on the CPU as the "GPU") ---

def test_model_offload_hooks_run_all_three_calls_and_release_also_after_an_error(tiny_sd3_dir, picture, mask,
                                                                                 monkeypatch):
    pipe = diffusers_pipe(tiny_sd3_dir)
    bridge = SD3Bridge(pipe, device="cpu", offload="model")  # enable_model_cpu_offload(device="cpu"): real hooks
    assert pipe._all_hooks and getattr(pipe.transformer, "_hf_hook", None) is not None
    releases = []
    original = type(pipe).maybe_free_model_hooks
    monkeypatch.setattr(type(pipe), "maybe_free_model_hooks", lambda self: (releases.append(self), original(self)))
    kwargs = dict(num_inference_steps=2, guidance_scale=GUIDANCE, generator=gen())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outputs = [bridge.sample("a red circle", **kwargs), bridge.img2img("a red circle", picture, **kwargs),
                   bridge.inpaint("a red circle", picture, mask, **kwargs)]
    assert all(out.images[0].size == (32, 32) for out in outputs)
    assert releases.count(pipe) >= 3  # the bridge's own release after each call (diffusers adds one for sample)
    before = len(releases)

    def fail(step):
        raise KeyboardInterrupt  # a Ctrl-C mid-call

    with pytest.raises(KeyboardInterrupt):
        bridge.sample("a red circle", callback=fail, **kwargs)
    assert releases[before:] == [pipe]  # released by the bridge although the call failed
    reference = diffusers_pipe(tiny_sd3_dir)
    reference.enable_model_cpu_offload(device="cpu")  # (offloaded, diffusers itself differs by 1 level here and there)
    expected = reference("a red circle", height=32, width=32, **{**kwargs, "generator": gen()}).images
    assert np.array_equal(pixels(bridge.sample("a red circle", **{**kwargs, "generator": gen()}).images),
                          pixels(expected))  # and the next call still runs, with diffusers' pixels


# --- the CFG-off path (guidance 0, Turbo's default) ---

@pytest.fixture(scope="module")
def reference_pipes(tiny_sd3_dir):
    return {kind: diffusers_pipe(tiny_sd3_dir, kind) for kind in ("sample", "img2img", "inpaint")}


def test_guidance_zero_matches_diffusers_on_all_three_calls(tiny_sd3, reference_pipes, picture, mask):
    kwargs = dict(num_inference_steps=3, guidance_scale=0.0)
    square = picture.resize((32, 32))
    square_mask = mask.resize((32, 32))
    ours = tiny_sd3.sample("a red circle", generator=gen(), **kwargs).images
    theirs = reference_pipes["sample"]("a red circle", generator=gen(), height=32, width=32, **kwargs).images
    assert np.array_equal(pixels(ours), pixels(theirs))
    ours = tiny_sd3.img2img("a red circle", square, strength=0.7, generator=gen(), **kwargs).images
    theirs = reference_pipes["img2img"]("a red circle", image=square, strength=0.7, generator=gen(), **kwargs).images
    assert np.array_equal(pixels(ours), pixels(theirs))
    ours = tiny_sd3.inpaint("a red circle", square, square_mask, generator=gen(), **kwargs).images
    inpaint = reference_pipes["inpaint"]
    latents = inpaint("a red circle", image=square, mask_image=square_mask, strength=0.99, generator=gen(),
                      output_type="latent", **kwargs).images
    decoded = pixels(tiny_sd3.decode_latents(latents))
    expected = np.where((np.asarray(square_mask) >= 128)[None, :, :, None], decoded, np.asarray(square)[None])
    assert np.array_equal(pixels(ours), expected)


def test_negative_prompt_without_cfg_warns_once(tiny_sd3_dir):
    bridge = SD3Bridge(diffusers_pipe(tiny_sd3_dir), device="cpu")
    with pytest.warns(UserWarning, match="negative_prompt is ignored at guidance_scale 0.0"):
        bridge.sample("a cat", negative_prompt="blue", num_inference_steps=1, guidance_scale=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only; and never where guidance uses it
        bridge.sample("a cat", negative_prompt="blue", num_inference_steps=1, guidance_scale=0.0)
        SD3Bridge(diffusers_pipe(tiny_sd3_dir), device="cpu").sample("a cat", negative_prompt="blue",
                                                                     num_inference_steps=1, guidance_scale=2.0)


# --- inputs of another size: resized as diffusers resizes them ---

def test_img2img_and_inpaint_resize_inputs_as_diffusers_does(tiny_sd3, reference_pipes, picture, mask):
    kwargs = dict(num_inference_steps=4, guidance_scale=GUIDANCE)
    with pytest.warns(UserWarning, match="image of size 40x24 resized to 32x32"):
        ours = tiny_sd3.img2img("a blue square", picture, strength=0.6, generator=gen(), **kwargs).images
    theirs = reference_pipes["img2img"]("a blue square", image=picture, strength=0.6, generator=gen(), height=32,
                                        width=32, **kwargs).images
    assert np.array_equal(pixels(ours), pixels(theirs))

    with pytest.warns(UserWarning, match="resized"):
        ours = pixels(tiny_sd3.inpaint("a green triangle", picture, mask, generator=gen(), **kwargs).images)
    inpaint = reference_pipes["inpaint"]
    latents = inpaint("a green triangle", image=picture, mask_image=mask, strength=0.99, generator=gen(), height=32,
                      width=32, output_type="latent", **kwargs).images
    seen_image = inpaint.image_processor.resize(picture, 32, 32)  # what diffusers encoded
    seen_mask = inpaint.mask_processor.preprocess(mask, height=32, width=32)[0, 0].numpy() >= 0.5
    expected = np.where(seen_mask[None, :, :, None], pixels(tiny_sd3.decode_latents(latents)),
                        np.asarray(seen_image)[None])
    assert np.array_equal(ours, expected)


# --- the trace on img2img and inpaint: values, not only shapes ---

def _record(seen):
    return lambda d: seen.append({k: v.clone() if torch.is_tensor(v) else v for k, v in d.items()})


def _schedule(bridge, steps, strength):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(bridge.pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    start = steps - bridge.steps_run(steps, strength)  # diffusers' get_timesteps: the first step that runs
    return scheduler.sigmas[start:], scheduler.timesteps[start:]


def test_img2img_trace_follows_the_euler_steps_from_the_strength(tiny_sd3, picture):
    square, steps, strength, seen = picture.resize((32, 32)), 6, 0.5, []
    out = tiny_sd3.img2img("a cat", square, strength=strength, num_inference_steps=steps, guidance_scale=GUIDANCE,
                           generator=gen(), callback=_record(seen), capture_steps=[0, 1, 3])
    sigmas, timesteps = _schedule(tiny_sd3, steps, strength)
    assert len(seen) == 3 and [d["t"] for d in seen] == pytest.approx(timesteps.tolist())
    for i in range(1, 3):  # x_i = x_{i-1} + (sigma_{i+1} - sigma_i) v_i;  x0_i = x_{i-1} - sigma_i v_i
        torch.testing.assert_close(seen[i]["x"], seen[i - 1]["x"] + (sigmas[i + 1] - sigmas[i]) * seen[i]["noise_pred"])
        torch.testing.assert_close(seen[i]["denoised"], seen[i - 1]["x"] - sigmas[i] * seen[i]["noise_pred"])
    assert [r["step"] for r in out.trace] == [0, 1, 3]
    assert [r["timestep"] for r in out.trace] == pytest.approx([float(timesteps[k]) for k in (0, 0, 2)])
    assert np.array_equal(pixels(out.trace[1]["x_t"]), pixels(tiny_sd3.decode_latents(seen[0]["x"])))
    assert np.array_equal(pixels(out.trace[-1]["x_t"]), pixels(out.images))  # after the last step: the output


def test_inpaint_trace_steps_in_the_replaced_region_and_decodes_before_the_paste(tiny_sd3, picture, mask):
    square, square_mask = picture.resize((32, 32)), mask.resize((32, 32))
    steps, seen = 4, []
    out = tiny_sd3.inpaint("a cat", square, square_mask, num_inference_steps=steps, guidance_scale=GUIDANCE,
                           generator=gen(), callback=_record(seen), capture_steps=[0, steps])
    sigmas, timesteps = _schedule(tiny_sd3, steps, 0.99)
    assert [d["t"] for d in seen] == pytest.approx(timesteps.tolist())
    for i in range(1, steps):
        torch.testing.assert_close(seen[i]["denoised"], seen[i - 1]["x"] - sigmas[i] * seen[i]["noise_pred"])
        # latent columns 8.. are the replaced right half: there x is the plain Euler step
        right = (Ellipsis, slice(8, None))
        torch.testing.assert_close(seen[i]["x"][right], (seen[i - 1]["x"] + (sigmas[i + 1] - sigmas[i])
                                                         * seen[i]["noise_pred"])[right])
    last = pixels(out.trace[-1]["x_t"])  # the decoded latents, before the kept half is pasted back
    assert np.array_equal(last[:, :, 16:], pixels(out.images)[:, :, 16:])
    assert out.trace[0]["step"] == 0 and out.trace[0]["timestep"] == pytest.approx(float(timesteps[0]))


# --- one recorder for both backends ---

def test_capture_steps_are_checked_by_the_shared_step_recorder(tiny_sd3):
    with pytest.raises(ValueError, match="whole numbers"):
        tiny_sd3.sample("a cat", num_inference_steps=2, capture_steps=[True])
    out = tiny_sd3.sample("a cat", num_inference_steps=2, capture_steps=[np.int64(2)])
    assert [r["step"] for r in out.trace] == [2]


# --- a folder saved without T5 ---

def test_a_folder_saved_without_t5_loads_as_a_t5_less_model(tiny_sd3_dir, tmp_path):
    folder = tmp_path / "no-t5"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        diffusers_pipe(tiny_sd3_dir, text_encoder_3=None, tokenizer_3=None).save_pretrained(folder)
    assert json.loads((folder / "model_index.json").read_text())["text_encoder_3"] == [None, None]
    bridge = SD3Bridge.from_pretrained(folder, device="cpu")
    assert bridge.pipe.text_encoder_3 is None and bridge.sample("a cat", num_inference_steps=1).images
    # a hub copy cannot be read before loading: diffusers' refusal is explained in one line
    refusal = ValueError("Pipeline <class 'StableDiffusion3Pipeline'> expected ['text_encoder_3', 'tokenizer_3', "
                         "'transformer'], but only {'transformer'} were passed.")
    assert "drop_t5=True" in explain_load_error("someone/sd35-no-t5", refusal)


# --- the realistic gated-model path, and how much of it a user sees ---

def _http_error(cls, status):
    url = f"https://huggingface.co/{GATED_ID}/resolve/main/model_index.json"
    return cls(f"{status} Client Error for url: {url}", response=httpx.Response(status, request=httpx.Request("GET", url)))


@pytest.fixture
def gated_hub(monkeypatch, tmp_path):
    """The Hub as it answers for a gated model: `model_info` works (metadata is public), then the
    first file download is refused with 401 (no token) or 403 (a token without access)."""
    import huggingface_hub
    import huggingface_hub.constants
    from huggingface_hub.hf_api import ModelInfo

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    info = ModelInfo(id=GATED_ID, gated="manual", siblings=[{"rfilename": "model_index.json"}])
    monkeypatch.setattr("diffusers.pipelines.pipeline_utils.model_info", lambda *a, **k: info)

    def install(status, token):
        def download(*args, **kwargs):
            raise _http_error(GatedRepoError, status)

        monkeypatch.setattr("diffusers.pipelines.pipeline_utils.hf_hub_download", download)
        monkeypatch.setattr(huggingface_hub, "get_token", lambda: token)
    return install


@pytest.mark.parametrize("status,token,needle", [(401, None, "not logged in"), (403, "hf_fake", "no access")])
def test_gated_model_after_model_info_answers(gated_hub, status, token, needle):
    gated_hub(status, token)
    with pytest.raises(BridgeError, match=needle) as caught:
        SD3Bridge.from_pretrained(GATED_ID, device="cpu")
    seen = "".join(traceback.format_exception(caught.value))  # what Python prints for an uncaught error
    assert seen.strip().splitlines()[-1] == f"bridge.sd3.BridgeError: {caught.value}"
    assert len(seen.splitlines()) < 15 and "huggingface_hub" not in seen and "diffusers" not in seen, seen
