"""Sharing the CPU with other programs: how many threads torch uses while something else runs.

torch's OpenMP threads wait for each other at the end of every parallel operation, spinning for a
few milliseconds first. When another program holds one of the cores, a thread is descheduled mid
operation and the others spin until it returns: two threads on two cores with one core taken run
several times slower than one thread. So the commands (everything run through `cli.run`) watch the
machine and use one thread fewer for every core that other programs keep busy, and all the cores
again when they are free:

    cores.start()        # once, when the command starts
    cores.adjust()       # often, from the thread that runs torch, between steps or batches

`adjust` (the first call waits until FIRST_READING seconds have passed) reads the CPU time of this process's cores from /proc/stat at most every `INTERVAL`
seconds; the cores other programs use are the busy time less this process's own. Nice'd programs
count too: Linux shares the CPU between terminal sessions before it looks at nice values
(autogroup), so a nice'd program started elsewhere takes its core all the same. It changes nothing when OMP_NUM_THREADS is set (the
count is then the user's), nor where /proc/stat does not exist (macOS, Windows).

The thread count changes float rounding, so runs on a machine whose load changes are not
bit-identical; OMP_NUM_THREADS=N fixes the count, and with it the numbers.
"""

from __future__ import annotations

import os
import sys
import time

import torch
from tqdm import tqdm

INTERVAL = 2.0  # seconds between readings
FIRST_READING = 0.3  # seconds: a shorter window says too little
STAT = "/proc/stat"

_state: dict | None = None  # None: not started, or not used on this machine


def others_busy(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
    """Cores kept busy by other programs between two `reading()`s: (wall s, busy core-s, own CPU s)."""
    wall = after[0] - before[0]
    if wall <= 0:
        return 0.0
    return max(0.0, ((after[1] - before[1]) - (after[2] - before[2])) / wall)


def reading(cpus, stat: str = STAT) -> tuple[float, float, float]:
    """(monotonic time, busy core-seconds of `cpus`, this process's CPU seconds)."""
    tick = os.sysconf("SC_CLK_TCK")
    busy = 0
    with open(stat) as f:
        for line in f:
            name, *values = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in values[:8])
                busy += user + nice + system + irq + softirq + steal
    own = os.times()
    return time.monotonic(), busy / tick, own.user + own.system


def threads_for(others: float, most: int) -> int:
    """One thread fewer than `most` for every core other programs keep busy, at least one."""
    return max(1, min(most, most - round(others)))


def start() -> None:
    """Begin watching; `adjust` decides after FIRST_READING seconds. Nothing when OMP_NUM_THREADS is set,
    torch has one thread, or /proc/stat cannot be read."""
    global _state
    _state = None
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    most = torch.get_num_threads()
    if "OMP_NUM_THREADS" in os.environ or most < 2 or not cpus:
        return
    try:
        first = reading(cpus)
    except (OSError, ValueError):
        return
    _state = {"cpus": cpus, "most": most, "last": first, "threads": most, "decided": False}


def adjust() -> int | None:
    """Set torch's thread count for the load of the last interval (a line on stderr when it changes);
    -> the count, or None when not watching."""
    if _state is None:
        return None
    waited = time.monotonic() - _state["last"][0]
    if not _state["decided"]:
        time.sleep(max(0.0, FIRST_READING - waited))  # once: the first decision needs a window this long
    elif waited < INTERVAL:
        return _state["threads"]
    try:
        current = reading(_state["cpus"])
    except (OSError, ValueError):
        return _state["threads"]
    others = others_busy(_state["last"], current)
    _state.update(last=current, decided=True)
    threads = threads_for(others, _state["most"])
    if threads != _state["threads"] or threads != torch.get_num_threads():
        torch.set_num_threads(threads)
        if threads != _state["threads"]:
            why = (f"other programs keep {others:.1f} of {len(_state['cpus'])} cores busy"
                   if threads < _state["most"] else "the cores are free again")
            tqdm.write(f"{why}: {threads} torch thread{'s' * (threads > 1)} (OMP_NUM_THREADS fixes the count)",
                       file=sys.stderr)  # above an open progress bar
        _state["threads"] = threads
    return threads
