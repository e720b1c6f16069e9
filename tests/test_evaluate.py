"""The analyser reads ground-truth Shapes images back almost perfectly, and notices wrong ones."""

from __future__ import annotations

import pytest
from PIL import Image

from minidiff.tools.shapes import Shapes
from minidiff.text import Tokenizer
from minidiff.tools.evaluate import analyse, evaluation_prompts, main, score


@pytest.mark.parametrize("size,two", [(16, 0.0), (24, 0.0), (32, 0.5), (64, 0.5)])
def test_analyser_scores_ground_truth_near_100_percent(size, two):
    data = Shapes(size, seed=7, two_object_fraction=two)
    correct = 0
    for index in range(300):
        objects = data.scene(index)
        found = analyse(data.pil_and_caption(index)[0], two_objects=len(objects) == 2)
        correct += score(found, [(o["colour"], o["shape"]) for o in objects])["both"]
    assert correct / 300 >= 0.99


def test_analyser_finds_nothing_in_black_and_scores_it_wrong():
    found = analyse(Image.new("RGB", (16, 16)))
    assert found == [(None, None)]
    assert score(found, [("red", "circle")]) == {"colour": False, "shape": False, "both": False}


def test_two_object_prompts_only_from_32px_and_for_a_model_that_knows_their_words():
    assert len(evaluation_prompts(16)) == 18
    assert len(evaluation_prompts(32)) == 36
    single, two = (Tokenizer.from_captions(Shapes(32, two_object_fraction=f).captions()) for f in (0.0, 0.3))
    assert len(evaluation_prompts(32, tokenizer=single)) == 18  # trained without two-object pictures
    assert len(evaluation_prompts(32, tokenizer=two)) == 36


def test_a_32px_model_trained_on_single_objects_is_scored_on_them(tmp_path, capsys):
    """A 32 px model whose vocabulary lacks the two-object words is scored on the single-object
    prompts, and the output says why the two-object ones are missing (it used to be refused)."""
    from minidiff import MiniDiffusionPipeline
    from minidiff.training import build_model
    from conftest import tiny_train_config

    config = tiny_train_config(tmp_path / "run", image_size=32)
    MiniDiffusionPipeline(build_model(config, Shapes(32).captions())).save_pretrained(tmp_path / "m")
    assert main(["--model", str(tmp_path / "m"), "--samples-per-prompt", "1", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "single-object prompts: colour" in out and "two-object prompts: not scored" in out


def test_evaluate_cli_runs_on_a_model(tiny_model_dir, capsys):
    assert main(["--model", str(tiny_model_dir), "--samples-per-prompt", "1", "--steps", "2"]) == 0
    assert "single-object prompts: colour" in capsys.readouterr().out


def test_evaluate_cli_bad_model_is_one_line(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.startswith("error: model folder")


def test_object_centre_finds_the_box_centre_of_circles_and_squares():
    import numpy as np

    from minidiff.tools.evaluate import object_centre

    data, checked = Shapes(16, seed=5), 0
    for index in range(40):
        (obj,) = data.scene(index)
        if obj["shape"] == "triangle":  # its centre of area sits below the box centre
            continue
        image = data.pil_and_caption(index)[0]
        x0, y0, x1, y1 = obj["box"]
        cx, cy = object_centre(np.asarray(image))
        # pixel i covers [i, i + 1): its centre is at i + 0.5 in box coordinates
        assert abs(cx - ((x0 + x1) / 2 - 0.5)) < 0.3 and abs(cy - ((y0 + y1) / 2 - 0.5)) < 0.3
        checked += 1
    assert checked > 10 and object_centre(np.zeros((16, 16, 3), np.uint8)) is None


@pytest.mark.slow
def test_evaluate_refuses_a_model_not_trained_on_shapes_in_one_line(tmp_path, capsys):
    from conftest import tiny_train_config
    from minidiff.tools.trainer import Trainer

    folder = tmp_path / "cats"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (16, 16), (200, 120, 40)).save(folder / f"{i}.png")
    (folder / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "a ginger cat"}\n'
                                           '{"file_name": "1.png", "text": "a ginger cat"}\n')
    Trainer(tiny_train_config(tmp_path / "model", data=str(folder), steps=1)).train()
    capsys.readouterr()
    assert main(["--model", str(tmp_path / "model"), "--samples-per-prompt", "1", "--steps", "1"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "was not trained on Shapes" in lines[0] and "circle" in lines[0], lines


def test_evaluate_shows_a_progress_bar_over_images(tiny_model_dir, capsys):
    assert main(["--model", str(tiny_model_dir), "--samples-per-prompt", "2", "--steps", "1"]) == 0
    assert "36/36" in capsys.readouterr().err  # 18 prompts x 2 images
