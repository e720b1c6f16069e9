"""Issue 24, item 2: an interrupted `make demo` does not look finished. The Makefile's model step
resumes a run stopped early (and train.py finishes it, then says a finished run is finished);
train.py's stop line names the command that resumes."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

import train
from minidiff.tools.cli import run

from test_resume import TINY_FLAGS, reached, stop_plan  # noqa: F401  (stop_plan: the fixture)

ROOT = Path(__file__).resolve().parents[1]


def make_demo(tmp_path: Path, run_dir: Path) -> list[str]:
    """`make demo` with a stand-in python that only logs its arguments: the commands make runs."""
    venv, log = tmp_path / "venv", tmp_path / "calls.log"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    stub = venv / "bin" / "python"
    stub.write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    stub.chmod(0o755)
    (venv / ".installed").touch()  # newer than pyproject.toml: nothing to install
    log.unlink(missing_ok=True)
    done = subprocess.run(["make", "-s", "demo", f"VENV={venv}", f"RUN={run_dir}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return log.read_text().splitlines()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_demo_trains_a_new_run_resumes_a_stopped_one_and_keeps_a_model_without_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    calls = make_demo(tmp_path, run_dir)
    assert calls[0] == f"train.py --out {run_dir}" and calls[1].startswith("sample.py")

    (run_dir / "checkpoints" / "step-00000003").mkdir(parents=True)  # a run stopped at step 3
    (run_dir / "model.safetensors").touch()
    calls = make_demo(tmp_path, run_dir)
    assert calls[0] == f"train.py --out {run_dir} --resume" and calls[1].startswith("sample.py")

    shutil.rmtree(run_dir / "checkpoints")  # a model alone (copied in): sampled as it is
    calls = make_demo(tmp_path, run_dir)
    assert calls[0].startswith("sample.py")


def test_a_run_stopped_by_ctrl_c_names_the_resume_command_and_the_demos_command_finishes_it(tmp_path, stop_plan,
                                                                                               capsys):
    out = tmp_path / "run"
    flags = ["--steps", "4", *TINY_FLAGS]
    stop_plan.new_run({2: lambda: signal.raise_signal(signal.SIGINT)})  # Ctrl-C during step 2
    assert run(train.main, ["--out", str(out), *flags]) == 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.endswith(f"; to finish the run (4 steps): python train.py --out {out} --resume")
    assert reached(out) == 1

    stop_plan.new_run()  # the command `make demo` runs on a stopped run
    assert run(train.main, ["--out", str(out), "--resume"]) == 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("stopped after step 4 (done") and "--resume" not in last
    assert json.loads((out / "config.json").read_text())["trained_steps"] == 4

    assert run(train.main, ["--out", str(out), "--resume"]) == 0  # and again: finished, nothing trained
    assert f"{out} is already at its last step (4 of 4)" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["trained_steps"] == 4
