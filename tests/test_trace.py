"""The visible trace (capture_steps on top of callback), the strips, and the command lines that write them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minidiff.tools.shapes import Shapes
from minidiff.tools.cli import run
from minidiff.tools.contract import StepRecorder
from minidiff.flow import RectifiedFlow
from minidiff.tools.figures import FIGURES, half_mask, noising_strip, trace_strip, two_object_picture
from minidiff.tools.pictures import pil_to_tensor, tensor_to_pil
from minidiff.tools.pictures import noise_to_pil
from minidiff.scheduler import DDPM

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def picture_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pictures") / "circle.png"
    Shapes(16, seed=3).pil_and_caption(0)[0].save(path)
    return path


def test_step_recorder_builds_records_from_callback_dicts():
    """Backend-agnostic: any decode function, the user's callback still sees every step."""
    seen = []
    recorder = StepRecorder([0, 2], num_steps=3, callback=seen.append, decode=lambda x: [f"img{float(x)}"],
                            decode_noise=lambda e: [f"eps{float(e)}"])
    recorder.start(torch.tensor(9.0), 900)
    for i, t in enumerate([900, 600, 300]):
        recorder.callback({"i": i, "t": t, "x": torch.tensor(float(i)), "denoised": torch.tensor(-1.0),
                           "noise_pred": torch.tensor(0.5)})
    assert len(seen) == 3
    assert recorder.trace == [
        {"step": 0, "timestep": 900, "x_t": ["img9.0"], "pred_x0": None, "noise_pred": None},
        {"step": 2, "timestep": 600, "x_t": ["img1.0"], "pred_x0": ["img-1.0"], "noise_pred": ["eps0.5"]},
    ]
    assert StepRecorder(None, 3).callback is None  # nothing asked: the loop runs without a callback


@pytest.mark.parametrize("steps,message", [([5], "asks for step 5, but this call runs 4"), ([-1], "step -1"),
                                           ([1.5], "whole numbers"), ([True], "whole numbers")])
def test_bad_capture_steps_are_clear_errors(steps, message):
    with pytest.raises(ValueError, match=message):
        StepRecorder(steps, num_steps=4, decode=list)


