"""Where and how tensors run: device choice and mixed precision. Library code takes a
device argument; only this module decides what "auto" means."""

from __future__ import annotations

import contextlib

import torch


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """`None` or "auto" -> cuda if present, then mps, then cpu. Anything else is used as given."""
    if device not in (None, "auto"):
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError("device 'mps' was asked for but MPS is not available; use --device cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def precision_for(device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `device`: bf16 on CUDA GPUs that compute it natively (Ampere and
    newer), fp16 on older CUDA cards (Turing: RTX 20xx, GTX 16xx, T4; Volta: V100), where bf16
    is only emulated and slow (fp16 then needs a gradient scaler when training); None (float32)
    on CPU and MPS."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def precision_name(dtype: torch.dtype | None) -> str:
    return {None: "float32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + gradient scaler"}[dtype]


def autocast(device: torch.device, dtype: torch.dtype | None = None):
    """Mixed precision on CUDA with `dtype` (default: `precision_for(device)`); a no-op elsewhere."""
    dtype = dtype or precision_for(device)
    if dtype is not None and device.type == "cuda":
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()
