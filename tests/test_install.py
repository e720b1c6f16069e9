"""Issue 24, item 7: `make install` (and so `make demo` and `make test`) installs what the README says,
and `TORCH_INDEX=cpu` takes PyTorch's CPU-only torch and torchvision first. Run with a stand-in
python that only logs its arguments: the pip commands make runs, without downloading anything."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def make_install(tmp_path: Path, *variables: str) -> list[str]:
    """`make install` in a new venv folder; -> the stand-in pythons' calls, one a line."""
    log, venv = tmp_path / "calls.log", tmp_path / "venv"
    shutil.rmtree(venv, ignore_errors=True)
    log.unlink(missing_ok=True)
    stub = tmp_path / "python3"  # `python3 -m venv DIR` makes DIR/bin/python, a logger like itself
    stub.write_text(f'#!/bin/sh\necho "$*" >> {log}\n'
                    f'if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; fi\n')
    stub.chmod(0o755)
    done = subprocess.run(["make", "-s", "install", f"PYTHON={stub}", f"VENV={venv}", *variables], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (venv / ".installed").is_file()
    return log.read_text().splitlines()


def test_make_install_installs_the_readmes_extras(tmp_path):
    calls = make_install(tmp_path)
    assert calls[0] == f"-m venv {tmp_path / 'venv'}"
    assert [call for call in calls[1:] if "pip install" in call] == [
        "-m pip install --quiet --disable-pip-version-check -e .[test,app]"]
    readme = (ROOT / "README.md").read_text()
    assert "`pip install -e '.[test,app]'`" in readme  # the README names the same extras


def test_torch_index_cpu_installs_cpu_only_torch_first(tmp_path):
    calls = make_install(tmp_path, "TORCH_INDEX=cpu")
    pips = [call for call in calls if "pip install" in call]
    assert pips == [f"-m pip install --quiet --disable-pip-version-check torch torchvision --index-url {CPU_INDEX}",
                    "-m pip install --quiet --disable-pip-version-check -e .[test,app]"]
    readme = " ".join((ROOT / "README.md").read_text().split())  # its lines joined
    assert "`make demo TORCH_INDEX=cpu`" in readme
    assert f"`pip install torch torchvision --index-url {CPU_INDEX}`" in readme
    assert re.search(r"\b6\.2 GB\b", readme) and "1.6 GB" in readme  # the sizes, both ways
