"""DDPM: the noise schedule, its objective and its samplers (DDPM and DDIM), from scratch.

Conventions (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"):
t = 0 is (almost) clean data, t = T - 1 is (almost) pure Gaussian noise. The model
predicts the noise epsilon that was added.

Code name            paper symbol
-------------------  ------------------------------------------------
betas[t]             beta_t, variance of the noise added at step t
alphas[t]            alpha_t = 1 - beta_t
alphas_cumprod[t]    alpha-bar_t = prod_{s<=t} alpha_s          (Ho eq. 4)
sample               x_t
model_output         epsilon_theta(x_t, t)
pred_original_sample x_0 predicted from x_t and epsilon       (Ho eq. 15)
eta                  eta of Song et al. 2021 (DDIM), 0 = deterministic

The names mirror diffusers' schedulers, so that a reader can hold the two side by side; tests
check every step against diffusers' DDPMScheduler and DDIMScheduler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
BETA_SCHEDULES = ("linear", "cosine")


@dataclass
class SchedulerConfig:
    num_train_timesteps: int = 1000
    beta_schedule: str = "cosine"  # "linear" (Ho et al.) or "cosine" (Nichol & Dhariwal)
    beta_start: float = 0.0001  # linear schedule only
    beta_end: float = 0.02  # linear schedule only
    clip_sample: bool = True  # clamp the predicted x_0 to [-1, 1]
    timestep_spacing: str = "leading"
    steps_offset: int = 0

    def __post_init__(self):
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {self.timestep_spacing!r}")


@dataclass
class SchedulerStepOutput:
    prev_sample: torch.Tensor  # x_{t-1} (or x_{t - stride} when skipping steps)
    pred_original_sample: torch.Tensor  # predicted x_0


def make_betas(config: SchedulerConfig) -> torch.Tensor:
    """beta_1..beta_T. Linear: Ho et al. 2020 sec. 4. Cosine: Nichol & Dhariwal 2021 eq. 17,
    betas derived from alpha-bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2), s = 0.008, capped at 0.999
    (diffusers calls this schedule "squaredcos_cap_v2")."""
    T = config.num_train_timesteps
    if config.beta_schedule == "linear":
        return torch.linspace(config.beta_start, config.beta_end, T, dtype=torch.float32)

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float32)


def expand_to(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape per-sample scalars of shape (B,) to (B, 1, 1, 1) so they broadcast over x."""
    return values.reshape(-1, *([1] * (x.ndim - 1))).to(device=x.device, dtype=x.dtype)


def predict_x0_from_noise(x_t, noise, alpha_bar_t):
    """x_0 = (x_t - sqrt(1 - alpha-bar_t) * eps) / sqrt(alpha-bar_t)   (Ho et al. 2020 eq. 15)."""
    return (x_t - (1 - alpha_bar_t) ** 0.5 * noise) / alpha_bar_t**0.5


def predict_noise_from_x0(x_t, x0, alpha_bar_t):
    """eps = (x_t - sqrt(alpha-bar_t) * x_0) / sqrt(1 - alpha-bar_t), eq. 15 solved for eps."""
    return (x_t - alpha_bar_t**0.5 * x0) / (1 - alpha_bar_t) ** 0.5


def randn(shape, generator: torch.Generator | None, device, dtype=torch.float32) -> torch.Tensor:
    """Gaussian noise drawn on the generator's device, then moved: a CPU generator gives the
    same numbers whatever device the model runs on (as diffusers' randn_tensor does)."""
    gen_device = generator.device if generator is not None else torch.device(device)
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


