"""`python -m minidiff.figures`: runs the command in minidiff/tools/figures.py."""
if __name__ == "__main__":
    import runpy
    runpy.run_module("minidiff.tools.figures", run_name="__main__")