def test_sample_captures_the_steps_asked_for(minidiff_pipe):
    out = minidiff_pipe.sample("a red circle", num_inference_steps=STEPS, num_images_per_prompt=2, generator=gen(),
                           capture_steps=[STEPS, 0, 1])
    assert [r["step"] for r in out.trace] == [0, 1, STEPS]
    start, first, last = out.trace
    assert start["pred_x0"] is None and start["noise_pred"] is None
    assert start["timestep"] == first["timestep"] > last["timestep"]  # step 1 ran at the first timestep
    for record in (first, last):
        assert len(record["x_t"]) == len(record["pred_x0"]) == len(record["noise_pred"]) == 2
        assert all(isinstance(im, Image.Image) and im.size == (16, 16) for im in record["x_t"])
    # step 0 is the starting noise itself; after the last step x_t is the output
    noise = torch.randn(2, 3, 16, 16, generator=gen())
    assert np.array_equal(np.asarray(start["x_t"][1]),
                          ((noise[1].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(last["x_t"], out.images))
    assert out.trace and not minidiff_pipe.sample("a red circle", num_inference_steps=2, generator=gen()).trace


@pytest.mark.parametrize("call", ["sample", "img2img", "inpaint"])
def test_trace_values_are_each_steps_guided_noise_and_clipped_x0(tiny_pipe, picture_file, call):
    """The values, not just the sizes: at every step, noise_pred is the guided model output
    eps = eps_uncond + w (eps_cond - eps_uncond) at (x_t, t), recomputed here from the UNet, and
    pred_x0 = (x_t - sqrt(1 - alpha-bar_t) eps) / sqrt(alpha-bar_t) (Ho et al. eq. 15), clipped to
    [-1, 1] as the sampler clips; the trace holds exactly those, decoded."""
    guidance, seen = 3.0, []
    runs = STEPS if call == "sample" else int(STEPS * 0.75)  # the edits run int(N * strength) steps
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=guidance, generator=gen(), callback=seen.append,
                  capture_steps=list(range(runs + 1)))
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (8, 0, 16, 16))
    out = {"sample": lambda: tiny_pipe.sample("a red circle", **kwargs),
           "img2img": lambda: tiny_pipe.img2img("a red circle", picture_file, strength=0.75, **kwargs),
           "inpaint": lambda: tiny_pipe.inpaint("a red circle", picture_file, mask, strength=0.75, **kwargs)}[call]()
    assert len(seen) == runs and len(out.trace) == runs + 1
    alphas_cumprod = tiny_pipe.model.objective.make_sampler(None, STEPS).alphas_cumprod
    # the start: x_T, or the input noised to the first timestep that runs (Ho eq. 4)
    x = torch.randn(1, 3, 16, 16, generator=gen())
    if call != "sample":
        a = alphas_cumprod[seen[0]["t"]]
        x = a.sqrt() * pil_to_tensor(Image.open(picture_file))[None] + (1 - a).sqrt() * x
    start = np.asarray(out.trace[0]["x_t"][0], dtype=int)
    assert np.abs(start - np.asarray(tensor_to_pil(x)[0], dtype=int)).max() <= 1
    context, context_mask = tiny_pipe.model.encode_prompt(["a red circle", ""])
    clipped = False
    for step, record in zip(seen, out.trace[1:]):
        t, alpha_bar = step["t"], alphas_cumprod[step["t"]]
        with torch.no_grad():
            eps_cond, eps_uncond = tiny_pipe.model.unet(torch.cat([x, x]), torch.tensor([t, t]), context,
                                                        context_mask).chunk(2)
        eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        torch.testing.assert_close(step["noise_pred"], eps, rtol=1e-5, atol=1e-5)
        x0 = (x - (1 - alpha_bar).sqrt() * step["noise_pred"]) / alpha_bar.sqrt()
        torch.testing.assert_close(step["denoised"], x0.clamp(-1, 1), rtol=1e-5, atol=1e-5)
        clipped |= bool((x0.abs() > 1.01).any())
        assert record["timestep"] == t
        decoded = {"pred_x0": tensor_to_pil(step["denoised"]), "noise_pred": noise_to_pil(step["noise_pred"]),
                   "x_t": tensor_to_pil(step["x"])}
        for name, images in decoded.items():
            assert np.array_equal(np.asarray(record[name][0]), np.asarray(images[0])), (name, t)
        x = step["x"]  # the next step's x_t (inpainting: after the kept region is put back)
    assert clipped  # the clipping was exercised


def test_capture_counts_the_steps_an_edit_runs(minidiff_pipe, picture_file):
    """Steps 0..steps_run can be captured: 4 steps at strength 0.9 run 3 (DDPM) or 4 (flow)."""
    runs = {"ddpm": 3, "flow": 4}[minidiff_pipe.config.objective]
    out = minidiff_pipe.img2img("a red circle", picture_file, strength=0.9, num_inference_steps=STEPS,
                                generator=gen(), capture_steps=[0, 2, runs])
    assert [r["step"] for r in out.trace] == [0, 2, runs]
    assert np.array_equal(np.asarray(out.trace[-1]["x_t"][0]), np.asarray(out.images[0]))  # the last is the result
    with pytest.raises(ValueError, match=f"runs {runs} denoising steps"):
        minidiff_pipe.img2img("a red circle", picture_file, strength=0.9, num_inference_steps=STEPS,
                              capture_steps=[runs + 1])
    unchanged = minidiff_pipe.img2img("a red circle", picture_file, strength=0.0, capture_steps=[0])
    assert unchanged.trace[0]["timestep"] is None
    assert np.array_equal(np.asarray(unchanged.trace[0]["x_t"][0]), np.asarray(Image.open(picture_file)))


def test_strips_have_one_tile_per_record(minidiff_pipe):
    out = minidiff_pipe.sample("a red circle", num_inference_steps=STEPS, generator=gen(), capture_steps=[0, 1, STEPS])
    strip = trace_strip(out.trace)
    tile = 96  # 16 px enlarged 6x
    assert strip.size[0] >= 3 * tile and strip.size[1] == 2 * (tile + 12)  # x_t row, predicted x0 row


