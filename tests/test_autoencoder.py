"""minidiff.autoencoder: shapes; SD3's latent conventions, checked against diffusers' own pipeline code on
a tiny diffusers AutoencoderKL and on minidiff's autoencoder; the Gaussian against diffusers'; the
fitted latent factors; deterministic training that resumes bit for bit; save/load (minidiff.tools.checkpoint:
atomic writes, explained errors); the fingerprint."""

from __future__ import annotations

import copy
import inspect
import json
import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_img2img import StableDiffusion3Img2ImgPipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_inpaint import StableDiffusion3InpaintPipeline

from minidiff.autoencoder import (Autoencoder, AutoencoderConfig, DiagonalGaussian, autoencoder_train_step,
                                  fingerprint, fit_latent_factors, from_latents, to_latents, train_autoencoder)
from minidiff.tools.shapes import Shapes
from minidiff.tools.checkpoint import CheckpointError, load_autoencoder, save_autoencoder


def tiny_config(**overrides) -> AutoencoderConfig:
    return AutoencoderConfig(**{"block_out_channels": (8, 8, 16), "norm_groups": 4, "image_size": 16, **overrides})


def pictures(count: int, seed: int = 0) -> torch.Tensor:
    return torch.stack([Shapes(image_size=16, seed=seed)[i][0] for i in range(count)])


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_shapes_and_sizes_the_factor_does_not_divide():
    autoencoder = Autoencoder(tiny_config())  # 3 levels: f = 4
    assert autoencoder.config.down_factor == 4
    x = pictures(2)
    posterior = autoencoder.encode(x).latent_dist
    for latent in (posterior.mean, posterior.logvar, posterior.mode(), posterior.sample(generator(0))):
        assert latent.shape == (2, 4, 4, 4)
    assert posterior.kl().shape == (2,)
    assert autoencoder.decode(posterior.mode()).sample.shape == x.shape
    assert autoencoder.decode(posterior.mode(), return_dict=False)[0].shape == x.shape  # as SD3's pipelines call it
    with pytest.raises(ValueError, match=r"\(18, 18\) is not divisible by the down factor 4"):
        autoencoder.encode(torch.zeros(1, 3, 18, 18))
    with pytest.raises(ValueError, match="image_size 18 is not divisible by the down factor 4"):
        tiny_config(image_size=18)


def test_with_down_factor_adds_one_level_per_halving():
    assert AutoencoderConfig.with_down_factor(4) == AutoencoderConfig()  # the default is f = 4
    for f, widths in ((2, (16, 32)), (4, (16, 32, 32)), (8, (16, 32, 32, 32))):
        config = AutoencoderConfig.with_down_factor(f, image_size=16, latent_channels=8)
        assert (config.down_factor, config.block_out_channels, config.image_size, config.latent_channels) == \
            (f, widths, 16, 8)
        assert Autoencoder(config).encode(torch.zeros(1, 3, 16, 16)).latent_dist.mean.shape == (1, 8, 16 // f, 16 // f)
    for bad in (0, 1, 3, 6):
        with pytest.raises(ValueError, match=f"a power of 2 from 2 up, got {bad}"):
            AutoencoderConfig.with_down_factor(bad)


# ---- SD3's latent conventions, against diffusers' own code --------------------------------
def tiny_diffusers_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                         layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, sample_size=16,
                         scaling_factor=1.5305, shift_factor=0.0609).eval()  # SD3.5's factors


def minidiff_vae() -> Autoencoder:
    torch.manual_seed(0)
    return Autoencoder(tiny_config(scaling_factor=1.7, shift_factor=-0.3)).eval()


def sd3_img2img_latents(vae, images, generator):
    """diffusers' StableDiffusion3Img2ImgPipeline.prepare_latents itself, run on a stand-in pipeline that
    holds only the vae and a scheduler adding no noise (scale_noise returns the clean latents)."""
    pipe = SimpleNamespace(vae=vae, scheduler=SimpleNamespace(scale_noise=lambda sample, timestep, noise: sample))
    return StableDiffusion3Img2ImgPipeline.prepare_latents(pipe, images, None, len(images), 1, images.dtype,
                                                           images.device, generator)


SD3_DECODE = ("latents = (latents / self.vae.config.scaling_factor) + self.vae.config.shift_factor",
              "image = self.vae.decode(latents, return_dict=False)[0]")


