"""How long the lesson is: the lines of every file at the top of minidiff/ (docstrings and blank
lines included), in reading order, and of the machinery around it.

    python -m minidiff.tools.lines            # a Markdown table, as the README shows it
"""

from __future__ import annotations

import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]
# the lesson in reading order, with what each file is in Stable Diffusion 3.5's terms
READING_ORDER = [
    ("scheduler.py", "DDPM: noise schedule, objective, DDPM and DDIM samplers"),
    ("flow.py", "rectified flow: objective, shift, Euler sampler (SD3.5's scheduler)"),
    ("text.py", "tokenizer and text encoder (SD3.5: CLIP-L, CLIP-G, T5)"),
    ("unet.py", "the denoising network (SD3.5: the MMDiT)"),
    ("model.py", "the components under one config; save and load"),
    ("training.py", "the loss, one training step, a short loop"),
    ("images.py", "pictures in and out"),
    ("runtime.py", "devices"),
    ("contract.py", "the calls every backend answers"),
    ("pipeline.py", "sample, img2img and inpaint through one sampling loop"),
]
NOT_COUNTED = ("mmdit.py", "autoencoder.py")  # components beside the UNet, each its own afternoon
LIMIT = 1400


def count(path: Path) -> int:
    return len(path.read_text().splitlines())


def lesson_files() -> list[Path]:
    """Every .py file at the top of minidiff/, the components beside the UNet aside."""
    return sorted(p for p in PACKAGE.glob("*.py") if p.name not in NOT_COUNTED)


def table() -> str:
    files = {p.name: count(p) for p in lesson_files()}
    described = dict(READING_ORDER)
    rows = [(name, files[name], described[name]) for name, _ in READING_ORDER if name in files]
    rows += [(name, n, "what `import minidiff` gives" if name == "__init__.py" else "the command's entry point")
             for name, n in files.items() if name not in described]
    tools = sum(count(p) for p in (PACKAGE / "tools").glob("*.py"))
    lines = ["| file | lines | what it is |", "| --- | ---: | --- |"]
    lines += [f"| `minidiff/{name}` | {n} | {what} |" for name, n, what in rows]
    lines.append(f"| **the lesson** | **{sum(files.values())}** | (at most {LIMIT:,}) |")
    lines += [f"| `minidiff/{name}` | {count(PACKAGE / name)} | beside the UNet, not counted above |"
              for name in NOT_COUNTED if (PACKAGE / name).exists()]
    lines.append(f"| `minidiff/tools/` | {tools} | the machinery: trainer, Shapes and data folders, app, evaluation, figures |")
    return "\n".join(lines)


def main() -> int:
    print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
