"""Where tensors run: the device for "auto", and mixed precision where the hardware computes it natively."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

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


@functools.cache
def cpu_computes_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True on x86 CPUs with AVX512-BF16 or AMX-BF16 (flags of `cpuinfo`), where oneDNN runs bf16
    matrix products natively; elsewhere bf16 on the CPU is emulated, slower than float32."""
    try:
        flags = Path(cpuinfo).read_text().split()
    except OSError:  # not Linux
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def precision_for(device: torch.device) -> torch.dtype | None:
    """The autocast dtype `device` computes natively: bf16 on CUDA GPUs that have it (Ampere and
    newer) and on CPUs that have it (`cpu_computes_bf16`); fp16 on older CUDA cards (Turing, Volta),
    where bf16 is only emulated and slow (fp16 then needs a gradient scaler when training); None
    (float32) elsewhere (MPS, other CPUs)."""
    if device.type == "cpu":
        return torch.bfloat16 if cpu_computes_bf16() else None
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None = None):
    """Mixed precision: on CUDA with `dtype` (default: `precision_for(device)`); on the CPU only with
    a `dtype` given (training's choice: sampling on the CPU stays float32, as diffusers' is); else a no-op."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=dtype or precision_for(device))
    if device.type == "cpu" and dtype is not None:
        return torch.autocast("cpu", dtype=dtype)
    return contextlib.nullcontext()