def sd3_decode(vae, latents):
    """The end of StableDiffusion3Pipeline.__call__ (inside the denoising call, so copied: SD3_DECODE)."""
    self = SimpleNamespace(vae=vae)
    latents = (latents / self.vae.config.scaling_factor) + self.vae.config.shift_factor
    image = self.vae.decode(latents, return_dict=False)[0]
    return image


def test_the_copied_decode_lines_are_diffusers_own():
    source = inspect.getsource(StableDiffusion3Pipeline.__call__)
    assert all(line in source for line in SD3_DECODE)
    assert all(line in inspect.getsource(sd3_decode) for line in SD3_DECODE)


@pytest.mark.parametrize("make_vae", [tiny_diffusers_vae, minidiff_vae], ids=["diffusers-AutoencoderKL", "minidiff"])
@torch.no_grad()
def test_to_and_from_latents_are_what_sd3_pipelines_compute(make_vae):
    vae, images = make_vae(), pictures(3)
    ours = to_latents(vae, images, generator(7))
    assert torch.equal(ours, sd3_img2img_latents(vae, images, generator(7)))
    inpaint_pipe = SimpleNamespace(vae=vae)  # the inpainting pipeline's _encode_vae_image, the same path
    assert torch.equal(ours, StableDiffusion3InpaintPipeline._encode_vae_image(inpaint_pipe, images, generator(7)))
    raw = vae.encode(images).latent_dist.mode()
    assert (ours - raw).abs().max() > 0.1  # not the unscaled mean: the factors and the noise were applied
    latents = torch.randn(ours.shape, generator=generator(8))
    assert torch.equal(from_latents(vae, latents), sd3_decode(vae, latents))
    assert from_latents(vae, latents).shape == images.shape


def test_diagonal_gaussian_matches_diffusers():
    parameters = 3 * torch.randn(2, 8, 4, 4, generator=generator(0))
    parameters[0, 4, 0, 0], parameters[0, 5, 0, 0] = 25.0, -40.0  # log-variances outside diffusers' clamp
    ours, theirs = DiagonalGaussian(parameters), DiagonalGaussianDistribution(parameters)
    for name in ("mean", "logvar", "std", "var"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    assert torch.equal(ours.mode(), theirs.mode())
    noise = torch.randn(ours.mean.shape, generator=generator(3))
    assert torch.equal(ours.sample(generator(3)), ours.mean + ours.std * noise)
    assert torch.equal(ours.sample(generator(3)), theirs.sample(generator(3)))
    assert torch.equal(ours.kl(), theirs.kl())


@torch.no_grad()
def test_fit_latent_factors_standardises_the_latents_it_was_fitted_on():
    autoencoder, images = Autoencoder(tiny_config()), pictures(16)
    out = autoencoder.encoder[-1]  # make the raw latents clearly off-centre and wide
    out.weight[:4] *= 10
    out.bias[:4] += 3
    raw = autoencoder.encode(images).latent_dist.sample(generator(0))
    assert raw.mean() > 2 and raw.std() > 2
    shift, scale = fit_latent_factors(autoencoder, images, generator(0), batch_size=5)
    assert (autoencoder.config.shift_factor, autoencoder.config.scaling_factor) == (shift, scale)
    latents = to_latents(autoencoder, images, generator(0))  # the same draws as the fit
    assert abs(latents.mean().item()) < 1e-5 and abs(latents.std().item() - 1) < 1e-5
    other_draws = to_latents(autoencoder, images, generator(1))
    assert abs(other_draws.mean().item()) < 0.1 and abs(other_draws.std().item() - 1) < 0.1


# ---- training ----------------------------------------------------------------------------
def test_train_step_loss_is_summed_squared_error_plus_weighted_kl():
    autoencoder, images = Autoencoder(tiny_config()), pictures(4)
    with torch.no_grad():  # by hand, with the same latent sample (the same generator seed)
        posterior = autoencoder.encode(images).latent_dist
        reconstruction = autoencoder.decode(posterior.sample(generator(3))).sample
        squared_error = (reconstruction - images).pow(2).sum(dim=[1, 2, 3]).mean().item()
        kl = posterior.kl().mean().item()
    before = autoencoder.decoder[-1].weight.clone()
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=1e-3)
    losses = autoencoder_train_step(autoencoder, optimizer, images, generator(3), kl_weight=0.5)
    assert losses["loss"] == pytest.approx(squared_error + 0.5 * kl, rel=1e-6)
    assert losses["mse"] == pytest.approx(squared_error / (3 * 16 * 16), rel=1e-6)
    assert losses["kl"] == pytest.approx(kl, rel=1e-6) and kl > 1
    assert not torch.equal(before, autoencoder.decoder[-1].weight)  # the optimizer stepped


