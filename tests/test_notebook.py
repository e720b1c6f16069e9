"""docs/walkthrough.ipynb: stored with the outputs of a first run at the learners' settings, and run
top to bottom (its FAST settings) by the tests.

The notebook's "by hand" cells (tagged "check") compute an equation in plain tensor code and
assert that the library gives the same numbers; each prints "check passed: NAME (...)" after its
assertions. The run fails if any cell raises, so a broken equality fails the suite; the run
(slow: a kernel and a training run) must print every name of CHECKS from a check cell.

The stored outputs are those of `python tests/notebooks.py docs/walkthrough.ipynb` (its docstring
says when to run it): each code cell carries the digest of the source that made its outputs, so a
cell edited without running that again fails `test_notebook_is_stored_with_the_outputs_of_a_first_run`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import nbformat
import pytest
from notebooks import STAMP, code_cells, execute, source_digest, stderr_of, stdout_of, terminal_text, tidy

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "docs" / "walkthrough.ipynb"
# every by-hand comparison the walkthrough promises, one name per "check passed:" line
CHECKS = {"forward-process", "noise-score", "cfg-bayes", "cfg", "negative-prompt", "ddpm-step", "ddpm-run",
          "ddim-step", "ddim-eta", "img2img", "inpaint-kept", "flow-forward", "flow-step", "flow-run", "flow-ddim",
          "shift", "diffusers-sd3", "sd3-inpaint-kept"}


MAX_BYTES = 1_000_000  # the stored notebook, outputs included
SD3_NOTICES = ("IProgress not found", "_pytree", "Enum subclass", "torchao")  # what importing diffusers printed


def read_notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def tagged(notebook, tag):
    """The one code cell tagged `tag`."""
    cells = [cell for cell in code_cells(notebook) if tag in cell.metadata.get("tags", [])]
    assert len(cells) == 1, f"{len(cells)} cells tagged {tag!r}"
    return cells[0]


def detail_rows(cell) -> dict:
    """The DDIM cell's printout: row name -> (detail, correlation with x_T's)."""
    found = re.findall(r"^\s*(.+?): detail ([\d.]+), correlation with x_T's ([+-][\d.]+)$", stdout_of(cell), re.MULTILINE)
    return {name: (float(detail), float(corr)) for name, detail, corr in found}


def test_notebook_is_stored_with_the_outputs_of_a_first_run():
    """The committed notebook shows its pictures unrun: the outputs of one run top to bottom at the
    learners' settings (FAST off), a first one (the DDPM model trained and kept, make demo's flow
    model loaded), every cell's outputs made by its present source, every check passed, no error,
    no JPEG twin of a PNG, none of the import notices the SD3 section filters, and under 1 MB."""
    notebook = read_notebook()
    nbformat.validate(notebook)
    assert NOTEBOOK.stat().st_size < MAX_BYTES
    cells = code_cells(notebook)
    assert [cell.execution_count for cell in cells] == list(range(1, len(cells) + 1)), "not one run, top to bottom"
    for index, cell in enumerate(cells):
        assert cell.metadata.get(STAMP) == source_digest(cell.source), (
            f"code cell {index}'s outputs are not from its source: python tests/notebooks.py docs/walkthrough.ipynb")
        for output in cell.outputs:
            assert output.output_type != "error", f"code cell {index} failed"
            if output.output_type == "display_data":
                assert "image/png" in output.data and "image/jpeg" not in output.data
    printed = "".join(stdout_of(cell) for cell in cells)
    assert "FAST = False" in printed
    trained = re.search(r"^trained (\d+) steps in (\d+) s\nkept in (.+): the next run loads it$", stdout_of(tagged(notebook, "ddpm-model")),
                        re.MULTILINE)
    assert trained and Path(trained[3]).name == "walkthrough-ddpm", "the stored run is not a first run"
    assert "loaded make demo's flow model in" in stdout_of(tagged(notebook, "flow-model"))
    passed = set(re.findall(r"^check passed: ([\w-]+)", printed, re.MULTILINE))
    assert passed == CHECKS
    pictures = sum("image/png" in o.get("data", {}) for cell in cells for o in cell.outputs)
    assert pictures >= 15
    errors = "".join(stderr_of(cell) for cell in cells)
    assert not [notice for notice in SD3_NOTICES if notice in errors]


def test_stored_run_shows_what_the_ddim_and_inpainting_texts_say():
    """Section 5's text: DDIM at eta 0 is speckled, with x_T's own noise, where DDPM and eta 1 are not.
    Section 6's: the kept half is exact, the replaced half does not always hold the triangle, and where it
    does not, the half-way prediction put all its yellow over the kept half."""
    notebook = read_notebook()
    rows = detail_rows(tagged(notebook, "ddim-rows"))
    steps = int(re.search(r"DDPM (\d+)", " ".join(rows))[1])
    ddpm, ddim, ddim10, eta1 = rows[f"DDPM {steps}"], rows[f"DDIM {steps}"], rows["DDIM 10"], rows["DDIM 10, eta 1"]
    assert min(ddim[0], ddim10[0]) > 2 * max(ddpm[0], eta1[0])  # speckled at eta 0, at 50 steps as at 10
    assert min(ddim[1], ddim10[1]) > 0.3 > max(abs(ddpm[1]), abs(eta1[1]))  # x_T's noise, left in
    printed = stdout_of(tagged(notebook, "inpaint"))
    drawn, n = map(int, re.search(r"in the replaced half: (\d+) of (\d+)", printed).groups())
    result, over_kept, over_replaced = (json.loads(re.search(pattern + r": +(\[.*\])", printed)[1]) for pattern in
                                        ("the replaced half of each result", "over the kept half", "over the replaced half"))
    assert 0 < drawn < n == len(result) == len(over_kept) == len(over_replaced)
    assert drawn == sum(count >= 6 for count in result)
    assert all(over_kept[i] > over_replaced[i] for i in range(n) if result[i] < 6)


def test_tidy_keeps_what_a_front_end_shows():
    """Progress bars keep their last state, a picture its PNG only; other outputs are untouched."""
    assert terminal_text("\r  0%|  | 0/2\r 50%|# | 1/2\r100%|##| 2/2\nsaving\n") == "100%|##| 2/2\nsaving\n"
    assert terminal_text("a\x1b[A\rb\r\n") == "b\n"
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x", outputs=[
        nbformat.v4.new_output("stream", name="stderr", text="\r 1/2"),
        nbformat.v4.new_output("stream", name="stderr", text="\r 2/2\n"),
        nbformat.v4.new_output("stream", name="stdout", text="done\n"),
        nbformat.v4.new_output("display_data", data={"image/png": "iVBO", "image/jpeg": "/9j/", "text/plain": "<PIL>"}),
        nbformat.v4.new_output("display_data", data={"image/jpeg": "/9j/"}),
    ])])
    outputs = tidy(notebook).cells[0].outputs
    assert [(o.output_type, o.get("name")) for o in outputs] == [("stream", "stderr"), ("stream", "stdout"),
                                                                 ("display_data", None), ("display_data", None)]
    assert outputs[0].text == " 2/2\n" and outputs[1].text == "done\n"
    assert set(outputs[2].data) == {"image/png", "text/plain"} and set(outputs[3].data) == {"image/jpeg"}


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


def model_cell_namespace(root, monkeypatch) -> dict:
    """What the model cells find from the cells above them, for a checkout at `root`: FAST off, a short
    training run (the parameters cell's FAST settings, 20 steps), matplotlib off screen, `display` silent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    monkeypatch.setenv("MINIDIFF_FAST", "1")
    parameters = {"os": os, "torch": torch, "DEVICE": torch.device("cpu")}
    run_cells([tagged(read_notebook(), "parameters")], parameters)
    return {"ROOT": root, "FAST": False, "DEVICE": torch.device("cpu"), "TRAIN": {**parameters["TRAIN"], "steps": 20},
            "Path": Path, "plt": plt, "display": lambda *args: None}


def no_training(*args, **kwargs):
    raise AssertionError("trained a model where one should have been loaded")


@pytest.mark.slow
def test_ddpm_cell_trains_once_keeps_the_model_and_loads_it_from_then_on(tmp_path, monkeypatch):
    """FAST off: the first run trains the DDPM model and keeps it in runs/walkthrough-ddpm; a run stopped
    early is not kept; the next run loads the kept model (runs/ddpm first, when it exists) and trains nothing."""
    import tempfile

    from minidiff.tools.trainer import Trainer

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the cell's training folders
    cell = tagged(read_notebook(), "ddpm-model")
    kept = tmp_path / "runs" / "walkthrough-ddpm"
    real_train = Trainer.train
    monkeypatch.setattr(Trainer, "train", lambda self: {**real_train(self), "stop_reason": "interrupted"})
    namespace = model_cell_namespace(tmp_path, monkeypatch)
    printed = run_cells([cell], namespace)
    assert printed.startswith("trained 20 steps in") and not kept.exists()  # stopped early: used, not kept

    monkeypatch.setattr(Trainer, "train", real_train)
    printed = run_cells([cell], namespace)
    assert f"kept in {kept}" in printed and (kept / "model.safetensors").is_file() and (kept / "loss.csv").is_file()
    assert namespace["pipe"].config.objective == "ddpm"

    monkeypatch.setattr(Trainer, "train", no_training)
    assert run_cells([cell], namespace) == f"loaded the DDPM model in {kept}\n"
    namespace["FAST"] = True  # FAST trains its tiny model whatever is kept
    with pytest.raises(AssertionError, match="trained a model where"):
        run_cells([cell], namespace)


@pytest.mark.slow
def test_flow_cell_loads_make_demos_model_when_it_draws_at_the_ddpm_models_size(tmp_path, monkeypatch):
    """FAST off and runs/shapes there (make demo's flow model): loaded, nothing trained; a model of
    another size (the GPU preset's 32 px) is not used, and the cell says why before it trains."""
    from conftest import tiny_train_config

    import tempfile

    from minidiff.tools.trainer import Trainer

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    Trainer(tiny_train_config(tmp_path / "runs" / "shapes", objective="flow")).train()
    cell = tagged(read_notebook(), "flow-model")
    namespace = {**model_cell_namespace(tmp_path, monkeypatch), "size": 16}
    exec("from minidiff import MiniDiffusionPipeline\nfrom minidiff.tools.trainer import Trainer\n"
         "from minidiff.training import TrainConfig\nimport tempfile", namespace)
    monkeypatch.setattr(Trainer, "train", no_training)
    printed = run_cells([cell], namespace)
    assert printed.startswith(f"loaded make demo's flow model in {tmp_path / 'runs' / 'shapes'}\n")
    assert namespace["flow_pipe"].config.objective == "flow"

    namespace["size"] = 32
    with pytest.raises(AssertionError, match="trained a model where"):
        run_cells([cell], namespace)


def test_quiet_imports_cell_drops_its_three_notices_and_nothing_else(monkeypatch):
    """The cell before the SD3 section filters tqdm's IProgress warning, torch's _pytree Enum notice and
    diffusers' torchao notice by their text; another warning or log record from the same places still shows."""
    import logging
    import warnings

    from tqdm import TqdmWarning

    loggers = [logging.getLogger(name) for name in ("torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer")]
    for logger in loggers:
        monkeypatch.setattr(logger, "filters", list(logger.filters))  # restored after the test
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_cells([tagged(read_notebook(), "quiet-imports")], {})
        warnings.warn("IProgress not found. Please update jupyter and ipywidgets.", TqdmWarning)
        warnings.warn("tqdm: another problem", TqdmWarning)
        warnings.warn("IProgress not found, from someone else", UserWarning)
    assert [str(w.message) for w in caught] == ["tqdm: another problem", "IProgress not found, from someone else"]
    for logger in loggers:
        logger.addHandler(handler)
        monkeypatch.setattr(logger, "propagate", False)
    try:
        loggers[0].warning("%s is an Enum subclass and is now natively supported by torch.compile", "<enum 'X'>")
        loggers[0].warning("a real problem in pytree")
        loggers[1].warning("Unable to import `torchao` Tensor objects. This may affect loading checkpoints")
        loggers[1].error("torchao: something else failed")
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert [record.getMessage() for record in records] == ["a real problem in pytree", "torchao: something else failed"]


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


@pytest.mark.slow
def test_notebook_measures_ddim_speckle_and_the_replaced_half_and_imports_diffusers_quietly(executed):
    """Section 5 prints each row's pixel-scale detail and its correlation with x_T's; section 6 what the
    replaced half holds; the SD3 section's cells print none of the import notices the cell before filters."""
    rows = detail_rows(tagged(executed, "ddim-rows"))
    assert list(rows) == ["DDPM 20", "DDIM 20", "DDIM 10", "DDIM 10, eta 1"]  # FAST: 20 steps
    assert all(detail >= 0 and -1 <= corr <= 1 for detail, corr in rows.values())
    printed = stdout_of(tagged(executed, "inpaint"))
    assert re.search(r"^a yellow triangle \(6 or more yellow pixels\) in the replaced half: \d of 8$", printed, re.MULTILINE)
    assert len(re.findall(r"^yellow pixels .*: +\[(?:\d+, ){7}\d+\]$", printed, re.MULTILINE)) == 3
    cells = code_cells(executed)
    sd3 = cells[cells.index(tagged(executed, "quiet-imports")):]
    assert "a tiny random-weight SD3 pipeline stands in" in "".join(stdout_of(cell) for cell in sd3)
    errors = "".join(stderr_of(cell) for cell in sd3)
    assert not [notice for notice in SD3_NOTICES if notice in errors], errors
