"""What the notebook tests share: the code cells, a cell's printed text, and one run of a notebook
top to bottom in a fresh kernel with its FAST settings, from docs/ (as a learner opens it)."""

from __future__ import annotations

import os

import nbclient
import nbformat


def code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def stdout_of(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


def stderr_of(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == "stderr")


def execute(path):
    """The notebook at `path`, run; a failing cell (or assertion) raises CellExecutionError naming it."""
    notebook = nbformat.read(path, as_version=4)
    env = dict(os.environ, MINIDIFF_FAST="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env.pop("PYTHONPATH", None)  # the notebook's first cell must find this checkout by itself
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute(env=env)
    return notebook
