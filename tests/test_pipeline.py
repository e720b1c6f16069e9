"""MiniDiffusionPipeline: determinism, keywords, save/load, and the sampling CLI. The calls are
checked on both tiny models, DDPM and rectified flow (`minidiff_pipe`, tests/conftest.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from minidiff import MiniDiffusionPipeline
from minidiff.model import OBJECTIVES

ROOT = Path(__file__).resolve().parents[1]


def pixels(images):
    return np.stack([np.asarray(im) for im in images])


def test_same_seed_same_images_bit_for_bit(minidiff_pipe):
    kwargs = dict(num_inference_steps=3, num_images_per_prompt=2)
    a = minidiff_pipe.sample("a red circle", generator=torch.Generator().manual_seed(1), **kwargs)
    b = minidiff_pipe.sample("a red circle", generator=torch.Generator().manual_seed(1), **kwargs)
    c = minidiff_pipe.sample("a red circle", generator=torch.Generator().manual_seed(2), **kwargs)
    assert len(a.images) == 2 and a.images[0].size == (16, 16)
    assert np.array_equal(pixels(a.images), pixels(b.images))
    assert not np.array_equal(pixels(a.images), pixels(c.images))


def test_prompt_list_and_images_per_prompt_order(minidiff_pipe):
    """images lists num_images_per_prompt images of each prompt, prompt by prompt: the same as
    asking for each prompt repeated in that order (same noise, row for row), and not the same as
    another order (the prompts do change the images)."""
    def run(prompts, n):
        return torch.stack(minidiff_pipe.sample(prompts, num_inference_steps=2, num_images_per_prompt=n, output_type="pt",
                                            generator=torch.Generator().manual_seed(0)).images)

    both = run(["a red circle", "a blue square"], 3)
    assert both.shape == (6, 3, 16, 16) and 0 <= both.min() and both.max() <= 1
    assert torch.equal(both, run(["a red circle"] * 3 + ["a blue square"] * 3, 1))
    assert not torch.allclose(both, run(["a red circle", "a blue square"] * 3, 1))


PROMPT_VALUES = {"": 0.0, "a red circle": 1.0, "a blue square": -2.0, "a green triangle": 0.5}


class PromptValueModel(torch.nn.Module):
    """Stands in for the model, with an output that depends on the prompt in a known way: each
    prompt is encoded as one number (PROMPT_VALUES) and the "UNet" predicts that number at every
    pixel, whatever x_t and t. Its calls are recorded."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the pipeline a device to find
        self.denoiser = PromptValueUNet()
        self.objective = OBJECTIVES[config.objective][1](config.scheduler)
        self.sample_shape = (3, config.image_size, config.image_size)

    def to_latents(self, images, generator=None):
        return images

    def from_latents(self, latents):
        return latents

    def encode_prompt(self, prompts):
        context = torch.tensor([PROMPT_VALUES[p] for p in prompts]).reshape(-1, 1, 1)  # (B, L = 1, D = 1)
        return context, torch.ones(len(prompts), 1, dtype=torch.bool)


class PromptValueUNet(torch.nn.Module):
    def forward(self, x, timesteps, context, mask):
        self.rows = getattr(self, "rows", []) + [x.shape[0]]
        return context.reshape(-1, 1, 1, 1).expand_as(x).clone()


