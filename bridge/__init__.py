"""bridge: Stable Diffusion 3.5 through minidiff's calls (`sample`, `img2img`, `inpaint`).

    from bridge import SD3Bridge        # instead of: from minidiff import MiniDiffusionPipeline
    pipe = SD3Bridge.from_pretrained("stabilityai/stable-diffusion-3.5-medium")

Read sd3.py: the wrapper over diffusers' SD3 pipelines, the flow-matching conversions it needs,
and the load errors it explains.
"""

from .sd3 import BridgeError, SD3Bridge

__all__ = ["BridgeError", "SD3Bridge"]
