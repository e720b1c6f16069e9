"""minidiff's schedulers against diffusers' DDPMScheduler / DDIMScheduler, step by step.

Both get the same config, the same model outputs and the same noise (same generator seed);
every step of a complete sampling loop must agree within 1e-5.
"""

from __future__ import annotations

import math

import diffusers
import pytest
import torch

from minidiff.scheduler import DDIMScheduler, DDPMScheduler, NoiseSchedule, SchedulerConfig, make_betas

DIFFUSERS_BETA = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


def diffusers_kwargs(config: SchedulerConfig) -> dict:
    return dict(num_train_timesteps=config.num_train_timesteps, beta_schedule=DIFFUSERS_BETA[config.beta_schedule],
                beta_start=config.beta_start, beta_end=config.beta_end, clip_sample=config.clip_sample,
                timestep_spacing=config.timestep_spacing, steps_offset=config.steps_offset)


def fake_model(x, t):
    """A deterministic stand-in for epsilon_theta that depends on x and t."""
    return torch.tanh(0.7 * x + 0.001 * t) * 0.9


def run_both(ours, theirs, steps, step_kwargs, seed=0):
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    x0 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    x_ours, x_theirs = x0.clone(), x0.clone()
    g_ours, g_theirs = torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 1)
    for t in ours.timesteps.tolist():
        a = ours.step(fake_model(x_ours, t), t, x_ours, generator=g_ours, **step_kwargs)
        b = theirs.step(fake_model(x_theirs, t), t, x_theirs, generator=g_theirs, **step_kwargs)
        torch.testing.assert_close(a.pred_original_sample, b.pred_original_sample, atol=1e-5, rtol=0)
        torch.testing.assert_close(a.prev_sample, b.prev_sample, atol=1e-5, rtol=0)
        x_ours, x_theirs = a.prev_sample, b.prev_sample
    return x_ours


CONFIGS = [
    SchedulerConfig(beta_schedule=beta, timestep_spacing=spacing, steps_offset=offset)
    for beta in ("linear", "cosine")
    for spacing, offset in (("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0))
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.beta_schedule}-{c.timestep_spacing}-{c.steps_offset}")
@pytest.mark.parametrize("steps", [10, 25, 50])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_diffusers(config, steps, eta):
    theirs = diffusers.DDIMScheduler(**diffusers_kwargs(config))
    run_both(DDIMScheduler(config), theirs, steps, {"eta": eta})


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.beta_schedule}-{c.timestep_spacing}-{c.steps_offset}")
@pytest.mark.parametrize("steps", [10, 50, 1000])
def test_ddpm_matches_diffusers(config, steps):
    if steps == 1000 and config.steps_offset:
        pytest.skip("an offset with every timestep would step past T - 1 (an error, tested below)")
    theirs = diffusers.DDPMScheduler(**diffusers_kwargs(config))
    run_both(DDPMScheduler(config), theirs, steps, {})


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_clipped_x0_matches_diffusers(eta):
    config = SchedulerConfig(beta_schedule="linear", clip_sample=True)
    run_both(DDPMScheduler(config), diffusers.DDPMScheduler(**diffusers_kwargs(config)), 20, {})
    for clipped_eps in (False, True):
        run_both(DDIMScheduler(config), diffusers.DDIMScheduler(**diffusers_kwargs(config)), 20,
                 {"eta": eta, "use_clipped_model_output": clipped_eps})


@pytest.mark.parametrize("beta_schedule", ["linear", "cosine"])
def test_add_noise_matches_diffusers(beta_schedule):
    config = SchedulerConfig(beta_schedule=beta_schedule)
    theirs = diffusers.DDPMScheduler(**diffusers_kwargs(config))
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(NoiseSchedule(config).add_noise(x0, noise, t), theirs.add_noise(x0, noise, t))


def test_closed_form_points():
    """Linear schedule end points (Ho et al. sec. 4) and the cosine alpha-bar (Nichol & Dhariwal eq. 17)."""
    linear = make_betas(SchedulerConfig(beta_schedule="linear"))
    assert linear[0].item() == pytest.approx(1e-4) and linear[-1].item() == pytest.approx(0.02)
    alpha_bar = NoiseSchedule(SchedulerConfig(beta_schedule="cosine")).alphas_cumprod
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert alpha_bar[499].item() == pytest.approx(f(0.5) / f(0.0), rel=1e-4)
    assert alpha_bar[-1].item() < 1e-4  # the last step is essentially pure noise


def test_add_noise_statistics():
    """x_t has mean sqrt(alpha-bar_t) x_0 and variance 1 - alpha-bar_t (eq. 4)."""
    schedule = NoiseSchedule(SchedulerConfig())
    x0 = torch.full((20000,), 0.5)
    t = torch.full((20000,), 300)
    x_t = schedule.add_noise(x0, torch.randn(20000, generator=torch.Generator().manual_seed(0)), t)
    a = schedule.alphas_cumprod[300].item()
    assert x_t.mean().item() == pytest.approx(0.5 * a**0.5, abs=0.02)
    assert x_t.var().item() == pytest.approx(1 - a, abs=0.02)


def test_ddim_eta0_is_deterministic_and_recovers_x0_from_true_noise():
    """With the true noise as the model output, one DDIM step from t to -1 returns x_0 exactly."""
    config = SchedulerConfig(clip_sample=False)
    scheduler = DDIMScheduler(config)
    scheduler.set_timesteps(1)
    t = int(scheduler.timesteps[0])
    x0, noise = torch.rand(1, 3, 4, 4) * 2 - 1, torch.randn(1, 3, 4, 4)
    x_t = scheduler.add_noise(x0, noise, torch.tensor([t]))
    out = scheduler.step(noise, t, x_t)
    torch.testing.assert_close(out.prev_sample, x0, atol=1e-4, rtol=0)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="beta_schedule"):
        SchedulerConfig(beta_schedule="quadratic")
    with pytest.raises(ValueError, match="num_inference_steps"):
        DDIMScheduler(SchedulerConfig()).set_timesteps(0)
    with pytest.raises(ValueError, match="steps_offset"):
        DDPMScheduler(SchedulerConfig(steps_offset=1)).set_timesteps(1000)
