"""How long the lesson is: the lines of every file at the top of minidiff/ (docstrings and blank
lines included), in reading order, and of the machinery around it. The lesson's files import only
each other and third-party libraries; the entry points at the top of minidiff/ (`import minidiff`
and the `python -m minidiff.*` commands) reach into the machinery, and are counted too.

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
    ("model.py", "the components under one config"),
    ("training.py", "the loss, one training step, a short loop"),
    ("runtime.py", "devices and mixed precision"),
    ("pipeline.py", "text to image, img2img and inpainting through one sampling loop, on tensors"),
]
NOT_COUNTED = ("mmdit.py", "autoencoder.py")  # components beside the UNet, each its own afternoon
ENTRY_POINTS = {  # counted, but they import minidiff.tools: outside the lesson's import rule
    "__init__.py": "what `import minidiff` gives: the lesson's TrainConfig and train, the tools' pipeline",
    "evaluate.py": "`python -m minidiff.evaluate`: runs minidiff/tools/evaluate.py",
    "figures.py": "`python -m minidiff.figures`: runs minidiff/tools/figures.py",
}
LIMIT = 1400


def count(path: Path) -> int:
    return len(path.read_text().splitlines())


def lesson_files() -> list[Path]:
    """Every .py file at the top of minidiff/, the components beside the UNet and the entry points aside."""
    return sorted(p for p in PACKAGE.glob("*.py") if p.name not in NOT_COUNTED and p.name not in ENTRY_POINTS)


def table() -> str:
    files = {p.name: count(p) for p in lesson_files()}
    described = dict(READING_ORDER)
    rows = [(name, files[name], described[name]) for name, _ in READING_ORDER if name in files]
    rows += [(name, n, "not in the reading order") for name, n in files.items() if name not in described]
    tools = sum(count(p) for p in (PACKAGE / "tools").glob("*.py"))
    lines = ["| file | lines | what it is |", "| --- | ---: | --- |"]
    lines += [f"| `minidiff/{name}` | {n} | {what} |" for name, n, what in rows]
    entry = {name: count(PACKAGE / name) for name in ENTRY_POINTS if (PACKAGE / name).exists()}
    lines += [f"| `minidiff/{name}` | {n} | {ENTRY_POINTS[name]} |" for name, n in entry.items()]
    total = sum(files.values()) + sum(entry.values())
    lines.append(f"| **the lesson** | **{total}** | minidiff/'s top level, the entry points included (at most {LIMIT:,}) |")
    lines += [f"| `minidiff/{name}` | {count(PACKAGE / name)} | beside the UNet, not counted above |"
              for name in NOT_COUNTED if (PACKAGE / name).exists()]
    lines.append(f"| `minidiff/tools/` | {tools} | the machinery: the user-facing pipeline and its contract, trainer, "
                 f"checkpoints, data, app, evaluation, figures |")
    return "\n".join(lines)


def main() -> int:
    print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
