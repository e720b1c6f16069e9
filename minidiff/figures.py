"""`python -m minidiff.figures --model runs/shapes --out figures-out`: the command lives here, its code in minidiff/tools/figures.py."""

if __name__ == "__main__":
    import sys

    from minidiff.tools.cli import run
    from minidiff.tools.figures import main

    sys.exit(run(main))
