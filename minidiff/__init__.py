"""minidiff: text-to-image diffusion from scratch, small enough to read in an afternoon.

Read in this order: scheduler.py (the maths), data.py (toy images), text.py and unet.py
(the networks), model.py, training.py (the objective and loop), pipeline.py (sampling,
img2img, inpainting), evaluate.py (how good is it?), figures.py (the chapter's pictures).
"""

from .contract import ImageOutput, TextToImagePipeline
from .data import Shapes
from .pipeline import MiniDiffusionPipeline
from .scheduler import DDIMScheduler, DDPMScheduler, SchedulerConfig

__all__ = ["DDIMScheduler", "DDPMScheduler", "ImageOutput", "MiniDiffusionPipeline", "SchedulerConfig", "Shapes",
           "TextToImagePipeline"]
__version__ = "0.1.0"