class NoiseSchedule:
    """The forward process q(x_t | x_0) and the inference timestep grid, shared by both samplers."""

    def __init__(self, config: SchedulerConfig | None = None, **kwargs):
        self.config = config if config is not None else SchedulerConfig(**kwargs)
        self.num_train_timesteps = self.config.num_train_timesteps  # T
        self.betas = make_betas(self.config)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # alpha-bar_t, Ho eq. 4
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(self.config.num_train_timesteps - 1, -1, -1)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x_0) = N(sqrt(alpha-bar_t) x_0, (1 - alpha-bar_t) I)   (Ho et al. 2020 eq. 4):
        x_t = sqrt(alpha-bar_t) * x_0 + sqrt(1 - alpha-bar_t) * eps."""
        alpha_bar = self.alphas_cumprod.to(original_samples.device)[timesteps.to(original_samples.device)]
        alpha_bar = expand_to(alpha_bar, original_samples)
        return alpha_bar**0.5 * original_samples + (1 - alpha_bar) ** 0.5 * noise

    def sample_training_timesteps(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """t ~ Uniform{0, ..., T - 1} for each of n training samples (Ho et al. 2020, Algorithm 1)."""
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator)

    def training_target(self, original_samples: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network learns to predict: the noise eps (Ho et al. 2020 eq. 14)."""
        return noise

    def signal_and_noise(self, timestep) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_t, s_t) with x_t = a_t x_0 + s_t eps: (sqrt(alpha-bar_t), sqrt(1 - alpha-bar_t))."""
        alpha_bar = self._alpha_bar(int(timestep))
        return alpha_bar**0.5, (1 - alpha_bar) ** 0.5

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Choose the `num_inference_steps` timesteps the sampler visits, from noisy to clean, with the
        spacings of Lin et al. 2024 (table 2): "leading" 0, k, 2k, ... (+ steps_offset); "trailing"
        counts back from T - 1; "linspace" spreads evenly over [0, T - 1]. One difference from
        diffusers, on purpose: its "trailing" grid can end in an (n + 1)-th timestep, -1 (T = 1000,
        n = 61, 103, ...), one more step "from t = -1"; minidiff keeps n timesteps, none below 0."""
        T = self.config.num_train_timesteps
        n = int(num_inference_steps)
        if not 1 <= n <= T:
            raise ValueError(f"num_inference_steps must be between 1 and {T}, got {num_inference_steps}")
        self.num_inference_steps = n
        spacing = self.config.timestep_spacing
        # numpy, as diffusers: rounding the same float64 values matters (trailing, n = 48: 936 or 937)
        if spacing == "leading":
            stride = T // n
            timesteps = (np.arange(0, n) * stride).round()[::-1] + self.config.steps_offset
        elif spacing == "trailing":
            stride = T / n
            timesteps = np.round(np.arange(T, 0, -stride)) - 1
            timesteps = timesteps[timesteps >= 0]  # the n timesteps (docstring)
        else:  # linspace
            timesteps = np.linspace(0, T - 1, n).round()[::-1]
        timesteps = torch.from_numpy(timesteps.astype(np.int64))
        if timesteps.max() >= T:
            raise ValueError(f"steps_offset {self.config.steps_offset} with {n} steps reaches timestep {int(timesteps.max())} >= {T}")
        self.timesteps = timesteps.to(torch.int64).to(device)

    def _alpha_bar(self, t: int) -> torch.Tensor:
        """alpha-bar_t, with alpha-bar_{-1} = 1: the step after the last one lands on clean data."""
        return self.alphas_cumprod[t] if t >= 0 else torch.tensor(1.0)

    def _clip(self, x0: torch.Tensor) -> torch.Tensor:
        return x0.clamp(-1.0, 1.0) if self.config.clip_sample else x0


class DDPMScheduler(NoiseSchedule):
    """Ancestral sampling of Ho et al. 2020 with the "fixed_small" variance: Algorithm 2 when
    `clip_sample` is off; with it (the default, as diffusers'), x_0 from eq. 15 clipped to [-1, 1],
    then the posterior mean of eq. 7 from that x_0 (Algorithm 2 folds eq. 15 into the mean unclipped)."""

    def previous_timestep(self, timestep: int) -> int:
        """The next timestep the sampler visits (-1 after the last): with fewer inference steps
        than training steps, the chain jumps along `self.timesteps`."""
        if self.num_inference_steps is None:
            return timestep - 1
        index = int((self.timesteps == timestep).nonzero()[0, 0])
        return int(self.timesteps[index + 1]) if index + 1 < len(self.timesteps) else -1

    def step(self, model_output, timestep, sample, generator=None) -> SchedulerStepOutput:
        t = int(timestep)
        prev_t = self.previous_timestep(t)
        # 1. alphas and betas of this jump from t to prev_t
        alpha_bar_t = self._alpha_bar(t)
        alpha_bar_prev = self._alpha_bar(prev_t)
        alpha_t = alpha_bar_t / alpha_bar_prev  # alpha_t of the (possibly strided) jump
        beta_t = 1 - alpha_t
        # 2. predicted x_0, eq. 15 of Ho et al. 2020
        pred_original_sample = self._clip(predict_x0_from_noise(sample, model_output, alpha_bar_t))
        # 3. mean of the posterior q(x_{t-1} | x_t, x_0), eq. 7 of Ho et al. 2020
        x0_coeff = alpha_bar_prev**0.5 * beta_t / (1 - alpha_bar_t)
        xt_coeff = alpha_t**0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
        prev_sample = x0_coeff * pred_original_sample + xt_coeff * sample
        # 4. add noise with the posterior variance beta-tilde_t, eq. 7 ("fixed_small"); none at the last step
        if t > 0:
            variance = ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t).clamp(min=1e-20)
            noise = randn(model_output.shape, generator, model_output.device, model_output.dtype)
            prev_sample = prev_sample + variance**0.5 * noise
        return SchedulerStepOutput(prev_sample, pred_original_sample)


