"""sample.py for any --num-images: bounded batches, a progress bar over images, grids about
square, one file per image with --out-dir, single images enlarged for viewing."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import sample
from minidiff import MiniDiffusionPipeline
from minidiff.tools.cli import run
from minidiff.tools.pictures import grid_columns


def sample_cli(argv, model) -> int:
    return run(sample.main, ["--model", str(model), "--device", "cpu", "--steps", "2", *argv])


@pytest.fixture
def calls(monkeypatch):
    """The number of images of every batch the pipeline denoises for sample.py."""
    seen = []
    original = MiniDiffusionPipeline.generate

    def recording(self, call):
        seen.append(len(call.prompts()[0]) * call.num_images_per_prompt)
        return original(self, call)

    monkeypatch.setattr(MiniDiffusionPipeline, "generate", recording)
    return seen


def test_grid_columns_are_about_square_and_keep_short_prompt_rows():
    assert [grid_columns(n) for n in (1, 2, 4, 5, 500)] == [1, 2, 2, 3, 23]
    assert grid_columns(24, group=4) == 4  # six prompts of four: a row each, as the demo grid
    assert grid_columns(100, group=50) == 10  # a row of 50 would be five times too wide


def test_many_images_make_an_about_square_grid_with_a_progress_bar(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert sample_cli(["--prompt", "a red circle", "--num-images", "30", "--batch-size", "8", "--out", str(out)],
                      tiny_model_dir) == 0
    width, height = Image.open(out).size
    assert 0.5 <= width / height <= 2, (width, height)  # 6 x 5 tiles, not one row of 30
    assert "30/30" in capsys.readouterr().err  # the bar counts images


def test_batches_are_bounded_and_do_not_change_the_images(tiny_model_dir, tmp_path, calls):
    folder = tmp_path / "images"
    assert sample_cli(["--prompt", "a red circle", "--num-images", "5", "--batch-size", "2", "--raw-size",
                       "--sampler", "ddim", "--out-dir", str(folder)], tiny_model_dir) == 0
    assert calls == [2, 2, 1]
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"{k:05d}-a-red-circle.png" for k in range(5)]
    # DDIM: one call of five images with the same seed gives the same pictures
    pipe = MiniDiffusionPipeline.from_pretrained(tiny_model_dir, device="cpu")
    whole = pipe.sample("a red circle", num_inference_steps=2, num_images_per_prompt=5, sampler="ddim",
                        generator=torch.Generator().manual_seed(0)).images
    for name, image in zip(names, whole):
        assert Image.open(folder / name).tobytes() == image.tobytes()


@pytest.mark.slow
def test_default_batch_holds_256_images_of_16_px(tiny_model_dir, tmp_path, calls):
    assert sample_cli(["--prompt", "a red circle", "--num-images", "300", "--steps", "1",
                       "--out-dir", str(tmp_path / "many")], tiny_model_dir) == 0
    assert calls == [256, 44] and len(list((tmp_path / "many").iterdir())) == 300


def test_one_image_is_enlarged_for_viewing_unless_raw_size(tiny_model_dir, tmp_path):
    assert sample_cli(["--prompt", "a red circle", "--out", str(tmp_path / "big.png")], tiny_model_dir) == 0
    assert sample_cli(["--prompt", "a red circle", "--raw-size", "--out", str(tmp_path / "raw.png")],
                      tiny_model_dir) == 0
    big, raw = Image.open(tmp_path / "big.png"), Image.open(tmp_path / "raw.png")
    assert raw.size == (16, 16) and big.size == (96, 96)
    assert big.resize((16, 16), Image.Resampling.NEAREST).tobytes() == raw.tobytes()  # nearest neighbour, 6 x 6


def test_help_names_the_default_model_which_is_where_train_py_writes(capsys):
    """`sample.py --help` shows the model used when --model is left out; that is DEFAULT_MODEL,
    the folder a plain `python train.py` (and so `make demo`) writes, and the app's default too."""
    import re

    import app
    import train
    from minidiff.tools.cli import DEFAULT_MODEL

    with pytest.raises(SystemExit):
        sample.parse_args(["--help"])
    options = " ".join(capsys.readouterr().out.split("options:", 1)[1].split())  # the list below the usage
    model_help = options[options.index("--model MODEL"):options.index("--backend {")]
    shown = re.findall(r"\(default: ([^)]*)\)", model_help)
    assert shown == [DEFAULT_MODEL]
    assert sample.parse_args(["--prompt", "a red circle"]).model == DEFAULT_MODEL  # what the help says is used
    assert train.parse_args([]).out == DEFAULT_MODEL  # ... is where train.py writes by default
    assert app.parse_args([]).model == DEFAULT_MODEL
