"""Rectified flow, the objective of Stable Diffusion 3: its forward process, the timestep shift
and the Euler sampler, from scratch.

Conventions (Stable Diffusion 3's, Esser et al. 2024): sigma = 0 is clean data, sigma = 1 is pure
noise, the path between them is a straight line, and the model predicts the velocity along it,
v = d x_sigma / d sigma = eps - x_0. This is Liu et al. 2022 ("Flow Straight and Fast") and
Lipman et al. 2023 ("Flow Matching") with time reversed: they put the noise at t = 0 and the data
at t = 1, so their velocity is data - noise; SD3 (and diffusers) count from data to noise, as
DDPM does, and sampling runs sigma from 1 down to 0.

Code name            paper symbol
-------------------  ------------------------------------------------
sigmas[i]            sigma (SD3's t), the noise level, 1 -> 0 over the run: z_t = a_t x_0 + b_t eps
                     (Esser eq. 2) with rectified flow's a_t = 1 - t, b_t = t (their eq. 13)
timesteps[i]         sigma * num_train_timesteps, what the network is given (as diffusers)
shift                the timestep shift of Esser et al. eq. 23 (SD3.5 uses 3.0; the 16 px toy 0.5)
model_output         v_theta(x_sigma, sigma) ~ eps - x_0, the velocity d x_sigma / d sigma
pred_original_sample x_0 = x_sigma - sigma * v

The names mirror diffusers' FlowMatchEulerDiscreteScheduler; tests check every step against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .scheduler import Objective, SchedulerStepOutput, expand_to

SIGMA_SAMPLINGS = ("logit_normal", "uniform")


@dataclass
class FlowMatchConfig:
    """The rectified-flow schedule; the names of diffusers' FlowMatchEulerDiscreteScheduler."""

    num_train_timesteps: int = 1000
    shift: float = 1.0  # timestep shift, Esser et al. eq. 23, in training and sampling (1.0: none; SD3.5: 3.0)
    sigma_sampling: str = "logit_normal"  # training sigmas: "logit_normal" (Esser sec. 3.1, m = 0, s = 1) or "uniform"

    def __post_init__(self):
        if self.sigma_sampling not in SIGMA_SAMPLINGS:
            raise ValueError(f"sigma_sampling must be one of {SIGMA_SAMPLINGS}, got {self.sigma_sampling!r}")
        if not self.shift > 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")


