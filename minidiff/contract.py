"""The calls every backend answers: minidiff's toy model and the Stable Diffusion 3.5 bridge.

The keywords mean what they mean in diffusers:

- `prompt`: a string or a list of strings; `negative_prompt` likewise (what to steer away
  from; it replaces the empty prompt in classifier-free guidance).
- `num_inference_steps`: denoising steps for a full run (img2img/inpaint run a fraction).
- `guidance_scale`: classifier-free guidance weight w in eps_uncond + w (eps_cond - eps_uncond);
  at 1 or below only the conditional prediction is used.
- `generator`: a `torch.Generator`; the same seed gives the same images.
- `num_images_per_prompt`: images per prompt; `images` lists them prompt by prompt.
- `strength` (img2img, inpaint): 0 returns the input, 1 ignores it; int(N * strength) of
  the N steps run.
- `mask_image` (inpaint): grayscale, white is replaced, black is kept.
- `callback`: called after every step with a plain dict (k-diffusion style), keys
  "i" (step index), "t" (timestep), "x" (x_t, the sample after the step), "denoised"
  (predicted x_0) and "noise_pred" (the model output). minidiff passes pixels in [-1, 1],
  shape (B, 3, H, W); the SD3 bridge passes latents.
- `capture_steps`: a list of step counts k to record in `ImageOutput.trace`, k = 0 being
  the starting point (pure noise for `sample`, the noised input for img2img/inpaint) and
  k = n the result after n denoising steps. Each record is a dict
  {"step": k, "timestep": t, "x_t": [PIL images], "pred_x0": [PIL images] or None at k = 0,
  "noise_pred": [PIL images] or None}: the same trace on both backends (the bridge decodes
  latents with its VAE). "timestep" is the t the model was given at step k (the callback's
  "t", so pred_x0 and noise_pred are predictions at that t); for k = 0 it is the first
  timestep of the run, the noise level of the start. Asking for a k beyond the steps the
  call runs is a ValueError, raised before any work. Capturing is built on `callback`, the
  one per-step mechanism (`StepRecorder` below, shared by every call of both backends).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
import operator
from dataclasses import dataclass, field
from typing import Callable

from PIL import Image


@dataclass
class ImageOutput:
    images: list[Image.Image]  # num_images_per_prompt images for each prompt, in prompt order
    trace: list[dict] = field(default_factory=list)  # the steps asked for with capture_steps


def check_arguments(num_inference_steps=None, guidance_scale=None, strength=None, num_images_per_prompt=1) -> None:
    """Raise ValueError with one clear sentence for a value no backend can use."""
    if num_inference_steps is not None and (not isinstance(num_inference_steps, int) or num_inference_steps < 1):
        raise ValueError(f"num_inference_steps must be a whole number >= 1, got {num_inference_steps}")
    if guidance_scale is not None and not guidance_scale >= 0:
        raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
    if strength is not None and not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be between 0 and 1, got {strength}")
    if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be a whole number >= 1, got {num_images_per_prompt}")


def as_prompt_list(prompt, negative_prompt=None) -> tuple[list[str], list[str]]:
    """Normalise prompt and negative prompt to two lists of equal length."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if negative_prompt is None:
        negatives = [""] * len(prompts)
    elif isinstance(negative_prompt, str):
        negatives = [negative_prompt] * len(prompts)
    else:
        negatives = list(negative_prompt)
    if len(negatives) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(negatives)} negative prompts")
    return prompts, negatives


