"""`python -m minidiff.evaluate --model runs/shapes`: the command lives here, its code in minidiff/tools/evaluate.py."""

if __name__ == "__main__":
    import sys

    from minidiff.tools.cli import run
    from minidiff.tools.evaluate import main

    sys.exit(run(main))
