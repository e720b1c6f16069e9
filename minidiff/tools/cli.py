"""What the command-line scripts share: turning a user's mistake into one clear line and exit 2."""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

from . import cores
from .checkpoint import CheckpointError
from .pictures import ImageInputError

DEFAULT_MODEL = "runs/shapes"
USER_ERRORS = (CheckpointError, ImageInputError, ValueError, FileNotFoundError, PermissionError, IsADirectoryError)


class UsageError(ValueError):
    """A bad flag combination or value, found before any work starts."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, except that a bad command line becomes one `error: ...` line and exit 2
    (through `run`) instead of the usage text followed by the error."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def writable_folder(folder, flag: str) -> Path:
    """Create `folder` if needed and check that a file can be written in it, before any work
    starts (so a long run cannot fail at its first save)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        blocking = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
        reason = f"{blocking} is a file, not a folder" if blocking else error.strerror or str(error)
        raise UsageError(f"{flag}: cannot write to {folder} ({reason}); choose another folder") from None
    return folder


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """`warnings.formatwarning` for the command line: `warning: MESSAGE`, one line, without the
    file, line and source that Python's default adds (which read like a crash to a user)."""
    return "warning: " + " ".join(str(message).split()) + "\n"


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """`warnings.showwarning` for the command line: the one line on stderr through tqdm.write,
    which lifts an open progress bar out of the way (not `...3.34image/s]warning: ...`)."""
    from tqdm import tqdm

    tqdm.write(one_line_warning(message, category, filename, lineno).rstrip("\n"), file=file or sys.stderr)


def run(main, argv=None) -> int:
    """Call main(argv); a user error prints `error: ...` on stderr and returns 2, no traceback.
    Warnings print as one `warning: ...` line each, on their own line even while a progress bar
    is open. Every script's `__main__` goes through here. A command started from the shell (`argv`
    None) shares the cores with other programs (`cores`); a caller passing `argv`, such as a test,
    keeps its own thread count."""
    if argv is None:
        cores.start()
    warnings.formatwarning = one_line_warning
    warnings.showwarning = show_warning
    try:
        return main(argv) or 0
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def pick_backend(model: str, backend: str = "auto") -> str:
    """auto: a folder with model_index.json, or a Hugging Face id (owner/name that does not look
    like a local path), is sd3; anything else (a minidiff checkpoint folder, the default
    runs/shapes, a typo in a run folder's name) is minidiff."""
    if backend != "auto":
        return backend
    from bridge.sd3 import looks_like_hub_id

    path = Path(model).expanduser()
    if (path / "model_index.json").is_file():
        return "sd3"
    local = path.exists() or path.parts[:1] == ("runs",) or path.parent.is_dir() and path.parent != Path(".")
    return "sd3" if not local and looks_like_hub_id(model) else "minidiff"


def pipeline_class(backend: str):
    """The pipeline class of a backend ("minidiff" or "sd3"), imported only when asked for."""
    if backend == "sd3":
        from bridge import SD3Bridge

        return SD3Bridge
    from .pipeline import MiniDiffusionPipeline

    return MiniDiffusionPipeline


def open_pipeline(model: str, backend: str, device=None, **options):
    """The one place a pipeline is built, for sample.py and app.py (`backend` already resolved by
    `pick_backend`; `options` go to its `from_pretrained`: the SD3 bridge's memory options)."""
    return pipeline_class(backend).from_pretrained(model, device=device, **options)
