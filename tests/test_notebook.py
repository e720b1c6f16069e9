"""docs/walkthrough.ipynb: kept without outputs, and run top to bottom (its FAST settings) by the tests.

The notebook's "by hand" cells (tagged "check") compute an equation in plain tensor code and
assert that the library gives the same numbers; each prints "check passed: NAME (...)" after its
assertions. The run fails if any cell raises, so a broken equality fails the suite; the run
(slow: a kernel and a training run) must print every name of CHECKS from a check cell.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from notebooks import code_cells, execute, stdout_of

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "docs" / "walkthrough.ipynb"
# every by-hand comparison the walkthrough promises, one name per "check passed:" line
CHECKS = {"forward-process", "noise-score", "cfg-bayes", "cfg", "negative-prompt", "ddpm-step", "ddpm-run",
          "ddim-step", "ddim-eta", "img2img", "inpaint-kept", "flow-forward", "flow-step", "flow-run", "flow-ddim",
          "shift", "diffusers-sd3", "sd3-inpaint-kept"}


def read_notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def test_notebook_is_stored_without_outputs():
    """Outputs stripped in git: small diffs, nothing stale; the tests make the outputs."""
    notebook = read_notebook()
    nbformat.validate(notebook)
    for index, cell in enumerate(code_cells(notebook)):
        assert cell.outputs == [] and cell.execution_count is None, f"code cell {index} holds outputs: strip them"


def run_cells(cells, namespace: dict) -> str:
    """Run code cells' sources in `namespace` as plain Python; -> what they printed."""
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for cell in cells:
            exec(compile(cell.source, "<notebook cell>", "exec"), namespace)
    return printed.getvalue()


def test_setup_cell_finds_this_checkout_and_the_parameters_cell_reads_fast_from_the_environment(monkeypatch):
    """The first cell, run from docs/ with everything installed, finds this checkout, installs
    nothing and picks the device; the one cell tagged "parameters" (papermill's) sets FAST from
    MINIDIFF_FAST or CI, and FAST's settings are a smaller run than the learner's."""
    import subprocess
    import sys

    import torch

    from minidiff.runtime import pick_device
    from minidiff.training import TrainConfig

    cells = code_cells(read_notebook())
    parameters = [cell for cell in cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(parameters) == 1 and cells.index(parameters[0]) == 1  # right after the setup, before any work
    installs = []
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: installs.append(args))
    monkeypatch.setattr(sys, "path", list(sys.path))  # the setup cell puts the checkout first
    monkeypatch.chdir(NOTEBOOK.parent)
    namespace = {}
    printed = run_cells(cells[:1], namespace)
    assert namespace["ROOT"] == ROOT and sys.path[0] == str(ROOT) and installs == []
    assert namespace["DEVICE"] == pick_device() and isinstance(namespace["DEVICE"], torch.device)
    assert f"minidiff from {ROOT / 'minidiff'}; device {namespace['DEVICE']}" in printed

    settings = {}
    for env in ({}, {"MINIDIFF_FAST": "1"}, {"CI": "true"}):
        for name in ("MINIDIFF_FAST", "CI"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        printed = run_cells(parameters, namespace)
        fast = bool(env)
        assert namespace["FAST"] is fast and printed.strip().endswith(f"FAST = {fast}")
        config = TrainConfig(out="unused", **namespace["TRAIN"])  # every setting is a real TrainConfig field
        settings[fast] = (config.steps * config.batch_size, config.base_channels, namespace["STEPS"])
    (fast_images, fast_width, fast_steps), (full_images, full_width, full_steps) = settings[True], settings[False]
    assert fast_images < full_images and fast_width <= full_width and fast_steps < full_steps


@pytest.fixture(scope="module")
def executed():
    """The notebook run top to bottom in a fresh kernel with FAST settings, from docs/ (as a learner opens it)."""
    return execute(NOTEBOOK)


@pytest.mark.slow
def test_notebook_runs_every_cell_with_this_checkout(executed):
    cells = code_cells(executed)
    assert all(cell.execution_count is not None for cell in cells)
    setup = "".join(stdout_of(cell) for cell in cells[:3])
    assert f"minidiff from {ROOT / 'minidiff'};" in setup and "FAST = True" in setup


@pytest.mark.slow
def test_notebook_by_hand_cells_pass_their_assertions(executed):
    """Every check cell ran to its end: its assert_close calls held (a failing one stops the run)."""
    passed = set()
    for cell in code_cells(executed):
        found = re.findall(r"^check passed: ([\w-]+)", stdout_of(cell), re.MULTILINE)
        if found:
            assert "check" in cell.metadata.get("tags", [])
        passed.update(found)
    assert passed == CHECKS
