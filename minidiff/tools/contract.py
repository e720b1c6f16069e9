"""The calls every backend answers, minidiff's toy model and the Stable Diffusion 3.5 bridge alike:
`sample`, `img2img` and `inpaint`, with diffusers' keywords, the fields of `Call` (docs/sampling.md).
Guidance and strength mean what minidiff/pipeline.py says. `callback` gets a plain dict after every
step (k-diffusion style), the one `minidiff.pipeline.Pipeline.denoise` gives; `capture_steps` keeps
some of them as pictures in `ImageOutput.trace`.
"""

from __future__ import annotations

import dataclasses
import operator
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

from PIL import Image
from tqdm import tqdm

from ..pipeline import prompt_lists
from . import cores


@dataclass
class ImageOutput:
    images: list[Image.Image]  # num_images_per_prompt images for each prompt, in prompt order
    trace: list[dict] = field(default_factory=list)  # the steps asked for with capture_steps


@dataclass
class Call:
    """One call's arguments; `None` means the backend's default."""

    prompt: str | list[str]
    negative_prompt: str | list[str] | None = None  # replaces the empty prompt in guidance
    num_inference_steps: int | None = None
    guidance_scale: float | None = None  # w above; at w <= 1 only the conditional prediction is used
    generator: object = None  # the same seed gives the same images
    num_images_per_prompt: int = 1
    callback: Callable[[dict], None] | None = None
    capture_steps: list[int] | None = None  # k = 0 the start, k = n after n steps
    image: object = None  # img2img, inpaint: a PIL image or a path
    mask_image: object = None  # inpaint: white is replaced, black is kept
    strength: float | None = None  # 0 returns the input, 1 ignores it
    sampler: str | None = None  # one of the backend's `samplers`
    height: int | None = None
    width: int | None = None
    batch_size: int | None = None  # images denoised together, each batch drawing from `generator` in turn

    def prompts(self) -> tuple[list[str], list[str]]:
        """(prompts, negative prompts): two lists of equal length."""
        prompts, negatives = prompt_lists(self.prompt, self.negative_prompt)
        if not isinstance(self.num_images_per_prompt, int) or self.num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a whole number >= 1, got {self.num_images_per_prompt}")
        return prompts, negatives


class StepRecorder:
    """`capture_steps` built on `callback`: `start(x, t)` records k = 0, `callback` records k = i + 1
    after step i and passes every step on to the user's callback. `decode` turns x and denoised into
    pictures, `decode_noise` the model's output (None: left out). Tensors are copied when recorded and
    decoded when `trace` is read (a reader mid-loop, such as the web app, gets those so far)."""

    def __init__(self, capture_steps, num_steps: int, callback=None, decode=None, decode_noise=None):
        steps = set()
        for k in capture_steps or ():
            try:
                steps.add(None if isinstance(k, bool) else operator.index(k))
            except TypeError:
                steps.add(None)
            if None in steps:
                raise ValueError(f"capture_steps must hold whole numbers of steps, got {k!r}")
        if steps and (min(steps) < 0 or max(steps) > num_steps):
            raise ValueError(f"capture_steps asks for step {min(steps) if min(steps) < 0 else max(steps)}, but this "
                             f"call runs {num_steps} denoising steps (steps 0..{num_steps} can be captured)")
        self.steps, self.user_callback, self.decode, self.decode_noise = steps, callback, decode, decode_noise
        self.records, self._trace = [], []  # (k, timestep, x_t, pred_x0, noise_pred), then decoded

    def start(self, x, timestep) -> None:  # k = 0: the noise, or the noised input image
        if 0 in self.steps:
            self.records.append((0, timestep, _copy(x), None, None))

    @property
    def callback(self):  # None when there is nothing to record or pass on
        return self._on_step if (self.steps - {0} or self.user_callback) else None

    def _on_step(self, step: dict) -> None:
        if self.user_callback is not None:
            self.user_callback(step)
        if step["i"] + 1 in self.steps:
            noise = _copy(step["noise_pred"]) if self.decode_noise is not None else None
            self.records.append((step["i"] + 1, step["t"], _copy(step["x"]), _copy(step["denoised"]), noise))

    @property
    def trace(self) -> list[dict]:
        for k, t, x, x0, noise in self.records[len(self._trace):]:
            self._trace.append({"step": k, "timestep": t, "x_t": self.decode(x),
                                "pred_x0": None if x0 is None else self.decode(x0),
                                "noise_pred": None if noise is None else self.decode_noise(noise)})
        return self._trace


def _copy(x):  # a tensor's values as they are now (the loop may reuse its buffers)
    return x.detach().clone() if hasattr(x, "detach") else x


def merge_outputs(outputs: list[ImageOutput]) -> ImageOutput:
    """Several batches' outputs as one: the images in order, each trace record's pictures batch after batch."""
    traces = [out.trace for out in outputs]
    trace = [{**record, **{key: sum((t[k][key] for t in traces), []) for key in ("x_t", "pred_x0", "noise_pred")
                           if record.get(key) is not None}} for k, record in enumerate(traces[0])]
    return ImageOutput(images=[image for out in outputs for image in out.images], trace=trace)


