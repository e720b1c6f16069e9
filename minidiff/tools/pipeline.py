"""`MiniDiffusionPipeline`: the lesson's `Pipeline` (minidiff/pipeline.py) behind the calls of
`contract.py`, with PIL images (or paths) in and out, every keyword checked, batches and traces.

    pipe = MiniDiffusionPipeline.from_pretrained("runs/shapes")
    out = pipe.sample("a red circle", num_inference_steps=50, generator=torch.Generator().manual_seed(0))
    blue = pipe.img2img("a blue circle", out.images[0], strength=0.7).images[0]
    patched = pipe.inpaint("a green square", out.images[0], "mask.png").images[0]
"""

from __future__ import annotations

from dataclasses import dataclass

from ..pipeline import Pipeline
from ..runtime import pick_device
from .checkpoint import load_model, save_model
from .contract import Call, ImageOutput, StepRecorder, TextToImagePipeline
from .pictures import load_image, load_mask, mask_to_tensor, noise_to_pil, pil_to_tensor, tensor_to_pil


@dataclass
class MiniCall(Call):
    """minidiff's keywords beyond the contract's."""

    eta: float = 0.0  # DDIM's noise (Song et al. 2021 eq. 16): 0 deterministic
    output_type: str = "pil"  # "pil", or "pt": tensors (3, H, W) in [0, 1]
    resample_jumps: int = 0  # inpainting: RePaint's resampling, r more model calls per step


class MiniDiffusionPipeline(Pipeline, TextToImagePipeline):
    call_type = MiniCall
    default_batch_size = 64  # images per forward pass (twice that many rows with guidance)
    default_num_inference_steps, default_guidance_scale = 50, 3.0
    size_multiple = None  # a minidiff model renders at its trained size only

    def __init__(self, model, device=None):
        super().__init__(model, device)
        self.config, self.image_size = model.config, model.config.image_size
        self.samplers = tuple(model.objective.samplers)  # DDPM models: ddpm, ddim; flow models: euler

    @classmethod
    def from_pretrained(cls, path, device=None) -> "MiniDiffusionPipeline":
        """The model folder `train.py` or `save_pretrained` wrote (config.json + model.safetensors),
        every way it can be broken explained (`checkpoint.load_model`)."""
        device = pick_device(device)
        return cls(load_model(path, device), device)

    def save_pretrained(self, path) -> None:
        save_model(path, self.model)

    def size(self, height=None, width=None) -> tuple[int, int]:
        for name, value in (("height", height), ("width", width)):
            if value not in (None, self.image_size):
                raise ValueError(f"{name} {value}: this minidiff model renders at its trained size, {self.image_size}")
        return self.image_size, self.image_size

    def decode(self, x) -> list:
        return tensor_to_pil(self.model.from_latents(x))

    def check_sampler(self, sampler: str | None) -> str:
        return self.model.objective.check_sampler(sampler)

    def generate(self, call: MiniCall) -> ImageOutput:
        """One batch: the call checked, its pictures loaded, then the lesson's `generate_pixels`."""
        steps, guidance = self.resolve(call)
        if call.output_type not in ("pil", "pt"):
            raise ValueError(f"output_type must be 'pil' or 'pt', got {call.output_type!r}")
        if not isinstance(call.resample_jumps, int) or call.resample_jumps < 0:
            raise ValueError(f"resample_jumps must be a whole number >= 0, got {call.resample_jumps}")
        image, mask_image = self.load_inputs(call)
        # the model's output is a picture only where the denoiser works on pixels
        decode_noise = noise_to_pil if self.model.sample_shape == (3, self.image_size, self.image_size) else None
        recorder = StepRecorder(call.capture_steps, self.steps_run(steps, call.strength), call.callback, self.decode,
                                decode_noise)
        x = self.generate_pixels(call.prompt, call.negative_prompt, num_images_per_prompt=call.num_images_per_prompt,
                                 num_inference_steps=steps, guidance_scale=guidance, generator=call.generator,
                                 image=image, mask_image=mask_image, strength=call.strength, sampler=call.sampler,
                                 eta=call.eta, resample_jumps=call.resample_jumps, callback=recorder.callback,
                                 on_start=recorder.start)
        if call.output_type == "pt":  # like diffusers: values in [0, 1]
            return ImageOutput(images=list(((x.float().cpu() + 1) / 2).clamp(0, 1)), trace=recorder.trace)
        return ImageOutput(images=tensor_to_pil(x), trace=recorder.trace)

    def load_inputs(self, call: MiniCall):
        """-> (input image (1, 3, H, W) or None, mask (1, 1, H, W), True where replaced, or None),
        resized to the model's size (with a warning); the mask thresholded at 0.5."""
        if call.image is None:
            return None, None
        original = load_image(call.image)
        init = pil_to_tensor(load_image(original, self.image_size))[None]
        if call.mask_image is None:
            return init, None
        return init, mask_to_tensor(load_mask(call.mask_image, self.image_size, image_size=original.size))[None]
