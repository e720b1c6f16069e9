"""The training loop: it learns, it logs, it saves what sampling needs."""

from __future__ import annotations

import json

import pytest
import torch

from minidiff import MiniDiffusionPipeline
from minidiff.tools.trainer import Trainer
from minidiff.training import learning_rate

from conftest import tiny_train_config


@pytest.mark.slow
def test_loss_goes_down_on_a_tiny_model(tmp_path):
    trainer = Trainer(tiny_train_config(tmp_path, steps=60, batch_size=16, lr=2e-3, log_every=10, warmup_steps=5))
    trainer.train()
    losses = [row["loss"] for row in trainer.loss_rows]
    assert losses[-1] < 0.7 * losses[0]


def test_run_folder_holds_model_logs_and_resumable_state(tiny_model_dir):
    for name in ("config.json", "model.safetensors", "loss.csv", "loss.png", "samples/final.png"):
        assert (tiny_model_dir / name).exists(), name
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["format"] == "minidiff" and config["unet"]["image_size"] == 16
    header = (tiny_model_dir / "loss.csv").read_text().splitlines()[0]
    assert header.startswith("step,loss,lr,images_per_s,loss_t0")
    checkpoints = list((tiny_model_dir / "checkpoints").glob("step-*"))
    assert [c.name for c in checkpoints] == ["step-00000004"]


@pytest.mark.slow
def test_saved_model_is_the_ema(tmp_path):
    trainer = Trainer(tiny_train_config(tmp_path))
    trainer.train()
    pipe = MiniDiffusionPipeline.from_pretrained(tmp_path, device="cpu")
    saved = pipe.model.state_dict()
    key = "unet.conv_in.weight"
    torch.testing.assert_close(saved[key], trainer.ema.shadow[key])
    assert not torch.equal(saved[key], trainer.model.state_dict()[key])


def test_learning_rate_warms_up_then_decays():
    config = tiny_train_config("x", steps=100, warmup_steps=10, lr=1.0)
    assert learning_rate(config, 0) == pytest.approx(0.1)
    assert learning_rate(config, 9) == pytest.approx(1.0)
    assert learning_rate(config, 99) == pytest.approx(0.1, abs=0.01)


@pytest.mark.slow
def test_caption_dropout_makes_empty_prompts(tmp_path, monkeypatch):
    from minidiff import training

    seen = []
    real = training.diffusion_loss

    def spy(model, tokenizer, schedule, images, captions, generator, dropout, device, **kwargs):
        original = tokenizer.__call__
        return real(model, lambda texts: (seen.extend(texts), original(texts))[1], schedule, images, captions,
                    generator, dropout, device, **kwargs)

    monkeypatch.setattr(training, "diffusion_loss", spy)
    Trainer(tiny_train_config(tmp_path, steps=20, batch_size=20, caption_dropout=0.1)).train()
    empty = seen.count("") / len(seen)
    assert 0.03 < empty < 0.2


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    import os

    from minidiff.tools.checkpoint import write_json

    write_json(tmp_path / "x.json", {"a": 1})
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_loss_regresses_the_noise_not_x0():
    """L_simple (Ho et al. 2020 eq. 14): a network that returns the noise actually added,
    eps = (x_t - sqrt(alpha-bar_t) x_0) / sqrt(1 - alpha-bar_t) (eq. 4 solved for eps), has loss 0;
    with x_0 as the target its loss would be about E[(eps - x_0)^2] > 1."""
    from minidiff.scheduler import DDPM
    from minidiff.text import Tokenizer
    from minidiff.training import diffusion_loss

    schedule = DDPM()
    images = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1

    def knows_the_noise(x_t, t, ids, mask):
        alpha_bar = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        return (x_t - alpha_bar.sqrt() * images) / (1 - alpha_bar).sqrt()

    tokenizer = Tokenizer.from_captions(["a red circle"])
    per_sample, t = diffusion_loss(knows_the_noise, tokenizer, schedule, images, ["a red circle"] * 8,
                                   torch.Generator().manual_seed(3), 0.0, torch.device("cpu"))
    assert per_sample.shape == (8,) and len(set(t.tolist())) > 1
    assert per_sample.max().item() < 1e-6
    zero, _ = diffusion_loss(lambda x_t, *args: torch.zeros_like(x_t), tokenizer, schedule, images,
                             ["a red circle"] * 8, torch.Generator().manual_seed(3), 0.0, torch.device("cpu"))
    assert 0.5 < zero.mean().item() < 1.5  # E[eps^2] = 1: the loss is not degenerate


def test_ema_decay_is_diffusers_ema_models():
    """EMA.decay_at(k) is the decay of update k + 1, which diffusers' EMAModel computes as
    get_decay(k + 1) (default settings: no update_after_step, no power warm-up)."""
    from diffusers.training_utils import EMAModel

    from minidiff.training import EMA

    theirs = EMAModel([torch.nn.Parameter(torch.zeros(1))], decay=0.999)
    for step in [*range(12), 99, 2399, 8990, 9000, 20000]:
        assert EMA.decay_at(step, 0.999) == pytest.approx(theirs.get_decay(step + 1), rel=1e-12, abs=0), step
    assert EMA.decay_at(2399, 0.999) == pytest.approx(0.9963, abs=5e-5)  # the last update of the CPU preset
    assert EMA.decay_at(20000, 0.999) == 0.999


