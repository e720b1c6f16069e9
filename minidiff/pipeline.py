"""`MiniDiffusionPipeline`: load a trained toy model and generate with diffusers' keywords.

    pipe = MiniDiffusionPipeline.from_pretrained("runs/shapes")
    out = pipe.sample("a red circle", num_inference_steps=50, generator=torch.Generator().manual_seed(0))
    out.images[0].save("red-circle.png")
    blue = pipe.img2img("a blue circle", "red-circle.png", strength=0.7).images[0]
    patched = pipe.inpaint("a green square", "red-circle.png", "mask.png").images[0]

All three calls share one sampling loop (`denoise`) and one way of starting it
(`_generate`): text to image starts from pure noise; img2img from the input image noised
part of the way (SDEdit, Meng et al. 2022); inpainting likewise, putting the kept region
back after every step (RePaint, Lugmayr et al. 2022).

The same code runs both kinds of model: a DDPM model (the network predicts the noise eps;
samplers "ddim" and "ddpm") and a rectified-flow model (it predicts the velocity eps - x_0;
sampler "euler", as Stable Diffusion 3). The scheduler holds the difference: `step`,
`add_noise` and `signal_and_noise` mean the same for both.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from .checkpoint import load_model, save_model
from .contract import ImageOutput, StepRecorder, TextToImagePipeline, as_prompt_list, check_arguments
from .images import load_image, load_mask, mask_to_tensor, noise_to_pil, pil_to_tensor, tensor_to_pil
from .model import TextToImageModel
from .runtime import autocast, pick_device
from .scheduler import SAMPLERS, randn

DEFAULT_BATCH_SIZE = 64  # images per forward pass (twice that many rows with guidance)

OUTPUT_TYPES = ("pil", "pt")


def check_edit_strength(strength) -> None:
    """img2img and inpainting need a strength: a number in [0, 1]."""
    if strength is None:
        raise ValueError("strength must be between 0 and 1, got None")
    check_arguments(strength=strength)


def timesteps_for_strength(timesteps: torch.Tensor, strength: float | None, round_up: bool = False) -> torch.Tensor:
    """The part of an N-step schedule that img2img and inpainting run: the last ones (the least
    noisy), as many as diffusers' `get_timesteps` runs. DDPM models follow the SD/SDXL pipelines,
    int(N * strength) steps; flow models (`round_up`) follow the SD3 pipelines,
    N - int(N - N * strength), which rounds up (40 of 40 steps at strength 0.99, where the other
    rule runs 39). strength 1 (or None, text to image) keeps all N; strength 0 keeps none."""
    if strength is None:
        return timesteps
    n = len(timesteps)
    if round_up:
        start = int(max(n - min(n * strength, n), 0))
    else:
        start = n - min(int(n * strength), n)
    return timesteps[start:]


def merge_traces(traces: list[list[dict]]) -> list[dict]:
    """One trace from the traces of several batches: each record's pictures in batch order."""
    merged = [dict(record) for record in traces[0]]
    for trace in traces[1:]:
        for record, more in zip(merged, trace):
            for key in ("x_t", "pred_x0", "noise_pred"):
                if record[key] is not None:
                    record[key] = record[key] + more[key]
    return merged


