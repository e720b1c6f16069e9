"""What the notebook tests share: the code cells, a cell's printed text, and one run of a notebook
top to bottom in a fresh kernel, from docs/ (as a learner opens it): with its FAST settings for the
tests, or with the learners' settings to store its outputs.

docs/walkthrough.ipynb is kept with the outputs of such a run, so that it shows its pictures before
anyone runs it. To make them again (a first run: `make demo`'s model in runs/shapes, no
runs/walkthrough-ddpm or runs/ddpm yet; some 5 minutes on 2 CPU cores):

    python tests/notebooks.py docs/walkthrough.ipynb

`store` tidies the outputs as a notebook front end would show them (each progress bar's last state,
one PNG per picture rather than a PNG and a JPEG) and stamps every code cell with a digest of the
source it ran, so that tests/test_notebook.py can tell outputs that no longer match their cell.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path

import nbclient
import nbformat

STAMP = "executed_source_sha256"  # code cell metadata: the digest of the source whose outputs are stored
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # terminal control sequences (tqdm's cursor moves)


def code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def stdout_of(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


def stderr_of(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == "stderr")


def source_digest(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


def execute(path, fast: bool = True, timeout: int | None = 300):
    """The notebook at `path`, run; a failing cell (or assertion) raises CellExecutionError naming it.
    fast: MINIDIFF_FAST=1 and one thread unless OMP_NUM_THREADS says otherwise (the tests); otherwise the
    learners' settings in this process's environment, without MINIDIFF_FAST and CI."""
    path = Path(path)
    notebook = nbformat.read(path, as_version=4)
    env = dict(os.environ)
    if fast:
        env.update(MINIDIFF_FAST="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    else:
        env.pop("MINIDIFF_FAST", None)
        env.pop("CI", None)
    env.pop("PYTHONPATH", None)  # the notebook's first cell must find this checkout by itself
    client = nbclient.NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute(env=env)
    return notebook


def terminal_text(text: str) -> str:
    """What a terminal shows of `text`: each line's last carriage-return segment, control sequences dropped."""
    lines = []
    for line in ANSI.sub("", text).split("\n"):
        segments = [segment for segment in line.split("\r") if segment]
        lines.append(segments[-1] if segments else "")
    return "\n".join(lines)


def tidy(notebook):
    """Outputs as a front end shows them: consecutive stream outputs of one name joined and resolved by
    `terminal_text` (a progress bar keeps its last state), and a picture offered as PNG and JPEG kept as PNG."""
    for cell in code_cells(notebook):
        outputs = []
        for output in cell.outputs:
            if output.output_type == "stream" and outputs and outputs[-1].output_type == "stream" \
                    and outputs[-1].name == output.name:
                outputs[-1].text += output.text
                continue
            if output.output_type in ("display_data", "execute_result") and "image/png" in output.data:
                output.data.pop("image/jpeg", None)
            outputs.append(output)
        for output in outputs:
            if output.output_type == "stream":
                output.text = terminal_text(output.text)
        cell.outputs = outputs
    return notebook


def store(path) -> Path:
    """Run the notebook at `path` with the learners' settings and write it back with its outputs, tidied
    and stamped (see the module's docstring)."""
    path = Path(path)
    notebook = tidy(execute(path, fast=False, timeout=None))
    for cell in code_cells(notebook):
        cell.metadata[STAMP] = source_digest(cell.source)
    nbformat.validate(notebook)
    nbformat.write(notebook, path)
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/notebooks.py NOTEBOOK.ipynb   (runs it with the learners' settings, "
                 "stores its outputs)")
    written = store(sys.argv[1])
    print(f"wrote {written} ({written.stat().st_size / 1e3:.0f} kB)")
