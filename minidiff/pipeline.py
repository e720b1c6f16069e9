"""The pipeline: prompts -> pictures through one sampling loop, on tensors. (`minidiff.MiniDiffusionPipeline`,
minidiff/tools/pipeline.py, puts it behind the calls `sample`, `img2img` and `inpaint`, PIL in and out.)

    pipe = Pipeline(model)
    pixels = pipe.generate_pixels("a red circle", num_inference_steps=50,
                                  generator=torch.Generator().manual_seed(0))  # (1, 3, H, W) in [-1, 1]

Text to image, img2img and inpainting run one sampling loop (`denoise`): text to image starts from pure
noise; img2img from the input noised part of the way (SDEdit, Meng et al. 2022); inpainting likewise,
putting the kept region back after every step (RePaint, Lugmayr et al. 2022). A latent model runs the
same loop on its autoencoder's latents, as SD3's pipelines do: the input is encoded, the mask brought
to the latents' size, the result decoded and the kept pixels pasted back. The model's objective chooses
the sampler and the steps an edit runs; every sampler's `step`, `add_noise` and `signal_and_noise` mean
the same, so the loop never asks which one it has.

Classifier-free guidance is out = out_uncond + w (out_cond - out_uncond), w = `guidance_scale`, the
negative prompt standing in for the unconditional one (Ho & Salimans' eq. 6 with their w = our w - 1, as
in Imagen and diffusers). An edit of strength s runs the last `steps_run(N, s)` of N steps (the objective's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .model import TextToImageModel
from .runtime import autocast, pick_device, precision_for
from .scheduler import DDIMScheduler, randn


def prompt_lists(prompt, negative_prompt=None) -> tuple[list[str], list[str]]:
    """(prompts, negative prompts): two lists of equal length, the empty prompt where none is given."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negatives = negative_prompt
    negatives = [negatives or ""] * len(prompts) if negatives is None or isinstance(negatives, str) else list(negatives)
    if len(negatives) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(negatives)} negative prompts")
    return prompts, negatives