class MiniDiffusionPipeline(TextToImagePipeline):
    default_num_inference_steps = 50
    # Chosen on an early model (100% at 2 and 3); on the default model DDIM scores 97.9% at 3 and
    # 100% from 6 up: BENCHMARKS.md, "Steps and guidance against quality".
    default_guidance_scale = 3.0

    def __init__(self, model: TextToImageModel, device=None):
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        self.config = model.config
        self._progress: dict = {}  # tqdm options, set_progress_bar_config

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

    @property
    def samplers(self) -> tuple[str, ...]:
        """The samplers this model can use, its default first: DDPM and DDIM step a DDPM
        (noise-predicting) model; Euler steps a rectified-flow (velocity-predicting) one. DDPM's
        ancestral sampler is the default for DDPM models: on the 1,200-step CPU model it scored
        97.2% at 50 steps where DDIM scored 83.3% (BENCHMARKS.md, "What made training faster")."""
        return ("euler",) if self.config.objective == "flow" else ("ddpm", "ddim")

    def set_progress_bar_config(self, **kwargs) -> None:
        """tqdm options of the bar over images that calls with more than one batch show
        (diffusers' method of the same name); `disable=True` hides it, `disable=False` shows it always."""
        self._progress = kwargs

    def make_scheduler(self, sampler: str | None, num_inference_steps: int):
        """The scheduler for `sampler` (None: this model's default), set to `num_inference_steps`."""
        sampler = self.samplers[0] if sampler is None else sampler
        if sampler not in self.samplers:
            kind = "a rectified-flow" if self.config.objective == "flow" else "a DDPM (noise-predicting)"
            raise ValueError(f"this is {kind} model: sampler must be one of {list(self.samplers)}, got {sampler!r}")
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
    def predict(self, x, t, context, mask, guidance_scale: float) -> torch.Tensor:
        """The model's output for the batch x at timestep t (epsilon for a DDPM model, the velocity
        for a flow model), with classifier-free guidance (Ho & Salimans 2022, eq. 6):
        out = out_uncond + w * (out_cond - out_uncond), the negative prompt standing in for uncond.
        (Guidance is linear, so it reads the same for noise and for velocity, as in SD3.)"""
        use_cfg = guidance_scale > 1
        x_in = torch.cat([x, x]) if use_cfg else x
        dtype = torch.float32 if self.config.objective == "flow" else torch.int64  # flow: t = sigma * T
        timesteps = torch.full((x_in.shape[0],), t, device=self.device, dtype=dtype)
        with autocast(self.device):
            out = self.model.unet(x_in, timesteps, context, mask).float()
        if use_cfg:
            out_cond, out_uncond = out.chunk(2)  # conditional rows first (encode_prompts)
            out = out_uncond + guidance_scale * (out_cond - out_uncond)
        return out

    @torch.no_grad()
    def denoise(self, x, scheduler, timesteps, context, mask, guidance_scale, generator=None, eta=0.0,
                callback=None, after_step=None) -> torch.Tensor:
        """The sampling loop shared by sample, img2img and inpaint: x_t -> x_0 along `timesteps`.
        `after_step(i, t, x)` may edit x after each step (inpainting puts the kept region back)."""
        for i, t in enumerate(timesteps.tolist()):
            output = self.predict(x, t, context, mask, guidance_scale)
            if isinstance(scheduler, SAMPLERS["ddim"]):
                out = scheduler.step(output, t, x, eta=eta, use_clipped_model_output=True, generator=generator)
            else:
                out = scheduler.step(output, t, x, generator=generator)
            x = out.prev_sample
            if after_step is not None:
                x = after_step(i, t, x)
            if callback is not None:
                callback({"i": i, "t": t, "x": x, "denoised": out.pred_original_sample, "noise_pred": output})
        return x

    def _initial_noise(self, batch: int, generator) -> torch.Tensor:
        size = self.image_size
        return randn((batch, 3, size, size), generator, self.device)

    @torch.no_grad()
    def sample(self, prompt, *, negative_prompt=None, num_inference_steps=None, guidance_scale=None,
               generator=None, num_images_per_prompt=1, callback=None, capture_steps=None, sampler=None, eta=0.0,
               output_type="pil", batch_size=DEFAULT_BATCH_SIZE) -> ImageOutput:
        """Text to image: start from x_T ~ N(0, I) and denoise for `num_inference_steps` steps.
        `sampler` is one of `self.samplers` (None: the model's default, the first): "ddim" (Song et
        al. 2021, `eta` sets its noise) or "ddpm" (Ho et al. 2020).
        `output_type` "pil" gives PIL images, "pt" tensors (3, H, W) in [0, 1].

        `batch_size` bounds the images denoised together (memory grows with it, not with the number
        of images asked for): more images run as several batches, one after the other, each drawing
        its noise from `generator` in turn, with a progress bar over images. The same seed and
        batch_size give the same images; another batch_size gives other (equally valid) draws. The
        `callback` then sees each batch's steps, its "i" starting again at 0."""
        return self._generate(prompt, None, None, None, negative_prompt, num_inference_steps, guidance_scale,
                              generator, num_images_per_prompt, callback, capture_steps, sampler, eta, output_type,
                              batch_size=batch_size)

    @torch.no_grad()
    def img2img(self, prompt, image, *, strength=0.7, negative_prompt=None, num_inference_steps=None,
                guidance_scale=None, generator=None, num_images_per_prompt=1, callback=None, capture_steps=None,
                sampler=None, eta=0.0, output_type="pil", batch_size=DEFAULT_BATCH_SIZE) -> ImageOutput:
        """Image to image (SDEdit, Meng et al. 2022): noise `image` (PIL or path; converted to RGB
        and resized to the model's size, with a warning) to the timestep where the last
        int(N * strength) of the N steps begin (flow models: as SD3, see `timesteps_for_strength`),
        then run those steps towards `prompt`. strength 0 returns the input unchanged; strength 1
        starts from pure noise and ignores it. (diffusers' SD/SDXL img2img pipelines noise the input
        to their first timestep even at strength 1, which keeps a trace of it under "leading"
        spacing; we follow their inpaint pipelines' `is_strength_max` and start from pure noise.
        Flow models reach sigma = 1 at strength 1, pure noise either way.)"""
        check_edit_strength(strength)
        init = pil_to_tensor(load_image(image, self.image_size))[None]  # (1, 3, H, W)
        return self._generate(prompt, init, None, strength, negative_prompt, num_inference_steps, guidance_scale,
                              generator, num_images_per_prompt, callback, capture_steps, sampler, eta, output_type,
                              batch_size=batch_size)

    @torch.no_grad()
    def inpaint(self, prompt, image, mask_image, *, strength=0.99, negative_prompt=None, num_inference_steps=None,
                guidance_scale=None, generator=None, num_images_per_prompt=1, callback=None, capture_steps=None,
                sampler=None, eta=0.0, output_type="pil", resample_jumps=0,
                batch_size=DEFAULT_BATCH_SIZE) -> ImageOutput:
        """Inpainting: regenerate the white part of `mask_image`, keep the black part of `image`.

        `mask_image` (PIL or path, any mode) is converted to grayscale and thresholded at 0.5; it
        must be the size of `image` (else ImageInputError), then both are resized to the model's
        size. Starting as img2img does, after every step the kept region is replaced by the input
        noised to the level the sample has reached, with one noise tensor drawn once (the RePaint
        blend, Lugmayr et al. 2022, Algorithm 1 lines 5 and 8; RePaint draws fresh noise each
        step, we keep one, as diffusers' StableDiffusion3InpaintPipeline does); after the last step
        it is the input itself, so black-mask pixels of the output equal the (resized) input's exactly.
        `resample_jumps` r > 0 adds RePaint's resampling (Algorithm 1, lines 3 and 9-11): after each
        step but the last, jump back by re-noising one step and denoise it again, r times,
        so the generated part settles in with the kept part; r more model calls per step."""
        check_edit_strength(strength)
        if not isinstance(resample_jumps, int) or resample_jumps < 0:
            raise ValueError(f"resample_jumps must be a whole number >= 0, got {resample_jumps}")
        original = load_image(image)
        mask = load_mask(mask_image, self.image_size, image_size=original.size)
        init = pil_to_tensor(load_image(original, self.image_size))[None]  # (1, 3, H, W)
        replace = mask_to_tensor(mask)[None]  # (1, 1, H, W), True where white
        return self._generate(prompt, init, replace, strength, negative_prompt, num_inference_steps, guidance_scale,
                              generator, num_images_per_prompt, callback, capture_steps, sampler, eta, output_type,
                              resample_jumps, batch_size)

    def _generate(self, prompt, init, replace, strength, negative_prompt, num_inference_steps, guidance_scale,
                  generator, num_images_per_prompt, callback, capture_steps, sampler, eta, output_type,
                  resample_jumps=0, batch_size=DEFAULT_BATCH_SIZE) -> ImageOutput:
        """Checks, then the images in batches of at most `batch_size` (`_generate_batch` each).
        init: (1, 3, H, W) input image or None (text to image); replace: (1, 1, H, W) bool or None."""
        steps, guidance = self._defaults(num_inference_steps, guidance_scale)
        check_arguments(steps, guidance, strength, num_images_per_prompt)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size}")
        prompts, negatives = as_prompt_list(prompt, negative_prompt)
        rows = [(p, n) for p, n in zip(prompts, negatives) for _ in range(num_images_per_prompt)]  # one per image
        scheduler = self.make_scheduler(sampler, steps)
        timesteps = timesteps_for_strength(scheduler.timesteps, strength, round_up=self.config.objective == "flow")
        StepRecorder(capture_steps, len(timesteps), decode=tensor_to_pil)  # a bad capture_steps fails before any work
        chunks = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
        progress = {"disable": len(chunks) == 1, **self._progress}
        images, traces = [], []
        with tqdm(total=len(rows), unit="image", leave=False, dynamic_ncols=True, **progress) as bar:
            for chunk in chunks:
                x, trace = self._generate_batch(chunk, init, replace, strength, scheduler, timesteps, guidance,
                                                generator, callback, capture_steps, eta, resample_jumps)
                images.append(x)
                traces.append(trace)
                bar.update(len(chunk))
        return self._output(torch.cat(images), output_type, merge_traces(traces))

    def _generate_batch(self, rows, init, replace, strength, scheduler, timesteps, guidance, generator, callback,
                        capture_steps, eta, resample_jumps) -> tuple[torch.Tensor, list]:
        """One batch, (prompt, negative prompt) per image: the start, `denoise`, the trace."""
        batch = len(rows)
        recorder = StepRecorder(capture_steps, len(timesteps), callback, decode=tensor_to_pil,
                                decode_noise=noise_to_pil)
        if init is not None:
            init = init.to(self.device).expand(batch, -1, -1, -1)  # (B, 3, H, W)
        if len(timesteps) == 0:  # strength 0 (or no step left for this strength): nothing to denoise
            recorder.start(init, None)
            return init, recorder.trace
        context, mask = self.encode_prompts([p for p, _ in rows], [n for _, n in rows], 1, guidance)
        # 1. the start: pure noise x_T, or the input noised to the first timestep that runs:
        #    DDPM x_t = sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) eps (Ho et al. 2020 eq. 4);
        #    flow x_sigma = (1 - sigma) x_0 + sigma eps (`scale_noise`, as SD3's img2img).
        #    At strength 1, pure noise, as diffusers' inpaint pipelines do (`is_strength_max`).
        noise = self._initial_noise(batch, generator)
        x = noise
        if init is not None and strength < 1:
            x = scheduler.add_noise(init, noise, timesteps[:1].expand(batch))
        recorder.start(x, timesteps[0].item())
        # 2. the steps; inpainting puts the kept region back after each
        step_callback, after_step = recorder.callback, None
        if replace is not None:
            timesteps, after_step, step_callback = self._repaint(scheduler, timesteps, init, noise,
                                                                 replace.to(self.device), resample_jumps,
                                                                 generator, step_callback)
        x = self.denoise(x, scheduler, timesteps, context, mask, guidance, generator, eta, step_callback, after_step)
        return x, recorder.trace

    def _repaint(self, scheduler, timesteps, init, noise, replace, resample_jumps, generator, callback):
        """The RePaint blend (Lugmayr et al. 2022, Algorithm 1) as inputs to `denoise`:
        -> (timesteps to visit, after_step, callback). With resampling, step i is visited
        1 + resample_jumps times (not the last step); the callback sees each step once, its last visit."""
        n, batch = len(timesteps), init.shape[0]
        visits = []  # (step index, is this its last visit?)
        for i in range(n):
            repeats = 1 + (resample_jumps if i < n - 1 else 0)
            visits += [(i, r == repeats - 1) for r in range(repeats)]

        def after_step(j, t, x):
            i, last_visit = visits[j]
            # 1. the kept region at the noise level x has reached: the input noised to the next
            #    timestep with the noise drawn once (Alg. 1 line 5), or the input itself at the end
            if i + 1 < n:
                known = scheduler.add_noise(init, noise, timesteps[i + 1].expand(batch))
            else:
                known = init
            x = torch.where(replace, x, known)  # Alg. 1 line 8: (1 - m) * unknown + m * known
            if not last_visit:
                # 2. jump back from t_{i+1} to t_i (Alg. 1 line 10): the forward process from one noise
                #    level to a higher one. With x_t = a_t x_0 + s_t eps at both ends,
                #    x_{t_i} = (a_i / a_{i+1}) x + sqrt(s_i^2 - (a_i / a_{i+1})^2 s_{i+1}^2) z;
                #    for DDPM a = sqrt(alpha-bar), s^2 = 1 - alpha-bar, which is Ho's strided q(x_t | x_s).
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

    def _output(self, x: torch.Tensor, output_type: str, trace: list | None = None) -> ImageOutput:
        if output_type == "pt":  # like diffusers: values in [0, 1]
            return ImageOutput(images=list(((x.float().cpu() + 1) / 2).clamp(0, 1)), trace=trace or [])
        return ImageOutput(images=tensor_to_pil(x), trace=trace or [])
