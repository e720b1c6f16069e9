"""What the benchmarks share: the diffusers baseline, one training step, alternating timing,
and the machine/report header every result carries.

The baseline is diffusers' `UNet2DConditionModel` configured like minidiff's UNet (same
levels, widths, attention levels, heads, norm groups, text width; the pooled caption added
to the time embedding through a linear layer, as minidiff does) and fed by minidiff's own
tokenizer and text encoder. `BaselineModel` is a `TextToImageModel` whose `.unet` is that
network behind an adapter with minidiff's call signature `unet(x_t, t, context, mask)`, so
`diffusion_loss`, `MiniDiffusionPipeline` and `minidiff.evaluate` run it unchanged.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from minidiff.tools.shapes import Shapes
from minidiff.model import TextToImageModel
from minidiff import training
from minidiff.tools.trainer import PRESETS
from minidiff.training import TrainConfig, make_optimizer
from minidiff.unet import UNetConfig, pool_text

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"  # committed: written only with --publish
SCRATCH = ROOT / "runs" / "benchmarks"  # everything else (runs/ is not committed)
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
BACKBONES = ("minidiff", "diffusers")


# ---- the diffusers baseline ------------------------------------------------------------
def diffusers_unet_kwargs(config: UNetConfig) -> dict:
    """UNet2DConditionModel arguments that mirror a minidiff `UNetConfig` block for block."""
    levels = range(len(config.channel_mults))
    return dict(
        sample_size=config.image_size, in_channels=config.in_channels, out_channels=config.in_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if i in config.attention_levels else "DownBlock2D" for i in levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if i in config.attention_levels else "UpBlock2D" for i in reversed(levels)),
        block_out_channels=tuple(config.base_channels * m for m in config.channel_mults),
        layers_per_block=config.num_res_blocks,
        cross_attention_dim=config.context_dim,
        attention_head_dim=config.num_heads,  # diffusers' legacy name: in this class it is the number of heads
        norm_num_groups=config.norm_groups,
        use_linear_projection=True,
        class_embed_type="simple_projection",  # Linear(pooled text) added to the time embedding, like minidiff
        projection_class_embeddings_input_dim=config.context_dim,
    )


class DiffusersUNet(nn.Module):
    """diffusers' UNet2DConditionModel with minidiff's UNet call:
    (B, 3, H, W), (B,), (B, L, D), (B, L) -> predicted noise (B, 3, H, W)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        from diffusers import UNet2DConditionModel

        self.config = config
        self.net = UNet2DConditionModel(**diffusers_unet_kwargs(config))

    def forward(self, x, timesteps, context, context_mask):
        return self.net(x, timesteps, encoder_hidden_states=context, encoder_attention_mask=context_mask,
                        class_labels=pool_text(context, context_mask).to(x.dtype), return_dict=False)[0]


class BaselineModel(TextToImageModel):
    """minidiff's tokenizer and text encoder with diffusers' UNet in place of minidiff's."""

    def __init__(self, config, autoencoder=None):
        super().__init__(config, autoencoder)
        self.unet = DiffusersUNet(config.backbone)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- building the models of a preset, and one training step ------------------------------
def preset_config(preset: str, **overrides) -> TrainConfig:
    """The TrainConfig that `train.py --preset <preset>` uses, with `overrides` (None values ignored)."""
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    return TrainConfig(**values)


def parse_variant(text: str, levers: dict[str, type] | None = None) -> tuple[str, dict, dict]:
    """"NAME:key=value,..." -> (NAME, TrainConfig changes typed like its fields (tuples written
    2/1), {key: value} for the keys of `levers`, typed by it). An unknown key exits with one line."""
    levers = levers or {}
    name, _, settings = text.partition(":")
    types = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}
    changes, chosen = {}, {}
    for item in filter(None, settings.split(",")):
        key, _, value = item.partition("=")
        if key in levers:
            chosen[key] = levers[key](value)
        elif key not in types:
            known = f"a TrainConfig field or one of {sorted(levers)}" if levers else "a TrainConfig field"
            raise SystemExit(f"error: --variant {text}: {key!r} is not {known}")
        elif types[key] == "bool":
            changes[key] = value.lower() in ("1", "true", "yes")
        elif "tuple" in types[key]:
            changes[key] = tuple(int(v) for v in value.split("/") if v)
        elif "int" in types[key]:
            changes[key] = int(value)
        elif "float" in types[key]:
            changes[key] = float(value)
        else:
            changes[key] = value
    return name, changes, chosen


def make_dataset(config: TrainConfig) -> Shapes:
    return Shapes(config.image_size, seed=config.seed, two_object_fraction=config.two_object_fraction)


def build_model(config: TrainConfig, backbone: str, device="cpu", autoencoder=None) -> TextToImageModel:
    """The model Trainer builds for `config` ("minidiff"; a latent one on `autoencoder`), or the same
    with diffusers' UNet ("diffusers"); the text encoder gets the same initial weights in both."""
    if backbone == "minidiff":
        return training.build_model(config, make_dataset(config).captions(), autoencoder).to(device)
    torch.manual_seed(config.seed)
    return BaselineModel.for_captions(make_dataset(config).captions(), config.backbone_config(), config.text_dim,
                                      config.scheduler_config(), text_clip_init=config.text_clip_init).to(device)