class Pipeline:
    """A trained `TextToImageModel` on a device, and the sampling loop."""

    def __init__(self, model: TextToImageModel, device=None):
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()

    def steps_run(self, num_inference_steps: int, strength: float | None = None) -> int:
        """The steps a call runs: all of them, or an edit's share (the objective's rule)."""
        objective = self.model.objective
        return num_inference_steps if strength is None else objective.steps_run(num_inference_steps, strength)

    @torch.no_grad()
    def encode_prompts(self, prompt, negative_prompt=None, num_images_per_prompt: int = 1, guidance_scale: float = 1.0):
        """-> (context, mask): the prompts' rows first, then (with guidance) the negative prompts' rows
        as the unconditional ones (the empty prompt where none is given)."""
        prompts, negatives = prompt_lists(prompt, negative_prompt)
        repeat = lambda texts: [t for t in texts for _ in range(num_images_per_prompt)]  # noqa: E731
        return self.model.encode_prompt(repeat(prompts) + (repeat(negatives) if guidance_scale > 1 else []))

    @torch.no_grad()
    def predict(self, x, t, context, mask, guidance_scale: float) -> torch.Tensor:
        """The model's output (eps, or the velocity of a flow model) for x at timestep t, with
        classifier-free guidance out_uncond + w (out_cond - out_uncond) (module doc): linear, so it
        reads the same for noise and for velocity, as in SD3."""
        use_cfg = guidance_scale > 1
        x_in = torch.cat([x, x]) if use_cfg else x
        timesteps = torch.full((x_in.shape[0],), t, device=self.device, dtype=self.model.objective.timestep_dtype)
        with autocast(self.device, precision_for(self.device)):
            out = self.model.denoiser(x_in, timesteps, context, mask).float()
        if use_cfg:
            out_cond, out_uncond = out.chunk(2)  # conditional rows first (encode_prompts)
            out = out_uncond + guidance_scale * (out_cond - out_uncond)
        return out

    @torch.no_grad()
    def denoise(self, x, scheduler, timesteps, context, mask, guidance_scale, generator=None, callback=None,
                after_step=None, **step_options) -> torch.Tensor:
        """The sampling loop: x_t -> x_0 along `timesteps`. `after_step(i, t, x)` may edit x after each
        step (inpainting puts the kept region back); `callback` gets a dict after each: "i", "t" (the
        timestep the model was given), "x" (the sample after the step), "denoised" (x_0 predicted) and
        "noise_pred" (the model's output)."""
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
    def generate_pixels(self, prompt, negative_prompt=None, num_images_per_prompt: int = 1,
                        num_inference_steps: int = 50, guidance_scale: float = 3.0, generator=None, image=None,
                        mask_image=None, strength: float | None = None, sampler: str | None = None, eta: float = 0.0,
                        resample_jumps: int = 0, callback=None, on_start=None) -> torch.Tensor:
        """The start, then `denoise`, then the pictures: (B, 3, H, W) in [-1, 1], `num_images_per_prompt`
        for each prompt. `image` (1, 3, H, W) in [-1, 1] starts img2img and inpainting; `mask_image`
        (1, 1, H, W), True where replaced, makes it inpainting. `on_start(x, t)` sees the start. At
        strength 1 the start is pure noise, as in diffusers' inpaint pipelines (`is_strength_max`); at
        strength 0 the input is the answer. `eta`: DDIM's noise; `resample_jumps`: RePaint's (`repaint`)."""
        steps = num_inference_steps
        scheduler = self.model.objective.make_sampler(sampler, steps)
        timesteps = scheduler.timesteps[steps - self.steps_run(steps, strength):]
        batch = len(prompt_lists(prompt, negative_prompt)[0]) * num_images_per_prompt
        kept = None if mask_image is None else (image.to(self.device), mask_image.to(self.device))  # the paste-back's
        init = replace = None
        if image is not None:  # (B, C, h, w): the input as the denoiser sees it
            init = self.model.to_latents(image.to(self.device), generator).expand(batch, -1, -1, -1)
        if mask_image is not None:  # the mask at the denoiser's size (nearest), as SD3's prepare_mask_latents
            replace = F.interpolate(mask_image.float(), size=self.model.sample_shape[1:]) > 0.5
        on_start = on_start or (lambda x, t: None)
        if len(timesteps) == 0:  # strength 0 (or no step left for this strength): nothing to denoise
            on_start(init, None)
            x = init
        else:
            context, mask = self.encode_prompts(prompt, negative_prompt, num_images_per_prompt, guidance_scale)
            # 1. the start: pure noise x_T, or the input noised to the first timestep that runs:
            #    DDPM x_t = sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) eps (Ho et al. 2020 eq. 4);
            #    flow x_sigma = (1 - sigma) x_0 + sigma eps (`scale_noise`, as SD3's img2img).
            noise = randn((batch, *self.model.sample_shape), generator, self.device)
            x = scheduler.add_noise(init, noise, timesteps[:1].expand(batch)) if init is not None and strength < 1 \
                else noise
            on_start(x, timesteps[0].item())
            # 2. the steps; inpainting puts the kept region back after each
            after_step = None
            if replace is not None:
                timesteps, after_step, callback = self.repaint(scheduler, timesteps, init, noise, replace.to(self.device),
                                                               generator, resample_jumps, callback)
            step_options = {"eta": eta, "use_clipped_model_output": True} if isinstance(scheduler, DDIMScheduler) else {}
            x = self.denoise(x, scheduler, timesteps, context, mask, guidance_scale, generator, callback, after_step,
                             **step_options)
        # 3. decode; inpainting pastes back the kept pixels exactly as given (a latent model's decoder
        #    only approximates them)
        x = self.model.from_latents(x)
        return x if kept is None else torch.where(kept[1], x, kept[0])

    def repaint(self, scheduler, timesteps, init, noise, replace, generator, resample_jumps: int, callback):
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
            repeats = 1 + (resample_jumps if i < n - 1 else 0)
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
                x = ratio * x + std * randn(x.shape, generator, x.device, x.dtype)
            return x

        def on_step(step):
            i, last_visit = visits[step["i"]]
            if last_visit:
                callback({**step, "i": i})

        visit_timesteps = timesteps[[i for i, _ in visits]]
        return visit_timesteps, after_step, (on_step if callback is not None else None)