class DDIMScheduler(NoiseSchedule):
    """Denoising Diffusion Implicit Models, Song et al. 2021, eq. 12 (eta = 0: deterministic)."""

    def step(self, model_output, timestep, sample, eta: float = 0.0, use_clipped_model_output: bool = False,
             generator=None) -> SchedulerStepOutput:
        """`use_clipped_model_output`: re-derive epsilon from the clipped x_0 so that both terms of
        eq. 12 agree. Keep it on with classifier-free guidance: guided epsilons push x_0 far
        outside [-1, 1], and the clipped x_0 plus the raw epsilon saturate the image."""
        t = int(timestep)
        # 1. the previous timestep. Like diffusers, a fixed stride of T // n, whatever the spacing.
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        alpha_bar_t = self._alpha_bar(t)
        alpha_bar_prev = self._alpha_bar(prev_t)
        # 2. predicted x_0, "predicted x_0" term of Song eq. 12 (= Ho eq. 15)
        pred_original_sample = self._clip(predict_x0_from_noise(sample, model_output, alpha_bar_t))
        if use_clipped_model_output:  # eps consistent with the clipped x_0, eq. 15 solved for eps
            model_output = predict_noise_from_x0(sample, pred_original_sample, alpha_bar_t)
        # 3. sigma_t, Song eq. 16: eta interpolates between DDIM (0) and DDPM-like (1) noise
        variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)
        std_dev = eta * variance**0.5
        # 4. "direction pointing to x_t", Song eq. 12
        direction = (1 - alpha_bar_prev - std_dev**2) ** 0.5 * model_output
        # 5. x_{t-1} = sqrt(alpha-bar_prev) x_0 + direction + sigma_t * noise, Song eq. 12
        prev_sample = alpha_bar_prev**0.5 * pred_original_sample + direction
        if eta > 0:
            noise = randn(model_output.shape, generator, model_output.device, model_output.dtype)
            prev_sample = prev_sample + std_dev * noise
        return SchedulerStepOutput(prev_sample, pred_original_sample)


class Objective:
    """What a model is trained to predict, and everything that follows from it: how training
    draws t (`sample_training_timesteps`), noises x_0 (`add_noise`) and what the network must
    output (`training_target`); the samplers that can run the model (`samplers`, its default
    first, each computing x_0 from that output); how many steps img2img runs (`steps_run`).
    `DDPM` below and `flow.RectifiedFlow` are the two; the rest of minidiff asks them."""

    name: str
    samplers: dict
    timestep_dtype: torch.dtype  # what the network is given as t

    def check_sampler(self, name: str | None) -> str:
        """`name`, or the default sampler when None; one that cannot run this model is a ValueError."""
        name = next(iter(self.samplers)) if name is None else name
        if name not in self.samplers:
            raise ValueError(f"this is {self.description} model: sampler must be one of {list(self.samplers)}, "
                             f"got {name!r}")
        return name

    def make_sampler(self, name: str | None, num_inference_steps: int):
        """The sampler `name` (None: this objective's default), set to `num_inference_steps`."""
        sampler = self.samplers[self.check_sampler(name)](self.config)
        sampler.set_timesteps(num_inference_steps)
        return sampler


class DDPM(NoiseSchedule, Objective):
    """The DDPM objective (Ho et al. 2020): the network predicts the noise eps that was added."""

    name, description = "ddpm", "a DDPM (noise-predicting)"
    samplers = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}  # ancestral sampling first: the default
    timestep_dtype = torch.int64

    @staticmethod
    def steps_run(num_inference_steps: int, strength: float) -> int:
        """img2img's share of an N-step run, as diffusers' SD/SDXL pipelines (`get_timesteps`): int(N * strength)."""
        return min(int(num_inference_steps * strength), num_inference_steps)

    def min_snr_weights(self, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
        """min(SNR_t, gamma) / SNR_t, SNR_t = alpha-bar_t / (1 - alpha-bar_t): the min-SNR-gamma weights
        of Hang et al. 2023 (sec. 3.4) for a noise-predicting model, as diffusers' train_text_to_image.py
        computes them (training_utils.compute_snr)."""
        alpha_bar = self.alphas_cumprod[timesteps]
        snr = alpha_bar / (1 - alpha_bar)
        return snr.clamp(max=gamma) / snr