def test_noising_strip_starts_clean_and_ends_in_noise():
    image = Shapes(16, seed=3).pil_and_caption(0)[0]
    strip = noising_strip(image, DDPM(), [0, 999], gen())
    tiles = [np.asarray(strip.crop((i * 96, 0, i * 96 + 96, 96)).resize((16, 16), Image.Resampling.NEAREST), float)
             for i in range(3)]
    clean = np.asarray(image, float)
    assert np.abs(tiles[1] - clean).mean() < 3 < np.abs(tiles[2] - clean).mean()
    with pytest.raises(ValueError, match="0..999"):
        noising_strip(image, DDPM(), [1000])


def cli(*args):
    import sample

    return run(sample.main, [str(a) for a in args])


def test_sample_cli_img2img_inpaint_and_save_steps(tiny_model_dir, picture_file, tmp_path):
    mask = tmp_path / "mask.png"
    Image.new("L", (16, 16), 255).save(mask)
    model = ["--model", tiny_model_dir, "--steps", "2", "--prompt", "a green square"]
    assert cli(*model, "--image", picture_file, "--strength", "0.5", "--out", tmp_path / "a.png") == 0
    assert cli(*model, "--image", picture_file, "--mask", mask, "--strength", "1", "--save-steps", "0,2",
               "--out", tmp_path / "b.png") == 0
    assert (tmp_path / "a.png").exists() and (tmp_path / "b.png").exists()
    assert Image.open(tmp_path / "b-steps.png").size[1] == 2 * (96 + 12)
    assert cli("--model", tiny_model_dir, "--noise-strip", picture_file, "--timesteps", "0,500,999",
               "--out", tmp_path / "strip.png") == 0
    assert Image.open(tmp_path / "strip.png").size[0] >= 4 * 96


@pytest.mark.parametrize("args,message", [
    (["--prompt", "a red circle", "--mask", "m.png"], "--mask needs --image"),
    (["--prompt", "a red circle", "--strength", "0.5"], "--strength needs --image"),
    (["--prompt", "a red circle", "--save-steps", "0,x"], "--save-steps takes whole numbers"),
    (["--prompt", "a red circle", "--save-steps", "0,9"], "asks for step 9"),
    (["--prompt", "a red circle", "--image", "PICTURE", "--strength", "2"], "strength must be between 0 and 1"),
    (["--prompt", "a red circle", "--image", "PICTURE", "--mask", "SMALL"], "mask_image is 8x8 but image is 16x16"),
    (["--noise-strip", "PICTURE", "--prompt", "a red circle"], "drop --prompt"),
    (["--noise-strip", "PICTURE", "--timesteps", "5000"], "0..999"),
    ([], "--prompt is required"),
])
def test_sample_cli_refuses_bad_input_and_writes_nothing(tiny_model_dir, picture_file, tmp_path, capsys, args,
                                                         message):
    Image.new("L", (8, 8), 255).save(tmp_path / "small.png")
    args = [{"PICTURE": picture_file, "SMALL": tmp_path / "small.png"}.get(a, a) for a in args]
    out = tmp_path / "out.png"
    assert cli("--model", tiny_model_dir, "--steps", "2", *args, "--out", out) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and not out.exists()
    assert not (tmp_path / "out-steps.png").exists()


@pytest.mark.slow
def test_sample_cli_keeps_an_existing_steps_file(tiny_model_dir, tmp_path):
    """The real process: exit status 2, one line, and the existing -steps.png untouched."""
    (tmp_path / "out-steps.png").write_bytes(b"keep me")
    cmd = [sys.executable, str(ROOT / "sample.py"), "--model", str(tiny_model_dir), "--prompt", "a red circle",
           "--steps", "2", "--save-steps", "0,2", "--out", str(tmp_path / "out.png")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and "--overwrite" in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "out-steps.png").read_bytes() == b"keep me" and not (tmp_path / "out.png").exists()


