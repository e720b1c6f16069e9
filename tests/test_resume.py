"""Runs that survive: SIGKILL and Ctrl-C at any moment, then --resume, give the weights of a
run that never stopped, bit for bit; a non-finite loss stops with the step and keeps the last
good checkpoint; a resumed run keeps its own settings."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import train
from minidiff import training
from minidiff.tools import trainer as trainer_module
from minidiff.tools.checkpoint import read_safetensors
from minidiff.tools.cli import run
from minidiff.tools.trainer import Trainer, config_for_resume, latest_checkpoint

from conftest import tiny_train_config, tiny_train_flags

ROOT = Path(__file__).resolve().parents[1]
# the tiny run with train.py's default objective; --steps and --checkpoint-every are each test's own
TINY_FLAGS = tiny_train_flags(objective=None, steps=None, checkpoint_every=None, batch_size=2, seed=0)
STEPS = 12


def start(out: Path, *flags: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--out", str(out), *flags], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def reached(out: Path) -> int:
    found = latest_checkpoint(out)
    return int(found.name.removeprefix("step-")) if found else 0


def stop_when(process: subprocess.Popen, out: Path, step: int, sig: int, delay: float = 0.0) -> tuple[int, str]:
    """Send `sig` once a checkpoint of `step` or later exists (+ `delay` s); the exit status and stderr."""
    while reached(out) < step:
        assert process.poll() is None, process.communicate()[1]
        time.sleep(0.005)
    time.sleep(delay)
    process.send_signal(sig)
    return process.wait(timeout=120), process.communicate()[1]


@pytest.mark.slow
def test_run_killed_and_interrupted_then_resumed_ends_bitwise_equal(tmp_path):
    # the reference: the same run, never stopped (in this process, on one thread as the subprocesses are)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run(train.main, ["--out", str(tmp_path / "ref"), "--steps", str(STEPS), "--checkpoint-every", "4",
                                *TINY_FLAGS]) == 0
    finally:
        torch.set_num_threads(threads)

    out = tmp_path / "run"
    first = start(out, "--steps", str(STEPS), "--checkpoint-every", "1", "--keep", "2", *TINY_FLAGS)
    status, _ = stop_when(first, out, 3, signal.SIGKILL)
    assert status == -signal.SIGKILL and reached(out) < STEPS
    # the resumed runs get no model flags: their settings come from the checkpoint
    status, stderr = stop_when(start(out, "--resume", "--device", "cpu"), out, 6, signal.SIGINT)
    assert status == 0, stderr
    assert "interrupted" in stderr and (out / "model.safetensors").exists()
    interrupted_at = reached(out)
    assert 6 <= interrupted_at < STEPS
    status, _ = stop_when(start(out, "--resume", "--device", "cpu"), out, interrupted_at + 2, signal.SIGKILL, 0.03)
    assert status == -signal.SIGKILL and reached(out) < STEPS
    last = start(out, "--resume", "--device", "cpu")
    assert last.wait(timeout=120) == 0, last.communicate()[1]

    final = f"checkpoints/step-{STEPS:08d}"
    for name in ("model.safetensors", f"{final}/model.safetensors", f"{final}/ema.safetensors",
                 f"{final}/optimizer.safetensors", f"{final}/rng.safetensors"):
        got, want = read_safetensors(out / name), read_safetensors(tmp_path / "ref" / name)
        assert got.keys() == want.keys(), name
        assert all(torch.equal(got[k], want[k]) for k in want), name
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step-{STEPS - 1:08d}", f"step-{STEPS:08d}"]
    rows = lambda run_dir: [(r["step"], r["loss"], r["loss_t0"]) for r in csv.DictReader(open(run_dir / "loss.csv"))]  # noqa: E731
    assert rows(out) == rows(tmp_path / "ref")  # the loss log too: its open window is checkpointed


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real = training.diffusion_loss
    calls = []

    def poisoned(*args, **kwargs):  # the 4th step's loss is NaN, as after an overflow
        calls.append(1)
        per_sample, t = real(*args, **kwargs)
        return (per_sample * float("nan") if len(calls) == 4 else per_sample), t

    monkeypatch.setattr(training, "diffusion_loss", poisoned)
    out = tmp_path / "run"
    status = run(train.main, ["--out", str(out), "--steps", "8", "--checkpoint-every", "2", *TINY_FLAGS])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 1
    assert error.startswith("error: training stopped: loss became nan at step 4;")
    assert "step-00000002" in error
    # model.safetensors is written with every checkpoint: it holds the last good step too
    assert json.loads((out / "config.json").read_text())["trained_steps"] == 2
    trainer = Trainer(tiny_train_config(tmp_path / "check", batch_size=2))
    trainer.load_checkpoint(latest_checkpoint(out))  # the last good checkpoint loads, and is finite
    assert trainer.step == 2
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_resume_keeps_the_runs_settings_and_lets_only_run_settings_change(tiny_model_dir):
    config = tiny_train_config(tiny_model_dir)  # the run that wrote the tiny model: 4 steps of 4 images
    checkpoint = latest_checkpoint(tiny_model_dir)
    resumed, changes = config_for_resume(checkpoint, {"out": str(tiny_model_dir), "steps": 9, "lr": 1e-4})
    assert resumed.batch_size == 4 and resumed.channel_mults == (1, 2) and resumed.steps == 9
    assert changes == {"steps": (4, 9), "lr": (config.lr, 1e-4)}
    assert config_for_resume(checkpoint, {"batch_size": 4})[1] == {}  # the same value is no change
    with pytest.raises(ValueError, match="--batch-size 8 differs from the resumed run's 4"):
        config_for_resume(checkpoint, {"batch_size": 8})
    with pytest.raises(ValueError, match="--steps 3 is below the step the run has reached"):
        config_for_resume(checkpoint, {"steps": 3})


@pytest.fixture
def stop_plan(monkeypatch):
    """In-process runs of train.main with stops at chosen steps, deterministically: `plan[k]` runs
    once the k-th forward pass of a run has drawn its numbers (caption dropout, timesteps, noise),
    before the loop looks for a stop; `clock` is the loop's time.monotonic. No sample grids (they
    change no weights and cost seconds)."""
    real, calls, plan, clock = training.diffusion_loss, [], {}, {"now": 0.0}

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(1)
        action = plan.pop(len(calls), None)
        if action is not None:
            action()
        return result

    monkeypatch.setattr(training, "diffusion_loss", spy)
    monkeypatch.setattr(trainer_module, "time", SimpleNamespace(monotonic=lambda: clock["now"]))
    monkeypatch.setattr(Trainer, "write_samples", lambda self, name: None)

    def new_run(actions=None):
        calls.clear()
        plan.clear()
        plan.update(actions or {})

    return SimpleNamespace(new_run=new_run, clock=clock, plan=plan)


@pytest.mark.slow
def test_ctrl_c_and_max_minutes_with_default_checkpoint_every_resume_bitwise_equal(tmp_path, stop_plan, capsys):
    """Issue 9, item 1: with the default --checkpoint-every no save falls on the stop, so the
    checkpoint written at the stop must hold the generator from before the thrown-away step."""
    flags = ["--steps", "8", *TINY_FLAGS]  # no --checkpoint-every: the default (500)
    stop_plan.new_run()
    assert run(train.main, ["--out", str(tmp_path / "ref"), *flags]) == 0

    out = tmp_path / "run"
    stop_plan.new_run({4: lambda: signal.raise_signal(signal.SIGINT)})  # Ctrl-C during step 4
    assert run(train.main, ["--out", str(out), *flags]) == 0
    err = capsys.readouterr().err
    assert "stopping after this step" in err and "stopped after step 3 (interrupted" in err
    assert reached(out) == 3 and json.loads((out / "config.json").read_text())["trained_steps"] == 3

    # resumed with --max-minutes 1; the clock passes it during the 2nd step of this run (step 5)
    stop_plan.new_run({2: lambda: stop_plan.clock.update(now=61.0)})
    assert run(train.main, ["--out", str(out), "--resume", "--device", "cpu", "--max-minutes", "1"]) == 0
    assert "stopped after step 4 (time limit of 1.0 min" in capsys.readouterr().err
    assert reached(out) == 4

    stop_plan.clock["now"] = 0.0
    stop_plan.new_run()
    assert run(train.main, ["--out", str(out), "--resume", "--device", "cpu"]) == 0
    assert stop_plan.plan == {}  # every planned stop happened
    final = "checkpoints/step-00000008"
    for name in ("model.safetensors", f"{final}/model.safetensors", f"{final}/ema.safetensors",
                 f"{final}/optimizer.safetensors", f"{final}/rng.safetensors"):
        got, want = read_safetensors(out / name), read_safetensors(tmp_path / "ref" / name)
        assert got.keys() == want.keys(), name
        assert all(torch.equal(got[k], want[k]) for k in want), name
    rows = lambda run_dir: [{k: v for k, v in r.items() if k not in ("images_per_s",)}  # noqa: E731
                            for r in csv.DictReader(open(run_dir / "loss.csv"))]
    assert rows(out) == rows(tmp_path / "ref") and len(rows(out)) == 4


def test_second_ctrl_c_quits_without_saving_and_names_the_step_the_model_holds(tmp_path, stop_plan, capsys):
    out = tmp_path / "run"

    def ctrl_c_twice():
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)

    stop_plan.new_run({3: ctrl_c_twice})
    assert run(train.main, ["--out", str(out), "--steps", "8", "--checkpoint-every", "2", *TINY_FLAGS]) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (f"error: interrupted twice, stopped without saving; the last checkpoint, "
                    f"{out / 'checkpoints' / 'step-00000002'}, and {out / 'model.safetensors'} hold step 2")
    assert reached(out) == 2 and json.loads((out / "config.json").read_text())["trained_steps"] == 2
