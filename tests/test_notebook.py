"""docs/walkthrough.ipynb: kept without outputs, and run top to bottom (its FAST settings) by the tests.

The notebook's "by hand" cells (tagged "check") compute an equation in plain tensor code and
assert that the library gives the same numbers; each prints "check passed: NAME (...)" after its
assertions. The run fails if any cell raises, so a broken equality fails the suite.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "docs" / "walkthrough.ipynb"
# every by-hand comparison the walkthrough promises, one name per "check passed:" line
CHECKS = {"forward-process", "noise-score", "cfg-bayes", "cfg", "negative-prompt", "ddpm-step", "ddpm-run",
          "ddim-step", "ddim-eta", "img2img", "inpaint-kept", "flow-forward", "flow-step", "flow-run", "flow-ddim",
          "shift", "diffusers-sd3", "sd3-inpaint-kept"}
PASSED = re.compile(r"check passed: ([\w-]+)")  # the line a check cell prints after its assertions


def read_notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def stdout_of(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


def test_notebook_is_stored_without_outputs():
    """Outputs stripped in git: small diffs, nothing stale; the tests make the outputs."""
    notebook = read_notebook()
    nbformat.validate(notebook)
    for index, cell in enumerate(code_cells(notebook)):
        assert cell.outputs == [] and cell.execution_count is None, f"code cell {index} holds outputs: strip them"


def test_notebook_has_a_parameters_cell_and_its_checks():
    cells = code_cells(read_notebook())
    assert "pip" in cells[0].source and "pick_device" in cells[0].source  # the first cell installs, picks the device
    parameters = [cell for cell in cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(parameters) == 1 and 'FAST = bool(os.environ.get("CI") or os.environ.get("MINIDIFF_FAST"))' in \
        parameters[0].source
    checks = [cell for cell in cells if "check" in cell.metadata.get("tags", [])]
    named = {name for cell in checks for name in PASSED.findall(cell.source)}
    assert named == CHECKS
    for cell in checks:  # each compares with an assertion, and only prints once past it
        assert "assert" in cell.source and cell.source.index("assert") < cell.source.index("check passed")


@pytest.fixture(scope="module")
def executed():
    """The notebook run top to bottom in a fresh kernel with FAST settings, from docs/ (as a learner opens it)."""
    notebook = read_notebook()
    # no PYTHONPATH: the notebook's first cell must find this checkout by itself
    env = dict(os.environ, MINIDIFF_FAST="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env.pop("PYTHONPATH", None)
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute(env=env)  # raises CellExecutionError, naming the cell, if any cell fails
    return notebook


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
