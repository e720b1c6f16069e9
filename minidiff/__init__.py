"""minidiff: text-to-image diffusion from scratch, shaped like Stable Diffusion 3.5's components.
Read the files in the README's order; the machinery around them is `minidiff.tools`, and the Stable
Diffusion 3.5 bridge is the `bridge` package."""

from .tools.contract import ImageOutput, TextToImagePipeline
from .tools.pipeline import MiniDiffusionPipeline
from .training import TrainConfig, train

__all__ = ["ImageOutput", "MiniDiffusionPipeline", "TextToImagePipeline", "TrainConfig", "train"]
__version__ = "0.1.0"
