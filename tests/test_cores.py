"""Issue 24, item 1: the commands use one torch thread fewer for every core other programs keep
busy (two threads collapse when one of two cores is taken), and all of them again when it is free."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from minidiff.tools import cores

ROOT = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")


def stat_file(path: Path, per_cpu: dict[int, tuple[int, ...]]) -> Path:
    """A /proc/stat with the given cpuN lines (user nice system idle iowait irq softirq steal), in ticks."""
    lines = ["cpu  " + " ".join(str(sum(v[i] for v in per_cpu.values())) for i in range(8)) + " 0 0"]
    lines += [f"cpu{n} " + " ".join(map(str, values)) + " 0 0" for n, values in per_cpu.items()]
    path.write_text("\n".join(lines + ["intr 1 2 3", "ctxt 99"]) + "\n")
    return path


def test_reading_counts_the_busy_time_of_this_process_cores_only(tmp_path):
    # cpu1 is not ours; cpu0's idle time (7 s) is not busy; user + nice + system + irq + softirq + steal
    # are (1 + 5 + 2 + 3 + 4 + 6 s)
    stat = stat_file(tmp_path / "stat", {0: (TICK, 5 * TICK, 2 * TICK, 7 * TICK, 0, 3 * TICK, 4 * TICK, 6 * TICK),
                                         1: (100 * TICK, 0, 0, 0, 0, 0, 0, 0)})
    _, busy, own = cores.reading({0}, stat=str(stat))
    assert busy == pytest.approx(21.0)
    assert own > 0  # this process has used some CPU time


def test_other_programs_load_is_the_busy_time_less_our_own():
    # 10 s of wall: 15 core-seconds busy, 6 of them ours: others kept 0.9 of a core busy
    assert cores.others_busy((0.0, 100.0, 50.0), (10.0, 115.0, 56.0)) == pytest.approx(0.9)
    assert cores.others_busy((0.0, 100.0, 50.0), (10.0, 110.0, 61.0)) == 0.0  # never below zero
    assert cores.threads_for(0.0, 2) == 2
    assert cores.threads_for(0.9, 2) == 1
    assert cores.threads_for(1.8, 2) == 1  # at least one
    assert cores.threads_for(1.2, 8) == 7
    assert cores.threads_for(0.3, 8) == 8


@pytest.fixture
def watched(monkeypatch):
    """cores started with 2 threads allowed and readings that the test feeds; torch's count restored."""
    readings = []
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: watched_threads[0])
    watched_threads = [2]
    monkeypatch.setattr(torch, "set_num_threads", lambda n: watched_threads.__setitem__(0, n))
    monkeypatch.setattr(cores.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(cores, "reading", lambda cpus: readings.pop(0))
    monkeypatch.setattr(cores, "FIRST_READING", 0.0)
    monkeypatch.setattr(cores, "INTERVAL", 0.0)
    readings.append((0.0, 0.0, 0.0))
    cores.start()
    yield readings, watched_threads
    cores._state = None


def test_adjust_drops_a_thread_while_another_program_is_busy_and_takes_it_back(watched, capsys):
    readings, threads = watched
    readings.append((10.0, 19.0, 10.0))  # 19 core-s busy in 10 s, 10 of them ours: others 0.9 core
    assert cores.adjust() == 1 and threads == [1]
    assert "other programs keep 0.9 of 2 cores busy: 1 torch thread" in capsys.readouterr().err
    readings.append((20.0, 29.0, 20.0))  # ours only
    assert cores.adjust() == 2 and threads == [2]
    assert "the cores are free again: 2 torch threads" in capsys.readouterr().err
    readings.append((30.0, 39.0, 30.0))
    assert cores.adjust() == 2
    assert capsys.readouterr().err == ""  # no line when nothing changes


def test_adjust_reads_the_machine_at_most_every_interval(watched, monkeypatch):
    readings, threads = watched
    readings.append((10.0, 19.0, 10.0))
    assert cores.adjust() == 1
    monkeypatch.setattr(cores, "INTERVAL", 60.0)
    monkeypatch.setattr(cores, "time", SimpleNamespace(monotonic=lambda: 30.0, sleep=time.sleep))  # 20 s later
    assert cores.adjust() == 1 and threads == [1]  # no reading taken (none is left to take)


def test_nothing_is_watched_when_the_user_sets_the_thread_count(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    cores.start()
    assert cores._state is None and cores.adjust() is None


def test_a_caller_passing_argv_keeps_its_own_thread_count(monkeypatch):
    """Tests call `cli.run(main, argv)`: only a command started from the shell watches the cores."""
    from minidiff.tools.cli import run

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores._state = None
    assert run(lambda argv: 0, []) == 0
    assert cores._state is None


@pytest.mark.slow
@pytest.mark.skipif(not Path(cores.STAT).exists() or len(os.sched_getaffinity(0)) < 2,
                    reason="needs /proc/stat and two cores")
def test_train_uses_fewer_threads_beside_a_busy_loop(tmp_path):
    """train.py beside a process spinning on one of our cores says so and drops a thread."""
    core = min(os.sched_getaffinity(0))
    busy = subprocess.Popen([sys.executable, "-c", "import os, time\nos.sched_setaffinity(0, {%d})\n"
                             "end = time.monotonic() + 120\nwhile time.monotonic() < end:\n    pass\n" % core])
    try:
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        env["PYTHONPATH"] = str(ROOT)
        done = subprocess.run([sys.executable, "train.py", "--steps", "3", "--sample-every", "0", "--image-size", "16",
                               "--base-channels", "16", "--out", str(tmp_path / "run")],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    finally:
        busy.kill()
        busy.wait()
    assert done.returncode == 0, done.stderr[-2000:]
    assert "other programs keep" in done.stderr and "torch thread" in done.stderr, done.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("target", ["train.py", "minidiff.evaluate"])
def test_the_benchmarks_before_policy_runs_a_command_without_the_thread_choice(target):
    """benchmarks/busy_core.py's `before`: the command itself, with cores.start a no-op."""
    from benchmarks.busy_core import WITHOUT_CORES

    probe = WITHOUT_CORES.replace("cores.start = lambda: None",
                                  "cores.start = lambda: print('start skipped', flush=True)")
    done = subprocess.run([sys.executable, "-c", probe, target, "--help"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "start skipped" in done.stdout and "usage:" in done.stdout


def test_every_batch_a_pipeline_draws_first_adjusts_the_thread_count(tiny_pipe, monkeypatch):
    """The contract's batch loop is where sampling, evaluation and the app share the cores, either backend."""
    calls = []
    monkeypatch.setattr(cores, "adjust", lambda: calls.append(1))
    tiny_pipe.sample(["a red circle"] * 3, num_inference_steps=1, batch_size=1, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 3
