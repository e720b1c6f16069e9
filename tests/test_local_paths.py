"""A typo in a run folder's name is answered about the local folder, never about the Hugging Face Hub."""

from __future__ import annotations

import sample
from minidiff.tools.cli import pick_backend, run


def test_a_path_like_name_is_local_and_a_hub_id_is_not(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "shapes").mkdir(parents=True)
    (tmp_path / "mine").mkdir()
    assert pick_backend("runs/shape") == "minidiff"  # names runs/
    assert pick_backend("mine/model") == "minidiff"  # its parent folder exists
    assert pick_backend("stabilityai/stable-diffusion-3.5-medium") == "sd3"
    assert pick_backend("someone/model") == "sd3"


def test_sample_with_a_typo_names_the_folder_and_the_nearest_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "shapes").mkdir(parents=True)
    assert run(sample.main, ["--model", "runs/shape", "--prompt", "a red circle", "--out", "x.png"]) == 2
    err = capsys.readouterr().err
    assert "model folder runs/shape does not exist; did you mean runs/shapes?" in err
    assert "Hugging Face" not in err and "Hub" not in err and not (tmp_path / "x.png").exists()
