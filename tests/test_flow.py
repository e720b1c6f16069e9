"""Rectified flow: minidiff's FlowMatchEulerScheduler against diffusers' FlowMatchEulerDiscreteScheduler,
the flow-matching loss, and the three calls on a flow model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image

import train
from minidiff import MiniDiffusionPipeline
from minidiff.tools.cli import run
from minidiff.flow import FlowMatchConfig, FlowMatchEulerScheduler, RectifiedFlow, shift_sigmas
from minidiff.training import TrainConfig, diffusion_loss

from conftest import tiny_train_flags

SHIFTS = [1.0, 3.0, 0.5, 1.7]
STEPS = [1, 2, 3, 7, 10, 28, 50, 100]


def fake_velocity(x, t):
    """A deterministic stand-in for v_theta that depends on x and t."""
    return torch.tanh(0.6 * x - 0.0007 * t) * 1.1


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("steps", STEPS)
def test_euler_loop_matches_diffusers(shift, steps):
    ours, theirs = FlowMatchEulerScheduler(shift=shift), FlowMatchEulerDiscreteScheduler(shift=shift)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    torch.testing.assert_close(ours.timesteps, theirs.timesteps, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.sigmas, theirs.sigmas, atol=1e-5, rtol=0)
    assert len(ours.sigmas) == steps + 1 and ours.sigmas[-1] == 0 and ours.sigmas[0] == 1
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(steps))
    x_ours, x_theirs = x.clone(), x.clone()
    for i, t in enumerate(ours.timesteps):
        v = fake_velocity(x_ours, float(t))
        a = ours.step(v, t, x_ours)
        b = theirs.step(fake_velocity(x_theirs, float(t)), t, x_theirs)
        torch.testing.assert_close(a.prev_sample, b.prev_sample, atol=1e-5, rtol=0)
        # x_0 = x_sigma - sigma v, the straight line followed back to sigma = 0
        torch.testing.assert_close(a.pred_original_sample, x_ours - theirs.sigmas[i] * v, atol=1e-6, rtol=0)
        x_ours, x_theirs = a.prev_sample, b.prev_sample


@pytest.mark.parametrize("shift", SHIFTS)
def test_scale_noise_matches_diffusers_at_every_timestep(shift):
    ours, theirs = FlowMatchEulerScheduler(shift=shift), FlowMatchEulerDiscreteScheduler(shift=shift)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(1, 3, 8, 8, generator=g) * 2 - 1, torch.randn(1, 3, 8, 8, generator=g)
    for t in theirs.timesteps:
        torch.testing.assert_close(ours.scale_noise(x0, t[None], noise), theirs.scale_noise(x0, t[None], noise),
                                   atol=1e-6, rtol=0)
        torch.testing.assert_close(ours.add_noise(x0, noise, t[None]), theirs.scale_noise(x0, t[None], noise),
                                   atol=1e-6, rtol=0)


def test_shift_is_sd3_eq_23_and_sd35_value_is_accepted():
    sigma = torch.tensor([0.0, 0.25, 0.5, 1.0])
    torch.testing.assert_close(shift_sigmas(sigma, 3.0), torch.tensor([0.0, 0.75 / 1.5, 1.5 / 2.0, 1.0]))
    scheduler = FlowMatchEulerScheduler(FlowMatchConfig(shift=3.0))
    scheduler.set_timesteps(4)
    assert scheduler.sigmas[1] > 0.75  # shift > 1 spends more of the run at high noise
    with pytest.raises(ValueError, match="shift"):
        FlowMatchConfig(shift=0.0)
    with pytest.raises(ValueError, match="not on this scheduler's grid"):
        scheduler.step(torch.zeros(1), 123.4, torch.zeros(1))


def test_training_sigmas_are_logit_normal_or_uniform():
    n = 20000
    t = RectifiedFlow().sample_training_timesteps(n, torch.Generator().manual_seed(0))
    logits = torch.logit(t / 1000)
    assert abs(logits.mean()) < 0.03 and abs(logits.std() - 1) < 0.03  # logit(sigma) ~ N(0, 1)
    uniform = RectifiedFlow(sigma_sampling="uniform").sample_training_timesteps(n, torch.Generator())
    assert abs((uniform / 1000).mean() - 0.5) < 0.01 and abs((uniform / 1000).std() - 12 ** -0.5) < 0.01
    # the default (shift 1) draws what it always drew: sigma = sigmoid(z), not a grid value
    g = torch.Generator().manual_seed(0)
    assert torch.equal(t, torch.sigmoid(torch.randn(n, generator=g)) * 1000)


def diffusers_training_sigmas(shift, weighting_scheme, n, generator):
    """How diffusers' SD3 training scripts (examples/dreambooth/train_dreambooth_sd3.py) draw sigma:
    u from compute_density_for_timestep_sampling, indices = (u * T).long(), timesteps[indices] of the
    scheduler built with the model's shift, and the sigma at that index."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    u = compute_density_for_timestep_sampling(weighting_scheme, n, logit_mean=0.0, logit_std=1.0,
                                              generator=generator)
    indices = (u * scheduler.config.num_train_timesteps).long()
    return scheduler.timesteps[indices], scheduler.sigmas[indices]


