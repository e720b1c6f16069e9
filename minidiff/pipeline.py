"""`MiniDiffusionPipeline`: a trained toy model behind the calls of `contract.py`.

    pipe = MiniDiffusionPipeline.from_pretrained("runs/shapes")
    out = pipe.sample("a red circle", num_inference_steps=50, generator=torch.Generator().manual_seed(0))
    blue = pipe.img2img("a blue circle", out.images[0], strength=0.7).images[0]
    patched = pipe.inpaint("a green square", out.images[0], "mask.png").images[0]

All three calls run one sampling loop (`denoise`): text to image starts from pure noise; img2img from
the input noised part of the way (SDEdit, Meng et al. 2022); inpainting likewise, putting the kept
region back after every step (RePaint, Lugmayr et al. 2022). A latent model runs the same loop on its
autoencoder's latents, as SD3's pipelines do: the input is encoded, the mask brought to the latents'
size, the result decoded and the kept pixels pasted back. The model's objective chooses the sampler
and the steps an edit runs; every sampler's `step`, `add_noise` and `signal_and_noise` mean the same,
so the loop never asks which one it has.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .contract import Call, ImageOutput, StepRecorder, TextToImagePipeline
from .images import load_image, load_mask, mask_to_tensor, noise_to_pil, pil_to_tensor, tensor_to_pil
from .model import TextToImageModel
from .runtime import autocast, pick_device
from .scheduler import DDIMScheduler, randn


@dataclass
class MiniCall(Call):
    """minidiff's keywords beyond the contract's."""

    eta: float = 0.0  # DDIM's noise (Song et al. 2021 eq. 16): 0 deterministic
    output_type: str = "pil"  # "pil", or "pt": tensors (3, H, W) in [0, 1]
    resample_jumps: int = 0  # inpainting: RePaint's resampling, r more model calls per step


class MiniDiffusionPipeline(TextToImagePipeline):
    call_type = MiniCall
    default_batch_size = 64  # images per forward pass (twice that many rows with guidance)
    default_num_inference_steps, default_guidance_scale = 50, 3.0
    size_multiple = None  # a minidiff model renders at its trained size only

    def __init__(self, model: TextToImageModel, device=None):
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        self.config = model.config
        self.image_size = model.config.image_size
        self.samplers = tuple(model.objective.samplers)  # DDPM models: ddpm, ddim; flow models: euler

    @classmethod
    def from_pretrained(cls, path, device=None) -> "MiniDiffusionPipeline":
        """Load config.json + model.safetensors from a folder written by `train.py` or `save_pretrained`."""
        device = pick_device(device)
        return cls(TextToImageModel.from_pretrained(path, device), device)

    def save_pretrained(self, path) -> None:
        self.model.save_pretrained(path)

    def size(self, height=None, width=None) -> tuple[int, int]:
        for name, value in (("height", height), ("width", width)):
            if value not in (None, self.image_size):
                raise ValueError(f"{name} {value}: this minidiff model renders at its trained size, {self.image_size}")
        return self.image_size, self.image_size

    def steps_run(self, num_inference_steps: int, strength: float | None = None) -> int:
        objective = self.model.objective
        return num_inference_steps if strength is None else objective.steps_run(num_inference_steps, strength)

    def decode(self, x) -> list:
        return tensor_to_pil(self.model.from_latents(x))

    def check_sampler(self, sampler: str | None) -> str:
        return self.model.objective.check_sampler(sampler)

    @torch.no_grad()
    def encode_prompts(self, prompt, negative_prompt=None, num_images_per_prompt: int = 1, guidance_scale: float = 1.0):
        """-> (context, mask): the prompts' rows first, then (with guidance) the negative prompts' rows
        as the unconditional ones (the empty prompt where none is given)."""
        prompts, negatives = Call(prompt, negative_prompt).prompts()
        repeat = lambda texts: [t for t in texts for _ in range(num_images_per_prompt)]  # noqa: E731
        return self.model.encode_prompt(repeat(prompts) + (repeat(negatives) if guidance_scale > 1 else []))

    @torch.no_grad()
    def predict(self, x, t, context, mask, guidance_scale: float) -> torch.Tensor:
        """The model's output (eps, or the velocity of a flow model) for x at timestep t, with
        classifier-free guidance out_uncond + w (out_cond - out_uncond) (contract.py): linear, so it
        reads the same for noise and for velocity, as in SD3."""
        use_cfg = guidance_scale > 1
        x_in = torch.cat([x, x]) if use_cfg else x
        timesteps = torch.full((x_in.shape[0],), t, device=self.device, dtype=self.model.objective.timestep_dtype)
        with autocast(self.device):
            out = self.model.denoiser(x_in, timesteps, context, mask).float()
        if use_cfg:
            out_cond, out_uncond = out.chunk(2)  # conditional rows first (encode_prompts)
            out = out_uncond + guidance_scale * (out_cond - out_uncond)
        return out

    @torch.no_grad()
    def denoise(self, x, scheduler, timesteps, context, mask, guidance_scale, generator=None, callback=None,
                after_step=None, **step_options) -> torch.Tensor:
        """The sampling loop shared by sample, img2img and inpaint: x_t -> x_0 along `timesteps`.
        `after_step(i, t, x)` may edit x after each step (inpainting puts the kept region back)."""
        for i, t in enumerate(timesteps.tolist()):
            output = self.predict(x, t, context, mask, guidance_scale)
            out = scheduler.step(output, t, x, generator=generator, **step_options)
            x = out.prev_sample
            if after_step is not None:
                x = after_step(i, t, x)
            if callback is not None:
                callback({"i": i, "t": t, "x": x, "denoised": out.pred_original_sample, "noise_pred": output})
        return x

    @torch.no_grad()
    def generate(self, call: MiniCall) -> ImageOutput:
        """One batch: the start, then `denoise`. At strength 1 the start is pure noise, as in diffusers'
        inpaint pipelines (`is_strength_max`); at strength 0 the input is the answer."""
        steps, guidance = self.resolve(call)
        if call.output_type not in ("pil", "pt"):
            raise ValueError(f"output_type must be 'pil' or 'pt', got {call.output_type!r}")
        if not isinstance(call.resample_jumps, int) or call.resample_jumps < 0:
            raise ValueError(f"resample_jumps must be a whole number >= 0, got {call.resample_jumps}")
        init, replace = self.load_inputs(call)
        scheduler = self.model.objective.make_sampler(call.sampler, steps)
        timesteps = scheduler.timesteps[steps - self.steps_run(steps, call.strength):]
        # the model's output is a picture only where the denoiser works on pixels
        decode_noise = noise_to_pil if self.model.sample_shape == (3, self.image_size, self.image_size) else None
        recorder = StepRecorder(call.capture_steps, len(timesteps), call.callback, self.decode, decode_noise)
        batch = len(call.prompts()[0]) * call.num_images_per_prompt
        kept = None if replace is None else (init.to(self.device), replace.to(self.device))  # pixels, for the paste-back
        if init is not None:  # (B, C, h, w): the input as the denoiser sees it
            init = self.model.to_latents(init.to(self.device), call.generator).expand(batch, -1, -1, -1)
        if replace is not None:  # the mask at the denoiser's size (nearest), as SD3's prepare_mask_latents
            replace = F.interpolate(replace.float(), size=self.model.sample_shape[1:]) > 0.5
        if len(timesteps) == 0:  # strength 0 (or no step left for this strength): nothing to denoise
            recorder.start(init, None)
            return self.output(init, call, recorder, kept)
        context, mask = self.encode_prompts(call.prompt, call.negative_prompt, call.num_images_per_prompt, guidance)
        # 1. the start: pure noise x_T, or the input noised to the first timestep that runs:
        #    DDPM x_t = sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) eps (Ho et al. 2020 eq. 4);
        #    flow x_sigma = (1 - sigma) x_0 + sigma eps (`scale_noise`, as SD3's img2img).
        noise = randn((batch, *self.model.sample_shape), call.generator, self.device)
        x = scheduler.add_noise(init, noise, timesteps[:1].expand(batch)) if init is not None and call.strength < 1 \
            else noise
        recorder.start(x, timesteps[0].item())
        # 2. the steps; inpainting puts the kept region back after each
        step_callback, after_step = recorder.callback, None
        if replace is not None:
            timesteps, after_step, step_callback = self.repaint(scheduler, timesteps, init, noise,
                                                                replace.to(self.device), call, step_callback)
        step_options = {"eta": call.eta, "use_clipped_model_output": True} if isinstance(scheduler, DDIMScheduler) else {}
        x = self.denoise(x, scheduler, timesteps, context, mask, guidance, call.generator, step_callback, after_step,
                         **step_options)
        return self.output(x, call, recorder, kept)

    def output(self, x, call: MiniCall, recorder, kept=None) -> ImageOutput:
        """Decode x; with `kept` = (input pixels, mask), inpainting's paste-back: the kept pixels exactly
        as given (a latent model's decoder only approximates them)."""
        x = self.model.from_latents(x)
        if kept is not None:
            x = torch.where(kept[1], x, kept[0])
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

    def repaint(self, scheduler, timesteps, init, noise, replace, call: MiniCall, callback):
        """The RePaint blend (Lugmayr et al. 2022, Algorithm 1) as inputs to `denoise`:
        -> (timesteps to visit, after_step, callback). After every step the kept region is the input
        noised to the level the sample has reached, with the one noise tensor of the start (RePaint
        draws fresh noise each step; we keep one, as diffusers' SD3 inpaint pipeline does); after the
        last step it is the input itself, so black-mask pixels equal the input's exactly. With
        `resample_jumps` r, each step but the last is visited 1 + r times (Algorithm 1, lines 3 and
        9-11: jump back by re-noising one step, denoise again); the callback sees its last visit."""
        n, batch = len(timesteps), init.shape[0]
        visits = []  # (step index, is this its last visit?)
        for i in range(n):
            repeats = 1 + (call.resample_jumps if i < n - 1 else 0)
            visits += [(i, r == repeats - 1) for r in range(repeats)]

        def after_step(j, t, x):
            i, last_visit = visits[j]
            # 1. the kept region at the noise level x has reached (Alg. 1 line 5), or the input at the end
            known = scheduler.add_noise(init, noise, timesteps[i + 1].expand(batch)) if i + 1 < n else init
            x = torch.where(replace, x, known)  # Alg. 1 line 8: (1 - m) * unknown + m * known
            if not last_visit:
                # 2. jump back from t_{i+1} to t_i (Alg. 1 line 10): with x_t = a_t x_0 + s_t eps at both
                #    ends, x_{t_i} = (a_i / a_{i+1}) x + sqrt(s_i^2 - (a_i / a_{i+1})^2 s_{i+1}^2) z
                #    (for DDPM, a = sqrt(alpha-bar), s^2 = 1 - alpha-bar: Ho's strided q(x_t | x_s)).
                a_i, s_i = scheduler.signal_and_noise(timesteps[i])
                a_next, s_next = scheduler.signal_and_noise(timesteps[i + 1])
                ratio = a_i / a_next
                std = (s_i**2 - ratio**2 * s_next**2).clamp(min=0).sqrt()
                x = ratio * x + std * randn(x.shape, call.generator, x.device, x.dtype)
            return x

        def on_step(step):
            i, last_visit = visits[step["i"]]
            if last_visit:
                callback({**step, "i": i})

        visit_timesteps = timesteps[[i for i, _ in visits]]
        return visit_timesteps, after_step, (on_step if callback is not None else None)
