"""What the command-line scripts share: turning a user's mistake into one clear line and exit 2."""

from __future__ import annotations

import sys
import warnings

from .checkpoint import CheckpointError
from .images import ImageInputError

USER_ERRORS = (CheckpointError, ImageInputError, ValueError, FileNotFoundError, PermissionError, IsADirectoryError)


class UsageError(ValueError):
    """A bad flag combination or value, found before any work starts."""


def run(main, argv=None) -> int:
    """Call main(argv); a user error prints `error: ...` on stderr and returns 2, no traceback."""
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
    try:
        return main(argv) or 0
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
