"""`python -m minidiff.evaluate`: runs the command in minidiff/tools/evaluate.py."""
if __name__ == "__main__":
    import runpy
    runpy.run_module("minidiff.tools.evaluate", run_name="__main__")
