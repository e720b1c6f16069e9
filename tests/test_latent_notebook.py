"""docs/latent.ipynb: kept without outputs, and run top to bottom (its FAST settings) by the tests;
each "check" cell asserts that its by-hand computation equals the library, then prints "check passed: NAME"."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from notebooks import code_cells, execute, stdout_of

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "docs" / "latent.ipynb"
CHECKS = {"encode-decode", "latent-scaling", "step-cost"}


def test_latent_notebook_is_stored_without_outputs_and_names_its_checks():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    cells = code_cells(notebook)
    assert all(cell.outputs == [] and cell.execution_count is None for cell in cells)
    parameters = [cell for cell in cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(parameters) == 1 and 'FAST = bool(os.environ.get("CI") or os.environ.get("MINIDIFF_FAST"))' in \
        parameters[0].source
    checks = [cell for cell in cells if "check" in cell.metadata.get("tags", [])]
    assert {name for cell in checks for name in re.findall(r"check passed: ([\w-]+)", cell.source)} == CHECKS
    for cell in checks:  # each asserts, and only prints once past its assertions
        assert "assert" in cell.source and cell.source.index("assert") < cell.source.index("check passed")
    assert "FlopCounterMode" in "".join(cell.source for cell in checks)  # counted, not guessed


@pytest.mark.slow
def test_latent_notebook_runs_and_its_checks_pass():
    notebook = execute(NOTEBOOK)  # raises CellExecutionError, naming the cell, if any cell (or assertion) fails
    out = "".join(stdout_of(cell) for cell in code_cells(notebook))
    assert f"minidiff from {ROOT / 'minidiff'};" in out and "FAST = True" in out
    assert set(re.findall(r"^check passed: ([\w-]+)", out, re.MULTILINE)) == CHECKS
    images = [o for cell in code_cells(notebook) for o in cell.outputs if "image/png" in o.get("data", {})]
    assert images  # the latent channels' picture