class StepRecorder:
    """`capture_steps` built on `callback`: records the steps asked for as `ImageOutput.trace`.

        recorder = StepRecorder(capture_steps, num_steps, callback, decode=tensor_to_pil)
        recorder.start(x, first_timestep)                   # the k = 0 record
        sampling_loop(..., callback=recorder.callback)      # records k = i + 1 after step i
        ImageOutput(images, trace=recorder.trace)

    `decode` turns the callback's x / denoised into PIL images (pixels for minidiff, a VAE
    decode for latents); `decode_noise` does the same for noise_pred, or None to leave it out.
    The tensors are copied when recorded and decoded when `trace` is first read, after the
    loop: a VAE decode mid-loop would cost time, and with model offloading GPU memory.
    The user's own `callback`, if any, still sees every step's dict unchanged.
    """

    def __init__(self, capture_steps, num_steps: int, callback: Callable[[dict], None] | None = None,
                 decode: Callable | None = None, decode_noise: Callable | None = None):
        steps = set()
        for k in capture_steps or ():
            if isinstance(k, bool):
                raise ValueError(f"capture_steps must hold whole numbers of steps, got {k!r}")
            try:
                steps.add(operator.index(k))
            except TypeError:
                raise ValueError(f"capture_steps must hold whole numbers of steps, got {k!r}") from None
        if steps and (min(steps) < 0 or max(steps) > num_steps):
            bad = min(steps) if min(steps) < 0 else max(steps)
            raise ValueError(f"capture_steps asks for step {bad}, but this call runs {num_steps} denoising steps "
                             f"(steps 0..{num_steps} can be captured)")
        if steps and decode is None:
            raise ValueError("capture_steps needs a decode function")
        self.steps, self.num_steps = steps, num_steps
        self.user_callback, self.decode, self.decode_noise = callback, decode, decode_noise
        self._records: list[tuple] = []  # (k, timestep, x_t, pred_x0, noise_pred), not yet decoded
        self._trace: list[dict] = []  # the records decoded so far

    def start(self, x, timestep) -> None:
        """Record k = 0, the starting point (pure noise, or the noised input image)."""
        if 0 in self.steps:
            self._records.append((0, timestep, _copy(x), None, None))

    @property
    def callback(self) -> Callable[[dict], None] | None:
        """The per-step callback to hand to the sampling loop (None when there is nothing to do)."""
        return self._on_step if (self.steps - {0} or self.user_callback) else None

    def _on_step(self, step: dict) -> None:
        if self.user_callback is not None:
            self.user_callback(step)
        k = step["i"] + 1  # after step i, k = i + 1 steps have run
        if k in self.steps:
            noise = _copy(step["noise_pred"]) if self.decode_noise is not None else None
            self._records.append((k, step["t"], _copy(step["x"]), _copy(step["denoised"]), noise))

    @property
    def trace(self) -> list[dict]:
        """The records asked for, decoded to PIL images (each once, when the trace is read: a
        reader during the loop, such as the web app, gets the records so far)."""
        for k, t, x, x0, noise in self._records[len(self._trace):]:
            self._trace.append({"step": k, "timestep": t, "x_t": self.decode(x),
                                "pred_x0": None if x0 is None else self.decode(x0),
                                "noise_pred": None if noise is None else self.decode_noise(noise)})
        return self._trace


def _copy(x):
    """A tensor's values as they are now (the loop may reuse its buffers); anything else as it is."""
    return x.detach().clone() if hasattr(x, "detach") else x


class TextToImagePipeline(ABC):
    """What `MiniDiffusionPipeline` and `bridge.SD3Bridge` both implement."""

    default_num_inference_steps: int = 50
    default_guidance_scale: float = 4.0

    def _defaults(self, num_inference_steps, guidance_scale) -> tuple[int, float]:
        """The caller's steps and guidance, or this pipeline's defaults where None."""
        steps = self.default_num_inference_steps if num_inference_steps is None else num_inference_steps
        guidance = self.default_guidance_scale if guidance_scale is None else guidance_scale
        return steps, guidance

    @abstractmethod
    def sample(self, prompt, *, negative_prompt=None, num_inference_steps=None, guidance_scale=None,
               generator=None, num_images_per_prompt=1, callback=None, capture_steps=None) -> ImageOutput:
        """Text to image, starting from pure noise."""

    @abstractmethod
    def img2img(self, prompt, image, *, strength=0.7, negative_prompt=None, num_inference_steps=None,
                guidance_scale=None, generator=None, num_images_per_prompt=1, callback=None,
                capture_steps=None) -> ImageOutput:
        """Start from `image` noised to `strength`, then denoise towards `prompt`."""

    @abstractmethod
    def inpaint(self, prompt, image, mask_image, *, strength=0.99, negative_prompt=None, num_inference_steps=None,
                guidance_scale=None, generator=None, num_images_per_prompt=1, callback=None,
                capture_steps=None) -> ImageOutput:
        """Regenerate the white part of `mask_image`, keep the black part of `image`."""