def train(steps, seed=5, **resume):
    return train_autoencoder(tiny_config(), Shapes(image_size=16, seed=0), steps, batch_size=4, lr=1e-3,
                             kl_weight=1e-3, generator=resume.pop("generator", None) or generator(seed), **resume)


def assert_same_weights(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_is_deterministic_and_resumes_bit_for_bit(tmp_path):
    torch.manual_seed(1)  # the global RNG plays no part
    unbroken, _ = train(4)
    torch.manual_seed(2)
    again, optimizer = train(4)
    assert_same_weights(unbroken.state_dict(), again.state_dict())
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 4)))  # cosine
    initial, _ = train(0)
    assert not torch.equal(initial.decoder[-1].weight, unbroken.decoder[-1].weight)  # it did train
    other_seed, _ = train(4, seed=6)
    assert not torch.equal(other_seed.decoder[-1].weight, unbroken.decoder[-1].weight)

    run_generator = generator(5)
    first_half, optimizer = train(4, generator=run_generator, stop_step=2)  # paused half-way
    save_autoencoder(tmp_path / "half", first_half)
    optimizer_state, generator_state = copy.deepcopy(optimizer.state_dict()), run_generator.get_state()
    del first_half, optimizer, run_generator  # a later process starts from what was saved
    autoencoder = load_autoencoder(tmp_path / "half")
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=1e-3)
    optimizer.load_state_dict(optimizer_state)
    restored = torch.Generator()
    restored.set_state(generator_state)
    resumed, _ = train(4, generator=restored, autoencoder=autoencoder, optimizer=optimizer, start_step=2)
    assert_same_weights(unbroken.state_dict(), resumed.state_dict())


# ---- save and load ---------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    autoencoder = Autoencoder(tiny_config())
    fit_latent_factors(autoencoder, pictures(8))
    save_autoencoder(tmp_path / "ae", autoencoder)
    assert sorted(p.name for p in (tmp_path / "ae").iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "ae" / "config.json").read_text())["format"] == "minidiff-autoencoder"
    loaded = load_autoencoder(tmp_path / "ae")
    assert not loaded.training
    assert loaded.config == autoencoder.config and loaded.config.scaling_factor != 1.0
    assert_same_weights(autoencoder.state_dict(), loaded.state_dict())
    assert fingerprint(loaded) == fingerprint(autoencoder)


def test_fingerprint_names_the_weights_and_the_latent_factors():
    autoencoder = Autoencoder(tiny_config())
    before = fingerprint(autoencoder)
    assert len(before) == 64 and fingerprint(copy.deepcopy(autoencoder)) == before
    autoencoder.config.scaling_factor = 2.0  # the same weights, other latents
    assert fingerprint(autoencoder) != before
    autoencoder.config.scaling_factor = 1.0
    with torch.no_grad():
        autoencoder.decoder[-1].bias[0] += 1e-6
    assert fingerprint(autoencoder) != before


def test_corrupt_or_foreign_folders_are_one_clear_error(tmp_path):
    load = load_autoencoder
    folder = tmp_path / "ae"
    save_autoencoder(folder, Autoencoder(tiny_config()))
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[: len(weights) // 2])  # a truncated download
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load(folder)

    save_autoencoder(tmp_path / "wider", Autoencoder(tiny_config(block_out_channels=(8, 8, 32))))
    (folder / "model.safetensors").write_bytes((tmp_path / "wider" / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="does not hold a valid autoencoder .*size mismatch"):
        load(folder)

    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "format": "minidiff"}))  # a diffusion model's
    with pytest.raises(CheckpointError, match="is not a minidiff autoencoder"):
        load(folder)
    (folder / "config.json").write_text(json.dumps({**config, "image_size": 18}))
    with pytest.raises(CheckpointError, match="does not hold a valid autoencoder .*not divisible"):
        load(folder)
    with pytest.raises(CheckpointError, match="missing"):
        load(tmp_path / "nothing-here")
