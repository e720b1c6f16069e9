"""minidiff: text-to-image diffusion from scratch, shaped like Stable Diffusion 3.5's components.

Read in this order (`python -m minidiff.tools.lines` counts them):
  scheduler.py, flow.py   the forward processes, objectives and samplers (DDPM, DDIM; rectified flow, Euler)
  data.py                 the toy images and their captions
  text.py, unet.py        the text encoder and the denoising network (or mmdit.py: SD3.5's, --backbone mmdit)
  model.py                the components under one config
  training.py             the loss, one training step, a short loop
  autoencoder.py          latents: a small VAE, and SD3's (z - shift) * scale (latent models, docs/latent.ipynb)
  images.py, contract.py, pipeline.py   sampling, img2img and inpainting through one loop
  runtime.py, checkpoint.py             devices; saving and loading (safetensors + JSON)
Everything around the lesson (the full trainer, data folders, the app, evaluation, figures) is in
`minidiff.tools`; the Stable Diffusion 3.5 bridge is the `bridge` package.
"""

import os as _os

# OpenMP's worker threads spin-wait for each other by default: on a machine whose cores are busy
# with other work, a descheduled thread makes all the others spin, and training ran 10x slower
# (17.5 s a step) instead of 2x (1.9 s with passive waiting). Set before torch loads OpenMP, so
# it holds when minidiff is imported first (the commands do it themselves); a user's own setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .contract import ImageOutput, TextToImagePipeline
from .data import Shapes
from .pipeline import MiniDiffusionPipeline
from .scheduler import DDIMScheduler, DDPMScheduler, SchedulerConfig
from .training import TrainConfig, train

__all__ = ["DDIMScheduler", "DDPMScheduler", "ImageOutput", "MiniDiffusionPipeline", "SchedulerConfig", "Shapes",
           "TextToImagePipeline", "TrainConfig", "train"]
__version__ = "0.1.0"
