"""docs/mmdit.ipynb: kept without outputs, and run top to bottom (its FAST settings) by the tests, as
tests/test_notebook.py runs the walkthrough. Its "by hand" cells (tagged "check") compute the joint
attention, the whole forward pass and adaLN-Zero in plain tensor code and assert that the library agrees;
each prints "check passed: NAME (...)" after its assertions, so a broken equality fails the run."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from notebooks import code_cells, execute, stdout_of

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "docs" / "mmdit.ipynb"
CHECKS = {"joint-attention", "mmdit-forward", "adaln-zero", "from-diffusers"}
PASSED = re.compile(r"check passed: ([\w-]+)")


def test_notebook_is_stored_without_outputs_and_names_its_checks():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    cells = code_cells(notebook)
    for index, cell in enumerate(cells):
        assert cell.outputs == [] and cell.execution_count is None, f"code cell {index} holds outputs: strip them"
    parameters = [cell for cell in cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(parameters) == 1 and 'FAST = bool(os.environ.get("CI") or os.environ.get("MINIDIFF_FAST"))' in \
        parameters[0].source
    checks = [cell for cell in cells if "check" in cell.metadata.get("tags", [])]
    assert {name for cell in checks for name in PASSED.findall(cell.source)} == CHECKS
    for cell in checks:  # each asserts, and only prints once past its assertions
        assert "assert" in cell.source and cell.source.index("assert") < cell.source.index("check passed")


@pytest.fixture(scope="module")
def executed():
    """Run top to bottom in a fresh kernel with FAST settings, from docs/ (as a learner opens it)."""
    return execute(NOTEBOOK)


@pytest.mark.slow
def test_notebook_runs_its_checks_and_draws_the_attention(executed):
    cells = code_cells(executed)
    assert all(cell.execution_count is not None for cell in cells)
    assert f"minidiff from {ROOT / 'minidiff'};" in stdout_of(cells[0]) and "FAST = True" in stdout_of(cells[1])
    passed = set()
    for cell in cells:
        found = re.findall(r"^check passed: ([\w-]+)", stdout_of(cell), re.MULTILINE)
        assert not found or "check" in cell.metadata.get("tags", [])
        passed.update(found)
    assert passed == CHECKS
    attention = next(cell for cell in cells if "def word_attention" in cell.source)
    assert any("image/png" in o.get("data", {}) for o in attention.outputs)  # the picture was drawn
    shares = re.findall(r"^  (red|circle) +([\d. ]+)$", stdout_of(attention), re.MULTILINE)
    assert [word for word, _ in shares] == ["red", "circle"]
    assert all(0 <= float(v) <= 1 for _, values in shares for v in values.split())