def test_figures_command_writes_every_figure_and_keeps_them(tiny_model_dir, tmp_path, capsys):
    from minidiff.tools.figures import main

    out = tmp_path / "figures"
    assert run(main, ["--model", str(tiny_model_dir), "--out", str(out), "--steps", "2"]) == 0
    for name in FIGURES:
        image = Image.open(out / name)
        assert image.size[1] >= 96  # 16 px tiles enlarged to be visible
    before = (out / FIGURES[0]).read_bytes()
    assert run(main, ["--model", str(tiny_model_dir), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / FIGURES[0]).read_bytes() == before


@pytest.mark.parametrize("size", [16, 32])
def test_inpainting_figure_input_keeps_an_object_outside_the_mask(size):
    """The inpainting figure masks the right half of a two-object picture: an object stays visible in
    the kept (black) half, and there is one in the replaced half to be painted over."""
    lit = np.asarray(two_object_picture(size)).max(axis=2) > 0  # (H, W), True on an object
    replaced = np.asarray(half_mask(size, "right")) == 255
    assert replaced[:, size // 2:].all() and not replaced[:, : size // 2].any()
    assert lit[~replaced].sum() >= (size // 4) ** 2 and lit[replaced].sum() >= (size // 4) ** 2
    assert np.array_equal(np.asarray(half_mask(size, "left")) == 255, ~replaced)


def test_figures_command_renders_a_flow_model_and_the_comparison(tiny_model_dir, tiny_flow_model_dir, tmp_path,
                                                                 capsys):
    from minidiff.tools.figures import COMPARISON, FLOW_FOLDER, main

    out = tmp_path / "figures"
    assert run(main, ["--model", str(tiny_model_dir), "--flow-model", str(tiny_model_dir), "--out", str(out),
                      "--steps", "2"]) == 2  # a DDPM model given as --flow-model
    assert "--flow-model needs a flow model" in capsys.readouterr().err and not out.exists()
    assert run(main, ["--model", str(tiny_model_dir), "--flow-model", str(tiny_flow_model_dir), "--out", str(out),
                      "--steps", "2"]) == 0
    for name in [*FIGURES, *(f"{FLOW_FOLDER}/{n}" for n in FIGURES), COMPARISON]:
        assert Image.open(out / name).size[1] >= 96


def test_ddpm_vs_flow_strip_starts_both_models_from_the_same_noise(tiny_pipe, tiny_flow_pipe):
    """Rows: DDPM x_t, DDPM x0, flow x_t, flow x0; one column per captured step (0, 1, 2 of 2)."""
    from minidiff.tools.figures import ddpm_vs_flow_strip
    from minidiff.tools.pictures import DISPLAY_SIZE

    strip = np.asarray(ddpm_vs_flow_strip(tiny_pipe, tiny_flow_pipe, steps=2, fractions=(0, 0.5, 1)))
    cell_w, cell_h = strip.shape[1] // 3, strip.shape[0] // 4
    assert strip.shape[0] == 4 * cell_h and cell_h >= DISPLAY_SIZE
    tile = lambda row, col: strip[row * cell_h: row * cell_h + DISPLAY_SIZE,  # noqa: E731
                                  col * cell_w + (cell_w - DISPLAY_SIZE) // 2:][:, :DISPLAY_SIZE]
    assert np.array_equal(tile(0, 0), tile(2, 0))  # step 0: the same x_T for both models
    assert not np.array_equal(tile(0, 2), tile(2, 2))  # after the run: two different models' pictures
    with pytest.raises(ValueError, match="a DDPM model and a flow model"):
        ddpm_vs_flow_strip(tiny_flow_pipe, tiny_pipe, steps=2)


def test_noising_strip_of_a_flow_schedule_is_the_straight_line():
    """A flow schedule noises as x_sigma = (1 - sigma) x_0 + sigma eps with sigma = t / T, labelled by sigma."""
    image = Image.fromarray(np.full((16, 16, 3), 255, dtype=np.uint8))  # white: x_0 = 1 everywhere
    zero_noise = torch.Generator().manual_seed(0)
    strip = noising_strip(image, RectifiedFlow(), [0, 500, 999], zero_noise)
    eps = torch.randn((1, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    expected = tensor_to_pil((1 - 0.5) * torch.ones(1, 3, 16, 16) + 0.5 * eps)[0]
    cell_w = strip.size[0] // 4
    x = 2 * cell_w + (cell_w - 96) // 2
    got = strip.crop((x, 0, x + 96, 96)).resize((16, 16), Image.Resampling.NEAREST)
    assert np.array_equal(np.asarray(got), np.asarray(expected))
