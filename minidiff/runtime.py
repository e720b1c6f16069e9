"""Where tensors run: the device for "auto", and mixed precision."""

from __future__ import annotations

import contextlib

import torch


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """`None` or "auto" -> cuda if present, then mps, then cpu. Anything else is used as given."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available()
                            else "cpu")
    device = torch.device(device)
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}.get(device.type)
    if available is not None and not available():
        raise ValueError(f"device {device.type!r} was asked for but is not available here; use --device cpu")
    return device


def precision_for(device: torch.device, training: bool = False, mixed_precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype (None: float32) for `mixed_precision` "no", "bf16" or "fp16" (diffusers' scripts'
    choices) as asked; for "auto", bf16 on CUDA GPUs that compute it natively (Ampere on), else fp16 (with a
    gradient scaler), and for training on a CPU with bf16 instructions (x86 AVX512-BF16, which AMX CPUs have)
    bf16; float32 elsewhere, on MPS, and for sampling on a CPU."""
    if mixed_precision != "auto":
        return {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]
    if device.type == "cpu":
        native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)  # a private check: absent, float32
        return torch.bfloat16 if training and native() else None
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision with `dtype` (`precision_for`'s choice); float32 when it is None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
