"""What surrounds the lesson: `MiniDiffusionPipeline` (the lesson's pipeline behind the contract every
backend answers, PIL images in and out), the full trainer (checkpoints, resume, signals, torchrun, logs),
model folders, other data sets, the command-line helpers, the web app, evaluation, figures and pictures.
These modules import the lesson (`minidiff/*.py`); the lesson never imports them."""