@pytest.mark.parametrize("guidance", [3.0, 1.0])
def test_guidance_is_uncond_plus_w_times_cond_minus_uncond_with_the_negative_prompt_as_uncond(minidiff_pipe,
                                                                                             guidance):
    """eps = eps_uncond + w (eps_cond - eps_uncond) (Ho & Salimans 2022 eq. 6), the negative prompt
    in the unconditional row, the empty prompt where none is given; at w <= 1 the conditional
    prediction alone, one row per image. (The same for a noise and a velocity prediction.)"""
    pipe = MiniDiffusionPipeline(PromptValueModel(minidiff_pipe.config), device="cpu")
    seen = []
    pipe.sample(["a red circle", "a blue square", "a green triangle"], negative_prompt=["a blue square", "", ""],
                guidance_scale=guidance, num_images_per_prompt=2, num_inference_steps=3,
                generator=torch.Generator().manual_seed(0), callback=seen.append)
    cond = torch.tensor([1.0, -2.0, 0.5])
    uncond = torch.tensor([-2.0, 0.0, 0.0])  # "a blue square", then the empty prompt
    expected = uncond + guidance * (cond - uncond) if guidance > 1 else cond  # w = 3: 7, -6, 1.5
    expected = expected.repeat_interleave(2).reshape(-1, 1, 1, 1).expand(6, 3, 16, 16)
    assert len(seen) == 3
    for step in seen:
        torch.testing.assert_close(step["noise_pred"], expected, rtol=0, atol=1e-6)
    assert pipe.model.denoiser.rows == [12 if guidance > 1 else 6] * 3  # uncond rows only with guidance
    seen.clear()
    pipe.sample("a red circle", guidance_scale=guidance, num_inference_steps=1, callback=seen.append)
    torch.testing.assert_close(seen[0]["noise_pred"], torch.full((1, 3, 16, 16), guidance * 1.0))  # uncond: ""


def test_negative_prompt_changes_the_result_only_with_guidance(minidiff_pipe):
    def run(negative, guidance):
        return pixels(minidiff_pipe.sample("a red circle", negative_prompt=negative, guidance_scale=guidance,
                                       num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images)

    assert not np.array_equal(run(None, 5.0), run("square", 5.0))
    assert np.array_equal(run(None, 1.0), run("square", 1.0))  # no CFG at guidance 1, as in diffusers


def test_default_sampler_and_callback(minidiff_pipe):
    """The objective's own sampler by default: DDPM's ancestral one, or Euler for a flow model."""
    assert minidiff_pipe.samplers[0] == {"ddpm": "ddpm", "flow": "euler"}[minidiff_pipe.config.objective]
    seen = []
    minidiff_pipe.sample("a red circle", num_inference_steps=4, callback=seen.append,
                         generator=torch.Generator().manual_seed(0))
    assert [s["i"] for s in seen] == [0, 1, 2, 3]
    assert seen[0]["t"] > seen[-1]["t"]
    assert set(seen[0]) == {"i", "t", "x", "denoised", "noise_pred"}
    assert seen[0]["x"].shape == (1, 3, 16, 16)


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(guidance_scale=-1.0), "guidance_scale"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt"),
    (dict(sampler="the other objective's"), "sampler"),
])
def test_bad_arguments_are_clear_errors(minidiff_pipe, kwargs, message):
    if "sampler" in kwargs:  # a DDPM model has no Euler sampler, a flow model no DDIM
        kwargs = dict(sampler={"ddpm": "euler", "flow": "ddim"}[minidiff_pipe.config.objective])
    with pytest.raises(ValueError, match=message):
        minidiff_pipe.sample("a red circle", **kwargs)


def test_save_pretrained_round_trips(minidiff_pipe, tmp_path):
    minidiff_pipe.save_pretrained(tmp_path / "copy")
    again = MiniDiffusionPipeline.from_pretrained(tmp_path / "copy", device="cpu")
    assert (tmp_path / "copy" / "config.json").exists() and (tmp_path / "copy" / "model.safetensors").exists()
    run = lambda p: pixels(p.sample("a blue square", num_inference_steps=2,  # noqa: E731
                                    generator=torch.Generator().manual_seed(0)).images)
    assert again.config.objective == minidiff_pipe.config.objective
    assert np.array_equal(run(minidiff_pipe), run(again))


@pytest.mark.slow
def test_sample_cli_writes_a_grid_and_keeps_existing_files(tiny_model_dir, tmp_path):
    out = tmp_path / "grid.png"
    cmd = [sys.executable, str(ROOT / "sample.py"), "--model", str(tiny_model_dir), "--prompt", "a red circle",
           "a blue square", "--num-images", "2", "--steps", "2", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert out.exists()
    before = out.read_bytes()
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 2 and "--overwrite" in again.stderr and "Traceback" not in again.stderr
    assert out.read_bytes() == before