def ks_distance(a, b):
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    grid = torch.cat([a, b]).sort().values
    cdf = lambda x: torch.searchsorted(x.sort().values, grid, right=True) / len(x)  # noqa: E731
    return (cdf(a) - cdf(b)).abs().max().item()


@pytest.mark.parametrize("sampling,scheme", [("logit_normal", "logit_normal"), ("uniform", "none")])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_training_sigmas_follow_diffusers_sd3_training_at_the_models_shift(shift, sampling, scheme):
    """train.py --shift 3 trains at the shifted noise levels it samples at, as diffusers' SD3 scripts:
    the same distribution (KS distance of 200,000 draws from independent seeds), and the same quantiles."""
    n, T = 200_000, 1000
    ours = RectifiedFlow(shift=shift, sigma_sampling=sampling).sample_training_timesteps(
        n, torch.Generator().manual_seed(1)) / T
    _, theirs = diffusers_training_sigmas(shift, scheme, n, torch.Generator().manual_seed(2))
    assert ks_distance(ours, theirs) < 0.006  # same distribution: 1.36 * sqrt(2 / n) = 0.0043 at the 5% level
    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    torch.testing.assert_close(ours.quantile(q), theirs.quantile(q), atol=0.006, rtol=0)
    if sampling == "logit_normal":  # the median is shift(1/2): 0.5 unshifted, 0.75 at SD3.5's shift 3
        assert ours.median().item() == pytest.approx(shift_sigmas(0.5, shift), abs=0.005)


def test_shifted_training_timesteps_are_diffusers_draw_for_draw():
    """With a shift, the same generator gives diffusers' SD3 training timesteps exactly (torch.randn
    and diffusers' torch.normal(0, 1) draw the same numbers); the sigmas are t / T."""
    n = 5000
    ours = RectifiedFlow(shift=3.0).sample_training_timesteps(n, torch.Generator().manual_seed(4))
    timesteps, sigmas = diffusers_training_sigmas(3.0, "logit_normal", n, torch.Generator().manual_seed(4))
    assert torch.equal(ours, timesteps)
    torch.testing.assert_close(ours / 1000, sigmas, atol=1e-6, rtol=0)


class Recorder(torch.nn.Module):
    """Stands in for the model: records x_t and t, returns a fixed guess."""

    def forward(self, x_t, t, ids, mask):
        self.x_t, self.t = x_t, t
        return torch.full_like(x_t, 0.25)


def test_flow_loss_is_velocity_regression_on_the_straight_path():
    from minidiff.text import Tokenizer

    tokenizer = Tokenizer.from_captions(["a red circle"])
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    model = Recorder()
    schedule = RectifiedFlow(FlowMatchConfig())
    per_sample, t = diffusion_loss(model, tokenizer, schedule, images, ["a red circle"] * 3,
                                   torch.Generator().manual_seed(7), 0.0, torch.device("cpu"))
    # replay the generator: caption dropout, then sigma, then the noise
    g = torch.Generator().manual_seed(7)
    torch.rand(3, generator=g)
    sigma = torch.sigmoid(torch.randn(3, generator=g))
    noise = torch.randn(3, 3, 8, 8, generator=g)
    torch.testing.assert_close(t, sigma * 1000)
    torch.testing.assert_close(model.t, sigma * 1000)
    s = sigma[:, None, None, None]
    torch.testing.assert_close(model.x_t, (1 - s) * images + s * noise)
    target = noise - images  # the velocity, not the noise and not x_0
    torch.testing.assert_close(per_sample, ((0.25 - target) ** 2).mean(dim=(1, 2, 3)))


def test_flow_model_config_round_trips_and_picks_euler(tiny_flow_model_dir, tiny_flow_pipe, tiny_pipe):
    config = json.loads((tiny_flow_model_dir / "config.json").read_text())
    assert config["objective"] == "flow" and config["scheduler"]["shift"] == TrainConfig().shift == 0.5  # the preset's
    assert tiny_flow_pipe.config.objective == "flow" and tiny_flow_pipe.samplers == ("euler",)
    assert tiny_pipe.config.objective == "ddpm" and tiny_pipe.samplers == ("ddpm", "ddim")
    with pytest.raises(ValueError, match="rectified-flow model: sampler must be one of \\['euler'\\]"):
        tiny_flow_pipe.sample("a red circle", num_inference_steps=2, sampler="ddim")
    with pytest.raises(ValueError, match="DDPM .* model: sampler must be one of"):
        tiny_pipe.sample("a red circle", num_inference_steps=2, sampler="euler")