class TextToImagePipeline(ABC):
    """What `MiniDiffusionPipeline` and `bridge.SD3Bridge` both implement. The three calls are
    written once, here: each is a `Call`, cut into batches, each batch given to `generate`."""

    call_type = Call  # a backend that takes more keywords has a subclass of Call
    load_options: tuple[str, ...] = ()  # keywords of `from_pretrained` beyond the model and the device
    default_batch_size: int | None = None  # None: every image in one batch
    default_num_inference_steps, default_guidance_scale = 50, 4.0
    image_size: int  # the default height and width
    size_multiple: int | None  # height and width are multiples of it; None: `image_size` only
    samplers: tuple[str, ...]  # what `sampler` may name, the default first
    progress: dict = {}  # tqdm options of the bar over batches

    def sample(self, prompt, **options) -> ImageOutput:
        """Text to image, starting from pure noise."""
        return self.run(self.call_type(prompt, **options))

    def img2img(self, prompt, image, *, strength=0.7, **options) -> ImageOutput:
        """Start from `image` noised part of the way (`strength`), then denoise towards `prompt`."""
        return self.run(self.call_type(prompt, image=image, strength=_edit_strength(strength), **options))

    def inpaint(self, prompt, image, mask_image, *, strength=0.99, **options) -> ImageOutput:
        """Regenerate the white part of `mask_image`, keep the black part of `image`."""
        return self.run(self.call_type(prompt, image=image, mask_image=mask_image, strength=_edit_strength(strength),
                                       **options))

    def run(self, call: Call) -> ImageOutput:
        batches = self.batches(call)
        bar = tqdm(batches, unit="batch", leave=False, **{"disable": len(batches) == 1, **self.progress})
        outputs = []
        for batch in bar:
            cores.adjust()  # a command's thread count for the machine's load (nothing outside a command)
            outputs.append(self.generate(batch))
        return merge_outputs(outputs)

    def batches(self, call: Call) -> list[Call]:
        """The one place a call is cut into batches of at most `batch_size` images, in order."""
        size = call.batch_size if call.batch_size is not None else self.default_batch_size
        if size is not None and (not isinstance(size, int) or size < 1):
            raise ValueError(f"batch_size must be a whole number >= 1, got {size}")
        prompts, negatives = call.prompts()
        rows = [(p, n) for p, n in zip(prompts, negatives) for _ in range(call.num_images_per_prompt)]
        if size is None or len(rows) <= size:
            return [call]
        return [dataclasses.replace(call, prompt=[p for p, _ in chunk], negative_prompt=[n for _, n in chunk],
                                    num_images_per_prompt=1) for chunk in (rows[i:i + size]
                                                                           for i in range(0, len(rows), size))]

    def set_progress_bar_config(self, **kwargs) -> None:
        """tqdm options of the bar over batches (diffusers' method of the same name)."""
        self.progress = kwargs

    def resolve(self, call: Call) -> tuple[int, float]:
        """The call's (steps, guidance), defaults where None; a value no backend can use: ValueError."""
        steps, guidance = self.defaults(call.num_inference_steps, call.guidance_scale)
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_inference_steps must be a whole number >= 1, got {steps}")
        if not guidance >= 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance}")
        if call.strength is not None and not 0.0 <= call.strength <= 1.0:
            raise ValueError(f"strength must be between 0 and 1, got {call.strength}")
        self.check_sampler(call.sampler)
        self.size(call.height, call.width)
        return steps, guidance

    def defaults(self, num_inference_steps=None, guidance_scale=None) -> tuple[int, float]:
        steps = self.default_num_inference_steps if num_inference_steps is None else num_inference_steps
        return steps, self.default_guidance_scale if guidance_scale is None else guidance_scale

    def check_sampler(self, sampler: str | None) -> str:
        """`sampler`, or the default when None; one this backend does not have is a ValueError."""
        if sampler is not None and sampler not in self.samplers:
            raise ValueError(f"sampler must be one of {list(self.samplers)} for this model, got {sampler!r}")
        return sampler or self.samplers[0]

    @abstractmethod
    def generate(self, call: Call) -> ImageOutput: ...  # one batch; `call.image` None: text to image

    @abstractmethod
    def size(self, height=None, width=None) -> tuple[int, int]: ...  # None: the default; ValueError if impossible

    @abstractmethod
    def steps_run(self, num_inference_steps: int, strength: float | None = None) -> int: ...  # steps a call runs

    @abstractmethod
    def decode(self, x) -> list[Image.Image]: ...  # the callback's "x" or "denoised" as pictures


def _edit_strength(strength):
    if strength is None:
        raise ValueError("strength must be between 0 and 1, got None")
    return strength
