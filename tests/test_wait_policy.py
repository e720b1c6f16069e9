"""Issue 24, item 1: every command sets a non-spinning OpenMP wait policy before torch loads
OpenMP (spinning workers made training 10x slower on a busy core), and a user's own setting wins."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Runs a command with a finder that, at the first `import torch`, prints OMP_WAIT_POLICY as it is
# then and exits: what OpenMP would read, found without loading torch.
PROBE = """
import os, runpy, sys
class Probe:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print(os.environ.get("OMP_WAIT_POLICY"), flush=True)
            os._exit(0)
sys.meta_path.insert(0, Probe())
kind, target = sys.argv[1], sys.argv[2]
sys.argv = [target, "--help"]
runpy.run_module(target, run_name="__main__", alter_sys=True) if kind == "module" else runpy.run_path(target, run_name="__main__")
print("torch never imported")
"""
COMMANDS = [("path", "train.py"), ("path", "sample.py"), ("path", "app.py"), ("module", "minidiff.evaluate"),
            ("module", "minidiff.figures")]


def policy_at_torch_import(kind: str, target: str, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    environ.update(PYTHONPATH=str(ROOT), **env)
    done = subprocess.run([sys.executable, "-c", PROBE, kind, target], cwd=ROOT, env=environ, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("kind,target", COMMANDS)
def test_every_command_sets_a_passive_wait_policy_before_torch_loads(kind, target):
    assert policy_at_torch_import(kind, target) == "PASSIVE"


def test_the_users_own_wait_policy_wins():
    assert policy_at_torch_import("path", "train.py", OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"
    assert policy_at_torch_import("module", "minidiff.evaluate", OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"
