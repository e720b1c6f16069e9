"""How long one attention takes, forward and backward, with each of PyTorch's CPU kernels. Run by
hand, not a test:

    python -m benchmarks.attention_kernels --threads 1

Times `F.scaled_dot_product_attention` + backward for the shapes a minidiff training step meets
(batch 64, 4 heads): the text encoder's self-attention over 5 tokens (single-object captions) and
15 (two-object captions), and a UNet cross-attention of 4 positions over 15 tokens; each under
bf16 with the default kernel (the flash kernel on a CPU) and with the math kernel, and in float32.
The padding mask is a boolean (B, 1, 1, L), as minidiff's text encoder and UNet pass it. Median of
`--repeats` timed calls after 5 untimed ones.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .common import machine_line, set_threads

SHAPES = {  # name -> (query length, key length)
    "text self-attention, 5 tokens": (5, 5),
    "text self-attention, 15 tokens": (15, 15),
    "cross-attention, 4 positions x 15 tokens": (4, 15),
}


def time_attention(queries: int, keys: int, dtype: torch.dtype, backend: SDPBackend | None, repeats: int) -> float:
    """Median milliseconds of one forward + backward."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(64, 4, n, 32, generator=generator).to(dtype).requires_grad_()
               for n in (queries, keys, keys))
    keep = torch.rand(64, keys, generator=generator) > 0.3
    keep[:, 0] = True
    mask = keep[:, None, None, :]
    times = []
    with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
        for i in range(5 + repeats):
            start = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask).float().sum().backward()
            if i >= 5:
                times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    threads = set_threads(args.threads)
    print(machine_line(threads))
    print("| attention (batch 64, 4 heads of 32) | bf16, default kernel | bf16, math kernel | float32, default kernel |")
    print("|---|---:|---:|---:|")
    for name, (queries, keys) in SHAPES.items():
        cells = [time_attention(queries, keys, dtype, backend, args.repeats) for dtype, backend in
                 ((torch.bfloat16, None), (torch.bfloat16, SDPBackend.MATH), (torch.float32, None))]
        print(f"| {name} | " + " | ".join(f"{ms:.2f} ms" for ms in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
