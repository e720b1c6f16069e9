"""minidiff's schedulers against diffusers' DDPMScheduler / DDIMScheduler, step by step.

Both get the same config, the same model outputs and the same noise (same generator seed);
every step of a complete sampling loop must agree within 1e-5.
"""

from __future__ import annotations

import math
import random

import diffusers
import pytest
import torch

from minidiff.scheduler import (TIMESTEP_SPACINGS, DDIMScheduler, DDPMScheduler, NoiseSchedule, SchedulerConfig,
                                make_betas)

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


GRIDS = [(spacing, offset) for spacing in TIMESTEP_SPACINGS for offset in ((0, 1) if spacing == "leading" else (0,))]


@pytest.mark.parametrize("T", [1000, 500, 200])
@pytest.mark.parametrize("spacing,offset", GRIDS)
def test_timesteps_equal_diffusers_for_every_step_count(T, spacing, offset):
    """Every N from 1 to T (rounding .5 the other way shows up at a few N only, e.g. trailing
    N = 48 and linspace N = 27 of T = 1000): the grid of DDPMScheduler and DDIMScheduler."""
    config = SchedulerConfig(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
    ours = NoiseSchedule(config)
    theirs = {name: cls(**diffusers_kwargs(config)) for name, cls in
              (("ddpm", diffusers.DDPMScheduler), ("ddim", diffusers.DDIMScheduler))}
    wrong = {"ddpm": [], "ddim": []}
    below_zero = {"ddpm": [], "ddim": []}  # where diffusers' grid ends at t = -1 (NoiseSchedule.set_timesteps)
    for n in range(1, T + 1 - offset):  # an offset with n = T steps past T - 1 (refused, tested below)
        ours.set_timesteps(n)
        assert len(ours.timesteps) == n and ours.timesteps.min() >= 0
        for name, scheduler in theirs.items():
            scheduler.set_timesteps(n)
            expected = scheduler.timesteps.tolist()
            if expected[-1] < 0:  # the documented difference: diffusers' extra, (n + 1)-th timestep, -1
                below_zero[name].append(n)
                expected = expected[:-1]
            if ours.timesteps.tolist() != expected:
                wrong[name].append(n)
    assert wrong == {"ddpm": [], "ddim": []}
    assert below_zero["ddpm"] == below_zero["ddim"]
    assert bool(below_zero["ddpm"]) == (spacing == "trailing")  # only trailing's float arange overshoots
    if spacing == "trailing":
        assert {200: 62, 500: 61, 1000: 61}[T] in below_zero["ddpm"]


@pytest.mark.parametrize("scheduler_class", [DDPMScheduler, DDIMScheduler])
def test_trailing_grid_never_steps_below_zero_where_diffusers_does(scheduler_class):
    """T = 200, trailing, 62 steps: diffusers' grid has 63 timesteps ending at -1, and its last step
    reads alphas_cumprod[-1] (alpha-bar_{T-1}); minidiff runs the 62 timesteps >= 0, each step equal to
    diffusers' at the same timestep, and ends on finite values (a step from t = -1 would give NaN)."""
    config = SchedulerConfig(num_train_timesteps=200, timestep_spacing="trailing", clip_sample=False)
    ours = scheduler_class(config)
    theirs = getattr(diffusers, scheduler_class.__name__)(**diffusers_kwargs(config))
    ours.set_timesteps(62)
    theirs.set_timesteps(62)
    assert len(theirs.timesteps) == 63 and theirs.timesteps[-1] == -1
    assert ours.timesteps.tolist() == theirs.timesteps[:-1].tolist()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    g_ours, g_theirs = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for t in ours.timesteps.tolist():
        a = ours.step(fake_model(x, t), t, x, generator=g_ours)
        b = theirs.step(fake_model(x, t), t, x, generator=g_theirs)
        torch.testing.assert_close(a.prev_sample, b.prev_sample, atol=1e-5, rtol=0)
        x = a.prev_sample
    assert torch.isfinite(x).all()


# complete loops at the step counts the issue found (T = 1000 unless noted), and a few random ones per spacing
LOOPS = ([("trailing", 1000, 48), ("linspace", 1000, 27), ("linspace", 1000, 31), ("linspace", 1000, 121),
          ("linspace", 500, 71)]
         + [(spacing, 1000, n) for i, spacing in enumerate(TIMESTEP_SPACINGS)
            for n in random.Random(i).sample(range(2, 301), 3)])


@pytest.mark.parametrize("spacing,T,steps", LOOPS)
def test_complete_loops_match_diffusers_at_more_step_counts(spacing, T, steps):
    config = SchedulerConfig(num_train_timesteps=T, timestep_spacing=spacing)
    run_both(DDIMScheduler(config), diffusers.DDIMScheduler(**diffusers_kwargs(config)), steps, {"eta": 0.0})
    run_both(DDPMScheduler(config), diffusers.DDPMScheduler(**diffusers_kwargs(config)), steps, {})


def ddim_loop(config, steps, model, x, eta, generator):
    scheduler = DDIMScheduler(config)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps.tolist():
        x = scheduler.step(model(x, t), t, x, eta=eta, generator=generator).prev_sample
    return x


@pytest.mark.parametrize("spacing", TIMESTEP_SPACINGS)
def test_ddim_eta0_loop_is_deterministic_and_follows_the_true_noise_back_to_x0(spacing):
    """A complete 20-step loop. eta = 0 draws no noise: two generators, the same result bit for
    bit (at eta = 1 they differ). Given the true noise at every step,
    eps(x_t, t) = (x_t - sqrt(alpha-bar_t) x_0) / sqrt(1 - alpha-bar_t), every DDIM step
    (Song et al. eq. 12) stays on the line from x_0 along eps and the loop ends on x_0."""
    config = SchedulerConfig(beta_schedule="linear", clip_sample=False, timestep_spacing=spacing)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1, torch.randn(2, 3, 8, 8, generator=g)
    runs = {(eta, seed): ddim_loop(config, 20, fake_model, noise, eta, torch.Generator().manual_seed(seed))
            for eta in (0.0, 1.0) for seed in (1, 2)}
    assert torch.equal(runs[0.0, 1], runs[0.0, 2])
    assert not torch.allclose(runs[1.0, 1], runs[1.0, 2])

    schedule = NoiseSchedule(config)
    schedule.set_timesteps(20)
    x_start = schedule.add_noise(x0, noise, schedule.timesteps[:1].expand(2))

    def true_noise(x, t):
        alpha_bar = schedule.alphas_cumprod[t]
        return (x - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()

    out = ddim_loop(config, 20, true_noise, x_start, 0.0, None)
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)
    assert (x_start - x0).abs().max() > 1  # the loop started far from x_0


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="beta_schedule"):
        SchedulerConfig(beta_schedule="quadratic")
    with pytest.raises(ValueError, match="num_inference_steps"):
        DDIMScheduler(SchedulerConfig()).set_timesteps(0)
    with pytest.raises(ValueError, match="steps_offset"):
        DDPMScheduler(SchedulerConfig(steps_offset=1)).set_timesteps(1000)