class TrainState(training.TrainState):
    """The lesson's TrainState (minidiff.training: the step `python train.py` takes) with the
    benchmarks' variants: `weight_decay` > 0 makes the optimizer AdamW, `lr_schedule="constant"`
    keeps the peak rate after the warm-up (diffusers' train_text_to_image.py recipe), and
    `optimizer_options` go to Adam (foreach / fused, for profile_step.py). The precision is the
    lesson's (`config.mixed_precision`). `train_step` returns the loss as a float."""

    def __init__(self, model: TextToImageModel, config: TrainConfig, device="cpu",
                 weight_decay: float = 0.0, lr_schedule: str = "cosine",
                 **optimizer_options):
        device = torch.device(device)
        optimizer = (torch.optim.Adam(model.parameters(), lr=config.lr, **optimizer_options) if optimizer_options
                     else make_optimizer(model, config.lr, device, torch.optim.AdamW, weight_decay=weight_decay)
                     if weight_decay > 0 else make_optimizer(model, config.lr, device))
        super().__init__(dataclasses.replace(config, device=str(device)), model=model, optimizer=optimizer)
        self.lr_schedule = lr_schedule

    def learning_rate(self) -> float:
        c = self.config
        if self.lr_schedule == "constant":
            return c.lr * min(1.0, (self.step + 1) / c.warmup_steps) if c.warmup_steps else c.lr
        return super().learning_rate()

    def train_step(self, images: torch.Tensor, captions: list[str]) -> float:
        per_sample, _ = super().train_step(images, captions)
        return per_sample.mean().item()


# ---- timing ----------------------------------------------------------------------------
def alternating_times(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                      prepare: dict[str, Callable[[], object]] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each function, `repeats` rounds, the order flipped every round
    (A B, B A, A B, ...) so that a slow drift of the machine's load hits both alike.
    `prepare[name]`, where given, runs untimed before every call of `fns[name]`."""
    prepare = prepare or {}
    for name, fn in fns.items():
        for _ in range(warmup):
            prepare.get(name, lambda: None)()
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            prepare.get(name, lambda: None)()
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of numerator[i] / denominator[i] (pairs taken in the same round)."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


# ---- machine, load and the report ------------------------------------------------------
def cpu_model() -> str:
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        if found:
            return found.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(threads: int | None = None) -> str:
    import diffusers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    threads = threads if threads is not None else torch.get_num_threads()
    return (f"{cpu_model()} ({os.cpu_count()} logical cores), {gpu}; torch {torch.__version__}, "
            f"diffusers {diffusers.__version__}, {threads} torch threads; Python {platform.python_version()}")


def load_average() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def set_threads(threads: int | None) -> int:
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


class Report:
    """The header of a result section: command, machine, date, load average (1/5/15 min) at
    start and end. A load average above the core count means other work shared the CPU.
    `level` 2 is a numbered section of BENCHMARKS.md of its own, 3 the runs under one."""

    def __init__(self, name: str, title: str, threads: int, module: str | None = None, level: int = 2):
        self.name, self.title, self.threads, self.level = name, title, threads, level
        module = module or name  # the script, when one script writes several named results
        self.command = "python -m benchmarks." + module + (" " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "")
        self.started = datetime.datetime.now().astimezone()
        self.load_start = load_average()

    def markdown(self, body: str) -> str:
        return "\n".join([
            f"{'#' * self.level} {self.title}",
            "",
            f"- command: `{self.command}`",
            f"- machine: {machine_line(self.threads)}",
            f"- date: {self.started:%Y-%m-%d %H:%M %Z}, took {(time.time() - self.started.timestamp()) / 60:.1f} min",
            f"- load average (1/5/15 min) at start {self.load_start}, at end {load_average()} "
            f"on {os.cpu_count()} cores",
            "",
            body.strip(),
            "",
        ])

    def write(self, body: str, data: dict, publish: bool = False) -> str:
        """Write <name>.md and .json into results_folder(publish) and, when publishing, replace
        this benchmark's section of BENCHMARKS.md."""
        folder = results_folder(publish)
        text = self.markdown(body)
        (folder / f"{self.name}.md").write_text(text)
        data = {"command": self.command, "machine": machine_line(self.threads), "date": self.started.isoformat(),
                "load_start": self.load_start, "load_end": load_average(), **data}
        (folder / f"{self.name}.json").write_text(json.dumps(data, indent=2) + "\n")
        if publish:
            replace_section(BENCHMARKS_MD, self.name, text)
        print(f"wrote {folder / self.name}.md, .json{' and BENCHMARKS.md' if publish else ''}", file=sys.stderr)
        return text


def add_publish_flag(parser) -> None:
    parser.add_argument("--publish", action="store_true",
                        help="write into benchmarks/results/ and BENCHMARKS.md, the committed results (default: "
                             "runs/benchmarks/, so that a quick check leaves them alone)")


def results_folder(publish: bool) -> Path:
    """Where a benchmark writes its results: the committed benchmarks/results/ only when asked to publish."""
    folder = RESULTS if publish else SCRATCH
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def replace_section(path: Path, name: str, text: str) -> None:
    """Put `text` between the markers <!-- begin NAME --> and <!-- end NAME --> of `path`,
    appending the markers if absent; the rest of the file is left as it is."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{begin}\n{text.strip()}\n{end}"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + block + rest.split(end, 1)[1]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    path.write_text(new)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
