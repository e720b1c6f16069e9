"""`MiniDiffusionPipeline`: load a trained toy model and generate with diffusers' keywords.

    pipe = MiniDiffusionPipeline.from_pretrained("runs/shapes")
    out = pipe.sample("a red circle", num_inference_steps=50, generator=torch.Generator().manual_seed(0))
    out.images[0].save("red-circle.png")
"""

from __future__ import annotations

import torch

from .checkpoint import load_model, save_model
from .contract import ImageOutput, TextToImagePipeline, as_prompt_list, check_arguments
from .images import tensor_to_pil
from .model import TextToImageModel
from .runtime import autocast, pick_device
from .scheduler import SAMPLERS, randn


class MiniDiffusionPipeline(TextToImagePipeline):
    default_num_inference_steps = 50
    default_guidance_scale = 4.0

    def __init__(self, model: TextToImageModel, device=None):
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        self.config = model.config

    @classmethod
    def from_pretrained(cls, path, device=None) -> "MiniDiffusionPipeline":
        """Load config.json + model.safetensors from a folder written by `train.py` or `save_pretrained`."""
        device = pick_device(device)
        return cls(load_model(path, device), device)

    def save_pretrained(self, path) -> None:
        save_model(path, self.model)

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def make_scheduler(self, sampler: str, num_inference_steps: int):
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
        scheduler = SAMPLERS[sampler](self.config.scheduler)
        scheduler.set_timesteps(num_inference_steps)
        return scheduler

    @torch.no_grad()
    def encode_prompts(self, prompt, negative_prompt, num_images_per_prompt: int, guidance_scale: float):
        """-> (context, mask) for the batch: conditional rows first, then (with CFG) unconditional."""
        prompts, negatives = as_prompt_list(prompt, negative_prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        negatives = [n for n in negatives for _ in range(num_images_per_prompt)]
        texts = prompts + negatives if guidance_scale > 1 else prompts
        return self.model.encode_prompt(texts)

    @torch.no_grad()
    def predict_noise(self, x, t: int, context, mask, guidance_scale: float) -> torch.Tensor:
        """epsilon for the batch x, with classifier-free guidance (Ho & Salimans 2022, eq. 6):
        eps = eps_uncond + w * (eps_cond - eps_uncond), the negative prompt standing in for uncond."""
        use_cfg = guidance_scale > 1
        x_in = torch.cat([x, x]) if use_cfg else x
        timesteps = torch.full((x_in.shape[0],), t, device=self.device, dtype=torch.int64)
        with autocast(self.device):
            eps = self.model.unet(x_in, timesteps, context, mask).float()
        if use_cfg:
            eps_cond, eps_uncond = eps.chunk(2)
            eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        return eps

    @torch.no_grad()
    def denoise(self, x, scheduler, timesteps, context, mask, guidance_scale, generator=None, eta=0.0,
                callback=None, after_step=None) -> torch.Tensor:
        """The sampling loop shared by sample, img2img and inpaint: x_t -> x_0 along `timesteps`.
        `after_step(i, t, x)` may edit x after each step (inpainting puts the kept region back)."""
        for i, t in enumerate(timesteps.tolist()):
            eps = self.predict_noise(x, t, context, mask, guidance_scale)
            if isinstance(scheduler, SAMPLERS["ddim"]):
                out = scheduler.step(eps, t, x, eta=eta, generator=generator)
            else:
                out = scheduler.step(eps, t, x, generator=generator)
            x = out.prev_sample
            if after_step is not None:
                x = after_step(i, t, x)
            if callback is not None:
                callback({"i": i, "t": t, "x": x, "denoised": out.pred_original_sample, "noise_pred": eps})
        return x

    def _defaults(self, num_inference_steps, guidance_scale):
        steps = self.default_num_inference_steps if num_inference_steps is None else num_inference_steps
        guidance = self.default_guidance_scale if guidance_scale is None else guidance_scale
        return steps, guidance

    def _initial_noise(self, batch: int, generator) -> torch.Tensor:
        size = self.image_size
        return randn((batch, 3, size, size), generator, self.device)

    @torch.no_grad()
    def sample(self, prompt, *, negative_prompt=None, num_inference_steps=None, guidance_scale=None,
               generator=None, num_images_per_prompt=1, callback=None, sampler="ddim", eta=0.0,
               output_type="pil") -> ImageOutput:
        """Text to image: start from x_T ~ N(0, I) and denoise for `num_inference_steps` steps.
        `sampler` is "ddim" (Song et al. 2021, `eta` sets its noise) or "ddpm" (Ho et al. 2020)."""
        steps, guidance = self._defaults(num_inference_steps, guidance_scale)
        check_arguments(steps, guidance, None, num_images_per_prompt)
        scheduler = self.make_scheduler(sampler, steps)
        context, mask = self.encode_prompts(prompt, negative_prompt, num_images_per_prompt, guidance)
        batch = context.shape[0] // (2 if guidance > 1 else 1)
        x = self._initial_noise(batch, generator)
        x = self.denoise(x, scheduler, scheduler.timesteps, context, mask, guidance, generator, eta, callback)
        return self._output(x, output_type)

    def _output(self, x: torch.Tensor, output_type: str) -> ImageOutput:
        if output_type == "pt":  # like diffusers: values in [0, 1]
            return ImageOutput(images=list(((x.float().cpu() + 1) / 2).clamp(0, 1)))
        return ImageOutput(images=tensor_to_pil(x))

    def img2img(self, prompt, image, *, strength=0.7, **kwargs) -> ImageOutput:
        raise NotImplementedError("img2img is not written yet")

    def inpaint(self, prompt, image, mask_image, *, strength=0.99, **kwargs) -> ImageOutput:
        raise NotImplementedError("inpaint is not written yet")
