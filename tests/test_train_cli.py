"""What train.py tells a user before and instead of work: a finished run that --resume cannot
continue, a data folder without captions or smaller than one batch."""

from __future__ import annotations

import pytest
from PIL import Image

import train
from minidiff.tools.cli import run

from conftest import tiny_train_flags

TINY = tiny_train_flags(steps=2)


@pytest.mark.slow
def test_resume_of_a_finished_run_says_so_and_changes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(train.main, ["--out", str(out), *TINY]) == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    capsys.readouterr()
    assert run(train.main, ["--out", str(out), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "already at its last step (2 of 2)" in err and "--steps 4" in err, err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing saved or rendered again


@pytest.mark.slow
def test_a_folder_without_captions_or_smaller_than_a_batch_gets_one_line_each(tmp_path, capsys):
    folder = tmp_path / "pictures"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (20, 20), (40 * i, 100, 200)).save(folder / f"{i}.png")
    assert run(train.main, ["--out", str(tmp_path / "run"), "--data", str(folder), *TINY]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(notes) == 2, notes
    assert "has no metadata.jsonl" in notes[0] and "unconditionally" in notes[0]
    assert "holds 3 images, fewer than one batch of 4" in notes[1]


def test_the_tiny_flags_are_the_tiny_config():
    """conftest's one tiny run, as train.py flags, makes the same TrainConfig as tiny_train_config."""
    from conftest import tiny_train_config

    assert train.build_config(train.parse_args(["--out", "x", *tiny_train_flags()])) == tiny_train_config("x")
    flow = train.build_config(train.parse_args(["--out", "x", *tiny_train_flags(objective="flow", steps=None)]))
    assert flow == tiny_train_config("x", objective="flow", steps=train.TrainConfig.steps)  # None: train.py's default