def shift_sigmas(sigmas, shift: float):
    """sigma' = shift * sigma / (1 + (shift - 1) * sigma), Esser et al. 2024 eq. 23: shift > 1 spends more of
    the run at high noise (SD3.5 at 1024 px: 3, more pixels carry the same signal), shift < 1 less (16 px: 0.5)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def predict_x0_from_velocity(x_t, velocity, sigma):
    """x_0 = x_sigma - sigma * v: follow the straight path back to sigma = 0."""
    return x_t - sigma * velocity


class FlowMatchEulerScheduler:
    """Euler's method on the ODE d x / d sigma = v_theta(x, sigma), from sigma = 1 to 0
    (the sampler of Esser et al. 2024; diffusers' FlowMatchEulerDiscreteScheduler)."""

    def __init__(self, config: FlowMatchConfig | None = None, **kwargs):
        self.config = config if config is not None else FlowMatchConfig(**kwargs)
        T = self.num_train_timesteps = self.config.num_train_timesteps
        # the training grid, as diffusers builds it: sigma = T/T, ..., 1/T, shifted; its ends bound inference's
        train_sigmas = shift_sigmas(torch.from_numpy(np.linspace(1, T, T, dtype=np.float32)[::-1].copy()) / T,
                                    self.config.shift)
        self.sigma_max, self.sigma_min = train_sigmas[0].item(), train_sigmas[-1].item()
        self.num_inference_steps: int | None = None
        self.sigmas = torch.cat([train_sigmas, torch.zeros(1)])
        self.timesteps = train_sigmas * T

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """n sigmas evenly spaced from sigma_max to sigma_min (in float64, then shifted, as
        diffusers does: its sigma_min is already shifted once), plus a final 0."""
        T, n = self.config.num_train_timesteps, int(num_inference_steps)
        if n < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        self.num_inference_steps = n
        sigmas = np.linspace(self.sigma_max * T, self.sigma_min * T, n) / T
        sigmas = torch.from_numpy(shift_sigmas(sigmas, self.config.shift)).to(torch.float32)
        self.timesteps = (sigmas * T).to(device)
        self.sigmas = torch.cat([sigmas, torch.zeros(1)]).to(device)

    def index_for_timestep(self, timestep) -> int:
        """Where `timestep` sits in `self.timesteps` (the run's grid)."""
        found = (self.timesteps == torch.as_tensor(timestep, dtype=self.timesteps.dtype)).nonzero()
        if len(found) == 0:
            raise ValueError(f"timestep {float(timestep)} is not on this scheduler's grid; call set_timesteps "
                             f"and pass one of scheduler.timesteps")
        return int(found[0, 0])

    def sigma_for(self, timestep) -> torch.Tensor:
        return self.sigmas[self.index_for_timestep(timestep)]

    def step(self, model_output, timestep, sample, generator=None) -> SchedulerStepOutput:
        """One Euler step from sigma to the next sigma of the grid:
        x_{sigma_next} = x_sigma + (sigma_next - sigma) * v  (the ODE's Euler step; sigma_next < sigma)."""
        i = self.index_for_timestep(timestep)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        sample = sample.float()  # as diffusers: upcast for the step
        prev_sample = sample + (sigma_next - sigma) * model_output
        pred_original_sample = predict_x0_from_velocity(sample, model_output, sigma)
        return SchedulerStepOutput(prev_sample.to(model_output.dtype), pred_original_sample)

    def scale_noise(self, sample, timestep, noise) -> torch.Tensor:
        """The forward process at a grid timestep (diffusers' name; img2img's start):
        x_sigma = sigma * eps + (1 - sigma) * x_0   (Esser et al. 2024 eq. 2 with rectified flow's
        a_t = 1 - t, b_t = t: their eq. 13)."""
        timestep = torch.as_tensor(timestep).reshape(-1)
        sigma = torch.stack([self.sigma_for(t) for t in timestep])
        sigma = expand_to(sigma, sample)
        return sigma * noise + (1.0 - sigma) * sample

    def add_noise(self, original_samples, noise, timesteps) -> torch.Tensor:
        """`scale_noise` under the DDPM schedulers' name: the pipeline noises inputs alike with every sampler."""
        return self.scale_noise(original_samples, timesteps, noise)

    def signal_and_noise(self, timestep) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, s) with x_sigma = a x_0 + s eps: (1 - sigma, sigma)."""
        sigma = self.sigma_for(timestep)
        return 1 - sigma, sigma


class RectifiedFlow(Objective):
    """The rectified-flow objective: the network predicts the velocity eps - x_0 along the line
    x_sigma = (1 - sigma) x_0 + sigma eps, and is given t = sigma * T (a float)."""

    name, description = "flow", "a rectified-flow"
    samplers = {"euler": FlowMatchEulerScheduler}
    timestep_dtype = torch.float32

    def __init__(self, config: FlowMatchConfig | None = None, **kwargs):
        self.config = config if config is not None else FlowMatchConfig(**kwargs)
        self.num_train_timesteps = self.config.num_train_timesteps  # T

    def sample_training_timesteps(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """sigma for each of n training samples, returned as t = sigma * T (float), as diffusers' SD3
        training scripts draw it: u logit-normal (u = 1 / (1 + exp(-z)), z ~ N(0, 1): Esser et al. 2024
        sec. 3.1, eq. 19, m = 0, s = 1, which favours middle noise levels) or uniform; with a shift, the
        sigma of the shifted training grid at index floor(u * T), so the model trains at the noise levels
        it samples at. Without one, sigma = u: diffusers' distribution up to the grid's 1/T steps
        (tests/test_flow.py checks both against diffusers' compute_density_for_timestep_sampling)."""
        if self.config.sigma_sampling == "logit_normal":
            u = torch.sigmoid(torch.randn(n, generator=generator))
        else:
            u = torch.rand(n, generator=generator)
        T = self.num_train_timesteps
        if self.config.shift == 1.0:
            return u * T
        train_timesteps = FlowMatchEulerScheduler(self.config).timesteps  # shifted sigma * T, from 1 * T down
        return train_timesteps[(u * T).long().clamp(max=T - 1)]  # diffusers: timesteps[(u * T).long()]

    def add_noise(self, original_samples, noise, timesteps) -> torch.Tensor:
        """The forward process at any t = sigma * T: x_sigma = (1 - sigma) x_0 + sigma eps."""
        sigma = expand_to(timesteps.float() / self.num_train_timesteps, original_samples)
        return (1.0 - sigma) * original_samples + sigma * noise

    def training_target(self, original_samples: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The velocity v = d x_sigma / d sigma = eps - x_0 (conditional flow matching, Lipman et al. 2023,
        in SD3's direction of time: their target is data - noise)."""
        return noise - original_samples

    @staticmethod
    def steps_run(num_inference_steps: int, strength: float) -> int:
        """img2img's share of an N-step run, as diffusers' SD3 pipelines (`get_timesteps`):
        N - int(N - N * strength), which rounds up (40 of 40 steps at strength 0.99)."""
        n = num_inference_steps
        return n - int(max(n - min(n * strength, n), 0))