def test_ema_first_update_copies_the_weights_then_averages_as_diffusers():
    from diffusers.training_utils import EMAModel

    from minidiff.training import EMA

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    ours = EMA(model, 0.999)
    theirs = EMAModel(model.parameters(), decay=0.999, foreach=False)
    for step in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ours.update(model, step)
        theirs.step(model.parameters())
        if step == 0:  # decay 0: the shadow is the weights after the first step, exactly
            assert all(torch.equal(ours.shadow[k], v) for k, v in model.state_dict().items())
        for (name, _), shadow in zip(model.named_parameters(), theirs.shadow_params):
            torch.testing.assert_close(ours.shadow[name], shadow, rtol=1e-6, atol=1e-7)



def test_ema_weights_of_a_preset_run_are_9_j8_over_n9_not_a_fixed_horizon():
    """What the saved EMA is an average of, for the CPU preset's steps: run the EMA on a model whose
    weights at step j are the one-hot vector e_j, so the shadow holds each step's weight. They are
    9 (j + 2)...(j + 9) / ((n + 1)...(n + 9)) (~ 9 j^8 / n^9), the window of the EMA docstring."""
    from minidiff.training import EMA, TrainConfig

    n = TrainConfig().steps
    assert EMA.decay_at(n - 1, 0.999) < 0.999  # the cap is never reached
    model = torch.nn.Linear(n, 1, bias=False)
    ema = EMA(model, TrainConfig().ema_decay)
    for j in range(n):
        with torch.no_grad():
            model.weight.zero_()
            model.weight[0, j] = 1.0
        ema.update(model, j)
    weights = ema.shadow["weight"][0].double()
    j = torch.arange(1, n, dtype=torch.float64)
    numerator = torch.stack([j + i for i in range(2, 10)]).prod(dim=0)
    denominator = torch.arange(n + 1, n + 10, dtype=torch.float64).prod()
    torch.testing.assert_close(weights[1:], 9 * numerator / denominator, rtol=1e-5, atol=1e-9)
    late = j >= 0.6 * n  # the large-j form, within 5% over the last 40% of the run
    torch.testing.assert_close(weights[1:][late], 9 * j[late] ** 8 / float(n) ** 9, rtol=0.05, atol=0)
    assert weights.sum().item() == pytest.approx(1, abs=1e-5)
    held = weights.flip(0).cumsum(0)  # the weight of the last k steps
    assert int((held < 0.5).sum()) + 1 == 64 and int((held < 0.9).sum()) + 1 == 194  # docs/training.md: 64 of 850
    ages = torch.arange(n - 1, -1, -1, dtype=torch.float64)
    assert (weights * ages).sum().item() == pytest.approx(n / 10, abs=0.01)  # mean age 85 steps

def test_min_snr_weighting_is_diffusers_train_text_to_image():
    """snr_gamma: each sample's loss times min(SNR_t, gamma) / SNR_t, with SNR_t from
    diffusers.training_utils.compute_snr, as train_text_to_image.py --snr_gamma weights it."""
    from diffusers import DDPMScheduler as DiffusersDDPM
    from diffusers.training_utils import compute_snr

    from minidiff.scheduler import DDPM
    from minidiff.text import Tokenizer
    from minidiff.training import diffusion_loss

    schedule = DDPM()
    reference = DiffusersDDPM(beta_schedule="squaredcos_cap_v2")
    images = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    model = lambda x_t, *args: torch.zeros_like(x_t)  # noqa: E731
    tokenizer = Tokenizer.from_captions(["a red circle"])
    args = (model, tokenizer, schedule, images, ["a red circle"] * 16)
    plain, t = diffusion_loss(*args, torch.Generator().manual_seed(3), 0.0, torch.device("cpu"))
    weighted, t2 = diffusion_loss(*args, torch.Generator().manual_seed(3), 0.0, torch.device("cpu"), snr_gamma=5.0)
    snr = compute_snr(reference, t)
    expected = plain * torch.stack([snr, 5.0 * torch.ones_like(snr)], dim=1).min(dim=1)[0] / snr
    assert torch.equal(t, t2) and torch.allclose(weighted, expected, rtol=1e-5)
    assert (weighted < plain).any() and (weighted <= plain * (1 + 1e-6)).all()  # low-noise steps count less


def test_min_snr_needs_the_ddpm_objective():
    from minidiff.training import TrainConfig

    assert TrainConfig(objective="ddpm", snr_gamma=5.0).snr_gamma == 5.0
    for bad in (dict(objective="flow", snr_gamma=5.0), dict(objective="ddpm", snr_gamma=0.0)):
        with pytest.raises(ValueError, match="snr_gamma"):
            TrainConfig(**bad)
