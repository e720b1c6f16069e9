"""`SD3Bridge`: Stable Diffusion 3.5 (Medium, Large, Large Turbo) through minidiff's calls.

    from bridge import SD3Bridge
    pipe = SD3Bridge.from_pretrained("stabilityai/stable-diffusion-3.5-medium")
    out = pipe.sample("a red circle", generator=torch.Generator().manual_seed(0))
    out.images[0].save("red-circle.png")

Everything after the first line is the same as with `MiniDiffusionPipeline`: the bridge answers
the calls of `minidiff.contract.TextToImagePipeline` by handing them to diffusers'
`StableDiffusion3Pipeline` (loaded once) and its img2img / inpaint siblings, which share its
components (`from_pipe`, no second copy of the weights).

What differs from the toy model, and where it shows here:
- SD3 denoises *latents* (16 channels at 1/8 of the image size), not pixels: the VAE's encoder
  maps an image x to z = (E(x) - shift_factor) * scaling_factor and its decoder goes back with
  D(z / scaling_factor + shift_factor). `vae_latents_to_decoder_input` writes that down once.
- SD3 is trained with rectified flow (Liu et al. 2022; Esser et al. 2024, "Scaling Rectified Flow
  Transformers"), not DDPM: with sigma in [0, 1] (sigma = 0 is data, sigma = 1 is noise),
      x_sigma = (1 - sigma) * x_0 + sigma * noise,
  and the transformer predicts the velocity v = noise - x_0. Hence the predicted clean latents
      x_0 = x_sigma - sigma * v                      (`velocity_to_x0`),
  and an Euler step to the next sigma is x_next = x_sigma + (sigma_next - sigma) * v.
  In diffusers' names: `scheduler.sigmas` -> sigma, `timesteps` = 1000 * sigma, `noise_pred` -> v.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
import warnings
from pathlib import Path

import huggingface_hub
import torch
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from PIL import Image

from minidiff.contract import ImageOutput, TextToImagePipeline, as_prompt_list, check_arguments
from minidiff.images import load_image, load_mask, paste_kept
from minidiff.runtime import pick_device

# Steps and guidance from the model cards' examples (diffusers' own defaults, 50 / 7.0, are
# SD3-era). Recognised by a name in the repo id or folder path; the first match wins, so
# "large-turbo" must come before "large".
MODEL_DEFAULTS = [  # (name, num_inference_steps, guidance_scale)
    ("large-turbo", 4, 0.0),  # stabilityai/stable-diffusion-3.5-large-turbo: distilled, no CFG
    ("large", 28, 3.5),  # stabilityai/stable-diffusion-3.5-large
    ("medium", 40, 4.5),  # stabilityai/stable-diffusion-3.5-medium
]
GENERIC_DEFAULTS = (28, 3.5)  # any other SD3 folder (a fine-tune, a renamed copy): Large's settings
OFFLOAD_MODES = (None, "model", "sequential")
EXAMPLE_ID = "stabilityai/stable-diffusion-3.5-medium"


class BridgeError(ValueError):
    """A model that cannot be loaded, with what to do about it (minidiff.cli prints it as one line)."""


def defaults_for(model_id_or_path) -> tuple[int, float]:
    """(num_inference_steps, guidance_scale) for a model, recognised by its repo id or folder name."""
    name = str(model_id_or_path).lower().replace("_", "-")
    for key, steps, guidance in MODEL_DEFAULTS:
        if key in name:
            return steps, guidance
    return GENERIC_DEFAULTS


def default_dtype(device: torch.device) -> torch.dtype:
    # bf16 halves the memory and is what the models were trained in; on CPU, bf16 SD3 is known
    # to produce noise, so CPU (and MPS, whose bf16 support depends on the macOS version) use fp32.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def velocity_to_x0(x_t: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    """Predicted clean latents from the flow-matching velocity: x_0 = x_sigma - sigma * v."""
    return x_t.float() - torch.as_tensor(sigma, dtype=torch.float32, device=x_t.device) * v.float()


def vae_latents_to_decoder_input(latents: torch.Tensor, vae_config) -> torch.Tensor:
    """Undo the encoder's normalisation z = (E(x) - shift) * scale: the decoder takes z / scale + shift."""
    return latents / vae_config.scaling_factor + vae_config.shift_factor