def test_flow_sample_steps_are_euler_steps_of_the_guided_velocity(tiny_flow_pipe):
    seen = []
    out = tiny_flow_pipe.sample("a red circle", num_inference_steps=4, guidance_scale=2.0, callback=seen.append,
                                generator=torch.Generator().manual_seed(0), output_type="pt")
    scheduler = FlowMatchEulerScheduler(tiny_flow_pipe.config.scheduler)
    scheduler.set_timesteps(4)
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for i, step in enumerate(seen):
        assert step["t"] == pytest.approx(float(scheduler.timesteps[i]))
        v = step["noise_pred"]
        sigma, sigma_next = scheduler.sigmas[i], scheduler.sigmas[i + 1]
        torch.testing.assert_close(step["x"], x + (sigma_next - sigma) * v)
        torch.testing.assert_close(step["denoised"], x - sigma * v)
        x = step["x"]
    torch.testing.assert_close(out.images[0], ((x[0] + 1) / 2).clamp(0, 1))


@pytest.fixture
def picture(tmp_path):
    image = Image.new("RGB", (16, 16), (200, 30, 30))
    return image


def test_flow_img2img_starts_at_scale_noise_and_runs_sd3s_step_count(tiny_flow_pipe, picture):
    seen = []
    out = tiny_flow_pipe.img2img("a blue circle", picture, strength=0.55, num_inference_steps=10,
                                 generator=torch.Generator().manual_seed(3), callback=seen.append, capture_steps=[0])
    assert len(seen) == 10 - int(10 - 10 * 0.55)  # SD3's get_timesteps: 6 of 10, where int(N * strength) is 5
    scheduler = FlowMatchEulerScheduler(tiny_flow_pipe.config.scheduler)
    scheduler.set_timesteps(10)
    assert seen[0]["t"] == pytest.approx(float(scheduler.timesteps[4]))
    assert out.trace[0]["timestep"] == pytest.approx(float(scheduler.timesteps[4]))
    assert tiny_flow_pipe.img2img("a blue circle", picture, strength=0.0).images[0].tobytes() == picture.tobytes()


def test_flow_inpaint_keeps_every_black_mask_pixel(tiny_flow_pipe, picture):
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (8, 0, 16, 16))  # replace the right half
    for jumps in (0, 1):
        out = tiny_flow_pipe.inpaint("a green square", picture, mask, num_inference_steps=4, resample_jumps=jumps,
                                     generator=torch.Generator().manual_seed(0)).images[0]
        kept = np.asarray(out)[:, :8]
        assert (kept == np.asarray(picture)[:, :8]).all()
        assert not (np.asarray(out)[:, 8:] == np.asarray(picture)[:, 8:]).all()


@pytest.mark.slow
def test_train_cli_objective_flow_writes_a_flow_model(tmp_path):
    out = tmp_path / "flow"
    flags = tiny_train_flags(objective="flow", steps=2, batch_size=2)
    assert run(train.main, ["--shift", "3.0", "--out", str(out), *flags]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["objective"] == "flow" and config["scheduler"]["shift"] == 3.0
    pipe = MiniDiffusionPipeline.from_pretrained(out, device="cpu")
    assert len(pipe.sample("a red circle", num_inference_steps=2).images) == 1
    assert run(train.main, ["--shift", "0", "--out", str(tmp_path / "bad"), *flags]) == 2


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_minidiff_euler_step_and_the_bridges_give_the_same_numbers(shift):
    """The same velocity and sigmas through minidiff's Euler step and through the bridge's (diffusers'
    FlowMatchEulerDiscreteScheduler, which SD3's pipelines step, and the bridge's trace x_0)."""
    from bridge.sd3 import velocity_to_x0

    ours, theirs = FlowMatchEulerScheduler(shift=shift), FlowMatchEulerDiscreteScheduler(shift=shift)
    ours.set_timesteps(8)
    theirs.set_timesteps(8)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(1, 16, 4, 4, generator=g)  # latent-shaped, as the bridge sees them
    for i, t in enumerate(theirs.timesteps):
        v = torch.randn(1, 16, 4, 4, generator=g)
        a = ours.step(v, t, x)
        b = theirs.step(v, t, x)
        torch.testing.assert_close(a.prev_sample, b.prev_sample, atol=1e-6, rtol=0)
        torch.testing.assert_close(a.pred_original_sample, velocity_to_x0(x, v, theirs.sigmas[i]), atol=1e-6, rtol=0)
        x = a.prev_sample
