"""The full trainer behind `python train.py`: the lesson's `TrainState.train_step` in a loop with
resumable checkpoints, Ctrl-C and SIGTERM, a time limit, torchrun, loss logs and sample grids.

Resuming is exact: a checkpoint holds the weights, the EMA, the optimizer moments, the generator
state and the step (the data position and learning rate follow from the step), so a run killed
at any moment and resumed ends with the same weights, bit for bit, as one that never stopped.

Data parallelism (train.py under torchrun) needs nothing from this module but a rank, a
world size, a `wrap` for the model (DDP) and a `sync_stop` that makes every rank act on
the same stop decision. Each rank reads its own slice of the global batch
(`batch_indices`), and every rank draws the randomness of the whole global batch from the
same generator and keeps its slice (`diffusion_loss`), so N processes with batch B train
like one process with batch N x B.

A latent run with `cache_latents` N encodes the first N pictures of its data once, after the autoencoder
is ready, as diffusers' SD3 scripts do with `--cache_latents` (`LatentCache`); the pool is a function of
the seed and the autoencoder, rebuilt the same on resume.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from . import cores
from .checkpoint import (AUTOENCODER_FOLDER, CheckpointError, atomic_write, load_autoencoder, read_json, read_safetensors,
                         save_autoencoder, save_model, write_json, write_safetensors)
from ..autoencoder import Autoencoder, AutoencoderConfig, DiagonalGaussian, fit_latent_factors, standardized, \
    train_autoencoder
from .shapes import Shapes
from ..model import TextToImageModel
from ..training import TrainConfig, TrainState, batch_indices, load_batch
from .datasets import load_dataset
from .pictures import make_grid
from .pipeline import MiniDiffusionPipeline

LOSS_BINS = 4  # the loss is also logged per quarter of the timestep range
TRAIN_STATE_FORMAT, TRAIN_STATE_VERSION = "minidiff-train-state", 1  # state.json of a resumable checkpoint
# what the ranks agree on after every forward pass (the largest code wins)
GO_ON, TIME_LIMIT, INTERRUPTED, NOT_FINITE, FAILED = 0, 1, 2, 3, 4

# A latent run's autoencoder, when trained first: benchmarks/autoencoder_quality.py's fastest recipe to 30 dB
AUTOENCODER_BATCH_SIZE, AUTOENCODER_LR, AUTOENCODER_FIT_PICTURES = 16, 3e-3, 1024
CACHE_LATENTS = 8192  # train.py --cache-latents without a number: pictures encoded once (LatentCache)

PRESETS = {  # train.py --preset: what each run changes of TrainConfig's defaults (BENCHMARKS.md measures them)
    "cpu": {},
    "gpu": dict(image_size=32, base_channels=64, steps=4000, batch_size=128, lr=1e-3, two_object_fraction=0.3,
                attention_levels=(2,), shift=1.0, warmup_steps=100),  # as BENCHMARKS.md section 2 measured it on an H200
}

# Settings a resumed run may change (`train.py --resume --steps 20000`); the others define the
# run (model, data, batch, seed, ...) and must stay what the checkpoint says. A longer --steps
# stretches the cosine learning-rate decay from the step where the run resumes.
RUN_SETTINGS = ("out", "steps", "lr", "device", "max_minutes", "sample_every", "checkpoint_every", "keep", "log_every",
                "compile", "data_root", "mixed_precision")


@torch.no_grad()
def sample_grid(model: TextToImageModel, prompts: list[str], seed: int = 0, steps: int = 25,
                per_prompt: int = 1) -> Image.Image:
    """`per_prompt` samples of each prompt, 6 to a row; labelled unless the prompt is empty."""

    pipe = MiniDiffusionPipeline(model, device=next(model.parameters()).device)
    out = pipe.sample(prompts, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                      num_images_per_prompt=per_prompt)
    labels = [short_label(p) for p in prompts for _ in range(per_prompt)]
    return make_grid(out.images, labels=labels if any(labels) else None, columns=6, scale=4)


def short_label(prompt: str, width: int = 28) -> str:
    prompt = prompt.removeprefix("a ")
    return prompt if len(prompt) <= width else prompt[: width - 3] + "..."


def latest_checkpoint(out) -> Path | None:
    """The newest complete checkpoint of the run in `out` (half-written ones are named .tmp-*)."""
    found = sorted((Path(out) / "checkpoints").glob("step-*"))
    return found[-1] if found else None


def read_train_state(checkpoint: Path) -> dict:
    """state.json of a resumable checkpoint, checked for format and version."""
    state = read_json(Path(checkpoint) / "state.json")
    if state.get("format") != TRAIN_STATE_FORMAT:
        raise CheckpointError(f"{checkpoint} is not a minidiff training checkpoint (its state.json has no "
                              f"\"format\": \"{TRAIN_STATE_FORMAT}\")")
    if state.get("format_version") != TRAIN_STATE_VERSION:
        raise CheckpointError(f"{checkpoint} was written by an incompatible minidiff (training state format "
                              f"{state.get('format_version')}, this version reads {TRAIN_STATE_VERSION}); "
                              f"start a new run or use the minidiff version that wrote it")
    if not isinstance(state.get("step"), int) or not isinstance(state.get("train_config"), dict):
        raise CheckpointError(f"{checkpoint / 'state.json'} has no step or train_config; the checkpoint is corrupt")
    return state


def train_config_from_dict(values: dict) -> TrainConfig:
    """The TrainConfig a checkpoint's state.json holds (JSON lists back to tuples)."""
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise ValueError(f"unknown training settings {', '.join(unknown)}")
    return TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def config_for_resume(checkpoint: Path, given: dict) -> tuple[TrainConfig, dict]:
    """The training config of a resumed run: the checkpoint's, with the settings in `given`
    (what the user asked for) applied where RUN_SETTINGS allows. Returns it and the changes,
    {name: (old, new)}. A request to change anything else is refused, so flags can never
    quietly train a different model than the checkpoint's."""
    state = read_train_state(checkpoint)
    try:
        config = train_config_from_dict(state["train_config"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{checkpoint / 'state.json'} holds an invalid train_config ({error})") from None
    changes = {}
    for name, value in given.items():
        old = getattr(config, name)
        if value is None or value == old:
            continue
        if name not in RUN_SETTINGS:
            raise ValueError(f"--{name.replace('_', '-')} {value} differs from the resumed run's {old}; a run keeps "
                             f"its model, data and batch: drop the flag, or start a new run with another --out")
        changes[name] = (old, value)
        setattr(config, name, value)
    if config.steps < state["step"]:
        raise ValueError(f"--steps {config.steps} is below the step the run has reached ({state['step']}); "
                         f"pass --steps {state['step']} or more")
    return config, changes


@contextlib.contextmanager
def stop_requests():
    """While training, Ctrl-C (SIGINT) and SIGTERM ask the loop to stop after the current
    step and save; a second Ctrl-C stops at once, without saving. Yields a list that gets
    the signal number. (Signals can only be caught on the main thread; elsewhere, no-op.)"""
    received: list[int] = []

    def handler(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)
        print("\nstopping after this step and saving (Ctrl-C again: quit without saving)", file=sys.stderr)

    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def train_run_autoencoder(config: TrainConfig, dataset) -> Autoencoder:
    """A latent run's autoencoder, trained on its data (the generator seeded with `config.seed`), its
    latent factors fitted on the first pictures."""
    cores.adjust()  # the thread count for the autoencoder's training (a command only)
    shape = AutoencoderConfig.with_down_factor(config.autoencoder_down_factor, image_size=config.image_size)
    autoencoder, _ = train_autoencoder(shape, dataset, config.autoencoder_steps, AUTOENCODER_BATCH_SIZE, AUTOENCODER_LR,
                                       generator=torch.Generator().manual_seed(config.seed))
    fit_latent_factors(autoencoder, torch.stack([dataset[i][0] for i in range(AUTOENCODER_FIT_PICTURES)]))
    return autoencoder


def prepare_autoencoder(config: TrainConfig, dataset, say=lambda text: None) -> Autoencoder | None:
    """The first phase of a latent run (None for a pixel run): the autoencoder already in
    `out`/autoencoder (a resumed run), else the folder `config.autoencoder` names, else one trained
    here on the run's data for `config.autoencoder_steps` steps and its latent factors fitted.
    It is written to `out`/autoencoder whole (a temporary folder renamed into place), before the
    diffusion phase starts: a run killed while training it has saved nothing, and starts it again."""
    if not config.latent:
        return None
    final = Path(config.out) / AUTOENCODER_FOLDER
    if final.is_dir():
        return load_autoencoder(final)
    if config.autoencoder is not None:
        autoencoder = load_autoencoder(config.autoencoder)
        say(f"autoencoder from {config.autoencoder}")
    else:
        say(f"training the autoencoder first: {config.autoencoder_steps} steps of {AUTOENCODER_BATCH_SIZE} "
            f"{config.image_size} px pictures")
        start = time.monotonic()
        autoencoder = train_run_autoencoder(config, dataset)
        say(f"autoencoder trained in {(time.monotonic() - start) / 60:.1f} min")
    tmp = final.with_name(f".tmp-{AUTOENCODER_FOLDER}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_autoencoder(tmp, autoencoder)
    tmp.rename(final)
    return autoencoder


class LatentCache:
    """diffusers' `--cache_latents` (train_dreambooth_lora_sd3.py: `latents_cache.append(vae.encode(pixels).latent_dist)`
    once, then `latents_cache[step].sample()` each step) for an endless dataset: q(z|x) of its first `size`
    pictures, kept as (mean, log-variance) stacked on the channels as the encoder outputs them, (N, 2C, h, w).
    Index i reads picture i mod `size`; `Trainer.encode` draws a fresh z from it at every step."""

    def __init__(self, vae: Autoencoder, load_batch, size: int, chunk: int = 256):
        moments, self.captions = [], []
        device = next(vae.parameters()).device
        with torch.no_grad():
            for start in range(0, size, chunk):
                images, captions = load_batch(range(start, min(size, start + chunk)))
                posterior = vae.encode(images.to(device)).latent_dist
                moments.append(torch.cat([posterior.mean, posterior.logvar], dim=1).cpu())
                self.captions += captions
        self.moments = torch.cat(moments)

    def batch(self, indices) -> tuple[torch.Tensor, list[str]]:
        """The cached q(z|x) of `indices` (B, 2C, h, w) and their captions."""
        positions = [i % len(self.captions) for i in indices]
        return self.moments[positions], [self.captions[i] for i in positions]


class Trainer(TrainState):
    """Trains a TextToImageModel on `dataset` (default: the one config.data names); a latent run
    (`config.latent`) on the latents of `autoencoder` (default: `prepare_autoencoder`'s).

    For data parallelism: `rank` and `world_size`, `wrap(model)` -> the module forward and
    backward run through (DDP), and `sync_stop(code)` -> the code every rank acts on (an
    all-reduce max); train.py builds them. Only rank 0 logs, samples and saves."""

    def __init__(self, config: TrainConfig, dataset=None, rank: int = 0, world_size: int = 1, wrap=None,
                 sync_stop=None, autoencoder: Autoencoder | None = None):
        self.rank, self.world_size = rank, world_size
        self.sync_stop = sync_stop or (lambda code: code)
        self.out = Path(config.out)
        self.dataset = dataset if dataset is not None else load_dataset(
            config.data, config.image_size, config.seed, config.data_root, config.two_object_fraction)
        if config.latent and autoencoder is None:  # the first phase of a latent run (train.py says so as it goes)
            autoencoder = prepare_autoencoder(config, self.dataset)
        super().__init__(config, self.dataset.captions(), autoencoder=autoencoder)
        self.latent_cache = None  # the pool's pictures are drawn by load_batch, like the run's
        if config.latent and config.cache_latents:
            self.latent_cache = LatentCache(self.model.vae, self.load_batch, config.cache_latents)
        # what forward/backward runs through: compiled and/or DDP-wrapped, same parameters
        if wrap is not None:
            self.train_model = wrap(self.model)
        if config.compile:
            self.train_model = torch.compile(self.train_model)
        self.loss_rows: list[dict] = []
        self.window = new_log_window()  # the loss since the last row of loss_rows (checkpointed too)

    # ---- checkpoints -------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoints"

    def save_checkpoint(self) -> Path:
        """Everything needed to continue bit for bit (weights, EMA, AdamW moments, generator
        state, step; the data position and learning rate follow from the step), in
        safetensors + JSON, written to a temporary folder and renamed into place, so a
        half-written checkpoint never counts. A step saved once is not written again: the
        state at a step is the same whenever it is reached."""
        final = self.checkpoint_dir / f"step-{self.step:08d}"
        if not final.is_dir():
            for stale in self.checkpoint_dir.glob(".tmp-step-*"):  # left by a run killed while saving
                shutil.rmtree(stale, ignore_errors=True)
            tmp = self.checkpoint_dir / f".tmp-step-{self.step:08d}"
            write_safetensors(tmp / "model.safetensors", self.model.state_dict())
            write_safetensors(tmp / "ema.safetensors", self.ema.shadow)
            write_safetensors(tmp / "optimizer.safetensors", optimizer_tensors(self.optimizer))
            write_safetensors(tmp / "rng.safetensors", {"generator": self.generator.get_state()})
            write_json(tmp / "state.json", {
                "format": TRAIN_STATE_FORMAT, "format_version": TRAIN_STATE_VERSION, "step": self.step,
                "train_config": dataclasses.asdict(self.config), "loss_rows": self.loss_rows,
                "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "log_window": {**self.window, "bins": self.window["bins"].tolist()}})
            tmp.rename(final)
        for old in sorted(self.checkpoint_dir.glob("step-*"))[: -self.config.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load_checkpoint(self, path: Path) -> None:
        """Read a whole checkpoint first, then change the trainer: a bad file changes nothing."""
        path = Path(path)
        state = read_train_state(path)
        model = read_safetensors(path / "model.safetensors")
        ema = read_safetensors(path / "ema.safetensors")
        optimizer = read_safetensors(path / "optimizer.safetensors")
        rng = read_safetensors(path / "rng.safetensors")
        try:
            self.model.load_state_dict(model)
            # empty_like keeps each tensor's memory format (channels_last): the same kernels as before the stop
            self.ema.shadow = {k: torch.empty_like(v).copy_(ema[k]) for k, v in self.ema.shadow.items()}
            load_optimizer_tensors(self.optimizer, optimizer)
            self.generator.set_state(rng["generator"])
        except (KeyError, RuntimeError, ValueError) as error:
            reason = " ".join(str(error).split())[:200]
            raise CheckpointError(f"{path} does not fit this run's model ({reason}); the checkpoint is partial, "
                                  f"corrupt or from another run, or the data's captions changed since") from None
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        self.step = state["step"]
        self.loss_rows = state.get("loss_rows", [])
        window = state.get("log_window")
        if window:
            self.window = {**window, "bins": torch.tensor(window["bins"])}

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.out)

    def save_pipeline(self) -> None:
        """The EMA weights as a sampling checkpoint: `out`/config.json + model.safetensors."""
        save_model(self.out, self.model, self.ema.shadow, trained_steps=self.step)

    def save(self) -> None:
        """A resumable checkpoint and the sampling model, together: `model.safetensors` never lags
        behind the checkpoints (sample.py and evaluate read it)."""
        self.save_checkpoint()
        self.save_pipeline()

    def periodic_reports(self) -> None:
        c = self.config
        if c.sample_every and self.step % c.sample_every == 0:
            self.write_samples(f"step-{self.step:08d}")
        if c.checkpoint_every and self.step % c.checkpoint_every == 0:
            self.save()

    def final_reports(self) -> None:
        self.save()
        self.write_samples("final")
        self.write_loss_log()

    def on_main_rank(self, work) -> None:
        """Run `work` on rank 0 (writing samples and checkpoints). Under DDP every rank then
        learns whether it failed, so that an error on rank 0 stops all ranks at once instead of
        leaving them waiting in the next all-reduce until a timeout."""
        error = None
        if self.rank == 0:
            try:
                work()
            except BaseException as caught:  # KeyboardInterrupt too: the other ranks must not wait
                error = caught
        if self.world_size > 1 and self.sync_stop(FAILED if error is not None else GO_ON) == FAILED and error is None:
            raise RuntimeError("rank 0 failed while saving or sampling; see its error")
        if error is not None:
            raise error

    # ---- the loop ----------------------------------------------------------------------
    def load_batch(self, indices) -> tuple[torch.Tensor, list[str]]:
        """The pictures and captions of `indices` (with a latent cache: their cached q(z|x)): Shapes drawn
        a batch at once in torch with `renderer="torch"` (the same scenes and captions as PIL's, not the
        same pixels), else one by one."""
        if self.latent_cache is not None:
            return self.latent_cache.batch(indices)
        if self.config.renderer == "torch" and isinstance(self.dataset, Shapes):
            return self.dataset.batch(indices, renderer="torch")
        return load_batch(self.dataset, indices)

    def encode(self, images: torch.Tensor, shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
        """x_0 of this step (TrainState.encode); with a latent cache `images` is this rank's cached q(z|x)
        and z = mean + std * eps (DiagonalGaussian.sample), eps drawn for the whole global batch from the
        run's generator and sliced, as diffusion_loss draws its noise."""
        if self.latent_cache is None:
            return super().encode(images, shard)
        (rank, world_size), b = shard, images.shape[0]
        posterior = DiagonalGaussian(images)
        noise = torch.randn((world_size * b, *posterior.mean.shape[1:]), generator=self.generator)
        return standardized(self.model.vae, posterior.mean + posterior.std * noise[rank * b:(rank + 1) * b])

    def stop_code(self, loss: torch.Tensor, signals: list, start_time: float) -> int:
        """This rank's view: should training stop now? (Rank 0 alone keeps the clock.)"""
        if not torch.isfinite(loss):
            return NOT_FINITE
        if signals:
            return INTERRUPTED
        minutes = self.config.max_minutes
        if self.rank == 0 and minutes is not None and time.monotonic() - start_time > 60 * minutes:
            return TIME_LIMIT
        return GO_ON

    def train(self) -> dict:
        c = self.config
        is_main = self.rank == 0
        start_time = time.monotonic()
        self.throughput = [0, time.monotonic()]  # images and start time of the log window (not checkpointed)
        stop_reason = "done"
        with stop_requests() as signals:
            with tqdm(total=c.steps, initial=self.step, disable=not is_main, unit="step", dynamic_ncols=True) as bar:
                while self.step < c.steps:
                    # the random state before this step: a stop below throws the step away, and the
                    # checkpoint must then hold the state that draws this step's numbers again
                    rng_at_step = self.generator.get_state()
                    cores.adjust()  # fewer threads while other programs keep cores busy (commands only)
                    images, captions = self.load_batch(batch_indices(self.step, c.batch_size, self.rank,
                                                                     self.world_size))
                    stops = []

                    def should_stop(loss):  # every rank acts on the same decision: all stop after the same step
                        stops.append(self.sync_stop(self.stop_code(loss, signals, start_time)))
                        if stops[0] == NOT_FINITE:  # nothing of this step is applied; the checkpoints stay
                            value = loss.item() if not torch.isfinite(loss) else "non-finite on another rank"
                            raise FloatingPointError(f"loss became {value} at step {self.step + 1}")
                        return stops[0] != GO_ON

                    done = self.train_step(images, captions, shard=(self.rank, self.world_size),
                                           should_stop=should_stop)
                    if done is None:
                        self.generator.set_state(rng_at_step)  # the step is not applied: undo its draws
                        stop_reason = "interrupted" if stops[0] == INTERRUPTED else f"time limit of {c.max_minutes} min"
                        break
                    if is_main:
                        per_sample, t = done
                        self.record_loss(per_sample.detach(), t, self.lr, images.shape[0] * self.world_size, bar)
                    if (c.sample_every and self.step % c.sample_every == 0) or (
                            c.checkpoint_every and self.step % c.checkpoint_every == 0):
                        self.on_main_rank(self.periodic_reports)
            if is_main:  # still inside stop_requests: a first Ctrl-C now waits for the save
                print(f"saving the model and sample grid (step {self.step})", file=sys.stderr)
            self.on_main_rank(self.final_reports)
        return {"step": self.step, "stop_reason": stop_reason, "seconds": time.monotonic() - start_time}

    def record_loss(self, per_sample: torch.Tensor, t: torch.Tensor, lr: float, images: int, bar) -> None:
        """Add a step to the log window; every log_every steps, close it into a loss_rows row
        (mean loss, learning rate, images/s, and the loss per timestep bin).
        The loss logged is rank 0's share of the global batch."""
        w, c = self.window, self.config
        per_sample = per_sample.float().cpu()
        b = (t * LOSS_BINS // self.objective.num_train_timesteps).long().clamp(max=LOSS_BINS - 1)
        w["bins"][0].index_add_(0, b, per_sample)
        w["bins"][1].index_add_(0, b, torch.ones_like(per_sample))
        w["loss"] += per_sample.mean().item()
        w["steps"] += 1
        self.throughput[0] += images
        bar.update(1)
        if self.step % c.log_every == 0 or self.step == c.steps:
            elapsed = time.monotonic() - self.throughput[1]
            row = {"step": self.step, "loss": w["loss"] / w["steps"], "lr": lr,
                   "images_per_s": self.throughput[0] / max(elapsed, 1e-9)}
            row.update({f"loss_t{i}": (w["bins"][0, i] / w["bins"][1, i].clamp(min=1)).item() for i in range(LOSS_BINS)})
            self.loss_rows.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.0f}")
            self.window = new_log_window()
            self.throughput = [0, time.monotonic()]

    # ---- reports -----------------------------------------------------------------------
    def write_samples(self, name: str) -> None:
        """Shapes: one image for each of its 18 captions (minidiff.evaluate scores them).
        Other data: a row of 6 per caption (the most frequent ones), or 12 unconditional
        samples; for data we cannot score, this grid is the report."""
        prompts = sample_prompts(self.dataset)
        per_prompt = 1 if isinstance(self.dataset, Shapes) else 12 if prompts == [""] else 6
        grid = sample_grid(self.ema_model(), prompts, seed=self.config.seed, per_prompt=per_prompt)
        atomic_write(self.out / "samples" / f"{name}.png", lambda tmp: grid.save(tmp, format="PNG"))

    def write_loss_log(self) -> None:
        if not self.loss_rows:
            return
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(self.loss_rows[0]))
        writer.writeheader()
        writer.writerows(self.loss_rows)
        atomic_write(self.out / "loss.csv", lambda tmp: Path(tmp).write_text(text.getvalue()))
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [r["step"] for r in self.loss_rows]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(steps, [r["loss"] for r in self.loss_rows], label="all t", color="black")
        for i in range(LOSS_BINS):
            lo, hi = i * self.objective.num_train_timesteps // LOSS_BINS, (i + 1) * self.objective.num_train_timesteps // LOSS_BINS
            ax.plot(steps, [r[f"loss_t{i}"] for r in self.loss_rows], label=f"t in [{lo}, {hi})", alpha=0.6)
        target = "noise" if self.model.config.objective == "ddpm" else "velocity"
        ax.set(xlabel="step", ylabel=f"MSE on the {target}", yscale="log", title="training loss")
        ax.legend()
        fig.tight_layout()
        atomic_write(self.out / "loss.png", lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
        plt.close(fig)


def new_log_window() -> dict:
    """Sums of the loss since the last log row: overall, and per timestep bin (sum, count)."""
    return {"loss": 0.0, "steps": 0, "bins": torch.zeros(2, LOSS_BINS)}


def sample_prompts(dataset) -> list[str]:
    """What the sample grids show: the data set's choice, else its first distinct captions."""
    if hasattr(dataset, "sample_prompts"):
        return dataset.sample_prompts()
    return sorted(set(dataset.captions()))[:10]


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW state as flat named tensors ("<param index>.<name>"), for safetensors."""
    flat = {}
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            flat[f"{index}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return flat


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, flat: dict[str, torch.Tensor]) -> None:
    state_dict = optimizer.state_dict()
    state: dict[int, dict] = {}
    for key, value in flat.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    state_dict["state"] = state
    optimizer.load_state_dict(state_dict)
    # the moments in each parameter's memory format (channels_last), as they were before saving:
    # fused kernels may round differently on another layout, and resume must be bit for bit
    for group in optimizer.param_groups:
        for param in group["params"]:
            for name, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value) and value.shape == param.shape:
                    optimizer.state[param][name] = torch.empty_like(param).copy_(value)