# --- errors a user can act on -------------------------------------------------------------------

def _causes(error: BaseException):
    """The error and everything it was raised from (diffusers re-raises hub errors as OSError)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _network_errors() -> tuple[type, ...]:
    errors = [OfflineModeIsEnabled, LocalEntryNotFoundError, ConnectionError, TimeoutError]
    with contextlib.suppress(ImportError, AttributeError):
        from huggingface_hub.utils import httpx  # the HTTP client the hub library uses

        errors.append(httpx.TransportError)
    with contextlib.suppress(ImportError):
        import requests

        errors.append(requests.ConnectionError)
    return tuple(errors)


def explain_load_error(model: str, error: BaseException) -> str:
    """One sentence saying what went wrong loading `model` and what to do about it."""
    page = f"https://huggingface.co/{model}"
    logged_in = huggingface_hub.get_token() is not None
    login = "run `hf auth login` (or set the HF_TOKEN environment variable to a token from https://huggingface.co/settings/tokens)"
    for cause in _causes(error):
        if isinstance(cause, GatedRepoError):
            if not logged_in:
                return (f"{model} is a gated model and you are not logged in to Hugging Face: {login}, "
                        f"and accept the licence on {page}")
            return (f"your Hugging Face token has no access to the gated model {model}: accept the licence on "
                    f"{page} while logged in as the token's owner (it can take a few minutes), then try again")
        if isinstance(cause, RevisionNotFoundError):
            return f"{model} has no such revision on the Hugging Face Hub; check the revision name"
        if isinstance(cause, RepositoryNotFoundError):
            private = "" if logged_in else f"; if it is a private model, {login}"
            return (f"{model} is not a local folder and the Hugging Face Hub has no model with that id: check the "
                    f"path or the id (for example {EXAMPLE_ID}){private}")
        if isinstance(cause, HFValidationError):
            return (f"{model} is neither an existing folder nor a Hugging Face model id of the form owner/name "
                    f"(for example {EXAMPLE_ID}); check the path")
        if isinstance(cause, _network_errors()):
            offline = " (HF_HUB_OFFLINE is set)" if huggingface_hub.constants.HF_HUB_OFFLINE else ""
            return (f"{model} is not in the local Hugging Face cache and the Hub cannot be reached{offline}: "
                    f"connect to the internet once to download it, or pass the folder of a downloaded copy")
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"could not load {model}: {first_line}"


_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def looks_like_hub_id(model: str) -> bool:
    """owner/name and nothing else: the shape of a Hugging Face model id."""
    return bool(_HUB_ID.match(str(model)))


def _check_local_folder(model: str) -> None:
    path = Path(model).expanduser()
    if path.is_dir() and not (path / "model_index.json").is_file():
        raise BridgeError(f"{model} has no model_index.json, so it is not a diffusers pipeline folder "
                          f"(a minidiff checkpoint is loaded with MiniDiffusionPipeline, or sample.py --backend minidiff)")


# --- the per-step trace ---------------------------------------------------------------------------

class _StepWatcher:
    """The contract's per-step `callback` dict and `capture_steps` trace, on top of diffusers.

    diffusers calls `callback_on_step_end(pipe, i, t, {"latents": x})` after step i, but does not
    hand over the model's output; the scheduler's `step` receives it (the guided velocity v) and the
    x_t it was predicted from, so we listen there during the call and nowhere else."""

    def __init__(self, bridge: "SD3Bridge", callback, capture_steps, steps_run: int):
        self.bridge, self.callback = bridge, callback
        self.capture = sorted(set(capture_steps or ()))
        if any(not isinstance(k, int) or not 0 <= k <= steps_run for k in self.capture):
            raise ValueError(f"capture_steps must be whole numbers from 0 to {steps_run} (the steps this call runs), "
                             f"got {list(capture_steps)}")
        self.latents: list[tuple[int, float, torch.Tensor, torch.Tensor | None]] = []  # (k, t, x_t, x0)
        self._last_step = None

    @property
    def active(self) -> bool:
        return self.callback is not None or bool(self.capture)

    @contextlib.contextmanager
    def watching(self, scheduler):
        """Yield the keywords for the diffusers call; listen to `scheduler.step` meanwhile."""
        if not self.active:
            yield {}
            return
        original_step = scheduler.step

        def step(model_output, timestep, sample, *args, **kwargs):
            out = original_step(model_output, timestep, sample, *args, **kwargs)
            sigma = scheduler.sigmas[scheduler.step_index - 1]  # step() has just moved step_index on
            self._last_step = (sample, model_output, sigma)
            return out

        scheduler.step = step  # an instance attribute shadowing the method, removed below
        try:
            yield {"callback_on_step_end": self.on_step_end}
        finally:
            del scheduler.step

    def on_step_end(self, pipe, i: int, t, tensors: dict) -> dict:
        x = tensors["latents"]  # (B, 16, H/8, W/8): after the step (and, inpainting, after the kept region's blend)
        x_t, v, sigma = self._last_step
        x0 = velocity_to_x0(x_t, v, sigma)
        t = float(t)
        if i == 0 and 0 in self.capture:
            self.latents.append((0, t, x_t.detach().clone(), None))
        if i + 1 in self.capture:
            self.latents.append((i + 1, t, x.detach().clone(), x0.detach().clone()))
        if self.callback is not None:
            self.callback({"i": i, "t": t, "x": x, "denoised": x0, "noise_pred": v})
        return {}

    def trace(self) -> list[dict]:
        """Decode the captured latents; the velocity has no picture of its own, so noise_pred is None."""
        decode = self.bridge.decode_latents
        return [{"step": k, "timestep": t, "x_t": decode(x_t), "pred_x0": None if x0 is None else decode(x0),
                 "noise_pred": None} for k, t, x_t, x0 in self.latents]


@contextlib.contextmanager
def _quiet_diffusers():
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


# --- the bridge -------------------------------------------------------------------------------

class SD3Bridge(TextToImagePipeline):
    """Stable Diffusion 3.5 behind `sample`, `img2img` and `inpaint`, with minidiff's keywords.

    Extra keywords: `height` and `width` (default: the model's native size, 1024 for SD3.5;
    multiples of `size_multiple`, 16 for SD3.5). Inputs to img2img/inpaint are resized to that
    size, with a warning. The callback dict carries latents, not pixels; the trace decodes them."""

    def __init__(self, pipe, *, name: str = "", device=None, offload: str | None = None):
        from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline

        if offload not in OFFLOAD_MODES:
            raise ValueError(f"offload must be one of {OFFLOAD_MODES}, got {offload!r}")
        self.pipe = pipe
        self.dtype = pipe.dtype
        # Built before any offloading hooks exist: from_pipe casts the shared modules to `dtype` (a no-op
        # here, but diffusers warns about it; hence the quiet logger).
        with _quiet_diffusers():
            self.img2img_pipe = StableDiffusion3Img2ImgPipeline.from_pipe(pipe, dtype=self.dtype)
            self.inpaint_pipe = StableDiffusion3InpaintPipeline.from_pipe(pipe, dtype=self.dtype)
        self.device = pick_device(device)
        if offload == "model":  # whole models move to the GPU one at a time
            pipe.enable_model_cpu_offload(device=self.device)
        elif offload == "sequential":  # layer by layer: least memory, slowest
            pipe.enable_sequential_cpu_offload(device=self.device)
        else:
            pipe.to(self.device)
        self.offload = offload
        self.default_num_inference_steps, self.default_guidance_scale = defaults_for(name)
        self.size_multiple = pipe.vae_scale_factor * pipe.patch_size
        self.native_size = pipe.default_sample_size * pipe.vae_scale_factor  # 128 * 8 = 1024 for SD3.5

    @classmethod
    def from_pretrained(cls, model_id_or_path, *, device=None, dtype=None, drop_t5: bool = False,
                        offload: str | None = None) -> "SD3Bridge":
        """Load a Hugging Face SD3 model (hub id or folder with model_index.json) once.

        device: "auto"/None picks cuda, then mps, then cpu. dtype: bf16 on CUDA, fp32 elsewhere.
        drop_t5: leave out the 4.7B-parameter T5 text encoder (prompts then use CLIP alone).
        offload: None, "model" (enable_model_cpu_offload) or "sequential" (enable_sequential_cpu_offload)."""
        from diffusers import StableDiffusion3Pipeline

        model = str(model_id_or_path)
        if offload not in OFFLOAD_MODES:
            raise ValueError(f"offload must be one of {OFFLOAD_MODES}, got {offload!r}")
        device = pick_device(device)
        dtype = default_dtype(device) if dtype is None else dtype
        if dtype == torch.float16 and not drop_t5:
            raise ValueError("the T5 text encoder overflows in float16; use dtype=torch.bfloat16 (or float32), "
                             "or drop_t5=True")
        if dtype == torch.bfloat16 and device.type == "cpu":
            warnings.warn("bfloat16 on CPU is known to give noise with SD3; float32 is the CPU default", stacklevel=2)
        if offload is not None and device.type == "cpu":
            raise ValueError(f"offload={offload!r} moves weights between CPU and a GPU, but the device is the CPU; "
                             "leave offload unset")
        if offload is not None and importlib.util.find_spec("accelerate") is None:
            raise BridgeError(f"offload={offload!r} needs the accelerate package: pip install accelerate")
        _check_local_folder(model)
        without_t5 = {"text_encoder_3": None, "tokenizer_3": None} if drop_t5 else {}
        try:
            pipe = StableDiffusion3Pipeline.from_pretrained(model, dtype=dtype, **without_t5)
        except (OSError, ValueError) as error:  # hub errors arrive as OSError (or ValueError for a bad id)
            raise BridgeError(explain_load_error(model, error)) from error
        return cls(pipe, name=model, device=device, offload=offload)

    @property
    def image_size(self) -> int:
        """The model's native size in pixels (height = width), as `MiniDiffusionPipeline.image_size`."""
        return self.native_size

    # -- helpers shared by the three calls --

    def _size(self, height, width) -> tuple[int, int]:
        height = self.native_size if height is None else height
        width = self.native_size if width is None else width
        m = self.size_multiple
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value < m or value % m:
                raise ValueError(f"{name} must be a positive multiple of {m} for this model, got {value}")
        return height, width

    @staticmethod
    def steps_run(num_inference_steps: int, strength: float) -> int:
        """How many of the N steps img2img/inpaint run: diffusers' `get_timesteps`, N - int(N - N * strength)."""
        return num_inference_steps - int(max(num_inference_steps - min(num_inference_steps * strength,
                                                                       num_inference_steps), 0))

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[Image.Image]:
        """Latents (B, 16, h, w) -> PIL images, through the VAE decoder with scaling *and* shift."""
        vae = self.pipe.vae
        pixels = vae.decode(vae_latents_to_decoder_input(latents, vae.config).to(vae.dtype), return_dict=False)[0]
        return self.pipe.image_processor.postprocess(pixels, output_type="pil")

    def _call(self, pipeline, prompt, negative_prompt, steps, guidance, generator, num_images_per_prompt,
              height, width, callback, capture_steps, steps_run, **inputs) -> tuple[list, list[dict]]:
        prompts, negatives = as_prompt_list(prompt, negative_prompt)
        watcher = _StepWatcher(self, callback, capture_steps, steps_run)
        with watcher.watching(pipeline.scheduler) as hooks:
            images = pipeline(prompts, negative_prompt=negatives, num_inference_steps=steps, guidance_scale=guidance,
                              generator=generator, num_images_per_prompt=num_images_per_prompt, height=height,
                              width=width, **inputs, **hooks).images
        return images, watcher.trace()

    def _release(self) -> None:
        """With offload="model", send every model back to the CPU (diffusers does this for its own
        pipeline's last step, not for the VAE decodes we add, nor for the img2img/inpaint siblings)."""
        if self.offload == "model":
            self.pipe.maybe_free_model_hooks()

    def _unchanged(self, image, prompt, negative_prompt, num_images_per_prompt, capture_steps) -> ImageOutput:
        """strength 0: nothing is noised and no step runs, so the input is the answer (diffusers itself refuses)."""
        prompts, _ = as_prompt_list(prompt, negative_prompt)
        _StepWatcher(self, None, capture_steps, 0)  # validates capture_steps
        images = [image.copy() for _ in range(len(prompts) * num_images_per_prompt)]
        trace = [{"step": 0, "timestep": 0.0, "x_t": images, "pred_x0": None, "noise_pred": None}] \
            if capture_steps else []
        return ImageOutput(images=images, trace=trace)

    # -- the contract --

    def sample(self, prompt, *, negative_prompt=None, num_inference_steps=None, guidance_scale=None,
               generator=None, num_images_per_prompt=1, callback=None, capture_steps=None, height=None,
               width=None) -> ImageOutput:
        """Text to image: from pure noise in latent space, `num_inference_steps` Euler steps of the flow."""
        steps, guidance = self._defaults(num_inference_steps, guidance_scale)
        check_arguments(steps, guidance, None, num_images_per_prompt)
        height, width = self._size(height, width)
        images, trace = self._call(self.pipe, prompt, negative_prompt, steps, guidance, generator,
                                   num_images_per_prompt, height, width, callback, capture_steps, steps)
        self._release()
        return ImageOutput(images=images, trace=trace)

    def img2img(self, prompt, image, *, strength=0.7, negative_prompt=None, num_inference_steps=None,
                guidance_scale=None, generator=None, num_images_per_prompt=1, callback=None, capture_steps=None,
                height=None, width=None) -> ImageOutput:
        """Encode `image`, move it to sigma = strength along the flow (x = (1 - s) z + s * noise), and run
        the remaining steps: with strength 0.7 and 100 steps, 70 run."""
        steps, guidance = self._defaults(num_inference_steps, guidance_scale)
        check_arguments(steps, guidance, strength, num_images_per_prompt)
        height, width = self._size(height, width)
        image = load_image(image, size=(width, height))
        steps_run = self.steps_run(steps, strength)
        if steps_run == 0:
            return self._unchanged(image, prompt, negative_prompt, num_images_per_prompt, capture_steps)
        images, trace = self._call(self.img2img_pipe, prompt, negative_prompt, steps, guidance, generator,
                                   num_images_per_prompt, height, width, callback, capture_steps, steps_run,
                                   image=image, strength=strength)
        self._release()
        return ImageOutput(images=images, trace=trace)

    def inpaint(self, prompt, image, mask_image, *, strength=0.99, negative_prompt=None, num_inference_steps=None,
                guidance_scale=None, generator=None, num_images_per_prompt=1, callback=None, capture_steps=None,
                height=None, width=None) -> ImageOutput:
        """Regenerate the white part of `mask_image` (binarised at 0.5), keep the black part of `image`.

        diffusers 0.42's StableDiffusion3InpaintPipeline decodes with latents / scaling_factor and
        forgets the VAE's shift_factor (its text-to-image and img2img siblings add it), which
        shifts every colour. So we ask it for latents and decode them ourselves, with the shift;
        then the black-mask pixels are pasted back so they equal the input exactly."""
        steps, guidance = self._defaults(num_inference_steps, guidance_scale)
        check_arguments(steps, guidance, strength, num_images_per_prompt)
        height, width = self._size(height, width)
        image = load_image(image)
        mask = load_mask(mask_image, size=(width, height), image_size=image.size)  # sizes must match
        image = load_image(image, size=(width, height))
        steps_run = self.steps_run(steps, strength)
        if steps_run == 0:
            return self._unchanged(image, prompt, negative_prompt, num_images_per_prompt, capture_steps)
        latents, trace = self._call(self.inpaint_pipe, prompt, negative_prompt, steps, guidance, generator,
                                    num_images_per_prompt, height, width, callback, capture_steps, steps_run,
                                    image=image, mask_image=mask, strength=strength, output_type="latent")
        images = [paste_kept(generated, image, mask) for generated in self.decode_latents(latents)]
        self._release()
        return ImageOutput(images=images, trace=trace)
