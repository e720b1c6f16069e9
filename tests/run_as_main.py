"""Run a command line in this process as `python ARGV...` would, and return its exit status.

The forked script servers of tests/test_readme.py and tests/test_cli_errors.py call this in each
child: they import torch once and fork a process per command, instead of starting a fresh
interpreter (and importing torch) each time."""

from __future__ import annotations

import os
import runpy
import sys
import traceback


def run_as_main(argv: list[str]) -> int:
    """`-m MODULE args`, `-c CODE args` or `SCRIPT args`, run as __main__ with sys.argv and
    sys.path[0] as Python sets them. SystemExit gives its status (a message: printed, status 1);
    any other exception prints its traceback, status 1. Standard streams are flushed."""
    try:
        if argv[0] == "-m":
            sys.argv, sys.path[0] = argv[1:], os.getcwd()
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        elif argv[0] == "-c":
            sys.argv, sys.path[0] = ["-c", *argv[2:]], ""
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
        else:
            sys.argv, sys.path[0] = argv, os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
        if not isinstance(stop.code, (int, type(None))):
            print(stop.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code
