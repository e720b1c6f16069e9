"""What surrounds the lesson: the full trainer (checkpoints, resume, signals, torchrun, logs),
other data sets, the command-line helpers, the web app, evaluation, figures and picture grids.
These modules import the lesson (`minidiff/*.py`); the lesson never imports them."""
