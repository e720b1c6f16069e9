"""MiniDiffusionPipeline: determinism, keywords, save/load, and the sampling CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from minidiff import MiniDiffusionPipeline

ROOT = Path(__file__).resolve().parents[1]


def pixels(images):
    return np.stack([np.asarray(im) for im in images])


def test_same_seed_same_images_bit_for_bit(tiny_pipe):
    kwargs = dict(num_inference_steps=3, num_images_per_prompt=2)
    a = tiny_pipe.sample("a red circle", generator=torch.Generator().manual_seed(1), **kwargs)
    b = tiny_pipe.sample("a red circle", generator=torch.Generator().manual_seed(1), **kwargs)
    c = tiny_pipe.sample("a red circle", generator=torch.Generator().manual_seed(2), **kwargs)
    assert len(a.images) == 2 and a.images[0].size == (16, 16)
    assert np.array_equal(pixels(a.images), pixels(b.images))
    assert not np.array_equal(pixels(a.images), pixels(c.images))


def test_prompt_list_and_images_per_prompt_order(tiny_pipe):
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    both = tiny_pipe.sample(["a red circle", "a blue square"], num_inference_steps=2, num_images_per_prompt=3,
                            generator=gen(), output_type="pt")
    assert len(both.images) == 6
    assert all(0 <= im.min() and im.max() <= 1 for im in both.images)


def test_negative_prompt_changes_the_result_only_with_guidance(tiny_pipe):
    def run(negative, guidance):
        return pixels(tiny_pipe.sample("a red circle", negative_prompt=negative, guidance_scale=guidance,
                                       num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images)

    assert not np.array_equal(run(None, 5.0), run("square", 5.0))
    assert np.array_equal(run(None, 1.0), run("square", 1.0))  # no CFG at guidance 1, as in diffusers


def test_ddpm_sampler_and_callback(tiny_pipe):
    seen = []
    tiny_pipe.sample("a red circle", num_inference_steps=4, sampler="ddpm", callback=seen.append,
                     generator=torch.Generator().manual_seed(0))
    assert [s["i"] for s in seen] == [0, 1, 2, 3]
    assert seen[0]["t"] > seen[-1]["t"]
    assert set(seen[0]) == {"i", "t", "x", "denoised", "noise_pred"}
    assert seen[0]["x"].shape == (1, 3, 16, 16)


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(guidance_scale=-1.0), "guidance_scale"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt"),
    (dict(sampler="euler"), "sampler"),
])
def test_bad_arguments_are_clear_errors(tiny_pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_pipe.sample("a red circle", **kwargs)


def test_save_pretrained_round_trips(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "copy")
    again = MiniDiffusionPipeline.from_pretrained(tmp_path / "copy", device="cpu")
    assert (tmp_path / "copy" / "config.json").exists() and (tmp_path / "copy" / "model.safetensors").exists()
    run = lambda p: pixels(p.sample("a blue square", num_inference_steps=2,  # noqa: E731
                                    generator=torch.Generator().manual_seed(0)).images)
    assert np.array_equal(run(tiny_pipe), run(again))


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
