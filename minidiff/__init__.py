"""minidiff: text-to-image diffusion from scratch, shaped like Stable Diffusion 3.5's components.
Read the files in the README's order; the machinery around them is `minidiff.tools`, and the Stable
Diffusion 3.5 bridge is the `bridge` package."""

import os as _os

# OpenMP's idle threads spin by default, and a machine busy with other work then runs 10x slower, not
# 2x: wait passively instead. Set before torch loads OpenMP; a user's own setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .tools.contract import ImageOutput, TextToImagePipeline
from .tools.pipeline import MiniDiffusionPipeline
from .training import TrainConfig, train

__all__ = ["ImageOutput", "MiniDiffusionPipeline", "TextToImagePipeline", "TrainConfig", "train"]
__version__ = "0.1.0"
