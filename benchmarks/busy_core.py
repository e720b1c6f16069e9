"""Does a busy core slow the commands down gracefully? Times `python train.py --steps N` and
`python -m minidiff.evaluate` (few samples) on an idle machine and beside a busy-loop process
pinned to one core, under several OpenMP wait policies; prints seconds, CPU seconds and the
ratio busy/idle. The goal: busy at most 2x idle, and the fix no slower than before when idle.

    python -m benchmarks.busy_core                          # all policies, 8 training steps
    python -m benchmarks.busy_core --steps 4 --policies spin passive

Policies (what the command's environment holds; torch reads it when it loads OpenMP). All but
`adaptive` fix the thread count with OMP_NUM_THREADS, which turns minidiff's own choice off:
  adaptive    nothing set: the commands' default (minidiff.tools.cores: one thread fewer for every
              core other programs keep busy)
  before      nothing set, and the thread choice turned off (cores.start replaced by a no-op): the
              commands as they ran before issue 24
  fixed       OMP_NUM_THREADS = the cores: libgomp's default wait (spin ~3 ms, then sleep), as the
              commands ran before issue 24
  spin        the same with OMP_WAIT_POLICY=ACTIVE: OpenMP workers spin while they wait
  spin1000    the same with GOMP_SPINCOUNT=1000: a short spin, then sleep
  passive     the same with OMP_WAIT_POLICY=PASSIVE: no spinning at all
  one-thread  OMP_NUM_THREADS=1

The competitor is a child process in a busy loop, pinned to core 0 (os.sched_setaffinity); it
stops by itself after --busy-limit seconds even if this script is killed. The idle figures mean
something only on an otherwise idle machine: the load average is printed with the results.
Scratch runs go to runs/benchmarks/busy_core/ (deleted and rewritten on each run).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRATCH = ROOT / "runs" / "benchmarks" / "busy_core"
CORES = str(len(os.sched_getaffinity(0)))
POLICIES = {"adaptive": {}, "before": {}, "fixed": {"OMP_NUM_THREADS": CORES},
            "spin": {"OMP_NUM_THREADS": CORES, "OMP_WAIT_POLICY": "ACTIVE"},
            "spin1000": {"OMP_NUM_THREADS": CORES, "GOMP_SPINCOUNT": "1000"},
            "passive": {"OMP_NUM_THREADS": CORES, "OMP_WAIT_POLICY": "PASSIVE"}, "one-thread": {"OMP_NUM_THREADS": "1"}}
# `before`: the command run with minidiff's thread choice turned off
WITHOUT_CORES = "import runpy, sys\nfrom minidiff.tools import cores\ncores.start = lambda: None\n" \
                "target, sys.argv = sys.argv[1], sys.argv[1:]\n" \
                "runpy.run_path(target, run_name='__main__') if target.endswith('.py') else " \
                "runpy.run_module(target, run_name='__main__', alter_sys=True)\n"
# the competitor: spins until its deadline, whatever happens to its parent
BUSY_LOOP = "import os, sys, time\nos.sched_setaffinity(0, {int(sys.argv[1])})\nend = time.monotonic() + float(sys.argv[2])\n" \
            "while time.monotonic() < end:\n    pass\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8, help="training steps per timed run (default 8)")
    p.add_argument("--samples-per-prompt", type=int, default=1, help="evaluate's samples per prompt (default 1)")
    p.add_argument("--eval-steps", type=int, default=10, help="evaluate's denoising steps (default 10)")
    p.add_argument("--policies", nargs="+", choices=sorted(POLICIES), default=list(POLICIES))
    p.add_argument("--commands", nargs="+", choices=["train", "evaluate"], default=["train", "evaluate"])
    p.add_argument("--busy-core", type=int, default=0, help="the core the competitor is pinned to (default 0)")
    p.add_argument("--busy-limit", type=float, default=1800, help="the competitor stops itself after this many s")
    p.add_argument("--skip-idle", action="store_true", help="time only beside the competitor (on a loaded machine "
                                                            "the idle figures mean little anyway)")
    return p.parse_args(argv)


def clean_env(policy: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    return {**env, "PYTHONPATH": str(ROOT), **POLICIES[policy]}


def run_timed(command: list[str], env: dict) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(command)} failed:\n{done.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def commands(args, out: Path) -> dict[str, list[str]]:
    return {"train": [sys.executable, "train.py", "--out", str(out), "--steps", str(args.steps), "--sample-every", "0"],
            "evaluate": [sys.executable, "-m", "minidiff.evaluate", "--model", str(out), "--samples-per-prompt",
                         str(args.samples_per_prompt), "--steps", str(args.eval_steps)]}


def measure(args, policy: str, busy: bool) -> dict[str, tuple[float, float]]:
    """One train run then evaluate on its model, under `policy`, with or without the competitor."""
    out = SCRATCH / f"{policy}-{'busy' if busy else 'idle'}"
    shutil.rmtree(out, ignore_errors=True)
    competitor = subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(args.busy_core), str(args.busy_limit)]) \
        if busy else None
    try:
        found = {}
        for name, command in commands(args, out).items():
            if policy == "before":  # python -c WITHOUT_CORES train.py ... / minidiff.evaluate ...
                command = [sys.executable, "-c", WITHOUT_CORES, *command[2 if command[1] == "-m" else 1:]]
            if name == "train" or name in args.commands:
                found[name] = run_timed(command, clean_env(policy))
        return {name: found[name] for name in args.commands}
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.busy_core not in os.sched_getaffinity(0):
        raise SystemExit(f"error: --busy-core {args.busy_core} is not one of this process's cores "
                         f"{sorted(os.sched_getaffinity(0))}")
    SCRATCH.mkdir(parents=True, exist_ok=True)
    print(f"cores {len(os.sched_getaffinity(0))}, load average {os.getloadavg()[0]:.1f} at the start; "
          f"train.py --steps {args.steps}, evaluate --samples-per-prompt {args.samples_per_prompt} "
          f"--steps {args.eval_steps}", flush=True)
    rows = []
    for policy in args.policies:
        idle = None if args.skip_idle else measure(args, policy, busy=False)
        busy = measure(args, policy, busy=True)
        for name in args.commands:
            b_wall, b_cpu = busy[name]
            line = f"{policy:>10} {name:>8}: busy {b_wall:7.1f} s wall {b_cpu:7.1f} s CPU"
            if idle is not None:
                i_wall, i_cpu = idle[name]
                line += f" | idle {i_wall:7.1f} s wall {i_cpu:7.1f} s CPU | busy/idle {b_wall / i_wall:5.2f}"
            rows.append(line)
            print(line, flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
